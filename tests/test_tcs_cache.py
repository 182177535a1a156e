"""TCS targets on disk (tinydiff/tcs_cache.py): written once, read back equal, resumed after an
interruption, keyed by teacher/settings/windows, bad shards recomputed; and distill.py's fixed windows
and --precompute_only end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import OracleAR, Toy
from tinydiff.common import model_from_checkpoint, save_checkpoint
from tinydiff.model import ModelConfig, Transformer
from tinydiff.tcs import tcs_targets
from tinydiff.tcs_cache import DiskTargets, TargetCache, fixed_chunks, grid_batch, target_store, tensor_hash

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"teacher_sha256": "t0", "estimator": "topk", "topk": 2, "window": None, "candidates": "prefix"}


class Counting:
    """compute() for DiskTargets: the oracle teacher's topk targets, counting windows; fails after fail_after calls."""

    def __init__(self, fail_after=None):
        self.ar = OracleAR(Toy(V=4, L=5, seed=1))
        self.windows, self.calls, self.fail_after = 0, 0, fail_after

    def __call__(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed ^C mid-precompute
        self.calls, self.windows = self.calls + 1, self.windows + len(x)
        return tcs_targets(self.ar, x, self.ar.bos_id, "topk", topk=2, candidates="prefix")


@pytest.fixture
def windows():
    return Toy(V=4, L=5, seed=1).seqs[::3]  # (342, 5) distinct windows


def fresh(windows):
    c = Counting()
    return c(windows)


def test_written_targets_read_back_equal(tmp_path, windows):
    compute = Counting()
    cache = DiskTargets(tmp_path, windows, SETTINGS, compute, shard=64).prepare(batch_size=32)
    assert compute.windows == len(windows) and cache.computed == len(windows)
    assert len(list(cache.dir.glob("shard-*.pt"))) == 6 and (cache.dir / "meta.json").exists()
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:50]
    for got, want in zip(cache(windows[perm]), fresh(windows[perm])):
        assert torch.equal(got, want.to(got.dtype))
    # another run (another lambda, seed or student): nothing computed, the same targets
    again = Counting()
    cache2 = DiskTargets(tmp_path, windows, SETTINGS, again).prepare(batch_size=32)
    assert again.windows == 0 and cache2.computed == 0
    assert torch.equal(cache2.ids, cache.ids) and torch.equal(cache2.logp, cache.logp)
    assert cache2.stats()["hits"] == 0
    cache2(windows[:7])
    assert cache2.stats()["hits"] == 7 and cache2.stats()["misses"] == 0


def test_window_outside_the_set_is_computed(tmp_path, windows):
    compute = Counting()
    cache = DiskTargets(tmp_path, windows[:20], SETTINGS, compute).prepare()
    n = compute.windows
    out = cache(windows[19:22])  # two of them are not in the set
    assert compute.windows == n + 3 and cache.misses == 2
    for got, want in zip(out, fresh(windows[19:22])):
        assert torch.equal(got, want)


def test_interrupted_precompute_resumes(tmp_path, windows):
    with pytest.raises(KeyboardInterrupt):
        DiskTargets(tmp_path, windows, SETTINGS, Counting(fail_after=5), shard=64).prepare(batch_size=32)
    # 5 batches of 32 = two whole shards (2 batches each) and half of the third, which is lost
    cache = DiskTargets(tmp_path, windows, SETTINGS, Counting(), shard=64)
    assert sorted(p.name for p in cache.dir.glob("shard-*.pt")) == ["shard-00000.pt", "shard-00001.pt"]
    assert not list(cache.dir.glob(".*tmp*"))  # no stray temp files
    resumed = Counting()
    cache.compute = resumed
    cache.prepare(batch_size=32)
    assert resumed.windows == len(windows) - 128 and cache.computed == len(windows) - 128
    for got, want in zip(cache(windows), fresh(windows)):
        assert torch.equal(got, want.to(got.dtype))


def test_key_depends_on_teacher_settings_and_windows(tmp_path, windows):
    base = DiskTargets(tmp_path, windows, SETTINGS, Counting()).dir
    assert DiskTargets(tmp_path, windows.clone(), dict(SETTINGS), Counting()).dir == base
    for other in (dict(SETTINGS, teacher_sha256="t1"), dict(SETTINGS, topk=3), dict(SETTINGS, candidates="grad"),
                  dict(SETTINGS, window=4)):
        assert DiskTargets(tmp_path, windows, other, Counting()).dir != base
    changed = windows.clone()
    changed[5, 2] = (changed[5, 2] + 1) % 4
    assert DiskTargets(tmp_path, changed, SETTINGS, Counting()).dir != base
    assert DiskTargets(tmp_path, windows[:-1], SETTINGS, Counting()).dir != base
    # the teacher's hash follows its weights
    torch.manual_seed(0)
    a = Transformer(ModelConfig(vocab_size=5, n_layer=1, n_head=2, n_embd=8, seq_len=8, causal=True))
    b = Transformer(ModelConfig(vocab_size=5, n_layer=1, n_head=2, n_embd=8, seq_len=8, causal=True))
    b.load_state_dict(a.state_dict())
    assert tensor_hash(a.state_dict()) == tensor_hash(b.state_dict())
    with torch.no_grad():
        b.head.weight[0, 0] += 1e-3
    assert tensor_hash(a.state_dict()) != tensor_hash(b.state_dict())


