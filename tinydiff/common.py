"""What every script calls: the device/dtype/compile policy (docs/design.md: cuda -> bf16 autocast, TF32,
fused AdamW, compile; mps, cpu -> fp32, eager), the JSON last line, atomic checkpoints, and the pieces of a
training loop (AdamW, the lr schedule, EMA, exact resume, stop signals). Plain functions: no argparse."""
import contextlib
import copy
import ctypes
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
from pathlib import Path

import torch

from . import dist
from .errors import UserError
from .hub import is_pretrained, load_pretrained
from .model import ModelConfig, Transformer


def emit(record):
    """The output contract: the last line on stdout is one JSON object with the headline figures. Strict
    JSON, so every parser reads it: a NaN or infinite float (a loss never measured, a diverged run) is null."""
    print(json.dumps(_finite(record), allow_nan=False), flush=True)


def _finite(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


# ----------------------------------------------------------------------------- device / dtype / compile

def pick_device(arg="auto"):
    """Returns (device string, reason)."""
    mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if arg == "auto":
        if torch.cuda.is_available():
            return "cuda", "auto: CUDA is available"
        return ("mps", "auto: Apple MPS is available") if mps else ("cpu", "auto: no GPU found")
    if arg == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu (or auto)")
    if arg == "mps" and not mps:
        raise UserError("--device mps was asked for but MPS is not available: use --device cpu (or auto)")
    if arg not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device {arg!r}: choose auto, cpu, cuda or mps")
    return arg, "asked for"


def pick_dtype(arg, device):
    """Autocast dtype for the forward pass: bf16 on CUDA (weights and optimizer stay fp32), else fp32."""
    if arg == "auto":
        return ("bfloat16", "auto: bf16 autocast on CUDA") if device == "cuda" else ("float32", f"auto: fp32 on {device}")
    if arg not in ("float32", "bfloat16"):
        raise UserError(f"unknown --dtype {arg!r}: choose auto, float32 or bfloat16")
    return arg, "asked for"


def pick_compile(arg, device):
    if arg == "auto":
        return (True, "auto: torch.compile on CUDA") if device == "cuda" else \
               (False, f"auto: eager on {device} (compile start-up outweighs its gain in short runs; --compile true to try)")
    if arg not in ("true", "false"):
        raise UserError(f"unknown --compile {arg!r}: choose auto, true or false")
    return arg == "true", "asked for"


def autocast_ctx(device, dtype):
    """A context-manager factory: bf16 autocast where asked, else nothing."""
    if dtype == "bfloat16":
        return lambda: torch.autocast(device_type=device if device != "mps" else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def reuse_freed_memory(mib=512):
    """CPU on glibc: let malloc keep freed blocks of up to `mib` MiB. glibc mmaps blocks above 32 MiB and unmaps
    them on free, so a tensor that size made every step (the logits of a 4096-id head: ~33 MiB) comes back as
    fresh pages the kernel must zero: ~9% of a step on 2 cores."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, mib << 20)  # M_MMAP_THRESHOLD: larger blocks only are mmapped
        libc.mallopt(-1, mib << 20)  # M_TRIM_THRESHOLD: keep up to this much free memory at the heap's top


def setup_runtime(device="auto", dtype="auto", compile="auto"):
    """Apply the policy for --device/--dtype/--compile, print it, return (device, dtype, compile, autocast).
    Under torchrun the process also joins the DDP process group here, before any CUDA work."""
    device, why_d = pick_device(device)
    dtype, why_t = pick_dtype(dtype, device)
    use_compile, why_c = pick_compile(compile, device)
    world = dist.init(device)[1]
    if device == "cpu":
        reuse_freed_memory()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    ddp = f" | DDP over {world} processes ({'nccl' if device == 'cuda' else 'gloo'})" if dist.active() else ""
    print(f"device {device} ({why_d}) | dtype {dtype} ({why_t}) | compile {use_compile} ({why_c}) | torch {torch.__version__}{ddp}")
    return device, dtype, use_compile, autocast_ctx(device, dtype)


def make_generator(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints

def temp_path(path):
    """Where a file is written before os.replace moves it into place: beside it, hidden, per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def commit_files(files):
    """Write {path: bytes, or a function that writes to a binary file} atomically: each to a synced temp file,
    then os.replace each, in order. An error before the replaces changes nothing; no temp file stays."""
    tmps = {}
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps[path] = tmp = temp_path(path)
            with open(tmp, "wb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def save_checkpoint(obj, path):
    """torch.save, atomically (commit_files): a crash never leaves a broken checkpoint."""
    commit_files({path: lambda f: torch.save(obj, f)})


def write_error(e, path):
    """Why a write failed, in a few words: the OS's reason, and the free space of that disk."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    with contextlib.suppress(OSError):
        reason += f"; {shutil.disk_usage(Path(path).parent).free / 2 ** 20:.1f} MiB free on that disk"
    return reason


def pid_alive(pid):
    """True when a process with this id runs on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def load_checkpoint(path, kind=None, tokenizer=None, script=None, what=None, fix=None):
    """Load a tinydiff checkpoint on the CPU, checked by check_checkpoint, or raise one UserError saying what
    is wrong and how to fix it. A published model's name (hf:OWNER/NAME[@REV], gpt2, ...) that is not a local
    file is downloaded and converted by tinydiff/hub.py. what: how messages name it (default: the path)."""
    path = str(path)
    if is_pretrained(path) and not os.path.isfile(path):
        ckpt = load_pretrained(path)
    else:
        if os.path.isdir(path):
            raise UserError(f"checkpoint {path} is a folder: give the file, e.g. {os.path.join(path, 'ckpt.pt')}")
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path} does not exist: train one with train.py (it writes OUT_DIR/ckpt.pt)")
        try:  # weights_only: tensors and plain containers only; a full pickle could run any code on load
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # what a safe load refuses: a pickled object that is not data
            why = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # the callable the file would run
            called = f"it would call {why.group(1)}" if why else "not plain data"
            raise UserError(f"checkpoint {path} holds objects that a safe load (torch.load weights_only=True) refuses "
                            f"({called}): tinydiff checkpoints hold tensors and plain values only, and a file that "
                            f"needs full unpickling can run code on your machine: use it only if you trust its "
                            f"source, and convert it yourself") from None
        except Exception as e:  # truncated, not a torch file, ...
            raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}): "
                            f"re-train or point to another checkpoint") from None
        if not isinstance(ckpt, dict) or not {"config", "model", "kind", "tokenizer"} <= set(ckpt):
            raise UserError(f"{path} is not a tinydiff checkpoint (missing config/model/kind/tokenizer)")
    check_fields(ckpt, what or path)
    check_checkpoint(ckpt, kind, tokenizer, script, what or path, fix)
    return ckpt


