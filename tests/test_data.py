"""tinydiff.data: tokenizers, prepare (file / folder / shakespeare / stdlib listing), batches, errors.
CPU only, no network, everything written under pytest's tmp_path."""
import json
import os
import re
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gpt2_or_skip
from tinydiff import bpe, data
from tinydiff.data import (BPETokenizer, DataError, get_batch, get_tokenizer, load_meta, load_tokenizer, prepare,
                           prepare_for, tokenizer_from_spec, val_windows)
from tinydiff.sources import stdlib_files

TEXT = "".join(f"line {i}: héllo wörld ✓ 日本語 {'x' * (i % 7)}\n" for i in range(200))


def ids_of(path):
    return np.fromfile(path, dtype=np.uint16)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def gpt2():
    return gpt2_or_skip()


# ----------------------------------------------------------------------------- tokenizers

def test_bytes_round_trip():
    tok = get_tokenizer()
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bytes", 257, 256)
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and tok.eot_id not in ids
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.tensor(ids)) == TEXT  # 1-D tensors decode too


def test_bytes_decode_specials_never_crash():
    tok = get_tokenizer("bytes")
    a, b = tok.encode("é"), tok.encode("x")
    assert tok.decode(a + [tok.eot_id] + b) == "é\nx"
    assert tok.decode(b + [257, 9999, -1] + b) == "x□□□x"  # [MASK] and garbage ids stay visible
    assert "\ufffd" in tok.decode(a[:1] + b)  # a cut multi-byte character is replaced, not an exception


def test_gpt2_round_trip(gpt2):
    assert (gpt2.name, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
    ids = gpt2.encode(TEXT + "<|endoftext|>")
    assert gpt2.eot_id not in ids  # a literal eot string inside a document is plain text
    assert gpt2.decode(ids) == TEXT + "<|endoftext|>"
    assert gpt2.decode(gpt2.encode("hi") + [gpt2.eot_id, 50257]) == "hi\n□"


def test_gpt2_errors_name_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now raises ImportError
    with pytest.raises(DataError, match="pip install tiktoken"):
        get_tokenizer("gpt2")
    monkeypatch.undo()
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        get_tokenizer("gpt2")


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="bytes, gpt2"):
        get_tokenizer("sentencepiece")
    with pytest.raises(DataError, match="bytes, gpt2"):
        prepare("stdlib", "sentencepiece")


# ----------------------------------------------------------------------------- prepare

def test_prepare_file(tmp_path):
    src = write(tmp_path / "my corpus.txt", TEXT)
    root = tmp_path / "data"
    d = prepare(str(src), "bytes", root=str(root))
    assert d.parent == root and re.fullmatch(r"my_corpus-[0-9a-f]{8}-bytes-[0-9a-f]{12}", d.name)
    tok = get_tokenizer("bytes")
    train, val = ids_of(d / "train.bin"), ids_of(d / "val.bin")
    # each part is one document followed by eot; the cut is on a line boundary near 90%
    assert train[-1] == val[-1] == tok.eot_id and (train == tok.eot_id).sum() == (val == tok.eot_id).sum() == 1
    train_text, val_text = tok.decode(train[:-1].tolist()), tok.decode(val[:-1].tolist())
    assert train_text + val_text == TEXT and train_text.endswith("\n")
    assert 0.85 < len(train_text) / len(TEXT) <= 0.9
    meta = load_meta(d)
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 257 and meta["eot_id"] == 256
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val) and meta["n_documents"] == 2
    assert meta["train_tokens"] + meta["val_tokens"] == len(tok.encode(TEXT)) + 2
    assert meta["source"] == str(src.resolve()) and len(meta["source_hash"]) == 64

    # second call: nothing is rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert prepare(str(src), "bytes", root=str(root)) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps

    # the source changes: its new content gets a new folder; the old one is kept as it was
    write(src, TEXT + "one more line\n")
    d2 = prepare(str(src), "bytes", root=str(root))
    assert d2 != d and d2.name[:-12] == d.name[:-12] and load_meta(d2)["key"] == d2.name[-12:]
    assert load_meta(d2)["train_tokens"] + load_meta(d2)["val_tokens"] == len(tok.encode(TEXT)) + 14 + 2
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


