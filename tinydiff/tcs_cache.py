"""Where TCS targets are kept, and the windows they belong to (docs/tcs.md).

Targets depend only on the window, so TCS draws windows on a fixed chunk grid over train.bin (offsets k*L:
grid_batch), optionally from a fixed set of N chunks only (fixed_chunks). TargetCache keeps the targets of the
windows met so far in memory (teacher work once per chunk and run). DiskTargets computes those of a fixed set
once across runs (epochs, lambdas, seeds, students), as accurate estimators (topk, exact) cost far more teacher
work per window than a training step: shards under ROOT/<key>/, all loaded into memory (N * L * K' * 8 bytes).

The key is a sha256 of everything the targets depend on: the teacher (a hash of its tensors, its config), the
estimator settings, TARGETS_VERSION and the windows (length and tokens); ROOT/<key>/meta.json says it in words.
A shard holds SHARD consecutive windows, {"key", "shard", "rows", "ids" int32 (n, L, K'), "logp" fp32 (n, L, K'),
"digest"}, written atomically (save_checkpoint): an interrupted precompute resumes with the missing shards, and a
shard that does not load, belongs to another key or rows, or fails its digest is recomputed.
"""
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .common import commit_files, save_checkpoint
from .data import DataError, _open_split, windows_at

TARGETS_VERSION = 2  # bump when the stored targets change meaning (2: the unbiased sparse schemes of tcs.py)


def tensor_hash(tensors):
    """sha256 of named tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def window_key(row):
    """A window's lookup key: a digest of its tokens (int64)."""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.int64).tobytes(), digest_size=16).digest()


class DiskTargets:
    """Sparse targets of a fixed set of windows (N, L), precomputed to ROOT/<key>/ and served by tokens.

    compute(x (B, L)) -> (ids (B, L, K'), logp (B, L, K')) is the teacher work; settings (JSON-able) what the
    targets depend on besides the windows. Call prepare() once, then targets(x)."""

    def __init__(self, root, windows, settings, compute, shard=64):
        self.windows = windows.cpu().long()  # (N, L)
        self.compute, self.shard = compute, shard
        self.info = {"version": TARGETS_VERSION, **settings, "seq_len": self.windows.shape[1],
                     "n_windows": len(self.windows), "windows_sha256": tensor_hash({"w": self.windows})}
        self.key = hashlib.sha256(json.dumps(self.info, sort_keys=True).encode()).hexdigest()
        self.dir = Path(root) / self.key[:20]
        self.ids = self.logp = None
        self.hits = self.misses = self.computed = 0

    def shard_path(self, s):
        return self.dir / f"shard-{s:05d}.pt"

    def _load_shard(self, s, rows):
        """The shard's (ids, logp), or None if it is missing, unreadable, partial or not this key's."""
        try:
            d = torch.load(self.shard_path(s), map_location="cpu", weights_only=True)
            ids, logp = d["ids"], d["logp"]
            ok = (d["key"] == self.key and d["shard"] == s and d["rows"] == list(rows) and ids.dtype == torch.int32
                  and logp.dtype == torch.float32 and ids.shape == logp.shape
                  and tuple(ids.shape[:2]) == (len(rows), self.windows.shape[1])
                  and d["digest"] == tensor_hash({"ids": ids, "logp": logp}))
            return (ids, logp) if ok else None
        except Exception:  # missing, truncated, not a torch file, wrong layout: recompute it
            return None

    def prepare(self, batch_size=16):
        """Compute the missing or invalid shards (an interruption loses at most the shard in progress), then
        load all targets into memory. Returns self."""
        if not (self.dir / "meta.json").exists():
            commit_files({self.dir / "meta.json": (json.dumps(self.info, indent=2) + "\n").encode()})
        N, parts = len(self.windows), []
        with tqdm(total=N, desc=f"TCS targets {self.dir.name}", unit="window") as bar:
            for s, a in enumerate(range(0, N, self.shard)):
                rows = range(a, min(N, a + self.shard))
                part = self._load_shard(s, rows)
                if part is None:
                    outs = [self.compute(w) for w in self.windows[rows.start:rows.stop].split(batch_size)]
                    ids = torch.cat([o[0] for o in outs]).to("cpu", torch.int32)  # (n, L, K')
                    logp = torch.cat([o[1] for o in outs]).to("cpu", torch.float32)  # (n, L, K')
                    save_checkpoint({"key": self.key, "shard": s, "rows": list(rows), "ids": ids, "logp": logp,
                                     "digest": tensor_hash({"ids": ids, "logp": logp})}, self.shard_path(s))
                    part, self.computed = (ids, logp), self.computed + len(rows)
                parts.append(part)
                bar.update(len(rows))
        self.ids, self.logp = (torch.cat([p[j] for p in parts]) for j in (0, 1))  # (N, L, K') each
        self.row = {window_key(w): r for r, w in enumerate(self.windows.numpy())}
        return self

    def __call__(self, x):
        """Targets of windows x (B, L) on x's device; a batch with a window outside the set goes to the teacher."""
        rows = [self.row.get(window_key(w)) for w in x.cpu().numpy()]  # one host copy per batch
        missing = rows.count(None)
        self.hits, self.misses = self.hits + len(rows) - missing, self.misses + missing
        if missing:
            return self.compute(x)
        r = torch.tensor(rows)
        return self.ids[r].to(x.device, torch.long), self.logp[r].to(x.device)

    def stats(self):
        return {"dir": str(self.dir), "windows": len(self.windows), "computed": self.computed, "hits": self.hits,
                "misses": self.misses, "mb": (self.ids.numel() * 8 if self.ids is not None else 0) / 2 ** 20}


