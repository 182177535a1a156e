"""The one training loop, shared by train.py (MDLM / AR) and distill.py (SDTT / TCS).

It is a function, not a class: the scripts build the model, the loss and the evaluation, and hand
them here. The loop does AdamW with warm-up, gradient accumulation, clipping, EMA, periodic eval on
fixed held-out windows, tqdm progress, atomic checkpoints and exact resume (optimizer, EMA, data
order and every RNG state are in the checkpoint).

Multi-GPU (launched by torchrun; tinydiff/dist.py): the model is wrapped in DDP, every rank draws the
same global batch (batch_size x world rows) and keeps its rows rank, rank + world, ...; t and the
masks are drawn for the global batch too (diffusion.data_parallel_noise). Each rank's loss is a mean
over its rows and DDP averages the gradients, so a step equals one process with batch_size x world.
Gradients are synchronised on the last micro-batch only (no_sync before). Rank 0 alone logs,
evaluates and writes checkpoints.

Preemption: SIGTERM makes the loop finish the current step, write OUT_DIR/ckpt.pt and exit with
status 143 (128 + SIGTERM: the run is not complete; the same command plus --resume continues it
exactly). --ckpt_minutes N also writes ckpt.pt every N minutes.
"""
import contextlib
import math
import signal
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import dist
from .common import EMA, save_checkpoint
from .data import get_batch
from .diffusion import data_parallel_noise

PREEMPTED = 143  # exit status after SIGTERM (128 + 15, as if killed by it): checkpoint written, run incomplete


def add_run_args(p):
    """Flags shared by every training script (one vocabulary across train.py and distill.py)."""
    p.add_argument("--data", default="stdlib", help="stdlib (offline default), shakespeare, or a text file/folder")
    p.add_argument("--tokenizer", default="bytes",
                   help="bytes (257 ids), gpt2 (tiktoken) or bpe (learned from the training split, --vocab_size ids)")
    p.add_argument("--out_dir", default="out", help="where ckpt.pt is written")
    p.add_argument("--max_iters", type=int, default=2000, help="optimizer steps in total")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch (per process under torchrun)")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)")
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
    p.add_argument("--ckpt_minutes", type=float, default=0,
                   help="also write OUT_DIR/ckpt.pt every N minutes (0 = off); SIGTERM always writes one before exit")
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
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):  # saved on a machine with more GPUs
            torch.cuda.set_rng_state(s, i)
    for name, g in gens.items():
        g.set_state(state[name])