def make_folder(tmp_path):
    """Three text documents plus things a folder source must skip."""
    folder = tmp_path / "corpus"
    docs = {"a.txt": "alpha " * 50, "b.md": "# béta\n" * 30, "sub/c.py": "print('gamma')\n" * 20}
    for name, text in docs.items():
        write(folder / name, text)
    (folder / "blob.txt").write_bytes(b"\x00\x01binary")   # binary with a text suffix
    (folder / "image.png").write_bytes(b"\x89PNG not text")
    write(folder / ".git" / "HEAD.txt", "hidden")
    write(folder / "__pycache__" / "x.py", "cached")
    return folder, [docs[k] for k in sorted(docs)]


def test_prepare_folder(tmp_path):
    folder, docs = make_folder(tmp_path)
    tok = get_tokenizer("bytes")
    d = prepare(str(folder), "bytes", root=str(tmp_path / "data"))
    eot = [tok.eot_id]
    # sorted order; fewer than 100 files -> the last one is the val document
    want_train = tok.encode(docs[0]) + eot + tok.encode(docs[1]) + eot
    want_val = tok.encode(docs[2]) + eot
    assert ids_of(d / "train.bin").dtype == np.uint16
    assert ids_of(d / "train.bin").tolist() == want_train and ids_of(d / "val.bin").tolist() == want_val
    meta = load_meta(d)
    assert meta["n_documents"] == 3 and (meta["n_train_documents"], meta["n_val_documents"]) == (2, 1)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(tok.encode(t)) + 1 for t in docs)
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    prepare(str(folder), "bytes", root=str(tmp_path / "data"))
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


def test_prepare_folder_skips_its_own_data_root(tmp_path):
    folder, _ = make_folder(tmp_path)
    root = folder / "data"  # --data . with the default root inside it
    d = prepare(str(folder), "bytes", root=str(root))
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    prepare(str(folder), "bytes", root=str(root))  # meta.json inside the folder must not count as a document
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


def test_folder_with_one_file_splits_like_a_file(tmp_path):
    write(tmp_path / "one" / "only.txt", TEXT)
    d_dir = prepare(str(tmp_path / "one"), "bytes", root=str(tmp_path / "data"))
    d_file = prepare(str(tmp_path / "one" / "only.txt"), "bytes", root=str(tmp_path / "data"))
    assert d_dir != d_file
    for split in ("train.bin", "val.bin"):
        assert ids_of(d_dir / split).tolist() == ids_of(d_file / split).tolist()


def test_prepare_gpt2(tmp_path, gpt2):
    src = write(tmp_path / "t.txt", TEXT)
    d = prepare(str(src), "gpt2", root=str(tmp_path / "data"))
    train, val = ids_of(d / "train.bin"), ids_of(d / "val.bin")
    assert re.search(r"-gpt2-[0-9a-f]{12}$", d.name) and train[-1] == val[-1] == 50256  # the eot id fits in uint16
    assert gpt2.decode(train[:-1].tolist()) + gpt2.decode(val[:-1].tolist()) == TEXT


def test_shakespeare_offline_and_cached(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="offline.*--data"):
        prepare("shakespeare", root=str(root))
    assert not (root / "shakespeare-raw" / "input.txt").exists()
    write(root / "shakespeare-raw" / "input.txt", TEXT)  # an earlier download: no network needed
    d = prepare("shakespeare", root=str(root))
    assert re.fullmatch(r"shakespeare-bytes-[0-9a-f]{12}", d.name) and load_meta(d)["n_documents"] == 2


