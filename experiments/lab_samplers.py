"""Every sampler of tinydiff/sampling.py on the exact lab (docs/lab.md, docs/samplers.md): true CE against H,
unigram entropy, valid words, word TV, NFE and wall time, at equal step budgets.

    python experiments/lab_samplers.py --model oracle --ckpt runs/lab/mdlm/ckpt.pt --nfe 8,16,32,64,128
    python experiments/lab_samplers.py --model runs/lab/mdlm/ckpt.pt --nfe 8,32,128 \
        --samplers ancestral,confidence,confidence:gumbel=1,threshold:tau=0.9,remdm,semi_ar:block_len=32

--model oracle samples with the lab's exact denoiser (the lab of --ckpt's data): the pure sampler error, no
network error. A sampler spec is NAME or NAME:knob=value,knob=value (knobs of docs/samplers.md). Rows use
the same seed, batches and generator as eval.py (ancestral rows reproduce eval.py's numbers draw for draw).
NFE: the network calls of a batch (eval.py's); nfe_row: the calls made while a row still had a mask, i.e.
what that row would need alone (the adaptive cost of `threshold`; for the other samplers an upper bound of
it). The last stdout line is one JSON object with every row.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from tinydiff.common import load_checkpoint, make_generator, model_from_checkpoint
from tinydiff.data import checkpoint_data
from tinydiff.evaluate import mean_entropy
from tinydiff.lab import OracleDenoiser
from tinydiff.lab import lab_metrics, lab_of
from tinydiff.sampling import describe, resolve, sample

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True, help="an MDLM checkpoint trained on the lab, or 'oracle'")
p.add_argument("--ckpt", default=None, help="with --model oracle: a checkpoint whose data is the lab")
p.add_argument("--samplers", default="ancestral,confidence,confidence:gumbel=1,threshold:tau=0.5,"
                                     "threshold:tau=0.7,threshold:tau=0.9,threshold:tau=0.99,remdm,semi_ar:block_len=32")
p.add_argument("--nfe", default="8,16,32,64,128", help="step counts (threshold: the budget)")
p.add_argument("--num_samples", type=int, default=256)
p.add_argument("--batch_size", type=int, default=64)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--lab_draws", type=int, default=4096, help="windows for the entropy H (eval.py's --lab_draws)")
p.add_argument("--out", default=None, help="also write the JSON here")
args = p.parse_args()

torch.manual_seed(args.seed)
ckpt = load_checkpoint(args.ckpt if args.model == "oracle" else args.model)
lab = lab_of(checkpoint_data(ckpt))
assert lab is not None, "the checkpoint's data is not the lab"
net = OracleDenoiser(lab) if args.model == "oracle" else model_from_checkpoint(ckpt, "cpu")  # EMA weights
mask_id, L = lab.mask_id, ckpt["config"]["seq_len"]


def spec_of(s):
    name, _, rest = s.partition(":")
    knobs = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        knobs[k] = type(resolve(name, {})[k])(v)
    return name, knobs


class Counted:
    """The model, counting per row the calls made while the row still has a mask."""

    def __init__(self, model):
        self.model, self.rows = model, None

    def __call__(self, z):
        self.rows += (z == mask_id).any(1).long()  # (B,); semi_ar's windows: a mask in the window
        return self.model(z)


H = lab.entropy(L, args.lab_draws, args.seed)
print(f"H = {H['H']:.4f} ± {H['H_se']:.4f} ({L}-token windows, {args.lab_draws} draws); model {args.model}")
rows = []
exact = lab.sample(args.num_samples, L, torch.Generator().manual_seed(args.seed))  # (n, L) exact samples
rows.append({"sampler": "exact samples", "steps": None, "nfe": None, "nfe_row": None, "seconds": None,
             "entropy": mean_entropy(exact), **lab_metrics(lab, exact)})
with torch.no_grad():
    for s in args.samplers.split(","):
        name, knobs = spec_of(s)
        for K in map(int, args.nfe.split(",")):
            gen, xs, nfes, per_row = make_generator(args.seed, "cpu"), [], [], []
            t0 = time.time()
            for start in range(0, args.num_samples, args.batch_size):
                b = min(args.batch_size, args.num_samples - start)
                model = Counted(net)
                model.rows = torch.zeros(b, dtype=torch.long)
                x, nfe = sample(name, model, (b, L), K, mask_id, gen, L, "cpu", **knobs)  # (b, L)
                xs.append(x)
                nfes.append(nfe)
                per_row.append(model.rows)
            seconds = time.time() - t0
            x, per_row = torch.cat(xs), torch.cat(per_row).double()
            assert (x != mask_id).all()
            r = {"sampler": describe(name, resolve(name, knobs)), "name": name, "knobs": knobs, "steps": K,
                 "nfe": sum(nfes) / len(nfes), "nfe_row": per_row.mean().item(),
                 "nfe_row_se": (per_row.std() / len(per_row) ** 0.5).item(), "seconds": seconds,
                 "entropy": mean_entropy(x), **lab_metrics(lab, x)}
            rows.append(r)
            print(f"{s:<24} K {K:>4} NFE {r['nfe']:6.1f} (row {r['nfe_row']:6.1f}) CE-H {r['ce'] - H['H']:+.4f} "
                  f"± {r['ce_se']:.4f} ent {r['entropy']:.3f} valid {r['valid_words']:.3f} ± {r['valid_words_se']:.3f} "
                  f"TV {r['word_tv']:.3f} ± {r['word_tv_se']:.3f} {seconds:6.1f}s", flush=True)
out = {"model": args.model, "ckpt": args.ckpt, "L": L, "num_samples": args.num_samples, "seed": args.seed,
       "batch_size": args.batch_size, "H": H, "rows": rows}
if args.out:
    with open(args.out, "w") as f:
        json.dump(out, f)
print(json.dumps(out))
