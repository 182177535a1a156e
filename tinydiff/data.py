"""Tokenizers, dataset sources, prepare -> uint16 .bin files, and batches.

On disk (design.md §3), one folder per (source, tokenizer) under ROOT (default ./data, gitignored):

    ROOT/<name>-<tokenizer>/train.bin   uint16 token ids, every document followed by the eot id
    ROOT/<name>-<tokenizer>/val.bin     same layout, the held-out documents
    ROOT/<name>-<tokenizer>/meta.json   tokenizer, vocab_size, eot_id, token/document counts, source, source_hash

<name> is 'stdlib', 'shakespeare', or for a local path its sanitized name plus 8 hex chars of a hash
of its absolute path (two folders both called 'notes' do not collide). prepare() writes the folder
once; later calls hash the source again and do nothing while the hash and tokenizer still match.
Every file is written to a temp file beside it and moved into place with os.replace, meta.json
last: it is the commit marker, so a crash or an error never leaves a half-written dataset that looks
complete, and a failing prepare never touches a dataset that is already there.

Sources: 'stdlib' (the running interpreter's standard library, the default offline corpus),
'shakespeare' (tiny shakespeare, downloaded once), or a path to a text file or a folder of them.
"""
import hashlib
import json
import os
import re
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .common import UserError


class DataError(UserError):
    """User-facing error: the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- tokenizers

class Tokenizer:
    """Shared decode: ids -> text, robust to ids a model may emit that are not text."""
    name, vocab_size, eot_id = None, None, None
    UNKNOWN = "□"  # shown for ids outside the vocabulary, e.g. the [MASK] id = vocab_size

    def _bytes(self, ids):
        raise NotImplementedError

    def decode(self, ids):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size and i != self.eot_id:
                run.append(i)
                continue
            # flush the text run first: a multi-byte character may span several ids of it
            out.append(self._bytes(run).decode("utf-8", errors="replace"))
            run = []
            out.append("\n" if i == self.eot_id else self.UNKNOWN)
        out.append(self._bytes(run).decode("utf-8", errors="replace"))
        return "".join(out)


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the UTF-8 bytes, 256 is end-of-text. Needs no vocabulary file."""
    name, vocab_size, eot_id = "bytes", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def _bytes(self, ids):
        return bytes(ids)


class GPT2Tokenizer(Tokenizer):
    """tiktoken's GPT-2 BPE: 50257 ids, the last one (50256) is <|endoftext|>."""
    name = "gpt2"

    def __init__(self):
        try:
            import tiktoken  # lazy: the bytes tokenizer must work without it
        except ImportError:
            raise DataError("the gpt2 tokenizer needs tiktoken: pip install tiktoken "
                            "(or use --tokenizer bytes)") from None
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline with no cached vocabulary: requests/urllib errors, or a bad cache
            raise DataError(f"could not load the GPT-2 vocabulary ({type(e).__name__}: {e}); tiktoken downloads it "
                            f"on first use: go online once, or set TIKTOKEN_CACHE_DIR to a folder that holds a cached "
                            f"copy (or use --tokenizer bytes)") from None
        self.vocab_size, self.eot_id = self.enc.n_vocab, self.enc.eot_token

    def encode(self, text):
        # encode_ordinary: a literal "<|endoftext|>" inside a document is plain text, not the eot id
        return self.enc.encode_ordinary(text)

    def _bytes(self, ids):
        return self.enc.decode_bytes(ids)


TOKENIZERS = {"bytes": ByteTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(name="bytes"):
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


# ----------------------------------------------------------------------------- sources -> documents

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java",
                 ".js", ".ts", ".html", ".css", ".tex", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".json",
                 ".jsonl", ".csv", ".xml"}
VAL_EVERY = 100  # folder sources: every 100th file (in sorted order) is held out, ~1%