def test_stdlib_files():
    train, val = stdlib_files()
    assert (train, val) == stdlib_files()  # deterministic
    files = train + val
    assert len(files) > 300 and all(f.suffix == ".py" for f in files) and not set(train) & set(val)
    assert len(val) == len(files) // 100  # every 100th file: ~1%
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert "os.py" in rel and "json/__init__.py" in rel
    for r in rel:
        parts = r.split("/")
        assert not any(p.startswith("test") or p in ("tests", "idle_test", "site-packages", "dist-packages")
                       for p in parts), r
    all_sorted = sorted(rel)
    assert [all_sorted[i] for i in range(99, len(rel), 100)] == [f.relative_to(root).as_posix() for f in val]


# ----------------------------------------------------------------------------- batches

@pytest.fixture
def prepared(tmp_path):
    return prepare(str(write(tmp_path / "t.txt", TEXT)), "bytes", root=str(tmp_path / "data"))


def test_get_batch(prepared):
    x = get_batch(prepared, "train", batch_size=8, seq_len=32, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 32) and x.dtype == torch.int64 and 0 <= x.min() and x.max() < 257
    same = get_batch(prepared, "train", 8, 32, generator=torch.Generator().manual_seed(0))
    other = get_batch(prepared, "train", 8, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, same) and not torch.equal(x, other)
    train = ids_of(prepared / "train.bin").tolist()
    windows = {tuple(train[i:i + 32]) for i in range(len(train) - 31)}
    assert all(tuple(row) in windows for row in x.tolist())  # real substrings of the corpus
    v = get_batch(prepared, "val", 4, 16)
    assert v.shape == (4, 16)


def test_framed_batches_are_mdlm_chunks(prepared):
    """bos_eos framing (MDLM's _group_texts): [eot] + seq_len - 2 consecutive tokens of the split + [eot]."""
    x = data.framed_batches(256)(prepared, "train", 8, 32, torch.Generator().manual_seed(0))  # (8, 32)
    assert x.shape == (8, 32) and (x[:, 0] == 256).all() and (x[:, -1] == 256).all()
    train = ids_of(prepared / "train.bin").tolist()
    windows = {tuple(train[i:i + 30]) for i in range(len(train) - 29)}
    assert all(tuple(row) in windows for row in x[:, 1:-1].tolist())  # the middle: real text of the split
    # the middle is the unframed batch of 30 tokens drawn with the same generator state
    plain = get_batch(prepared, "train", 8, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:-1], plain)
    with pytest.raises(DataError, match="no room"):
        data.framed_batches(256)(prepared, "train", 2, 2)

def test_val_windows(prepared):
    val = torch.from_numpy(ids_of(prepared / "val.bin").astype(np.int64))
    w = val_windows(prepared, seq_len=16, max_tokens=64)
    assert w.shape == (4, 16) and w.dtype == torch.int64
    assert torch.equal(w.flatten(), val[:64]) and torch.equal(w, val_windows(prepared, 16, 64))
    assert val_windows(prepared, 16, 10 ** 9).shape == (len(val) // 16, 16)  # capped by the split
    assert val_windows(prepared, 16, 1).shape == (1, 16)  # at least one window


# ----------------------------------------------------------------------------- errors

def test_errors_are_actionable(tmp_path, prepared):
    root = str(tmp_path / "data")
    with pytest.raises(DataError, match="does not exist: give --data stdlib, shakespeare"):
        prepare(str(tmp_path / "nope.txt"), root=root)
    with pytest.raises(DataError, match="empty or too small"):
        prepare(str(write(tmp_path / "empty.txt", "")), root=root)
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="no text files found"):
        prepare(str(tmp_path / "void"), root=root)
    n_val = len(ids_of(prepared / "val.bin"))
    with pytest.raises(DataError, match=f"has {n_val} tokens.*--seq_len"):
        get_batch(prepared, "val", 2, n_val)
    with pytest.raises(DataError, match="--seq_len"):
        val_windows(prepared, n_val + 1, 10 ** 6)
    with pytest.raises(DataError, match="train or val"):
        get_batch(prepared, "test", 2, 8)
    with pytest.raises(DataError, match="prepare"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match="prepare"):
        get_batch(tmp_path, "train", 2, 8)


