"""The one training loop, shared by train.py (MDLM / AR) and distill.py (SDTT / TCS).

It is a function, not a class: the scripts build the model, the loss, the evaluation, the batches
and the checkpoint's description, and hand them here as arguments. The loop does AdamW with warm-up, gradient accumulation, clipping, EMA, periodic eval on
fixed held-out windows, tqdm progress, atomic checkpoints and exact resume (optimizer, EMA, data
order and every RNG state are in the checkpoint).

Multi-GPU (launched by torchrun; tinydiff/dist.py): the model is wrapped in DDP, every rank draws the
same global batch (batch_size x world rows) and keeps its rows rank, rank + world, ...; t and the
masks are drawn for the global batch too (Noise: the loss passes rank and world to
diffusion.sample_times/forward_mask). Each rank's loss is a mean over its rows and DDP averages the
gradients, so a step equals one process with batch_size x world.
Gradients are synchronised on the last micro-batch only (no_sync before). Rank 0 alone logs,
evaluates and writes checkpoints.

Preemption: SIGTERM makes the loop finish the current step, write OUT_DIR/ckpt.pt and exit with
status 143 (128 + SIGTERM: the run is not complete; the same command plus --resume continues it
exactly). Ctrl-C (SIGINT) does the same with status 130; a second Ctrl-C aborts at once (the last
checkpoint stays intact). --ckpt_minutes N also writes ckpt.pt every N minutes. A save that fails
(disk full, permissions) stops the run with one `error:` line naming the checkpoint that is intact.

Resume (--resume): the run continues as it was started. Every flag takes the checkpoint's value;
a flag given on the command line must equal it, except the ones in RESUMABLE (resume_args).
"""
import argparse
import contextlib
import copy
import math
import signal
import sys
import time
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import dist
from .common import UserError, save_checkpoint, write_error
from .data import FRAMINGS
from .model import DROPOUT_SITES
from .lab import canonical_source
from .sampling import sampler_flags

PREEMPTED = 143  # exit status after SIGTERM (128 + 15, as if killed by it): checkpoint written, run incomplete
INTERRUPTED = 130  # after Ctrl-C (128 + SIGINT), likewise
STOP_SIGNALS = {signal.SIGTERM: ("SIGTERM", PREEMPTED), signal.SIGINT: ("Ctrl-C", INTERRUPTED)}

# Flags a resumed run may change (the one list; --help prints it): the schedule, intervals, batch split,
# runtime, and the sampler of the end-of-run sample. Everything else -- data, tokenizer, architecture,
# framing, seed, EMA, weight decay (kept in the optimizer state), the eval windows and draws (the history
# must compare like with like), the distillation recipe -- comes from the checkpoint.
RESUMABLE = ("max_iters", "lr", "min_lr", "lr_schedule", "warmup", "grad_clip", "batch_size", "grad_accum",
             "eval_interval", "ckpt_interval", "ckpt_minutes", "log_interval", "device", "dtype", "compile",
             "tcs_cache_mb", "teacher_elems", "sampler", *sampler_flags())
NOT_COMPARED = ("resume", "overwrite", "out_dir")  # where and how the run is continued, not what it is


