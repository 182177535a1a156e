"""Data parallelism with PyTorch DDP under torchrun (one process per GPU; each runs the whole script, rank 0
alone prints, evaluates and writes checkpoints). Without torchrun's RANK, WORLD_SIZE and LOCAL_RANK in the
environment everything here is a no-op: rank 0 of 1, no process group."""
import atexit
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from .errors import UserError

_ctl = None  # a gloo group for small CPU-side messages (stop?, barriers): no GPU sync, long timeout


def active():
    return dist.is_available() and dist.is_initialized()


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def init(device):
    """Join the process group when launched by torchrun; returns (rank, world size). CUDA: nccl, and "cuda"
    means cuda:LOCAL_RANK from here on; CPU: gloo. Ranks but 0 send stdout to /dev/null (stderr still shows)."""
    global _ctl
    if "RANK" not in os.environ or active():
        return rank_world()
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started a process for GPU {local} but torch sees {torch.cuda.device_count()} "
                            f"GPU(s) here: use --nproc_per_node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local)
    elif device != "cpu":
        raise UserError(f"torchrun (DDP) runs on CUDA (nccl) or CPU (gloo), not on {device}: use --device cuda or cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    # long timeout: rank 0 may tokenize a whole corpus while the others wait (rank0_first); a rank that dies
    # makes torchrun stop the others, and NCCL's watchdog still catches stuck collectives
    _ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    atexit.register(lambda: active() and dist.destroy_process_group())
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank_world()


def barrier():
    if active():
        dist.barrier(group=_ctl)


def agree(flag):
    """True on every rank if `flag` is True on any rank (an all-reduce on the CPU: no GPU sync)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_ctl)
    return bool(t.item())


def no_sync(net, skip):
    """DDP's no_sync() when skip (a micro-batch that is not the step's last: no gradient all-reduce)."""
    return net.no_sync() if skip and active() else contextlib.nullcontext()


def mean(t):
    """Mean over the ranks of a tensor on the training device (the tensor itself in a single process)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)  # a sum: gloo has no average
    return t / dist.get_world_size()


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (e.g. tokenizing a corpus into data/), then the others, which find it done."""
    if rank_world()[0] != 0:
        barrier()
    yield
    if rank_world()[0] == 0:
        barrier()