def test_failing_prepare_keeps_existing_data(tmp_path, monkeypatch):
    src = write(tmp_path / "t.txt", TEXT)
    root = str(tmp_path / "data")
    d = prepare(str(src), root=root)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    write(src, "")  # the source becomes empty: prepare refuses, the old dataset stays
    with pytest.raises(DataError):
        prepare(str(src), root=root)
    write(src, TEXT + "changed\n")  # a crash while writing: still nothing replaced, no temp files left

    def disk_full(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(data.os, "fsync", disk_full)
    with pytest.raises(OSError):
        prepare(str(src), root=root)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert json.loads(before["meta.json"])["train_tokens"] == load_meta(d)["train_tokens"]
    assert [p.name for p in Path(root).iterdir()] == [d.name]  # no temp folder, no half-written dataset


# ----------------------------------------------------------------------------- data pinned to its content

def test_running_job_keeps_reading_its_data(tmp_path):
    """A job holds its folder; the source is edited and prepared again by another run: the job's batches
    do not change (QA: a job's val loss went 2.80 -> 12.35 when train.bin was replaced under it)."""
    src = write(tmp_path / "swap.txt", TEXT)
    root = str(tmp_path / "data")
    job = prepare(str(src), root=root)
    before = get_batch(job, "train", 8, 16, torch.Generator().manual_seed(0))
    write(src, "z\n" * 5000)  # edited ...
    other = prepare(str(src), root=root)  # ... and prepared again by a second run
    assert other != job
    assert torch.equal(get_batch(job, "train", 8, 16, torch.Generator().manual_seed(0)), before)
    assert set(get_batch(other, "train", 8, 16).flatten().tolist()) <= {ord("z"), ord("\n"), 256}


def test_concurrent_prepare_of_the_same_content(tmp_path, monkeypatch):
    """Two processes prepare the same content at once: the second rename finds the folder there and keeps it."""
    src = write(tmp_path / "t.txt", TEXT)
    root = str(tmp_path / "data")
    d = prepare(str(src), root=root)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    real, looks = data._is_prepared, []
    # the first look finds nothing (the other process had not finished); after our rename fails, it is there
    monkeypatch.setattr(data, "_is_prepared", lambda out, meta: bool(looks.append(1) or len(looks) > 1) and real(out, meta))
    assert prepare(str(src), root=root) == d
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps  # never written again
    assert [p.name for p in Path(root).iterdir()] == [d.name]  # our temp folder is gone


def test_stale_temp_folders_of_killed_prepares_are_removed(tmp_path):
    import socket
    import subprocess
    root = tmp_path / "data"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = root / f".x-bytes-abc.tmp-{host}-{int(dead.stdout)}"
    alive = root / f".y-bytes-abc.tmp-{host}-{os.getpid()}"  # a prepare still running: kept
    for folder in (stale, alive):
        write(folder / "train.bin", "partial")
    prepare(str(write(tmp_path / "t.txt", TEXT)), root=str(root))
    assert not stale.exists() and alive.exists()


def test_binary_inputs(tmp_path, capsys):
    blob = tmp_path / "ls"
    blob.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 20)
    with pytest.raises(DataError, match="looks binary"):
        prepare(str(blob), root=str(tmp_path / "data"))
    (tmp_path / "latin").write_bytes(bytes(range(128, 256)) * 40)  # no NUL, but not UTF-8 text either
    with pytest.raises(DataError, match="looks binary"):
        prepare(str(tmp_path / "latin"), root=str(tmp_path / "data"))
    folder, _ = make_folder(tmp_path)  # holds blob.txt, a binary with a text suffix
    prepare(str(folder), root=str(tmp_path / "data"))
    assert "skipped 1 binary or unreadable file" in capsys.readouterr().out