def add_run_args(p):
    """Flags shared by every training script (one vocabulary across train.py and distill.py)."""
    p.add_argument("--data", default="stdlib", type=data_source,
                   help="stdlib (offline default), shakespeare, a text file/folder, or lab / lab:W=256,delta=0.02,... "
                        "(the exact synthetic language, docs/lab.md)")
    p.add_argument("--tokenizer", default=None,
                   help="bpe (default: learned from the training split, --vocab_size ids), bytes (257 ids) or gpt2 "
                        "(tiktoken); --data lab has its own (labA, its letters + 2)")
    p.add_argument("--out_dir", default="out", help="where ckpt.pt is written")
    p.add_argument("--max_iters", type=int, default=2000, help="optimizer steps in total (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=32,
                   help="sequences per micro-batch (per process under torchrun; default %(default)s)")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per training window (default: the model's)")
    p.add_argument("--framing", default=None, choices=FRAMINGS,
                   help="training and held-out windows: none (plain token windows) or bos_eos ([BOS] + L-2 tokens "
                        "+ [EOS], BOS = EOS = end-of-text, as MDLM/SDTT trained); default: the loaded checkpoint's, "
                        "else none")
    p.add_argument("--dropout_sites", default=None, choices=DROPOUT_SITES,
                   help="where dropout applies: all (embeddings, attention probabilities, residual branches) or "
                        "residual (the official DiT's); default: the loaded checkpoint's, else all")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW; default %(default)s)")
    p.add_argument("--min_lr", type=float, default=0.0, help="final learning rate of the cosine schedule")
    p.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"],
                   help="after warm-up: constant (MDLM/SDTT) or cosine decay to --min_lr")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default %(default)s)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay on matrices (MDLM: 0)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--ema", type=float, default=0.999,
                   help="EMA decay of the weights used for eval/sampling (0 = off; default %(default)s)")
    p.add_argument("--eval_interval", type=int, default=250,
                   help="evaluate every N steps (and at the end; default %(default)s)")
    p.add_argument("--eval_tokens", type=int, default=32768,
                   help="held-out tokens for the periodic eval (default %(default)s)")
    p.add_argument("--eval_draws", type=int, default=2, help="t draws per held-out window for the MDLM bound")
    p.add_argument("--ckpt_interval", type=int, default=500,
                   help="write OUT_DIR/ckpt.pt every N steps (and at the end; default %(default)s)")
    p.add_argument("--ckpt_minutes", type=float, default=0,
                   help="also write OUT_DIR/ckpt.pt every N minutes (0 = off); SIGTERM always writes one before exit")
    p.add_argument("--log_interval", type=int, default=10, help="refresh the progress bar every N steps (one host sync)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (autocast dtype; auto = bf16 on CUDA)")
    p.add_argument("--compile", default="auto", help="auto|true|false (auto = on for CUDA)")
    p.add_argument("--seed", type=int, default=1337, help="seed for init, data order and noise")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT_DIR/ckpt.pt exactly where it stopped: its data, tokenizer, "
                        "architecture and every other flag come from the checkpoint; a flag given that contradicts "
                        f"it is an error, except these, which may change on resume: --{', --'.join(RESUMABLE)}")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUT_DIR that holds a checkpoint, replacing it (without this flag "
                        "or --resume such a folder is refused)")


def resume_args(args, ckpt, given, path):
    """Continue the run a checkpoint holds: every flag not given takes the checkpoint's value; a given flag
    must equal it unless it is RESUMABLE. given: the flags written on the command line (checks.given_flags).
    Also refuses a --max_iters below the checkpoint's iteration."""
    old = ckpt.get("args") or {}
    for name, value in old.items():
        if name in NOT_COMPARED or not hasattr(args, name):
            continue
        if name not in given:
            setattr(args, name, value)
        elif name not in RESUMABLE and getattr(args, name) != value:
            raise UserError(f"--{name} {getattr(args, name)} contradicts {path}, which holds --{name} {value}: a "
                            f"resumed run keeps its data, tokenizer, architecture and recipe; drop the flag, or start "
                            f"a new run in another --out_dir (--resume may change: --{', --'.join(RESUMABLE)})")
    if args.max_iters < ckpt["iter"]:
        raise UserError(f"--max_iters {args.max_iters} is below the iteration of {path} ({ckpt['iter']}): "
                        f"give --max_iters {ckpt['iter']} or more")


