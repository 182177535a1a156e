"""Per masking rate, how far each checkpoint's one-step prediction is from the exact lab posterior
(tinydiff.lab.per_rate): -log p_model(x_i | z_t), the oracle's, and KL(oracle || model) per masked
token, on the same 256 stationary windows for every checkpoint (docs/lab.md §c).

    python experiments/lab_per_rate.py teacher=runs/lab/mdlm/ckpt.pt control=runs/labexp/control/iter1000.pt \
        sdtt-r4=runs/labexp/sdtt/round4.pt
The last stdout line is one JSON object: {name: [{t, model, oracle, kl}, ...]}.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from tinydiff.common import load_checkpoint, model_from_checkpoint  # noqa: E402
from tinydiff.data import checkpoint_data  # noqa: E402
from tinydiff.lab import lab_of, per_rate  # noqa: E402

RATES = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)
out = {}
with torch.no_grad():
    for arg in sys.argv[1:]:
        name, path = arg.split("=", 1)
        ckpt = load_checkpoint(path)
        lab = lab_of(checkpoint_data(ckpt))
        assert lab is not None, f"{path} was not trained on the lab"
        rows = per_rate(model_from_checkpoint(ckpt, "cpu"), lab, ckpt["config"]["seq_len"], rates=RATES, n=256, seed=0)
        out[name] = rows
        print(name, " ".join(f"t={r['t']}: KL {r['kl']:.3f}" for r in rows), flush=True)
print(json.dumps(out))
