"""Tokenizers: how text becomes ids and back (docs/tokenizers.md): 'bytes', 'gpt2', 'bpe' (learned from a corpus,
bpe.py) and the lab's own 'labA'. Every checkpoint carries its tokenizer's spec(); tokenizer_from_spec() rebuilds it."""
import hashlib
import itertools
import json

import numpy as np

from . import bpe
from .common import tokenizer_key
from .errors import DataError


class Tokenizer:
    """Shared decode, robust to ids a model may emit that are not text. encode / _bytes (ids -> bytes) go through
    tiktoken's self.enc unless a subclass overrides them."""
    name, vocab_size, eot_id = None, None, None
    UNKNOWN = "□"  # shown for ids outside the vocabulary, e.g. the [MASK] id = vocab_size

    def encode(self, text):
        # encode_ordinary: a literal "<|endoftext|>" inside a document is plain text, not the eot id
        return self.enc.encode_ordinary(text)

    def _bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def spec(self):
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    @property
    def key(self):  # two tokenizers are the same when their keys are (bpe: the merges' hash, not the name)
        return tokenizer_key(self.spec())

    def byte_lengths(self):
        """(vocab_size,) UTF-8 bytes of each id's text, end-of-text 1: nats per byte compare across tokenizers."""
        return np.array([1 if i == self.eot_id else len(self._bytes([i])) for i in range(self.vocab_size)])

    def decode(self, ids):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out = []
        for is_text, run in itertools.groupby(ids, lambda i: 0 <= i < self.vocab_size and i != self.eot_id):
            if is_text:  # a run at once: a multi-byte character may span several ids
                out.append(self._bytes(list(run)).decode("utf-8", errors="replace"))
            else:
                out += ["\n" if i == self.eot_id else self.UNKNOWN for i in run]
        return "".join(out)


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the UTF-8 bytes, 256 is end-of-text."""
    name, vocab_size, eot_id = "bytes", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def _bytes(self, ids):
        return bytes(ids)


def _tiktoken(name):
    try:
        import tiktoken  # lazy: the bytes tokenizer must work without it
    except ImportError:
        raise DataError(f"the {name} tokenizer needs tiktoken: pip install tiktoken "
                        f"(or use --tokenizer bytes)") from None
    return tiktoken


class GPT2Tokenizer(Tokenizer):
    """tiktoken's GPT-2 BPE: 50257 ids, the last one (50256) is <|endoftext|>."""
    name = "gpt2"

    def __init__(self):
        tiktoken = _tiktoken("gpt2")
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline with no cached vocabulary: requests/urllib errors, or a bad cache
            raise DataError(f"could not load the GPT-2 vocabulary ({type(e).__name__}: {e}); tiktoken downloads it "
                            f"on first use: go online once, or set TIKTOKEN_CACHE_DIR to a folder that holds a cached "
                            f"copy (or use --tokenizer bytes)") from None
        self.vocab_size, self.eot_id = self.enc.n_vocab, self.enc.eot_token


class BPETokenizer(Tokenizer):
    """A byte-level BPE learned from a corpus (tinydiff/bpe.py): ids 0..255 the bytes, 256 + i merge i, then
    end-of-text (the last id), with GPT-2's pre-tokenisation."""
    name = "bpe"

    def __init__(self, merges):
        tiktoken = _tiktoken("bpe")
        self.merges = [tuple(m) for m in merges]
        self.sha256 = hashlib.sha256(json.dumps(self.merges).encode()).hexdigest()
        self.enc = tiktoken.Encoding(f"tinydiff-bpe-{self.sha256[:12]}", pat_str=bpe.PATTERN,
                                     mergeable_ranks=bpe.ranks(self.merges), special_tokens={})
        self.vocab_size = 256 + len(self.merges) + 1
        self.eot_id = self.vocab_size - 1

    @classmethod
    def learn(cls, texts, vocab_size):
        _tiktoken("bpe")  # fail before learning, not after
        return cls(bpe.learn_merges(texts, vocab_size - 257))

    def spec(self):
        return {**super().spec(), "merges": [list(m) for m in self.merges], "merges_sha256": self.sha256}


TOKENIZERS = {"bytes": ByteTokenizer, "gpt2": GPT2Tokenizer, "bpe": BPETokenizer}


def get_tokenizer(name="bytes"):
    if name.startswith("lab") and name[3:].isdigit():
        from .lab import LETTERS, LabTokenizer  # the exact lab's own, imported only for it
        if 1 <= int(name[3:]) <= len(LETTERS):
            return LabTokenizer(int(name[3:]))
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)} (or labA for the lab)")
    if name == "bpe":
        raise DataError("the bpe tokenizer is learned from a corpus: prepare(source, 'bpe', vocab_size=V) learns it, "
                        "load_tokenizer(data_dir) loads it, and a checkpoint carries its own (tokenizer_from_spec)")
    return TOKENIZERS[name]()


def tokenizer_from_spec(spec):
    """The tokenizer a checkpoint's spec describes (self-describing: no data folder needed)."""
    try:
        if spec["name"] != "bpe":
            return get_tokenizer(spec["name"])
        tok = BPETokenizer(spec["merges"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise DataError(f"corrupt tokenizer description (name, merges) in a checkpoint or bpe.json: {str(spec)[:80]}") \
            from None
    if tok.sha256 != spec.get("merges_sha256", tok.sha256):
        raise DataError(f"the bpe merges do not match their recorded hash {spec['merges_sha256'][:16]}: corrupt file")
    return tok