def check_fields(ckpt, what):
    """The fields every script reads have the types it expects: one UserError naming the field otherwise."""
    tok = ckpt.get("tokenizer")
    fields = {"config": isinstance(ckpt.get("config"), dict), "model": isinstance(ckpt.get("model"), dict),
              "kind": ckpt.get("kind") in ("mdlm", "ar"),
              "tokenizer": isinstance(tok, dict) and isinstance(tok.get("name"), str)
              and isinstance(tok.get("vocab_size", 0), int)}
    bad = [k for k, ok in fields.items() if not ok]
    if bad:
        raise UserError(f"{what} is damaged or not a tinydiff checkpoint: its {', '.join(bad)} field"
                        f"{'s have' if len(bad) > 1 else ' has'} the wrong type; re-train or point to another checkpoint")


def tokenizer_key(spec):
    """A tokenizer spec's identity: its name, and for a learned bpe the hash of its merges."""
    return f"bpe-{spec['merges_sha256'][:16]}" if spec.get("merges_sha256") else spec["name"]


def check_checkpoint(ckpt, kind=None, tokenizer=None, script=None, what="the checkpoint", fix=None):
    """UserError unless the checkpoint is a `kind` ("mdlm", "ar") model using the `tokenizer` tokenizer (its
    tokenizer_key), written by `script` ("train.py", "distill.py"); None: not checked. fix: how to fix it."""
    kinds = {"mdlm": "an MDLM", "ar": "an AR model"}
    wrote = f"distill.py --method {ckpt['method']}" if ckpt.get("method") else "train.py"
    if script is not None and wrote.split()[0] != script:
        raise UserError(f"{what} was written by {wrote}, not {script}: resume it with {wrote.split()[0]}, "
                        f"or use another --out_dir")
    have_kind, have_tok = ckpt["kind"], tokenizer_key(ckpt["tokenizer"])
    if (kind or have_kind) != have_kind or (tokenizer or have_tok) != have_tok:
        want = kinds.get(kind or have_kind, kind) + (f" with the {tokenizer} tokenizer" if tokenizer else "")
        flags = f"--model {kind or have_kind}" + (f" --tokenizer {tokenizer.split('-')[0]}" if tokenizer else "")
        if tokenizer and tokenizer.startswith("bpe-"):  # a learned bpe is its merges: the same data and size
            flags += " on the same --data with the same --vocab_size"
        raise UserError(f"{what} is {kinds.get(have_kind, have_kind)} with the {have_tok} tokenizer, not {want}: "
                        + (fix or f"give one trained with train.py {flags}"))