def test_checkpoint_data_finds_the_trained_on_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write(tmp_path / "c.txt", TEXT)
    d = prepare(str(src))
    ckpt = {"tokenizer": {"name": "bytes"}, "args": {"data": str(src)}, "data_dir": str(d.resolve()),
            "data_key": load_meta(d)["key"]}
    write(src, TEXT + "edited\n")
    assert data.checkpoint_data(ckpt) == d.resolve()  # the recorded folder, not the edited source
    assert data.checkpoint_data(ckpt, source=str(src)) != d  # asked for explicitly: the source as it is now
    import shutil
    shutil.rmtree(d)
    with pytest.raises(DataError, match=f"content key {ckpt['data_key']}.*other content"):
        data.checkpoint_data(ckpt)  # gone, and the source no longer gives it
    write(src, TEXT)
    assert load_meta(data.checkpoint_data(ckpt))["key"] == ckpt["data_key"]  # gone, prepared again: same content
    src.unlink()
    shutil.rmtree(data.checkpoint_data(ckpt))
    with pytest.raises(DataError, match="which is gone.*--data"):
        data.checkpoint_data(ckpt)


# ----------------------------------------------------------------------------- bpe (tinydiff/bpe.py)

def test_bpe_trainer_hand_worked():
    """The merge order of a tiny corpus, worked out by hand.

    "aaaa bb bb" -> GPT-2 pre-tokens "aaaa" x1, " bb" x2 (a word keeps its leading space; no merge crosses
    a pre-token). Ids: ' ' = 32, 'a' = 97, 'b' = 98. Pair counts, weighted by how often each word occurs:
      (97, 97): 3 (three overlapping pairs in "aaaa"), (32, 98): 2, (98, 98): 2
      merge 1: (97, 97) -> 256 "aa"; "aaaa" is rewritten left to right: [256, 256]
               counts now (32, 98): 2, (98, 98): 2, (256, 256): 1
      merge 2: a tie at 2: the pair with the smaller ids wins, (32, 98) -> 257 " b"; " bb" = [257, 98]
               counts now (257, 98): 2, (256, 256): 1
      merge 3: (257, 98) -> 258 " bb"
      merge 4: (256, 256) -> 259 "aaaa"; then no pair is left, so a larger budget gives no more merges."""
    want = [(97, 97), (32, 98), (257, 98), (256, 256)]
    assert bpe.learn_merges(["aaaa bb bb"], 10) == want
    assert bpe.learn_merges(["aaaa bb bb"], 2) == want[:2]
    assert bpe.learn_merges(["aaaa bb", " bb"], 10) == want  # split across documents: the same counts
    tok = BPETokenizer(want)
    assert (tok.vocab_size, tok.eot_id) == (256 + 4 + 1, 260)
    assert tok.encode("aaaa bb bb") == [259, 258, 258]
    assert tok.encode("aaaaa bbb") == [259, 97, 258, 98]  # merges apply within each pre-token only
    assert tok.encode("bb") == [98, 98]  # no space before it: " b" does not apply


