"""Sample sets of lab checkpoints scored by the truth, with common random numbers so that arms can be
compared PAIRED per sample (docs/lab.md §e).

Every entry NAME=CKPT@K draws --num_samples samples of the model's context length in K ancestral steps
(EMA weights, float64 draws, temperature 1), seed --seed, in batches of --batch_size: the same uniforms
decide which positions are revealed at each step for every checkpoint (the reveal pattern depends only on
them), and the same Gumbel noise picks the tokens, so two models' sample i differ only where their
denoisers differ. Per sample: the true NLL per token (CE), the unigram entropy, and the complete words
(valid-word fraction, word TV as tinydiff/lab/evaluate.py). CKPT 'oracle:PATH' samples with the lab's exact
denoiser (PATH gives the lab and the context); 'ideal:PATH' with the best one-step student a round of SDTT
with the exact teacher could reach (IdealStudent below). Each entry is written once to DIR/NAME@K.json and reused
(teacher rows are computed once for every seed); --pair A:B prints the paired difference B - A of two
written entries (same K, n, seed and batch size: refused otherwise).

    python experiments/lab_paired.py --dir runs/labsdtt/eval teacher=runs/labsdtt/teacher/ckpt.pt@8 \
        sdtt-s1-r4=runs/labsdtt/sdtt-s1/round4.pt@8 --pair teacher@8:sdtt-s1-r4@8
The last stdout line is one JSON object: the summaries of the entries and pairs asked for.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from tinydiff.common import load_checkpoint, make_generator, model_from_checkpoint  # noqa: E402
from tinydiff.data import checkpoint_data  # noqa: E402
from tinydiff.diffusion import T_END, get_schedule  # noqa: E402
from tinydiff.evaluate import unigram_entropy  # noqa: E402
from tinydiff.lab import OracleDenoiser, lab_metrics, lab_of  # noqa: E402
from tinydiff.sampling import diffusion_sample, sample  # noqa: E402
from tinydiff.sdtt import sdtt_targets  # noqa: E402


def se(v):
    v = np.asarray(v, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v)))


class IdealStudent:
    """The optimum of an SDTT round's loss (kl_bwd, tinydiff/sdtt.py) for the lab's exact teacher, as a denoiser
    for K-step sampling: at step k (time t_k of the K-step grid) it returns g = softmax(mean over M draws of the
    exact teacher's two-step targets of step 1/(2K) from the same z_t), the minimiser of E KL(student || target)
    over one-step outputs. Sampling with it shows what SDTT's target carries beyond the exact one-step denoiser,
    free of any network error. Called once per step (diffusion_sample with cache=False); its own generator,
    so the sampler's draws are those of every other entry (paired)."""

    def __init__(self, lab, schedule, K, M, seed):
        self.oracle, self.mask_id, self.schedule, self.K, self.M = OracleDenoiser(lab), lab.mask_id, schedule, K, M
        self.ts = torch.linspace(1.0, T_END, K + 1, dtype=torch.float64)  # diffusion_sample's grid
        self.gen, self.calls = torch.Generator().manual_seed(seed), 0

    def __call__(self, z):
        t = self.ts[min(self.calls, self.K - 1)].expand(len(z))  # (B,) step's time (greedy pass: the last)
        self.calls += 1
        T = [sdtt_targets(self.oracle, z, t, 2, 1.0 / (2 * self.K), self.mask_id, self.schedule, self.gen).double()
             for _ in range(self.M)]  # M x (B, L, V)
        return torch.stack(T).mean(0).log_softmax(-1)  # (B, L, V) the geometric mean, normalised


def run_entry(name, spec, a):
    path, K = spec.rsplit("@", 1)
    kind, _, rest = path.partition(":")
    K, oracle = int(K), kind if kind in ("oracle", "ideal") else None
    path = rest if oracle else path
    ckpt = load_checkpoint(path)
    lab = lab_of(checkpoint_data(ckpt))
    assert lab is not None, f"{path} was not trained on the lab"
    L, schedule = ckpt["config"]["seq_len"], get_schedule(ckpt.get("schedule"))
    model = OracleDenoiser(lab) if oracle == "oracle" else model_from_checkpoint(ckpt, "cpu")
    gen, xs, t0 = make_generator(a.seed, "cpu"), [], time.time()
    with torch.no_grad():
        for start in range(0, a.num_samples, a.batch_size):
            b = min(a.batch_size, a.num_samples - start)
            if oracle == "ideal":  # the same draws as sample("ancestral", ...): one call per step, t known
                ideal = IdealStudent(lab, schedule, K, a.ideal_draws, a.seed + 1 + start)
                init = torch.full((b, L), lab.mask_id, dtype=torch.long)
                xs.append(diffusion_sample(ideal, b, L, K, lab.mask_id, init, schedule, gen, cache=False)[0])
            else:
                xs.append(sample("ancestral", model, (b, L), K, lab.mask_id, gen, L, "cpu", schedule)[0])
    x = torch.cat(xs)  # (n, L)
    seconds = time.time() - t0
    nll = (-lab.log_prob(x) / L).tolist()  # (n,) true NLL per token of each sample
    ent = [unigram_entropy(s) for s in x]
    m = lab_metrics(lab, x)
    return {"name": name, "ckpt": path, "oracle": oracle, "K": K, "L": L, "n": a.num_samples, "seed": a.seed,
            "batch_size": a.batch_size, "sample_seconds": seconds, "spec": lab.params.spec(),
            "ce": float(np.mean(nll)), "ce_se": se(nll), "entropy": float(np.mean(ent)), "entropy_se": se(ent),
            "valid_words": m["valid_words"], "valid_words_se": m["valid_words_se"], "word_tv": m["word_tv"],
            "word_tv_se": m["word_tv_se"], "ideal_draws": a.ideal_draws if oracle == "ideal" else None,
            "nll": nll, "ent": ent, "first": lab.text(x[0].tolist())}


def entropy_H(lab, L, a):
    f = os.path.join(a.dir, f"H-L{L}-{a.lab_draws}.json")
    if not os.path.exists(f):
        with open(f, "w") as fh:
            json.dump(lab.entropy(L, a.lab_draws, 0), fh)
    with open(f) as fh:
        return json.load(fh)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("entries", nargs="*", help="NAME=CKPT@K (CKPT may be oracle:PATH or ideal:PATH)")
    p.add_argument("--dir", required=True, help="where each entry's NAME@K.json is written and reused")
    p.add_argument("--num_samples", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lab_draws", type=int, default=4096, help="windows for H (computed once per DIR)")
    p.add_argument("--ideal_draws", type=int, default=16, help="M, the target draws of an 'ideal:' entry")
    p.add_argument("--pair", action="append", default=[], help="A:B (entry keys NAME@K): paired B - A")
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    out = {"entries": {}, "pairs": {}}
    for e in a.entries:
        name, spec = e.split("=", 1)
        key = f"{name}@{spec.rsplit('@', 1)[1]}"
        f = os.path.join(a.dir, key + ".json")
        if os.path.exists(f):
            with open(f) as fh:
                r = json.load(fh)
            assert (r["n"], r["seed"], r["batch_size"]) == (a.num_samples, a.seed, a.batch_size), f"{f}: other settings"
            assert r.get("ideal_draws") in (None, a.ideal_draws), f"{f}: other --ideal_draws (use another NAME)"
        else:
            r = run_entry(name, spec, a)
            with open(f + ".tmp", "w") as fh:
                json.dump(r, fh)
            os.replace(f + ".tmp", f)
        ckpt = load_checkpoint(r["ckpt"])
        H = entropy_H(lab_of(checkpoint_data(ckpt)), r["L"], a)
        s = {k: v for k, v in r.items() if k not in ("nll", "ent")}
        s["ce_minus_H"], s["H"], s["H_se"] = r["ce"] - H["H"], H["H"], H["H_se"]
        out["entries"][key] = s
        print(f"{key:>24}: CE {r['ce']:.4f} ± {r['ce_se']:.4f} (CE - H {r['ce'] - H['H']:+.4f}) | entropy "
              f"{r['entropy']:.3f} ± {r['entropy_se']:.3f} | valid words {r['valid_words']:.3f} ± "
              f"{r['valid_words_se']:.3f} | word TV {r['word_tv']:.3f} | {r['sample_seconds']:.0f}s", flush=True)
    for pr in a.pair:
        ka, kb = pr.split(":")
        ra, rb = (json.load(open(os.path.join(a.dir, k + ".json"))) for k in (ka, kb))
        for k in ("K", "n", "seed", "batch_size", "L"):
            assert ra[k] == rb[k], f"{ka} and {kb} differ in {k}: not paired"
        d = np.asarray(rb["nll"]) - np.asarray(ra["nll"])
        de = np.asarray(rb["ent"]) - np.asarray(ra["ent"])
        ind = math.hypot(ra["ce_se"], rb["ce_se"])
        out["pairs"][pr] = {"d_ce": float(d.mean()), "d_ce_se": se(d), "d_ce_se_indep": ind,
                            "corr": float(np.corrcoef(ra["nll"], rb["nll"])[0, 1]),
                            "d_entropy": float(de.mean()), "d_entropy_se": se(de)}
        q = out["pairs"][pr]
        print(f"{kb} - {ka}: CE {q['d_ce']:+.4f} ± {q['d_ce_se']:.4f} paired ({q['d_ce']/q['d_ce_se']:+.1f} s.e.; "
              f"independent s.e. {ind:.4f}, corr {q['corr']:.2f}) | entropy {q['d_entropy']:+.3f} ± "
              f"{q['d_entropy_se']:.3f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