class TargetCache:
    """Sparse targets of every window met, keyed by its tokens (so by chunk), on the CPU; stops adding (but
    keeps serving) once max_bytes is reached."""

    def __init__(self, compute, max_bytes=1 << 30):
        self.compute, self.max_bytes = compute, max_bytes
        self.store, self.nbytes, self.hits, self.misses, self.seconds = {}, 0, 0, 0, 0.0

    def __call__(self, x):
        """x (B, L) -> (ids (B, L, K'), logp (B, L, K')) on x's device; computes only the misses."""
        keys = [r.tobytes() for r in x.cpu().numpy()]
        hit = [b for b, k in enumerate(keys) if k in self.store]
        miss = [b for b, k in enumerate(keys) if k not in self.store]
        self.hits, self.misses = self.hits + len(hit), self.misses + len(miss)
        if hit:
            hit_ids = torch.stack([self.store[keys[b]][0] for b in hit]).to(x.device, torch.long)  # (h, L, K')
            hit_logp = torch.stack([self.store[keys[b]][1] for b in hit]).to(x.device)  # (h, L, K')
            if not miss:
                return hit_ids, hit_logp
        t0 = time.perf_counter()
        ids, logp = self.compute(x[miss])  # (m, L, K') each
        self.seconds += time.perf_counter() - t0
        for b, i, lp in zip(miss, ids.to("cpu", torch.int32), logp.cpu()):
            size = i.numel() * 4 + lp.numel() * lp.element_size()
            if self.nbytes + size > self.max_bytes:
                break
            self.store[keys[b]] = (i.clone(), lp.clone())  # clone: do not pin the whole batch's storage
            self.nbytes += size
        if not hit:
            return ids, logp
        out_ids = torch.empty((len(keys),) + ids.shape[1:], dtype=torch.long, device=x.device)  # (B, L, K')
        out_logp = torch.empty((len(keys),) + logp.shape[1:], dtype=logp.dtype, device=x.device)  # (B, L, K')
        out_ids[miss], out_logp[miss], out_ids[hit], out_logp[hit] = ids, logp, hit_ids, hit_logp
        return out_ids, out_logp

    def stats(self):
        return {"chunks": len(self.store), "hits": self.hits, "misses": self.misses, "mb": self.nbytes / 2 ** 20,
                "teacher_seconds": self.seconds}


def grid_batch(data_dir, split, batch_size, seq_len, generator=None, device="cpu", chunks=None):
    """Like data.get_batch, but windows start on the chunk grid 0, L, 2L, ... of the split, so their TCS
    targets can be reused in later epochs; chunks (n,): draw only from these."""
    data = _open_split(data_dir, split)
    n_chunks = len(data) // seq_len
    if n_chunks < 1:
        raise DataError(f"{split} split of {data_dir} has {len(data)} tokens, fewer than seq_len = {seq_len}")
    pick = torch.randint(n_chunks if chunks is None else len(chunks), (batch_size,), generator=generator)  # (B,)
    return windows_at(data, (pick if chunks is None else chunks[pick]) * seq_len, seq_len, device)  # chunk starts


def fixed_chunks(data_dir, seq_len, n):
    """A fixed training set, the same for every run on this data and seq_len: n chunks evenly spaced over the
    train split's grid (all of them when n >= its size), (n,) int64."""
    n_chunks = len(_open_split(data_dir, "train")) // seq_len
    if n_chunks < 1:
        raise DataError(f"the train split of {data_dir} is shorter than seq_len = {seq_len}")
    if n >= n_chunks:
        return torch.arange(n_chunks)
    return torch.linspace(0, n_chunks - 1, n, dtype=torch.float64).round().long()  # distinct: spacing >= 1


def target_settings(teacher, config, bos_id, estimator, topk, window, candidates):
    """What a teacher's stored targets depend on besides the windows (part of DiskTargets' key)."""
    top = estimator == "topk"  # window and candidates matter to topk only
    return {"teacher_sha256": tensor_hash(teacher.state_dict()), "teacher_config": config, "bos_id": bos_id,
            "estimator": estimator, "topk": topk, "window": window if top else None,
            "candidates": candidates if top else None}


def target_store(compute, data_dir, seq_len, fixed=0, cache_dir=None, cache_mb=1024, batch_size=16, settings=None):
    """Where a TCS run's targets come from -> (targets, chunks): a callable like compute (with stats() when it
    caches), and the chunks training draws from (None: all). fixed > 0 (and settings given): `fixed` chunks,
    their targets precomputed to cache_dir (default DATA_DIR/tcs_targets) unless cache_dir is 'none'; else
    every window met is kept in memory up to cache_mb MiB (0: none)."""
    chunks = fixed_chunks(data_dir, seq_len, fixed) if fixed > 0 else None
    if chunks is not None and str(cache_dir or "").lower() != "none" and settings is not None:
        windows = windows_at(_open_split(data_dir, "train"), chunks * seq_len, seq_len)  # (N, L)
        store = DiskTargets(cache_dir or Path(data_dir) / "tcs_targets", windows, settings, compute).prepare(batch_size)
        print(f"TCS targets of {len(windows)} fixed windows: {store.dir} ({store.computed} computed now)")
        return store, chunks
    return (TargetCache(compute, int(cache_mb * 2 ** 20)) if cache_mb > 0 else compute), chunks