def _walk(root, keep_dir, keep_file):
    """Sorted files under root; folders rejected by keep_dir(path) are never entered (site-packages can be huge)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if keep_dir(Path(dirpath, d))]
        found += [Path(dirpath, f) for f in filenames if keep_file(f)]
    # sort by relative posix path: the same order on every machine and OS
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _split_files(files):
    """(train, val): every VAL_EVERY-th file held out, at least one (the last) for small folders."""
    val_idx = set(range(VAL_EVERY - 1, len(files), VAL_EVERY)) or {len(files) - 1}
    return [f for i, f in enumerate(files) if i not in val_idx], [f for i, f in enumerate(files) if i in val_idx]


def _is_stdlib_excluded(name):
    return name in ("site-packages", "dist-packages", "__pycache__", "idle_test") or name.startswith("test")


def stdlib_files():
    """(train_files, val_files): the interpreter's standard-library .py files, tests and installed packages excluded.
    Test suites are excluded because they are huge, repetitive and full of deliberately odd code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _walk(root, lambda d: not _is_stdlib_excluded(d.name),
                  lambda f: f.endswith(".py") and not _is_stdlib_excluded(f))
    # machine-generated codec tables (encodings/cp037.py, ...) are ~10% of the bytes and not code anyone writes
    files = [f for f in files if b"gencodec.py" not in Path(f).read_bytes()[:1000]]
    return _split_files(files)


def _read_text(path, skip_bad=False):
    """File -> str (UTF-8, undecodable bytes replaced). With skip_bad, None for binaries (they hold a NUL byte)
    and unreadable files: a user's folder may hold both, and one of them should not fail the whole corpus."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        if not skip_bad:
            raise
        return None
    return None if skip_bad and b"\0" in data else data.decode("utf-8", errors="replace")


def _split_text(text, frac=0.9):
    """(train, val) = first ~90% / last ~10% of the text, cut just after a newline near the 90% mark so no
    line is split in two; the exact character cut when there is no newline in the last half."""
    cut = int(len(text) * frac)
    nl = text.rfind("\n", 0, cut)
    if nl >= len(text) // 2:
        cut = nl + 1
    return text[:cut], text[cut:]


def _download_shakespeare(root):
    raw = Path(root) / "shakespeare-raw" / "input.txt"
    if not raw.exists():
        print(f"downloading tiny shakespeare from {SHAKESPEARE_URL}")
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=15) as r:
                data = r.read()
        except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
            raise DataError(f"could not download tiny shakespeare ({e}): you seem to be offline; pass a local copy "
                            f"as a path instead, e.g. --data /work/shared/data/tinyshakespeare.txt") from None
        _commit({raw: data})
    return raw


def _documents(source, root):
    """source -> (name, train_docs, val_docs, where): the documents as strings, where = what meta records."""
    if source == "stdlib":
        train, val = stdlib_files()
        read = lambda files: [_read_text(f) for f in files]
        return "stdlib", read(train), read(val), "stdlib:" + sysconfig.get_paths()["stdlib"]
    if source == "shakespeare":
        train, val = _split_text(_read_text(_download_shakespeare(root)))
        return "shakespeare", [train], [val], SHAKESPEARE_URL
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data path {source} does not exist: give --data stdlib, shakespeare, "
                        f"or an existing text file/folder")
    # the path's own name keeps the folder readable; a hash of the full path keeps two 'notes/' apart
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem if path.is_file() else path.name).strip("_") or "data"
    name = f"{stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if path.is_dir():
        # skip hidden folders, caches, and ROOT itself (--data . must not read its own prepared data)
        skip = Path(root).resolve()
        files = _walk(path, lambda d: not d.name.startswith(".") and d.name != "__pycache__" and d.resolve() != skip,
                      lambda f: Path(f).suffix.lower() in TEXT_SUFFIXES and not f.startswith("."))
        texts = [t for t in (_read_text(f, skip_bad=True) for f in files) if t is not None]
        if not texts:
            raise DataError(f"no text files found under {path} (looked for {', '.join(sorted(TEXT_SUFFIXES))}): "
                            f"point --data at a folder that holds text files, or at a single text file")
        if len(texts) == 1:  # one file: split its text like a file source
            train, val = _split_text(texts[0])
            return name, [train], [val], str(path)
        train, val = _split_files(texts)
        return name, train, val, str(path)
    train, val = _split_text(_read_text(path))
    return name, [train], [val], str(path)


def _hash_documents(train_docs, val_docs):
    """sha256 over the documents' bytes in order; the length prefix makes document boundaries count."""
    h = hashlib.sha256()
    for doc in train_docs + [None] + val_docs:  # None marks where val starts: moving a file across changes it
        b = b"" if doc is None else doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


