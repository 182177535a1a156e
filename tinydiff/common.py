"""Shared plumbing: device/dtype/compile policy, clear errors, seeding, EMA, atomic checkpoints.

The policy is decided once here and printed with its reason (design.md §3):
cuda -> bf16 autocast, TF32, fused AdamW, torch.compile on; mps -> fp32; cpu -> fp32, compile when
asked (on 2 cores its start-up cost is rarely repaid in a short run; see README).
"""
import contextlib
import copy
import ctypes
import json
import os
import sys
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input from the user. Scripts print its message on one line and exit with status 2."""


class DataError(UserError):
    """A data problem (source, tokenizer, prepared folder): the message says what is wrong and how to fix it."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def emit(record):
    """The output contract: the last line on stdout is one JSON object with the headline figures."""
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------- device / dtype / compile

def pick_device(arg="auto"):
    """Returns (device string, reason)."""
    if arg == "auto":
        if torch.cuda.is_available():
            return "cuda", "auto: CUDA is available"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps", "auto: Apple MPS is available"
        return "cpu", "auto: no GPU found"
    if arg == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu (or auto)")
    if arg == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
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
    """CPU training on Linux/glibc: let malloc keep freed blocks of up to `mib` MiB for reuse. glibc serves
    blocks above 32 MiB with mmap and unmaps them on free, so a tensor that size allocated every step (the
    (N, V) logits of a 4096-id output head are ~33 MiB) comes back as fresh pages that the kernel must
    zero and fault in again: ~9% of a step on 2 cores, all system time. No-op where mallopt is missing."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, mib << 20)  # M_MMAP_THRESHOLD: larger blocks only are mmapped
        libc.mallopt(-1, mib << 20)  # M_TRIM_THRESHOLD: keep up to this much free memory at the heap's top
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        pass


def setup_runtime(args):
    """Apply the policy for --device/--dtype/--compile, print it, return (device, dtype, compile, autocast).
    Launched by torchrun, the process also joins the DDP process group here (before any CUDA work)."""
    device, why_d = pick_device(args.device)
    dtype, why_t = pick_dtype(args.dtype, device)
    use_compile, why_c = pick_compile(args.compile, device)
    from .dist import active, init  # under torchrun: join the process group, GPU = LOCAL_RANK (tinydiff/dist.py)
    world = init(device)[1]
    if device == "cpu":
        reuse_freed_memory()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    ddp = f" | DDP over {world} processes ({'nccl' if device == 'cuda' else 'gloo'})" if active() else ""
    print(f"device {device} ({why_d}) | dtype {dtype} ({why_t}) | compile {use_compile} ({why_c}) | torch {torch.__version__}{ddp}")
    return device, dtype, use_compile, autocast_ctx(device, dtype)


def make_generator(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- EMA

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


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path):
    """torch.save to a synced temp file beside path, then commit_files moves it into place: a crash never
    leaves a broken checkpoint, and a failed save leaves no temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_files({path: tmp})


def temp_path(path):
    """Where a file is written before os.replace moves it into place: beside it, hidden, per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def commit_files(files):
    """Write {path: bytes, or a finished temp file beside path} atomically: every file to a temp file beside it
    first, then os.replace each, in order. Any error before the replaces leaves the folder exactly as it was;
    temp files are always removed."""
    tmps = {}
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, Path):  # written (and synced) by the caller
                tmps[path] = data
                continue
            tmps[path] = tmp = temp_path(path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def load_checkpoint(path):
    """Load a tinydiff checkpoint on the CPU, or raise UserError saying what is wrong with it.
    A published model's name (hf:OWNER/NAME[@REV], gpt2, gpt2-medium, ...) that is not a local file is
    downloaded and converted by tinydiff/hub.py into the same format."""
    path = str(path)
    from .hub import is_pretrained, load_pretrained
    if is_pretrained(path) and not os.path.isfile(path):
        return load_pretrained(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: train one with train.py (it writes OUT_DIR/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}): "
                        f"re-train or point to another checkpoint") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "kind", "tokenizer"} <= set(ckpt):
        raise UserError(f"{path} is not a tinydiff checkpoint (missing config/model/kind/tokenizer)")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", use_ema=True):
    """Build the model a checkpoint describes; EMA weights when present and use_ema. Eval mode."""
    from .model import ModelConfig, Transformer
    model = Transformer(ModelConfig(**ckpt["config"]))
    ema = ckpt.get("ema")
    state = ema["model"] if (use_ema and ema) else ckpt["model"]
    model.load_state_dict(state)
    return model.to(device).eval()
