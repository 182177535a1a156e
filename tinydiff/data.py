"""Preparing a corpus (documents from sources.py -> uint16 .bin files) and drawing batches from it.

ROOT/<name>-<tokenizer>-<key>/ (ROOT default ./data) holds train.bin and val.bin (uint16 ids, each document
followed by the eot id), meta.json, and for bpe the learned merges (bpe.json). <key> hashes the source's content
(HF sources: their recipe) and the tokenizer: an edited source gets a new folder and the old one stays, so a
running job never sees its data change and a checkpoint finds its folder again (checkpoint_data). A folder is
written as a hidden temp folder and renamed into place: complete or absent, and never written again.
"""
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import bpe
from .common import commit_files, pid_alive
from .dist import rank0_first
from .errors import DataError
from .sources import HF_SOURCES, doc_texts, hash_documents, hf_documents, local_documents
from .tokenizers import BPETokenizer, get_tokenizer, tokenizer_from_spec


# ----------------------------------------------------------------------------- tokenizers

def _lab_params(source):
    """LabParams of a lab source ('lab', 'lab:W=...'), None for any other source; a bad spec is a DataError."""
    if source != "lab" and not str(source).startswith("lab:"):
        return None
    from .lab import parse_spec
    try:
        return parse_spec(source)
    except ValueError as e:
        raise DataError(str(e)) from None


def default_tokenizer(source):
    """The lab gets its own tokenizer, every other source a BPE learned from its training split."""
    params = _lab_params(source)
    return "bpe" if params is None else f"lab{params.A}"


def load_tokenizer(data_dir):
    """The tokenizer a prepared folder was tokenised with (bpe: its bpe.json)."""
    meta = load_meta(data_dir)
    if meta["tokenizer"] != "bpe":
        return get_tokenizer(meta["tokenizer"])
    try:
        spec = json.loads((Path(data_dir) / "bpe.json").read_text())
    except (OSError, ValueError):
        raise DataError(f"{data_dir}/bpe.json is missing or corrupt: delete {data_dir} and prepare it again") from None
    tok = tokenizer_from_spec(spec)
    if tok.sha256 != meta.get("merges_sha256"):
        raise DataError(f"{data_dir}/bpe.json does not hold the merges meta.json records: delete {data_dir} and "
                        f"prepare it again")
    return tok


# ----------------------------------------------------------------------------- prepare

META_VERSION = 1  # bump when the layout or the split rules change, so old folders are rebuilt
KEY_CHARS = 12  # hex chars of the content key in a folder name
CHUNK_DOCS = 512  # documents per tokenisation task
BPE_LEARN_BYTES = 64 * 2 ** 20  # bpe merges are learned from (at most) the first 64 MiB of the training split


