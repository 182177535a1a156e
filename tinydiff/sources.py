"""Where the documents come from (data.py tokenizes them): 'stdlib' (the running interpreter's standard library,
the default offline corpus), 'shakespeare' (downloaded once), a local text file or folder, or a Hugging Face
dataset ('owt', 'tinystories': HF_SOURCES, `pip install datasets`). A folder (and 'stdlib') holds out every
VAL_EVERY-th file as val; a single file (and 'shakespeare') is cut near 90% of its text."""
import hashlib
import os
import re
import sysconfig
import urllib.request
from pathlib import Path

from .common import commit_files
from .errors import DataError


# ----------------------------------------------------------------------------- local sources

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


def stdlib_files():
    """(train_files, val_files): the standard library's .py files; installed packages and the test suites (huge,
    repetitive, full of deliberately odd code) excluded."""
    def excluded(name):
        return name in ("site-packages", "dist-packages", "__pycache__", "idle_test") or name.startswith("test")
    files = _walk(Path(sysconfig.get_paths()["stdlib"]), lambda d: not excluded(d.name),
                  lambda f: f.endswith(".py") and not excluded(f))
    # codec tables (encodings/cp037.py, cp1125.py, ...: a decoding_map or decoding_table of 256 entries) are
    # ~10% of the bytes and not code anyone writes; held out, one of them alone dominates the val loss
    files = [f for f in files if not re.search(rb"^decoding_(map|table) = ", Path(f).read_bytes(), re.M)]
    return _split_files(files)


def _read_text(path, skip_bad=False):
    """File -> str (UTF-8, undecodable bytes replaced); a binary file is a DataError. skip_bad: None for a binary or
    unreadable file instead (one such file in a user's folder should not fail the whole corpus)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        if not skip_bad:
            raise
        return None
    if looks_binary(data):
        if skip_bad:
            return None
        raise DataError(f"data file {path} looks binary (it holds NUL bytes or is mostly not UTF-8 text): "
                        f"give a text file or a folder of them")
    return data.decode("utf-8", errors="replace")


def looks_binary(data):
    """A NUL byte (text never holds one; executables, images and UTF-16 do), or more than a quarter of the
    first 64 KiB undecodable as UTF-8."""
    if b"\0" in data:
        return True
    head = data[:65536]
    return len(head) > 0 and head.decode("utf-8", errors="replace").count("\ufffd") > len(head) / 4


def _split_text(text, frac=0.9):
    """(train, val): cut just after the last newline before frac of the text (exactly at frac when there is none
    in the second half)."""
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
                            f"as a path instead, e.g. --data path/to/tinyshakespeare.txt") from None
        commit_files({raw: data})
    return raw


def local_documents(source, root):
    """A local source -> (name, train_docs, val_docs, where): documents as strings, where = what meta records."""
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
                        f"{', '.join(HF_SOURCES)} or an existing text file/folder")
    # the path's own name keeps the folder readable; a hash of the full path keeps two 'notes/' apart
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem if path.is_file() else path.name).strip("_") or "data"
    name = f"{stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if path.is_dir():
        # skip hidden folders, caches, and ROOT itself (--data . must not read its own prepared data)
        skip = Path(root).resolve()
        files = _walk(path, lambda d: not d.name.startswith(".") and d.name != "__pycache__" and d.resolve() != skip,
                      lambda f: Path(f).suffix.lower() in TEXT_SUFFIXES and not f.startswith("."))
        texts = [t for t in (_read_text(f, skip_bad=True) for f in files) if t is not None]
        if len(texts) < len(files):
            print(f"note: skipped {len(files) - len(texts)} binary or unreadable file(s) under {path}")
        if not texts:
            raise DataError(f"no text files found under {path} (looked for {', '.join(sorted(TEXT_SUFFIXES))}): "
                            f"point --data at a folder that holds text files, or at a single text file")
    else:
        texts = [_read_text(path)]
    if len(texts) > 1:
        train, val = _split_files(texts)
    else:  # one file: cut its text
        train, val = ([t] for t in _split_text(texts[0]))
    return name, train, val, str(path)


def hash_documents(train_docs, val_docs):
    """sha256 over the documents' bytes in order; the length prefix makes document boundaries count."""
    h = hashlib.sha256()
    for doc in train_docs + [None] + val_docs:  # None marks where val starts: moving a file across changes it
        b = b"" if doc is None else doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


# ----------------------------------------------------------------------------- Hugging Face datasets

HF_SOURCES = {
    # OpenWebText, held out as MDLM does (its dataloader.py: split='train[:-100000]' / 'train[-100000:]')
    "owt": {"path": "Skylion007/openwebtext", "train": "train", "holdout": 100_000},
    # TinyStories (Eldan & Li 2023) ships its own validation split
    "tinystories": {"path": "roneneldan/TinyStories", "train": "train", "val": "validation"},
}


def take(ds, a, b):
    """Documents a..b-1 of a datasets.Dataset (a cheap index view) or a list."""
    return ds.select(range(a, b)) if hasattr(ds, "select") else ds[a:b]


def hf_documents(source):
    """(train, val) documents of a HF_SOURCES entry, as datasets.Dataset objects with a "text" column."""
    spec = HF_SOURCES[source]
    try:
        import datasets  # lazy: an optional extra
    except ImportError:
        raise DataError(f"--data {source} needs the Hugging Face datasets package: pip install datasets") from None
    # datasets 2.16-3.x run a repository's loading script only when asked to; 4+ dropped scripts and the flag
    major, minor = (int(x) for x in datasets.__version__.split(".")[:2])
    kw = {"trust_remote_code": True} if (2, 16) <= (major, minor) < (4, 0) else {}
    try:
        full = datasets.load_dataset(spec["path"], split=spec["train"], **kw)
        if "val" in spec:
            return full, datasets.load_dataset(spec["path"], split=spec["val"], **kw)
    except Exception as e:  # offline, hub errors, a script-based dataset on datasets >= 4, ...
        raise DataError(f"could not load the {source} dataset ({spec['path']}) with datasets {datasets.__version__} "
                        f"({type(e).__name__}: {str(e)[:300]}). It is downloaded on first use: check the network "
                        f"(offline with a cached copy: HF_DATASETS_OFFLINE=1); if the message says dataset scripts "
                        f"are not supported, pip install 'datasets<4'") from None
    n, k = len(full), spec["holdout"]
    if n <= k:
        raise DataError(f"{spec['path']} has {n} documents, not more than the {k} held out for validation")
    return take(full, 0, n - k), take(full, n - k, n)


def doc_texts(docs, a, b):
    """Documents a..b-1 as strings: from a datasets.Dataset ("text" column), a list of dicts or of strings."""
    if hasattr(docs, "column_names"):
        return docs[a:b]["text"]  # a Dataset slice is a dict of columns
    return [d if isinstance(d, str) else d["text"] for d in docs[a:b]]
