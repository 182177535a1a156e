"""What the exact denoiser can do on a lab instance, with no network: its size (S hidden states, mean word
length), H of L-windows, and the true cross-entropy of n samples drawn with the exact denoiser in K ancestral
steps for each K (the factorisation error of K-step sampling alone). Used to choose docs/lab.md §e's instance.

    OMP_NUM_THREADS=1 python experiments/lab_instance.py lab:W=16,A=8 --L 64 --steps 4,8,16,32,64,128 --n 256
The last stdout line is one JSON object.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from tinydiff.lab import Lab, OracleDenoiser, lab_metrics, parse_spec  # noqa: E402
from tinydiff.sampling import diffusion_sample  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("spec", help="lab or lab:W=...,...")
p.add_argument("--L", type=int, default=64, help="window length")
p.add_argument("--steps", default="4,8,16,32,64,128", help="comma-separated K")
p.add_argument("--n", type=int, default=256, help="samples per K")
p.add_argument("--draws", type=int, default=4096, help="windows for H")
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

lab = Lab(parse_spec(a.spec))
t0 = time.perf_counter()
H = lab.entropy(a.L, a.draws, a.seed)
mean_len = float((lab.word_pi * lab.n_states).sum() - 1)
x = lab.sample(128, a.L, torch.Generator().manual_seed(a.seed))  # (128, L)
pi = lab.conditionals(x)  # (128, L, V) p(x_i | x_!=i), the exact TCS target
h_pi = -(pi * pi.clamp_min(1e-300).log()).sum(-1).mean().item()  # its mean entropy: what TCS adds to the label
print(f"{lab.params.spec()}\nS {lab.S}, |V| {lab.V}, mean word length {mean_len:.2f}; H(L={a.L}) = {H['H']:.4f} ± "
      f"{H['H_se']:.4f}, h = {H['h_rate']:.4f}; full conditionals: mean H(x_i | x_!=i) = {h_pi:.4f}", flush=True)
oracle, rows = OracleDenoiser(lab), []
for K in map(int, a.steps.split(",")):
    gen = torch.Generator().manual_seed(a.seed)
    x = torch.cat([diffusion_sample(oracle, min(64, a.n - i), a.L, K, lab.mask_id, generator=gen)[0]
                   for i in range(0, a.n, 64)])
    m = lab_metrics(lab, x)
    rows.append({"K": K, **m, "ce_minus_H": m["ce"] - H["H"]})
    print(f"K {K:4d}: CE {m['ce']:.4f} ± {m['ce_se']:.4f} (CE - H {m['ce'] - H['H']:+.4f}), valid words "
          f"{m['valid_words']:.3f}, word TV {m['word_tv']:.3f}", flush=True)
print(json.dumps({"spec": lab.params.spec(), "S": lab.S, "V": lab.V, "mean_word_len": mean_len, "L": a.L, **H,
                  "h_cond": h_pi,
                  "rows": rows, "seconds": time.perf_counter() - t0}))