def model_from_checkpoint(ckpt, device="cpu", use_ema=True):
    """Build the model a checkpoint describes; EMA weights when present and use_ema. Eval mode."""
    try:
        model = Transformer(ModelConfig(**ckpt["config"]))
        ema = ckpt.get("ema")
        model.load_state_dict(ema["model"] if (use_ema and ema) else ckpt["model"])
    except (TypeError, KeyError, ValueError, AssertionError, RuntimeError) as e:  # a damaged or foreign checkpoint
        raise UserError(f"the checkpoint's weights do not match its config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}): it is damaged or not a tinydiff checkpoint") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- the pieces of a training loop

def make_optimizer(model, lr, weight_decay, device):
    """AdamW (betas 0.9/0.999 as MDLM); decay only matrices; fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=(device == "cuda"))


def lr_at(it, lr, warmup, max_iters, schedule="constant", min_lr=0.0):
    """Linear warm-up to lr over `warmup` steps, then constant (MDLM, SDTT) or cosine decay to min_lr."""
    if it < warmup:
        return lr * (it + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (it - warmup) / max(1, max_iters - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the weights, in a second model that can be evaluated as is. The decay
    warms up as min(decay, (1 + n) / (10 + n)) so the random init does not dominate early averages."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)  # fused: no host sync

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, sd):
        self.decay, self.updates = sd["decay"], sd["updates"]
        self.model.load_state_dict(sd["model"])


def generators(seed, device):
    """The run's random streams: "data" (CPU: the same windows on any device), "noise" (t, masks: on device)."""
    return {"data": torch.Generator().manual_seed(seed), "noise": torch.Generator(device=device).manual_seed(seed + 1)}


def run_state(meta, model, opt, ema, gens, it, history):
    """A run's checkpoint: meta (config, kind, tokenizer, args, ...) and all that an exact --resume needs."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
           **{name: g.get_state() for name, g in gens.items()}}
    return {**meta, "model": model.state_dict(), "ema": ema.state_dict() if ema else None,
            "optimizer": opt.state_dict(), "iter": it, "rng": rng, "history": history,
            "world_size": dist.rank_world()[1]}


def restore_run(ckpt, model, opt, ema, gens):
    """Load run_state's checkpoint into the run's objects; returns (iter, history)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ema is not None and ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"].get("cuda") is not None and torch.cuda.is_available():
        for i, s in enumerate(ckpt["rng"]["cuda"][:torch.cuda.device_count()]):  # saved on a machine with more GPUs
            torch.cuda.set_rng_state(s, i)
    for name, g in gens.items():
        g.set_state(ckpt["rng"][name])
    world = dist.rank_world()[1]
    print(f"resumed from iter {ckpt['iter']}")
    if ckpt.get("world_size", 1) != world:
        print(f"note: the checkpoint was written by {ckpt.get('world_size', 1)} process(es), this run has {world}: "
              f"the global batch changes unless --batch_size or --grad_accum make up for it")
    return ckpt["iter"], ckpt.get("history", [])


def save_run(state, path, intact=None):
    """Write a run's checkpoint (rank 0 only). A failed write (disk full, permissions) is one UserError naming
    what is intact: `intact` = (the last good ckpt.pt, its iter), or None when none was written."""
    if dist.rank_world()[0] != 0:
        return
    try:
        save_checkpoint(state, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        print(file=sys.stderr)  # end the progress line: the error starts on a line of its own
        ok = (f"{intact[0]} (iter {intact[1]}) is intact: free space or fix the folder, then continue with the same "
              f"command plus --resume" if intact else "no checkpoint of this run was written")
        raise UserError(f"could not write {path} at iter {state['iter']} ({write_error(e, path)}); {ok}") from None


class StopSignals:
    """SIGTERM (a scheduler's preemption) and Ctrl-C ask the loop to stop after the current step and write
    ckpt.pt (`stop`). A second Ctrl-C aborts at once: the save in progress is abandoned, the last ckpt.pt stays."""
    # the exit status: 128 + the signal's number, as if killed by it (ckpt.pt is written, the run incomplete)
    SIGNALS = {signal.SIGTERM: ("SIGTERM", 143), signal.SIGINT: ("Ctrl-C", 130)}

    def __init__(self):
        self.got = []
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, signum, frame=None):
        if signum == signal.SIGINT and signal.SIGINT in self.got:
            self.restore()
            raise KeyboardInterrupt
        self.got.append(signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self):
        """True on every rank once any rank got a signal (a CPU all-reduce under DDP: no GPU sync)."""
        return dist.agree(bool(self.got))

    def stop(self, it, max_iters, out_dir):
        """After the checkpoint of step `it` is written: one line saying how to continue, and the exit status."""
        dist.barrier()  # rank 0 has written ckpt.pt
        name, status = self.SIGNALS[(self.got or [signal.SIGTERM])[0]]
        if dist.rank_world()[0] == 0:
            print(f"\n{name}: stopped after iter {it}/{max_iters} and wrote {out_dir}/ckpt.pt; continue with the "
                  f"same command plus --resume (exit status {status})", file=sys.stderr, flush=True)
        sys.exit(status)
