"""The one training loop, shared by train.py (MDLM / AR) and distill.py (SDTT / TCS).

It is a function, not a class: the scripts build the model, the loss and the evaluation, and hand
them here. The loop does AdamW with warm-up, gradient accumulation, clipping, EMA, periodic eval on
fixed held-out windows, tqdm progress, atomic checkpoints and exact resume (optimizer, EMA, data
order and every RNG state are in the checkpoint).
"""
import math
import time

import torch
from tqdm import tqdm

from .common import EMA, save_checkpoint
from .data import get_batch


def add_run_args(p):
    """Flags shared by every training script (one vocabulary across train.py and distill.py)."""
    p.add_argument("--data", default="stdlib", help="stdlib (offline default), shakespeare, or a text file/folder")
    p.add_argument("--tokenizer", default="bytes", help="bytes (default, 257 ids) or gpt2 (tiktoken)")
    p.add_argument("--out_dir", default="out", help="where ckpt.pt is written")
    p.add_argument("--max_iters", type=int, default=2000, help="optimizer steps in total")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per training window (default: the model's)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min_lr", type=float, default=0.0, help="final learning rate of the cosine schedule")
    p.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"],
                   help="after warm-up: constant (MDLM/SDTT) or cosine decay to --min_lr")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay on matrices (MDLM: 0)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights used for eval/sampling (0 = off)")
    p.add_argument("--eval_interval", type=int, default=250, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval_tokens", type=int, default=32768, help="held-out tokens for the periodic eval")
    p.add_argument("--eval_draws", type=int, default=2, help="t draws per held-out window for the MDLM bound")
    p.add_argument("--ckpt_interval", type=int, default=500, help="write OUT_DIR/ckpt.pt every N steps (and at the end)")
    p.add_argument("--log_interval", type=int, default=10, help="refresh the progress bar every N steps (one host sync)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (autocast dtype; auto = bf16 on CUDA)")
    p.add_argument("--compile", default="auto", help="auto|true|false (auto = on for CUDA)")
    p.add_argument("--seed", type=int, default=1337, help="seed for init, data order and noise")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt exactly where it stopped")


def make_optimizer(model, lr, weight_decay, device):
    """AdamW (betas 0.9/0.999 as MDLM); decay only matrices; fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=(device == "cuda"))


def lr_at(it, args):
    if it < args.warmup:
        return args.lr * (it + 1) / args.warmup
    if args.lr_schedule == "constant":
        return args.lr
    progress = min(1.0, (it - args.warmup) / max(1, args.max_iters - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def rng_state(gens):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **{name: g.get_state() for name, g in gens.items()}}


def set_rng_state(state, gens):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in gens.items():
        g.set_state(state[name])


def train(model, loss_fn, evaluate, args, run, ckpt_meta, resume=None, hooks=()):
    """Run the optimisation.

    model: the raw (uncompiled) nn.Module being trained, on run["device"].
    loss_fn(fwd, x, gen) -> (loss, logs): fwd is the (maybe compiled) model; logs a dict of scalar tensors.
    evaluate(model) -> dict of floats (called on the EMA model if any, else the raw one).
    run: {"device", "autocast", "compile", "data_dir", "window"} (window = tokens per batch row).
    ckpt_meta: what makes the checkpoint self-describing (config, kind, tokenizer, mask_id, args, ...);
    it is read at every save, so a hook may update it (SDTT records the current sample_steps).
    resume: a loaded checkpoint to continue from. hooks: callables h(it, state) run after each step
    (state: model, ema, opt, checkpoint(path=None, **override)); a hook may return a dict merged into
    every later checkpoint's "extra" (e.g. SDTT's round and teacher weights).
    Returns the summary dict for the JSON last line.
    """
    device = run["device"]
    fwd = torch.compile(model) if run["compile"] else model
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    gens = {"data": torch.Generator().manual_seed(args.seed),  # CPU: same batches on any device
            "noise": torch.Generator(device=device).manual_seed(args.seed + 1)}
    it, history, extra = 0, [], {}
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if ema is not None and resume.get("ema"):
            ema.load_state_dict(resume["ema"])
        set_rng_state(resume["rng"], gens)
        it, history, extra = resume["iter"], resume.get("history", []), resume.get("extra", {})
        print(f"resumed from iter {it}")

    def checkpoint(path=None, **override):
        """Write the full state to OUT_DIR/ckpt.pt, or to `path` with some top-level keys overridden
        (SDTT's per-round files: their own sample_steps, no optimizer)."""
        save_checkpoint({**ckpt_meta, "model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                         "optimizer": opt.state_dict(), "iter": it, "rng": rng_state(gens), "history": history,
                         "extra": extra, **override}, path or f"{args.out_dir}/ckpt.pt")

    def do_eval():
        t0 = time.time()
        metrics = evaluate(ema.model if ema else model)
        history.append({"iter": it, **metrics})
        tqdm.write(f"iter {it}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({time.time() - t0:.1f}s)")
        return metrics

    model.train()
    tokens_per_step = args.batch_size * args.grad_accum * run["window"]
    bar = tqdm(total=args.max_iters, initial=it, desc="train", dynamic_ncols=True)
    train_loss, t_start, it_start, metrics, eval_seconds = float("nan"), time.time(), it, {}, 0.0
    while it < args.max_iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args)
        loss_sum = torch.zeros((), device=device)
        for _ in range(args.grad_accum):
            x = get_batch(run["data_dir"], "train", args.batch_size, run["window"], gens["data"], device)
            with run["autocast"]():
                loss, logs = loss_fn(fwd, x, gens["noise"])
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        it += 1
        for hook in hooks:
            extra.update(hook(it, {"model": model, "ema": ema, "opt": opt, "checkpoint": checkpoint}) or {})
        if it % args.log_interval == 0 or it == args.max_iters:
            train_loss = loss_sum.item()  # the one host sync, every log_interval steps
            tok_s = (it - it_start) * tokens_per_step / (time.time() - t_start - eval_seconds)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr_at(it - 1, args):.2e}", tok_s=f"{tok_s:.0f}",
                            **{k: f"{v.item():.4f}" for k, v in logs.items()})
        bar.update(1)
        if it % args.eval_interval == 0 or it == args.max_iters:
            model.eval()
            t0 = time.time()
            metrics = do_eval()
            eval_seconds += time.time() - t0
            model.train()
        if it % args.ckpt_interval == 0 or it == args.max_iters:
            checkpoint()
    bar.close()
    elapsed = time.time() - t_start - eval_seconds  # training time only
    if not metrics and history:
        metrics = {k: v for k, v in history[-1].items() if k != "iter"}
    return {"iter": it, "train_loss": train_loss, **metrics,
            "tokens_per_sec": (it - it_start) * tokens_per_step / max(elapsed, 1e-9),
            "train_seconds": elapsed, "eval_seconds": eval_seconds, "out_dir": args.out_dir}
