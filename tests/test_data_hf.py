"""Hugging Face sources (--data owt / tinystories) and prepare_documents, on small local datasets built
here: no network. The `datasets` package is replaced by a stand-in whose load_dataset serves them (a
real datasets.Dataset when the package is installed, else a list of dicts)."""
import json
import os
import re
import sys
import types

import numpy as np
import pytest

from conftest import gpt2_or_skip
from tinydiff import data
from tinydiff.data import DataError, get_tokenizer, load_meta, prepare, prepare_documents

DOCS = [f"document {i}: " + "héllo wörld " * (i % 5 + 1) + "✓" for i in range(23)]


def ids_of(path):
    return np.fromfile(path, dtype=np.uint16)


def as_dataset(texts):
    """A datasets.Dataset with a "text" column when the package is installed, else a list of dicts."""
    try:
        import datasets
    except ImportError:
        return [{"text": t} for t in texts]
    return datasets.Dataset.from_dict({"text": list(texts)})


def joined(texts, tok):
    return [i for t in texts for i in tok.encode(t) + [tok.eot_id]]


def test_prepare_documents_any_container(tmp_path):
    tok = get_tokenizer("bytes")
    train, val = DOCS[:20], DOCS[20:]
    d = prepare_documents("mine", as_dataset(train), as_dataset(val), "bytes", root=tmp_path / "a")
    assert re.fullmatch(r"mine-bytes-[0-9a-f]{12}", d.name)
    assert ids_of(d / "train.bin").tolist() == joined(train, tok)  # documents joined with eot, in order
    assert ids_of(d / "val.bin").tolist() == joined(val, tok)
    meta = load_meta(d)
    assert (meta["n_train_documents"], meta["n_val_documents"], meta["val_tokens"]) == (20, 3, len(joined(val, tok)))
    for i, container in enumerate([lambda x: list(x), lambda x: [{"text": t} for t in x]]):
        d2 = prepare_documents("mine", container(train), container(val), "bytes", root=tmp_path / f"b{i}")
        assert ids_of(d2 / "train.bin").tolist() == ids_of(d / "train.bin").tolist()
    stamp = (d / "meta.json").stat().st_mtime_ns
    prepare_documents("mine", as_dataset(train), as_dataset(val), "bytes", root=tmp_path / "a")  # reused
    assert (d / "meta.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_pool_gives_the_same_bytes(tmp_path, monkeypatch, tokenizer):
    if tokenizer == "gpt2":
        gpt2_or_skip()
    monkeypatch.setattr(data, "CHUNK_DOCS", 3)  # 23 documents -> 7 tasks over 2 processes
    one = prepare_documents("p", DOCS[:20], DOCS[20:], tokenizer, root=tmp_path / "one", num_proc=1)
    two = prepare_documents("p", DOCS[:20], DOCS[20:], tokenizer, root=tmp_path / "two", num_proc=2)
    for split in ("train.bin", "val.bin"):
        assert (one / split).read_bytes() == (two / split).read_bytes()
    assert ids_of(one / "train.bin").tolist() == joined(DOCS[:20], get_tokenizer(tokenizer))


# ----------------------------------------------------------------------------- --data owt / tinystories

def fake_datasets(monkeypatch, splits, version="5.2.0", error=None):
    """Install a stand-in `datasets` module: load_dataset(path, split) serves splits[(path, split)]."""
    calls = []

    def load_dataset(path, split=None, **kw):
        calls.append((path, split, kw))
        if error is not None:
            raise error
        return splits[(path, split)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(__version__=version, load_dataset=load_dataset))
    return calls


def test_owt_holds_out_the_last_documents(tmp_path, monkeypatch):
    monkeypatch.setitem(data.HF_SOURCES["owt"], "holdout", 4)  # MDLM: the last 100k of ~8M
    owt = as_dataset(DOCS)
    calls = fake_datasets(monkeypatch, {("Skylion007/openwebtext", "train"): owt})
    tok = get_tokenizer("bytes")
    d = prepare("owt", "bytes", root=str(tmp_path), num_proc=1)
    assert re.fullmatch(r"owt-bytes-[0-9a-f]{12}", d.name) and calls == [("Skylion007/openwebtext", "train", {})]
    assert ids_of(d / "train.bin").tolist() == joined(DOCS[:-4], tok)
    assert ids_of(d / "val.bin").tolist() == joined(DOCS[-4:], tok)
    meta = load_meta(d)
    assert meta["source"] == "hf:Skylion007/openwebtext" and meta["n_val_documents"] == 4
    assert prepare("owt", "bytes", root=str(tmp_path)) == d and len(calls) == 1  # reused: the dataset is not loaded


def test_tinystories_uses_its_validation_split(tmp_path, monkeypatch):
    splits = {("roneneldan/TinyStories", "train"): as_dataset(DOCS[:15]),
              ("roneneldan/TinyStories", "validation"): as_dataset(DOCS[15:])}
    calls = fake_datasets(monkeypatch, splits, version="3.1.0")
    d = prepare("tinystories", "bytes", root=str(tmp_path))
    assert calls[0][2] == {"trust_remote_code": True}  # datasets 2.16-3.x need it for script datasets
    assert load_meta(d)["n_train_documents"] == 15 and load_meta(d)["n_val_documents"] == 8
    assert ids_of(d / "val.bin").tolist() == joined(DOCS[15:], get_tokenizer("bytes"))


def test_missing_package_or_network_is_a_clear_message(tmp_path, monkeypatch):
    small = as_dataset(DOCS[:3])  # built before the stand-ins replace the package
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        prepare("owt", "bytes", root=str(tmp_path))
    fake_datasets(monkeypatch, {}, error=ConnectionError("Couldn't reach the Hugging Face Hub"))
    with pytest.raises(DataError, match="check the network"):
        prepare("tinystories", "bytes", root=str(tmp_path))
    fake_datasets(monkeypatch, {("Skylion007/openwebtext", "train"): small})
    with pytest.raises(DataError, match="held out"):
        prepare("owt", "bytes", root=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing half-written, no empty folders


def test_failed_write_keeps_prepared_data(tmp_path, monkeypatch):
    d = prepare_documents("k", DOCS[:20], DOCS[20:], "bytes", root=tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def disk_full(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(data.os, "fsync", disk_full)
    with pytest.raises(OSError):
        prepare_documents("k", DOCS[:19], DOCS[19:], "bytes", root=tmp_path)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing replaced
    assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temp folder, no half-written dataset
    assert json.loads(before["meta.json"])["n_train_documents"] == 20