def train(model, loss_fn, evaluate, args, run, ckpt_meta, resume=None, hooks=()):
    """Run the optimisation.

    model: the raw (uncompiled) nn.Module being trained, on run["device"].
    loss_fn(fwd, x, gen) -> (loss, logs): fwd is the (maybe compiled, maybe DDP) model; logs a dict of scalar
    tensors; the loss is a mean over the rows of x (what DDP's gradient averaging assumes).
    evaluate(model) -> dict of floats (called on the EMA model if any, else the raw one; rank 0 only).
    run: {"device", "autocast", "compile", "data_dir", "window"} (window = tokens per batch row), and
    optionally "get_batch" (same signature as data.get_batch) to draw training batches another way.
    ckpt_meta: what makes the checkpoint self-describing (config, kind, tokenizer, mask_id, args, ...);
    it is read at every save, so a hook may update it (SDTT records the current sample_steps).
    resume: a loaded checkpoint to continue from. hooks: callables h(it, state) run after each step on
    every rank (state: model, ema, opt, checkpoint(path=None, **override)); a hook may return a dict
    merged into every later checkpoint's "extra" (e.g. SDTT's round and teacher weights).
    Returns the summary dict for the JSON last line.
    """
    device = run["device"]
    rank, world = dist.rank_world()
    ddp, rank0 = dist.active(), rank == 0
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
        if resume.get("world_size", 1) != world:
            print(f"note: ckpt.pt was written by {resume.get('world_size', 1)} process(es), this run has {world}: "
                  f"the global batch changes unless --batch_size or --grad_accum make up for it")
    # DDP: the data and noise generators above stay identical on every rank (they draw for the global batch);
    # the per-rank randomness (dropout, a loss's other draws) comes from torch's RNG and rank_gen, seeded
    # from (seed, step, rank) at each step: different on every rank, exact on resume with no state to save.
    net = DDP(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None) if ddp else model
    fwd = torch.compile(net) if run["compile"] else net
    rank_gen = torch.Generator(device=device) if ddp else None
    batch_fn = run.get("get_batch", get_batch)
    last_save = time.time()

    def checkpoint(path=None, **override):
        """Write the full state to OUT_DIR/ckpt.pt, or to `path` with some top-level keys overridden
        (SDTT's per-round files: their own sample_steps, no optimizer). Rank 0 only (no collective)."""
        nonlocal last_save
        if not rank0:
            return
        save_checkpoint({**ckpt_meta, "model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                         "optimizer": opt.state_dict(), "iter": it, "rng": rng_state(gens), "history": history,
                         "extra": extra, "world_size": world, **override}, path or f"{args.out_dir}/ckpt.pt")
        if path is None:
            last_save = time.time()  # --ckpt_minutes counts from the last ckpt.pt

    preempted = []  # SIGTERM (preemption) only sets this flag; the loop stops at the end of the step
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(signum))
    model.train()
    tokens_per_step = args.batch_size * world * args.grad_accum * run["window"]
    print(f"global batch: {args.batch_size} x {args.grad_accum} (accumulation) x {world} (processes) = "
          f"{args.batch_size * args.grad_accum * world} sequences, {tokens_per_step} tokens per step")
    bar = tqdm(total=args.max_iters, initial=it, desc="train", dynamic_ncols=True, disable=not rank0)
    train_loss, t_start, it_start, eval_seconds = float("nan"), time.time(), it, 0.0
    while it < args.max_iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args)
        if ddp:
            step_seed = args.seed + 1_000_003 * (it * world + rank + 1)
            torch.manual_seed(step_seed)
            rank_gen.manual_seed(step_seed)
        logged = None  # (1 + len(logs),): the loss and the loss_fn's logs, averaged over micro-batches
        for micro in range(args.grad_accum):
            # the global batch (batch_size x world rows, the same on every rank); this rank keeps its rows,
            # cut on the CPU so only they are copied to the device
            x = batch_fn(run["data_dir"], "train", args.batch_size * world, run["window"], gens["data"],
                         "cpu" if ddp else device)[rank::world].to(device)  # (batch_size, window)
            sync = contextlib.nullcontext() if not ddp or micro == args.grad_accum - 1 else net.no_sync()
            noise = data_parallel_noise(gens["noise"], rank, world) if ddp else contextlib.nullcontext()
            with sync:  # DDP all-reduces the gradients in the backward of the last micro-batch only
                with run["autocast"](), noise:
                    loss, logs = loss_fn(fwd, x, rank_gen if ddp else gens["noise"])
                (loss / args.grad_accum).backward()
            micro_logs = torch.stack([loss.detach(), *logs.values()]) / args.grad_accum  # (1 + len(logs),)
            logged = micro_logs if logged is None else logged + micro_logs
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        it += 1
        for hook in hooks:
            extra.update(hook(it, {"model": model, "ema": ema, "opt": opt, "checkpoint": checkpoint}) or {})
        stop = dist.agree(bool(preempted))  # every rank stops after the same step (a CPU all-reduce)
        if it % args.log_interval == 0 or it == args.max_iters:
            train_loss, *values = dist.mean(logged).tolist()  # the one host sync, every log_interval steps
            tok_s = (it - it_start) * tokens_per_step / (time.time() - t_start - eval_seconds)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", tok_s=f"{tok_s:.0f}",
                            **{k: f"{v:.4f}" for k, v in zip(logs, values)})
        bar.update(1)
        if rank0 and (it % args.eval_interval == 0 or it == args.max_iters):
            model.eval()
            t0 = time.time()
            metrics = evaluate(ema.model if ema else model)
            history.append({"iter": it, **metrics})
            seconds = time.time() - t0
            eval_seconds += seconds
            tqdm.write(f"iter {it}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({seconds:.1f}s)")
            model.train()
        due = args.ckpt_minutes > 0 and time.time() - last_save >= 60 * args.ckpt_minutes
        if it % args.ckpt_interval == 0 or it == args.max_iters or stop or due:
            checkpoint()
        if stop and it < args.max_iters:
            bar.close()
            dist.barrier()  # rank 0 has written ckpt.pt
            if rank0:
                print(f"SIGTERM: stopped after iter {it}/{args.max_iters} and wrote {args.out_dir}/ckpt.pt; continue "
                      f"with the same command plus --resume (exit status {PREEMPTED})", file=sys.stderr, flush=True)
            sys.exit(PREEMPTED)
    bar.close()
    signal.signal(signal.SIGTERM, previous_handler)
    dist.barrier()  # the final ckpt.pt is on disk before any rank reads it
    elapsed = time.time() - t_start - eval_seconds  # training time only
    metrics = {k: v for k, v in history[-1].items() if k != "iter"} if history else {}
    return {"iter": it, "train_loss": train_loss, **metrics,
            "tokens_per_sec": (it - it_start) * tokens_per_step / max(elapsed, 1e-9),
            "train_seconds": elapsed, "eval_seconds": eval_seconds, "out_dir": args.out_dir}
