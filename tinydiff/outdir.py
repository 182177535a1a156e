"""A training run's output folder (--out_dir), claimed before any work starts and released at exit: nothing
already written is lost, and output problems show before the training, not at its first save. Under torchrun
only rank 0 claims and checks it (it alone writes checkpoints)."""
import atexit
import contextlib
import os
import re
import shutil
from pathlib import Path

from .common import UserError

LOCK = ".lock"
_TEMP = re.compile(r"^\..+\.tmp\d+$")  # common.temp_path: .NAME.tmpPID


class Claim:
    def __init__(self, out_dir, fd, created):
        self.out_dir, self.fd, self.created = out_dir, fd, created

    def release(self):
        """Unlock and remove the lock file; remove the folder if this run created it and wrote nothing."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:  # remove the file before unlocking: a waiting claim then retries on a fresh one
            (self.out_dir / LOCK).unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the flock
        if self.created:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only when empty


def claim(out_dir, resume=False, overwrite=False):
    """Claim out_dir for a training run: lock it, probe that it takes a file, refuse to lose a checkpoint
    (ckpt.pt only with --resume or --overwrite), remove temp files of a killed save. Released at exit."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run in --out_dir, or replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} exists and is not a folder: choose another --out_dir")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir {out_dir} ({e.strerror}): choose a folder you can write") from None
    c = Claim(out_dir, _lock(out_dir), created)
    atexit.register(c.release)
    try:
        _probe(out_dir)
        ckpt = out_dir / "ckpt.pt"
        if resume and not ckpt.is_file():
            raise UserError(f"--resume: {ckpt} does not exist: nothing to continue (drop --resume to start a new run)")
        if ckpt.exists() and not (resume or overwrite):
            raise UserError(f"{out_dir} already holds a checkpoint ({ckpt}): continue that run with --resume, "
                            f"replace it with --overwrite, or choose another --out_dir")
        for tmp in out_dir.iterdir():  # while we hold the lock, no other process can be writing them
            if _TEMP.match(tmp.name) and tmp.is_file():
                size = tmp.stat().st_size
                tmp.unlink()
                print(f"note: removed {tmp} ({size / 2 ** 20:.1f} MiB), left by a save that was killed")
    except BaseException:
        c.release()
        raise
    return c


def _lock(out_dir):
    """flock OUT_DIR/.lock without waiting and write our pid in it (for a second run's message). An flock, as
    the kernel releases it when the process dies, however it dies: a killed run's lock file is taken over."""
    import fcntl  # POSIX
    path = out_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in --out_dir {out_dir} ({e.strerror}): choose a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 100).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"--out_dir {out_dir} is in use by another run (process {owner}): wait for it to end, "
                            f"or choose another --out_dir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a file its previous owner removed meanwhile
                break
        os.close(fd)
    previous = os.read(fd, 100).decode(errors="replace").strip()
    if previous:
        print(f"note: {path} was left by process {previous}, which is gone: taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _probe(out_dir, what=None):
    """Write, sync and remove a small file: the permissions, a read-only disk and quotas all show here."""
    probe = out_dir / f".probe{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write in {what or '--out_dir ' + str(out_dir)} ({e.strerror}): fix the folder's "
                        f"permissions or choose another") from None
    finally:
        probe.unlink(missing_ok=True)


def check_writable(path):
    """A file a script will write at its end (sample.py --out): its folder must exist and take a file now."""
    if Path(path).is_dir():
        raise UserError(f"{path} is a folder: give a file name")
    folder = Path(path).parent
    if not folder.is_dir():
        raise UserError(f"the folder of {path} ({folder}) does not exist: create it or give another path")
    _probe(folder, what=str(path))


def checkpoint_bytes(model, copies):
    """Bytes of a checkpoint with `copies` copies of the parameters (weights, EMA, AdamW's two moments)."""
    return copies * sum(p.numel() * p.element_size() for p in model.parameters()) + 2 ** 20


def check_space(out_dir, need):
    """A clear error before training when the disk cannot hold the checkpoints (a save's temp file sits beside
    the previous checkpoint until it replaces it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"--out_dir {out_dir} has {free / 2 ** 20:.1f} MiB free but this run's checkpoints need "
                        f"~{need / 2 ** 20:.1f} MiB: free space or choose another --out_dir")