class EMA:
    """Exponential moving average of the weights, kept in a second model so it can be evaluated as is.
    The effective decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated
    by the random initialisation. The update is one fused foreach op: no host sync."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, sd):
        self.decay, self.updates = sd["decay"], sd["updates"]
        self.model.load_state_dict(sd["model"])


class StopSignals:
    """SIGTERM (a scheduler's preemption) and Ctrl-C only ask the loop to stop after the current step, which it
    does after writing ckpt.pt; a second Ctrl-C aborts at once (KeyboardInterrupt: a save in progress is
    abandoned and its temp file removed, the previous checkpoint stays intact)."""

    def __init__(self):
        self.got = []
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}

    def handle(self, signum, frame=None):
        if signum == signal.SIGINT and signal.SIGINT in self.got:
            self.restore()
            raise KeyboardInterrupt
        self.got.append(signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Noise(NamedTuple):
    """The randomness of one training step, handed to the loss: loss_fn(fwd, x, noise).
    gen draws t and the masks: give it with rank and world to diffusion.sample_times / forward_mask (or a loss
    that calls them). Under DDP it is in the same state on every rank, which draws for the whole global batch
    and keeps its own rows, so the step equals one process with batch world x B. own: a loss's other draws
    (SDTT's teacher steps): this rank's own generator under DDP, gen itself in one process."""
    gen: torch.Generator
    rank: int = 0
    world: int = 1
    own: torch.Generator = None


def data_source(value):
    """--data: a lab spec is written out in full (every parameter), so checkpoints record the lab exactly."""
    try:
        return canonical_source(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def train(model, loss_fn, evaluate, get_batch, window, args, *, device, autocast, use_compile, meta, resume=None,
          on_step=None):
    """Run the optimisation; everything it needs is an argument.

    model: the raw (uncompiled) nn.Module being trained, on `device`.
    loss_fn(fwd, x, noise) -> (loss, logs): fwd is the (maybe compiled, maybe DDP) model; noise the step's
    generators (Noise); logs a dict of scalar tensors; the loss is a mean over the rows of x (what DDP's
    gradient averaging assumes).
    evaluate(model) -> dict of floats (called on the EMA model if any, else the raw one; rank 0 only).
    get_batch(n, generator, device) -> (n, window) int64 training windows, drawn with the CPU generator
    (the same data order on any device); window: tokens per row. args: add_run_args' flags.
    device, autocast, use_compile: common.setup_runtime's policy.
    meta: what makes the checkpoint self-describing (config, kind, tokenizer, mask_id, schedule, args, ...),
    written into every checkpoint as it is at that save: the script that owns it may change it between
    steps (SDTT: the round's sample_steps and teacher).
    resume: a loaded checkpoint to continue from.
    on_step(it, save): called after every optimizer step on every rank, returns nothing; save(path,
    **override) writes the state of this step to `path` with some top-level keys overridden (rank 0).
    Returns the summary dict for the JSON last line.
    """
    rank, world = dist.rank_world()
    ddp, rank0 = dist.active(), rank == 0
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    gens = {"data": torch.Generator().manual_seed(args.seed),  # CPU: same batches on any device
            "noise": torch.Generator(device=device).manual_seed(args.seed + 1)}
    it, history = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if ema is not None and resume.get("ema"):
            ema.load_state_dict(resume["ema"])
        set_rng_state(resume["rng"], gens)
        it, history = resume["iter"], resume.get("history", [])
        print(f"resumed from iter {it}")
        if resume.get("world_size", 1) != world:
            print(f"note: ckpt.pt was written by {resume.get('world_size', 1)} process(es), this run has {world}: "
                  f"the global batch changes unless --batch_size or --grad_accum make up for it")
    # DDP: the data and noise generators above stay identical on every rank (they draw for the global batch);
    # the per-rank randomness (dropout, a loss's other draws) comes from torch's RNG and rank_gen, seeded
    # from (seed, step, rank) at each step: different on every rank, exact on resume with no state to save.
    net = DDP(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None) if ddp else model
    fwd = torch.compile(net) if use_compile else net
    rank_gen = torch.Generator(device=device) if ddp else None
    noise = Noise(gens["noise"], rank, world, rank_gen if ddp else gens["noise"])
    last_save, saved_iter = time.time(), (resume["iter"] if resume is not None else None)

    def save(path=None, **override):
        """Write the full state to OUT_DIR/ckpt.pt, or to `path` with some top-level keys overridden
        (SDTT's per-round files: their own sample_steps, no optimizer). Rank 0 only (no collective).
        A failed write (disk full, permissions) is a UserError that names the checkpoint still intact."""
        nonlocal last_save, saved_iter
        if not rank0:
            return
        target, main = path or f"{args.out_dir}/ckpt.pt", f"{args.out_dir}/ckpt.pt"
        try:
            save_checkpoint({**meta, "model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                             "optimizer": opt.state_dict(), "iter": it, "rng": rng_state(gens), "history": history,
                             "world_size": world, **override}, target)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            bar.close()  # ends the progress line: the error line starts on a line of its own
            signals.restore()
            intact = (f"{main} (iter {saved_iter}) is intact: free space or fix the folder, then continue with the same "
                      f"command plus --resume" if saved_iter is not None else "no checkpoint of this run was written")
            raise UserError(f"could not write {target} at iter {it} ({write_error(e, target)}); {intact}") from None
        if path is None:
            last_save, saved_iter = time.time(), it  # --ckpt_minutes counts from the last ckpt.pt

    signals = StopSignals()  # SIGTERM and Ctrl-C only set a flag; the loop stops at the end of the step
    model.train()
    tokens_per_step = args.batch_size * world * args.grad_accum * window
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
            x = get_batch(args.batch_size * world, gens["data"], "cpu" if ddp else device)[rank::world]  # (B, W)
            x = x.to(device)
            sync = contextlib.nullcontext() if not ddp or micro == args.grad_accum - 1 else net.no_sync()
            with sync:  # DDP all-reduces the gradients in the backward of the last micro-batch only
                with autocast():
                    loss, logs = loss_fn(fwd, x, noise)
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
        if on_step is not None:
            on_step(it, save)
        stop = bool(signals.got)
        if ddp:
            stop = dist.agree(stop)  # every rank stops after the same step (a CPU all-reduce)
        if it % args.log_interval == 0 or it == args.max_iters:
            if ddp:
                logged = dist.mean(logged)  # over the ranks
            train_loss, *values = logged.tolist()  # the one host sync, every log_interval steps
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
            shown = " ".join(f"{k} {'-' if v is None else format(v, '.4f')}" for k, v in metrics.items())
            tqdm.write(f"iter {it}: {shown} ({seconds:.1f}s)")
            model.train()
        due = args.ckpt_minutes > 0 and time.time() - last_save >= 60 * args.ckpt_minutes
        if it % args.ckpt_interval == 0 or it == args.max_iters or stop or due:
            save()
        if stop and it < args.max_iters:
            bar.close()
            dist.barrier()  # rank 0 has written ckpt.pt
            name, status = STOP_SIGNALS[(signals.got or [signal.SIGTERM])[0]]
            if rank0:
                print(f"{name}: stopped after iter {it}/{args.max_iters} and wrote {args.out_dir}/ckpt.pt; continue "
                      f"with the same command plus --resume (exit status {status})", file=sys.stderr, flush=True)
            sys.exit(status)
    bar.close()
    signals.restore()
    dist.barrier()  # the final ckpt.pt is on disk before any rank reads it
    elapsed = time.time() - t_start - eval_seconds  # training time only
    metrics = {k: v for k, v in history[-1].items() if k != "iter"} if history else {}
    return {"iter": it, "train_loss": train_loss, **metrics,
            "tokens_per_sec": (it - it_start) * tokens_per_step / max(elapsed, 1e-9),
            "train_seconds": elapsed, "eval_seconds": eval_seconds, "out_dir": args.out_dir}