def _recipe(tokenizer_name, vocab_size):
    """(folder suffix, meta fields) of a tokenizer, known before a bpe one is learned (to find its folder)."""
    if tokenizer_name != "bpe":
        tok = get_tokenizer(tokenizer_name)
        assert tok.vocab_size <= 2 ** 16, "token ids are stored as uint16"
        return tok.name, {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    if not isinstance(vocab_size, int) or not 258 <= vocab_size <= 2 ** 16:
        raise DataError(f"--tokenizer bpe needs a --vocab_size between 258 and 65536 (got {vocab_size}), e.g. 4096")
    return f"bpe{vocab_size}", {"tokenizer": "bpe", "vocab_size": vocab_size, "eot_id": vocab_size - 1,
                                "bpe_trainer": bpe.VERSION}


def _meta(tok_meta, where, source_hash):
    """What identifies a dataset; key hashes the tokenizer's recipe and the content (a bpe tokenizer is a
    deterministic function of the content, its size and the trainer's version)."""
    tok_id = f"{tok_meta['tokenizer']}/{tok_meta['vocab_size']}/{tok_meta.get('bpe_trainer', '')}"
    key = hashlib.sha256(f"{META_VERSION}/{tok_id}/{source_hash}".encode()).hexdigest()[:KEY_CHARS]
    return {"version": META_VERSION, **tok_meta, "source": where, "source_hash": source_hash, "key": key}


def _folder(root, name, suffix, meta):
    return Path(root) / f"{name}-{suffix}-{meta['key']}"


def _is_complete(out):
    try:
        meta = json.loads((out / "meta.json").read_text())
        return ((out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
                and (out / "val.bin").stat().st_size == 2 * meta["val_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_prepared(out, meta_want):
    """True when out/ holds a complete dataset for the same source content and tokenizer."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (all(meta.get(k) == meta_want[k] for k in ("version", "tokenizer", "vocab_size", "key"))
            and _is_complete(out) and (meta["tokenizer"] != "bpe" or (out / "bpe.json").is_file()))


def _encode(tok, texts):
    """Texts -> one uint16 array, each document followed by the eot id."""
    ids = []
    for text in texts:
        ids += tok.encode(text)
        ids.append(tok.eot_id)
    return np.array(ids, dtype=np.uint16)  # (tokens,)


_WORKER_TOK = None  # the tokenizer of a Pool worker process


def _init_worker(tokenizer_spec):
    global _WORKER_TOK
    _WORKER_TOK = tokenizer_from_spec(tokenizer_spec)


def _encode_in_worker(texts):
    return _encode(_WORKER_TOK, texts)


def _token_chunks(docs, tok, num_proc):
    """Yield (documents, tokens) CHUNK_DOCS documents at a time, in document order (so the result does not depend
    on num_proc). At most 2 * num_proc chunks are in flight in the Pool: memory stays bounded."""
    bounds = [(a, min(a + CHUNK_DOCS, len(docs))) for a in range(0, len(docs), CHUNK_DOCS)]
    if num_proc <= 1 or len(bounds) < 2:
        for a, b in bounds:
            yield b - a, _encode(tok, doc_texts(docs, a, b))
        return
    with multiprocessing.Pool(num_proc, initializer=_init_worker, initargs=(tok.spec(),)) as pool:
        pending = deque()
        for i, (a, b) in enumerate(bounds):
            pending.append((b - a, pool.apply_async(_encode_in_worker, (doc_texts(docs, a, b),))))
            while pending and (len(pending) >= 2 * num_proc or i == len(bounds) - 1):
                k, result = pending.popleft()
                yield k, result.get()


def _write_tokens(path, docs, tok, num_proc, desc):
    """Stream the documents' tokens to `path`; returns the token count."""
    n = 0
    with open(path, "wb") as f, tqdm(total=len(docs), desc=desc, unit="doc", disable=len(docs) < 2) as bar:
        for k, ids in _token_chunks(docs, tok, num_proc):
            f.write(ids.tobytes())
            n += len(ids)
            bar.update(k)
        f.flush()
        os.fsync(f.fileno())
    return n


def _learn_texts(docs):
    """The training documents' texts, up to BPE_LEARN_BYTES characters in all."""
    seen = 0
    for a in range(0, len(docs), CHUNK_DOCS):
        for text in doc_texts(docs, a, min(a + CHUNK_DOCS, len(docs))):
            yield text
            seen += len(text)
            if seen >= BPE_LEARN_BYTES:
                return


class VocabTooLarge(DataError):
    """The training split cannot give the bpe ids asked for (every pair merged); .allowed: the most it gives."""

    def __init__(self, message, allowed):
        super().__init__(message)
        self.allowed = allowed


def _make_tokenizer(meta, train_docs):
    """The tokenizer meta describes: bytes / gpt2 by name; bpe learned here from the training documents."""
    if meta["tokenizer"] != "bpe":
        return get_tokenizer(meta["tokenizer"])
    t0 = time.time()
    tok = BPETokenizer.learn(_learn_texts(train_docs), meta["vocab_size"])
    if tok.vocab_size < meta["vocab_size"]:
        raise VocabTooLarge(f"the training split allows only {tok.vocab_size} bpe ids (every pair of tokens is "
                            f"merged): use --vocab_size {tok.vocab_size} or less, or a bigger corpus", tok.vocab_size)
    print(f"learned {len(tok.merges)} bpe merges from the training split in {time.time() - t0:.1f}s")
    return tok


def _remove_stale_temps(root):
    """Remove temp folders of prepares killed on this machine (their process is gone)."""
    host = socket.gethostname()
    for tmp in Path(root).glob(f".*.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_dataset(out, meta, train_docs, val_docs, num_proc, source):
    """Make the tokenizer (bpe: learn it), tokenize both splits into a temp folder, rename it to out/ in one step."""
    tok = _make_tokenizer(meta, train_docs)
    if num_proc is None:  # a Pool pays off only for many documents
        num_proc = min(os.cpu_count() or 1, 32) if len(train_docs) >= 8 * CHUNK_DOCS else 1
    _remove_stale_temps(out.parent)
    older = [p.name for p in out.parent.glob(f"{out.name[:-len(meta['key'])]}*") if p.is_dir() and p != out]
    if older:
        print(f"note: {source} changed since it was prepared: preparing {out.name}; the older "
              f"{', '.join(sorted(older))} is kept for runs that read it (delete it when none does)")
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        n_train = _write_tokens(tmp / "train.bin", train_docs, tok, num_proc, f"tokenizing {out.name} train")
        n_val = _write_tokens(tmp / "val.bin", val_docs, tok, num_proc, f"tokenizing {out.name} val")
        n_train_text, n_val_text = n_train - len(train_docs), n_val - len(val_docs)
        if n_train_text == 0 or n_val_text == 0:
            raise DataError(f"data source {source} is empty or too small: it gives {n_train_text} train and "
                            f"{n_val_text} val tokens; use a text file/folder with more text (or --data stdlib)")
        meta.update(train_tokens=n_train, val_tokens=n_val, n_documents=len(train_docs) + len(val_docs),
                    n_train_documents=len(train_docs), n_val_documents=len(val_docs))
        files = {}
        if tok.name == "bpe":  # the merges beside the data; meta.json records their hash
            meta["merges_sha256"] = tok.sha256
            files[tmp / "bpe.json"] = (json.dumps(tok.spec()) + "\n").encode()
        files[tmp / "meta.json"] = (json.dumps(meta, indent=2) + "\n").encode()
        commit_files(files)
        try:
            os.rename(tmp, out)  # atomic; fails when out/ exists (another process prepared the same content)
        except OSError:
            if not _is_prepared(out, meta):
                raise DataError(f"{out} exists but is not a complete dataset: delete it and run again") from None
            return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepared {out}: {n_train:,} train / {n_val:,} val tokens from {meta['n_documents']:,} documents")
    return out


def prepare_documents(name, train_docs, val_docs, tokenizer_name="gpt2", root="data", where=None, num_proc=None,
                      vocab_size=None):
    """Tokenize documents of your own into ROOT/<name>-<tokenizer>-<key>/ (unless already there); returns that
    folder. Documents: a datasets.Dataset with a "text" column, a list of {"text": ...} dicts, or of strings."""
    suffix, tok_meta = _recipe(tokenizer_name, vocab_size)
    if hasattr(train_docs, "_fingerprint") and hasattr(val_docs, "_fingerprint"):  # datasets' own content hashes
        source_hash = hashlib.sha256(f"{train_docs._fingerprint}/{val_docs._fingerprint}".encode()).hexdigest()
    else:
        source_hash = hash_documents(doc_texts(train_docs, 0, len(train_docs)), doc_texts(val_docs, 0, len(val_docs)))
    meta = _meta(tok_meta, where or name, source_hash)
    out = _folder(root, name, suffix, meta)
    if _is_prepared(out, meta):
        return out
    return _write_dataset(out, meta, train_docs, val_docs, num_proc, name)


def prepare(source="stdlib", tokenizer_name="bytes", root="data", num_proc=None, vocab_size=None):
    """Make sure ROOT/<name>-<tokenizer>-<key>/ holds the tokenized source (sources.py); returns that folder.
    num_proc: tokenizer processes (default: all cores for 4k+ documents). Under torchrun rank 0 prepares first."""
    with rank0_first():
        return _prepare(source, tokenizer_name, root, num_proc, vocab_size)


def _prepare(source, tokenizer_name, root, num_proc, vocab_size):
    if _lab_params(source) is not None:
        from .lab import prepare_lab  # the exact lab (tinydiff/lab/): one stationary chain per split
        return prepare_lab(source, get_tokenizer(tokenizer_name), root)
    suffix, tok_meta = _recipe(tokenizer_name, vocab_size)
    if source in HF_SOURCES:
        # keyed by the recipe (repository, splits): a prepared folder is reused without loading OpenWebText's ~40 GB
        spec, name, docs = HF_SOURCES[source], source, None
        recipe_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        meta = _meta(tok_meta, f"hf:{spec['path']}", recipe_hash)
    else:
        name, train_docs, val_docs, where = local_documents(source, root)
        meta, docs = _meta(tok_meta, where, hash_documents(train_docs, val_docs)), (train_docs, val_docs)
    out = _folder(root, name, suffix, meta)
    if _is_prepared(out, meta):
        return out
    train_docs, val_docs = docs or hf_documents(source)
    return _write_dataset(out, meta, train_docs, val_docs, num_proc, source)


def prepare_for(source, tok, root="data", num_proc=None):
    """Prepare `source` for an existing tokenizer (a checkpoint's). A bpe tokenizer is learned from the data it
    was trained on, so the folder's merges must be the same: another source is refused."""
    data_dir = prepare(source, tok.name, root, num_proc, vocab_size=tok.vocab_size)
    have = load_tokenizer(data_dir)
    if have.key != tok.key:
        raise DataError(f"{data_dir} is tokenized with {have.key}, but the checkpoint's tokenizer is {tok.key}: a bpe "
                        f"model reads only the data its merges were learned from (its training --data)")
    return data_dir


def checkpoint_data(ckpt, source=None, what="the checkpoint"):
    """The folder a checkpoint was trained on (--resume, eval.py); when it is gone, its source is prepared again
    and must give the same content key. source: another source asked for (eval.py --data), as it is now."""
    tok_name, vocab_size = ckpt["tokenizer"]["name"], ckpt["tokenizer"].get("vocab_size")
    if source is not None:
        return prepare_for(source, tokenizer_from_spec(ckpt["tokenizer"]))
    recorded, key = ckpt.get("data_dir"), ckpt.get("data_key")
    try:
        if recorded and (key is None or load_meta(recorded).get("key") == key) and _is_complete(Path(recorded)):
            return Path(recorded)
    except DataError:
        pass
    src = (ckpt.get("args") or {}).get("data") or "stdlib"
    try:
        data_dir = prepare(src, tok_name, vocab_size=vocab_size)
    except DataError as e:
        raise DataError(f"{what} was trained on {recorded}, which is gone, and its source cannot be prepared "
                        f"again here ({e}); pass --data SOURCE (eval.py) or restore the data") from None
    if key is not None and load_meta(data_dir)["key"] != key:
        raise DataError(f"{what} was trained on {recorded} (content key {key}), which is gone, and its source {src} "
                        f"now has other content ({data_dir}): restore that data, or evaluate on the new data "
                        f"explicitly with --data (eval.py) / start a new run")
    return data_dir


def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: {data_dir} is not a prepared dataset; prepare it first "
                        f"(tinydiff.data.prepare, or train.py --data SOURCE does it on first use)") from None
    except ValueError:
        raise DataError(f"{path} is corrupt: delete {data_dir} and prepare the data again") from None


# ----------------------------------------------------------------------------- batches

def _open_split(data_dir, split):
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}: choose train or val")
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise DataError(f"{path} not found: prepare the data first (tinydiff.data.prepare)")
    # a fresh memmap per call, as nanoGPT does: a long-lived one keeps growing resident memory
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(data_dir, split, batch_size, seq_len, generator=None, device="cpu"):
    """(batch_size, seq_len) int64 windows at random offsets; a CPU generator makes them reproducible."""
    data = _open_split(data_dir, split)
    if len(data) <= seq_len:
        raise DataError(f"{split} split of {data_dir} has {len(data)} tokens, fewer than seq_len+1 = {seq_len + 1}: "
                        f"use a smaller --seq_len or a bigger corpus")
    ix = torch.randint(len(data) - seq_len + 1, (batch_size,), generator=generator)  # (B,) window starts
    return windows_at(data, ix, seq_len, device)


# Window framing. "none": seq_len consecutive tokens of the split (tinydiff's own models). "bos_eos": [BOS] +
# seq_len - 2 consecutive tokens + [EOS], BOS = EOS = end-of-text: the chunks MDLM and SDTT trained on (mdlm
# dataloader.py _group_texts). Such a model is evaluated and distilled on the same framing (checkpoint "framing").
FRAMINGS = ("none", "bos_eos")


def frame(x, eot_id):
    """[BOS] + x + [EOS] per row, BOS = EOS = eot_id: (B, W - 2) -> (B, W)."""
    e = torch.full((x.shape[0], 1), eot_id, dtype=x.dtype, device=x.device)  # (B, 1)
    return torch.cat([e, x, e], 1)  # (B, W)


def framed_batches(eot_id):
    """A get_batch for bos_eos windows (same signature): rows of seq_len tokens, eot_id first and last."""
    def get(data_dir, split, batch_size, seq_len, generator=None, device="cpu"):
        if seq_len < 3:
            raise DataError(f"a framed window of {seq_len} tokens has no room for text between BOS and EOS")
        return frame(get_batch(data_dir, split, batch_size, seq_len - 2, generator, device), eot_id)  # (B, seq_len)
    return get


def windows_at(data, starts, seq_len, device="cpu"):
    """(B, seq_len) int64 windows of a token array at the given starts (B,), on device."""
    x = torch.stack([torch.from_numpy(data[i:i + seq_len].astype(np.int64)) for i in starts.tolist()])  # (B, L)
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)  # pinned: the copy overlaps with GPU work
    return x.to(device)


def val_windows(data_dir, seq_len, max_tokens):
    """(N, seq_len) int64: consecutive windows from the start of val.bin, N = min(max_tokens, val) // seq_len >= 1."""
    data = _open_split(data_dir, "val")
    if len(data) < seq_len:
        raise DataError(f"val split of {data_dir} has {len(data)} tokens, fewer than seq_len = {seq_len}: "
                        f"use a smaller --seq_len or a bigger corpus")
    n = max(1, min(max_tokens // seq_len, len(data) // seq_len))
    return torch.from_numpy(data[:n * seq_len].astype(np.int64)).view(n, seq_len)  # (N, L)