def test_bad_shards_are_recomputed(tmp_path, windows):
    cache = DiskTargets(tmp_path, windows, SETTINGS, Counting(), shard=64).prepare(batch_size=64)
    want_ids, want_logp = cache.ids.clone(), cache.logp.clone()
    p = [cache.shard_path(s) for s in range(4)]
    raw = p[0].read_bytes()
    p[0].write_bytes(raw[:len(raw) // 2])  # partial (truncated) file
    p[1].write_bytes(b"not a torch file")  # garbage
    d = torch.load(p[2], weights_only=True)
    d["logp"][tuple(d["logp"].isfinite().nonzero()[0])] += 1.0  # silently corrupted: the digest no longer matches
    torch.save(d, p[2])
    d = torch.load(p[3], weights_only=True)
    d["key"] = "another key"  # a shard of another cache copied here
    torch.save(d, p[3])
    again = Counting()
    cache2 = DiskTargets(tmp_path, windows, SETTINGS, again, shard=64).prepare(batch_size=64)
    assert again.windows == 4 * 64 and cache2.computed == 4 * 64
    assert torch.equal(cache2.ids, want_ids) and torch.equal(cache2.logp, want_logp)
    assert DiskTargets(tmp_path, windows, SETTINGS, Counting(), shard=64).prepare().computed == 0  # repaired


def test_fixed_chunks_and_batches(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    chunks = fixed_chunks(tmp_path, 16, 5)  # 62 chunks on the grid
    assert chunks.tolist() == [0, 15, 30, 46, 61]
    assert torch.equal(fixed_chunks(tmp_path, 16, 500), torch.arange(62))
    x = grid_batch(tmp_path, "train", 200, 16, torch.Generator().manual_seed(0), chunks=chunks)
    assert set((x[:, 0] // 16).tolist()) == set(chunks.tolist())  # every draw is one of the fixed chunks


# ----------------------------------------------------------------------------- distill.py plumbing

def _setup(tmp_path):
    """A prepared bytes data folder and a tiny AR teacher checkpoint."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(97, 123, 4000).astype(np.uint16).tofile(data / "train.bin")
    rng.integers(97, 123, 1000).astype(np.uint16).tofile(data / "val.bin")
    (data / "meta.json").write_text('{"version": 1, "key": "test", "tokenizer": "bytes", "vocab_size": 257, "eot_id": 256, '
                                    '"source": "test", "source_hash": "x", "train_tokens": 4000, "val_tokens": 1000}')
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, seq_len=16, causal=True)
    torch.manual_seed(0)
    save_checkpoint({"kind": "ar", "config": cfg.to_dict(), "model": Transformer(cfg).state_dict(), "ema": None,
                     "tokenizer": {"name": "bytes", "vocab_size": 257, "eot_id": 256}, "data_dir": str(data),
                     "args": {"data": str(data)}}, tmp_path / "ar.pt")
    return data


def test_target_store_with_fixed_windows(tmp_path):
    """distill.py --tcs_windows: draws only from the fixed chunks, whose targets are precomputed to disk once and
    reused by another run with the same teacher and settings (another lambda); 'none' keeps them in memory."""
    data = _setup(tmp_path)
    teacher = model_from_checkpoint(torch.load(tmp_path / "ar.pt", weights_only=False))
    calls = []

    def compute(x):
        calls.append(len(x))
        return tcs_targets(teacher, x, 256, "topk", 3)
    settings = {"teacher_sha256": tensor_hash(teacher.state_dict()), "topk": 3}
    store, chunks = target_store(compute, data, 16, 10, tmp_path / "targets", batch_size=4, settings=settings)
    assert store.stats()["computed"] == 10 and str(store.dir).startswith(str(tmp_path / "targets"))
    x = grid_batch(data, "train", 8, 16, torch.Generator().manual_seed(0), chunks=chunks)  # (8, 16)
    grid = torch.from_numpy(np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.int64)).view(-1, 16)
    fixed = grid[fixed_chunks(data, 16, 10)]  # (10, 16)
    assert (x[:, None, :] == fixed[None]).all(-1).any(1).all()  # every window is one of the fixed ones
    n = len(calls)
    store(x)
    assert store.stats()["hits"] == 8 and len(calls) == n  # served from the set, no teacher work
    again, _ = target_store(compute, data, 16, 10, tmp_path / "targets", batch_size=4, settings=settings)
    assert again.stats()["computed"] == 0 and again.dir == store.dir  # another run (lambda, seed): reused
    # the default folder is DATA_DIR/tcs_targets; 'none' keeps them in memory only (what is met)
    default, _ = target_store(compute, data, 16, 10, None, batch_size=4, settings=settings)
    assert str(default.dir).startswith(str(data / "tcs_targets"))
    memory, _ = target_store(compute, data, 16, 10, "none", batch_size=4, settings=settings)
    assert isinstance(memory, TargetCache) and len(list((data / "tcs_targets").iterdir())) == 1


def test_distill_precompute_only(tmp_path):
    _setup(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "distill.py"), "--method", "tcs", "--teacher", "ar.pt", "--seq_len", "16",
           "--tcs_windows", "12", "--topk", "4", "--batch_size", "4", "--eval_tokens", "64", "--device", "cpu",
           "--precompute_only"]  # to the default folder, DATA_DIR/tcs_targets
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["precompute_only"] and out["tcs_cache"]["computed"] == 12
    assert not (tmp_path / "out" / "ckpt.pt").exists()  # no training
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert json.loads(p.stdout.strip().splitlines()[-1])["tcs_cache"]["computed"] == 0  # reused
    assert len(list((tmp_path / "data" / "tcs_targets").glob("*/shard-*.pt"))) == 1
    bad = subprocess.run(cmd + ["--tcs_windows", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