def test_bpe_same_corpus_same_merges(tmp_path):
    words = ["self", "return", "value", "items", "count", "name", "other", "result", "index", "parser"]
    docs = [f"def {words[i % 10]}_{i}(self, {words[(i * 3) % 10]}):\n    return self.{words[(i * 7) % 10]}{i % 3} + {i}\n"
            for i in range(60)]
    a = bpe.learn_merges(docs, 120)
    assert a == bpe.learn_merges(list(reversed(docs)), 120)  # counts do not depend on the document order
    assert len(a) == 120 and len(set(a)) == 120
    # the same through prepare, in two roots: identical bpe.json, and the tokenizer rebuilt from it
    corpus = tmp_path / "corpus"
    for i in range(0, 60, 3):
        write(corpus / f"m{i:02d}.py", "".join(docs[i:i + 3]))
    d1 = prepare(str(corpus), "bpe", root=str(tmp_path / "r1"), vocab_size=300)
    d2 = prepare(str(corpus), "bpe", root=str(tmp_path / "r2"), vocab_size=300)
    assert "-bpe300-" in d1.name and (d1 / "bpe.json").read_bytes() == (d2 / "bpe.json").read_bytes()
    tok = load_tokenizer(d1)
    assert tok.vocab_size == 300 and tok.eot_id == 299 and load_meta(d1)["merges_sha256"] == tok.sha256
    # learned from the train split only (the last file is held out): its text is still encoded losslessly
    train, val = ids_of(d1 / "train.bin"), ids_of(d1 / "val.bin")
    assert tok.decode(val[:-1].tolist()) == "".join(docs[57:60]) and val[-1] == 299 and train.max() <= 299
    assert len(train) < 0.5 * sum(len(d) for d in docs[:57])  # code compresses: well under one id per byte
    # a second prepare reuses the folder; a checkpoint's spec rebuilds the same tokenizer without it
    stamps = {p.name: p.stat().st_mtime_ns for p in d1.iterdir()}
    assert prepare(str(corpus), "bpe", root=str(tmp_path / "r1"), vocab_size=300) == d1
    assert {p.name: p.stat().st_mtime_ns for p in d1.iterdir()} == stamps
    spec = json.loads(json.dumps(tok.spec()))  # as stored
    same = tokenizer_from_spec(spec)
    assert same.key == tok.key and same.encode(docs[0]) == tok.encode(docs[0])
    spec["merges"][0] = [spec["merges"][0][1], spec["merges"][0][0]]
    with pytest.raises(DataError, match="hash"):
        tokenizer_from_spec(spec)


def test_bpe_round_trip_any_text():
    rng = np.random.default_rng(0)
    text = "".join(f"    def f{i}(self):\n        return self.x_{i} * 2\n" for i in range(50))
    tok = BPETokenizer.learn([text], 400)
    planes = [(0x20, 0x7F), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    for trial in range(20):  # arbitrary unicode: every plane, controls, NUL, whitespace runs
        lo, hi = planes[trial % len(planes)]
        s = "".join(chr(c) for c in rng.integers(lo, hi, 200)) + text[:100] + "\x00\t\r\n  \u00a0<|endoftext|>"
        ids = tok.encode(s)
        assert tok.decode(ids) == s and max(ids) < tok.eot_id
        assert tok._bytes(ids) == s.encode("utf-8")
    for trial in range(20):  # arbitrary bytes: the text they decode to round-trips; every byte id decodes to itself
        b = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
        s = b.decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(s)) == s
        assert tok._bytes(list(b)) == b
    # ids that are not text never crash decoding: eot, [MASK], out of range; a cut character is replaced
    e = tok.encode("é")
    assert tok.decode(e + [tok.eot_id, tok.vocab_size, -1] + e) == "é\n□□é"
    assert tok.decode([0xC3]) == "\ufffd"
    assert tok.byte_lengths()[tok.encode(" return")].sum() == 7 and tok.byte_lengths()[tok.eot_id] == 1


def test_bpe_errors(tmp_path, monkeypatch):
    src = write(tmp_path / "t.txt", TEXT)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now raises ImportError
        with pytest.raises(DataError, match="pip install tiktoken"):
            prepare(str(src), "bpe", root=str(tmp_path / "data"), vocab_size=300)
    with pytest.raises(DataError, match="--vocab_size"):
        prepare(str(src), "bpe", root=str(tmp_path / "data"))  # no size given
    with pytest.raises(DataError, match="allows only"):
        prepare(str(src), "bpe", root=str(tmp_path / "data"), vocab_size=60000)  # more than the corpus has
    with pytest.raises(DataError, match="learned from a corpus"):
        get_tokenizer("bpe")
    d = prepare(str(src), "bpe", root=str(tmp_path / "data"), vocab_size=300)
    tok = load_tokenizer(d)
    assert prepare_for(str(src), tok, root=str(tmp_path / "data")) == d
    other = write(tmp_path / "u.txt", "".join(f"x{i} = y{i}\n" for i in range(500)))  # another source: other merges
    with pytest.raises(DataError, match="merges were learned"):
        prepare_for(str(other), tok, root=str(tmp_path / "data"))
    (d / "bpe.json").write_text("{}")
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(d)