# ----------------------------------------------------------------------------- prepare

META_VERSION = 1  # bump when the layout or the split rules change, so old folders are rebuilt


def _commit(files):
    """Write {path: bytes} atomically: every file to a temp file beside it first, then os.replace each, in order.
    Any error before the replaces leaves the folder exactly as it was; temp files are always removed."""
    tmps = {}
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmps[path] = tmp
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


def _is_prepared(out, meta_want):
    """True when out/ holds a complete dataset for the same source content and tokenizer."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        return (all(meta.get(k) == meta_want[k] for k in ("version", "tokenizer", "vocab_size", "source_hash"))
                and (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
                and (out / "val.bin").stat().st_size == 2 * meta["val_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _tokenize(docs, tok, desc):
    """Documents -> one uint16 array, each document followed by the eot id. Returns (ids, text tokens)."""
    parts = []
    for doc in tqdm(docs, desc=desc, unit="doc", disable=len(docs) < 2):
        parts.append(np.array(tok.encode(doc) + [tok.eot_id], dtype=np.uint16))  # (len(doc ids) + 1,)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    return ids, len(ids) - len(docs)


def prepare(source="stdlib", tokenizer_name="bytes", root="data"):
    """Make sure ROOT/<name>-<tokenizer>/ holds the tokenized source; returns that folder."""
    tok = get_tokenizer(tokenizer_name)
    assert tok.vocab_size <= 2 ** 16, "token ids are stored as uint16"
    name, train_docs, val_docs, where = _documents(source, root)
    out = Path(root) / f"{name}-{tok.name}"
    meta = {"version": META_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "source": where, "source_hash": _hash_documents(train_docs, val_docs)}
    if _is_prepared(out, meta):
        return out
    if (out / "meta.json").exists():
        print(f"{out}: the source or tokenizer changed since it was prepared, preparing it again")

    train, n_train_text = _tokenize(train_docs, tok, f"tokenizing {name} train ({tok.name})")
    val, n_val_text = _tokenize(val_docs, tok, f"tokenizing {name} val ({tok.name})")
    if n_train_text == 0 or n_val_text == 0:
        raise DataError(f"data source {source} is empty or too small: it gives {n_train_text} train and "
                        f"{n_val_text} val tokens; use a text file/folder with more text (or --data stdlib)")

    meta.update(train_tokens=len(train), val_tokens=len(val), n_documents=len(train_docs) + len(val_docs),
                n_train_documents=len(train_docs), n_val_documents=len(val_docs))
    _commit({out / "train.bin": train.tobytes(), out / "val.bin": val.tobytes(),
             out / "meta.json": (json.dumps(meta, indent=2) + "\n").encode()})  # meta.json last: the commit marker
    print(f"prepared {out}: {len(train):,} train / {len(val):,} val tokens from {meta['n_documents']} documents")
    return out


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
    x = torch.stack([torch.from_numpy(data[i:i + seq_len].astype(np.int64)) for i in ix.tolist()])  # (B, L)
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)  # pinned: the copy overlaps with GPU work
    return x.to(device)


def val_windows(data_dir, seq_len, max_tokens):
    """(N, seq_len) int64: consecutive non-overlapping windows from the start of val.bin, the same for every
    model evaluated on this data. N = min(max_tokens, val tokens) // seq_len, at least 1."""
    data = _open_split(data_dir, "val")
    if len(data) < seq_len:
        raise DataError(f"val split of {data_dir} has {len(data)} tokens, fewer than seq_len = {seq_len}: "
                        f"use a smaller --seq_len or a bigger corpus")
    n = max(1, min(max_tokens // seq_len, len(data) // seq_len))
    return torch.from_numpy(data[:n * seq_len].astype(np.int64)).view(n, seq_len)  # (N, L)

