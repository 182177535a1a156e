"""The exact lab's tokenizer and its prepared data: the bridge from the language (language.py) to tinydiff's data
pipeline (tinydiff/data.py and tokenizers.py import these lazily, for --data lab only)."""
import hashlib
import json
from dataclasses import asdict

import numpy as np

from ..errors import DataError
from ..tokenizers import Tokenizer
from .language import LETTERS, Lab, parse_spec


class LabTokenizer(Tokenizer):
    """The exact lab's symbols (language.py): 'labA' = the letters LETTERS[:A] (ids 0..A-1), the space
    (A) and the sentence end (A+1, the eot id, shown as a newline)."""

    def __init__(self, A):
        self.name, self.vocab_size, self.eot_id, self.chars = f"lab{A}", A + 2, A + 1, LETTERS[:A] + " "
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        return [self.ids.get(c, self.eot_id) for c in text]  # anything else (newlines) ends a sentence

    def _bytes(self, ids):
        return "".join(self.chars[i] for i in ids).encode()


def prepare_lab(source, tok, root):
    """The exact lab: train.bin / val.bin are each one stationary chain of the lab's law (no eot added:
    the eot id is the language's own sentence end), so every window of them is an exact sample."""
    from ..data import _folder, _is_prepared, _meta, commit_files, default_tokenizer  # (data.py imports this lazily)
    params = parse_spec(source)
    if tok.name != default_tokenizer(source):
        raise DataError(f"the lab is written in its own tokenizer {default_tokenizer(source)}, not {tok.name}: "
                        f"drop --tokenizer (or pass --tokenizer {default_tokenizer(source)})")
    spec = params.spec()  # the law and the split sizes: the data are a deterministic function of it
    tok_meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    meta = _meta(tok_meta, spec, hashlib.sha256(spec.encode()).hexdigest())
    out = _folder(root, "lab", tok.name, meta)
    if _is_prepared(out, meta):
        return out
    lab = Lab(params)
    splits = {split: lab.stream(n, np.random.default_rng([params.seed, 2, k])).tobytes()  # own seeds per split
              for k, (split, n) in enumerate([("train", params.train_tokens), ("val", params.val_tokens)])}
    meta.update(train_tokens=params.train_tokens, val_tokens=params.val_tokens, n_documents=2, n_train_documents=1,
                n_val_documents=1, lab=asdict(params), lab_states=lab.S)
    out.mkdir(parents=True, exist_ok=True)
    commit_files({out / "train.bin": splits["train"], out / "val.bin": splits["val"],
                  out / "meta.json": (json.dumps(meta, indent=2) + "\n").encode()})  # meta.json last: commit marker
    print(f"prepared {out}: the exact lab {spec} ({lab.S} hidden states), {params.train_tokens:,} train / "
          f"{params.val_tokens:,} val tokens")
    return out
