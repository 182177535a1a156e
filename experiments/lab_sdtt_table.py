"""The tables of docs/lab.md §e from the sample sets experiments/lab_paired.py wrote (DIR/NAME@K.json):
per round and seed, SDTT (learned teacher), the control and SDTT with the exact teacher at the round's K,
paired differences, the first (trained) teacher's CE at 2K, K and 128; entropy and valid words; and the goal check at the
last round (the student at K_R against the control, the share of the teacher's gap K_R -> 128 it closes,
and its distance to the teacher at 128).

    python experiments/lab_sdtt_table.py --dir runs/labeasy/eval --seeds 1,2,3
Prints markdown; the last line is one JSON object.
"""
import argparse
import json
import math
import os

import numpy as np


def load(d, key):
    with open(os.path.join(d, key + ".json")) as f:
        return json.load(f)


def paired(a, b):
    """b - a per sample, mean and s.e."""
    d = np.asarray(b["nll"]) - np.asarray(a["nll"])
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--K0", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    H = next(json.load(open(os.path.join(a.dir, f))) for f in sorted(os.listdir(a.dir)) if f.startswith("H-"))["H"]
    seeds = a.seeds.split(",")
    T = lambda K: load(a.dir, f"teacher@{K}")
    out = {"H": H, "rows": [], "goal": []}
    print(f"H = {H:.4f}. CE - H (nats/token) ± s.e. over 512 samples; Δ = arm - control, paired per sample.\n")
    print("| round | K | seed | SDTT | control | Δ SDTT | exact teacher | Δ exact | first teacher at 2K | at K | at 128 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in range(1, a.rounds + 1):
        K = a.K0 // 2 ** r
        for s in seeds:
            S, C, X = (load(a.dir, f"{arm}-s{s}-r{r}@{K}") for arm in ("sdtt", "control", "exact"))
            dS, dS_se = paired(C, S)
            dX, dX_se = paired(C, X)
            row = {"round": r, "K": K, "seed": s, **{f"{n}_ce": e["ce"] for n, e in (("sdtt", S), ("control", C), ("exact", X))},
                   **{f"{n}_se": e["ce_se"] for n, e in (("sdtt", S), ("control", C), ("exact", X))},
                   "d_sdtt": dS, "d_sdtt_se": dS_se, "d_exact": dX, "d_exact_se": dX_se,
                   **{f"{n}_entropy": e["entropy"] for n, e in (("sdtt", S), ("control", C), ("exact", X))},
                   **{f"{n}_valid": e["valid_words"] for n, e in (("sdtt", S), ("control", C), ("exact", X))},
                   **{f"{n}_valid_se": e["valid_words_se"] for n, e in (("sdtt", S), ("control", C), ("exact", X))}}
            out["rows"].append(row)
            f = lambda e: f"{e['ce'] - H:+.3f} ± {e['ce_se']:.3f}"
            print(f"| {r} | {K} | {s} | {f(S)} | {f(C)} | **{dS:+.3f} ± {dS_se:.3f}** | {f(X)} | {dX:+.3f} ± {dX_se:.3f} | "
                  f"{T(2 * K)['ce'] - H:+.3f} | {T(K)['ce'] - H:+.3f} | {T(a.K0)['ce'] - H:+.3f} |")
    print("\n| round | K | seed | entropy: SDTT / control / exact / teacher at K | valid words: SDTT / control / exact / teacher at K |")
    print("|---|---|---|---|---|")
    for row in out["rows"]:
        t = T(row["K"])
        print(f"| {row['round']} | {row['K']} | {row['seed']} | {row['sdtt_entropy']:.3f} / {row['control_entropy']:.3f} / "
              f"{row['exact_entropy']:.3f} / {t['entropy']:.3f} | {row['sdtt_valid']:.3f} / {row['control_valid']:.3f} / "
              f"{row['exact_valid']:.3f} / {t['valid_words']:.3f} |")
    # goal check at the last round
    K = a.K0 // 2 ** a.rounds
    tK, t0 = T(K), T(a.K0)
    gap, gap_se = tK["ce"] - t0["ce"], math.hypot(tK["ce_se"], t0["ce_se"])  # different K: independent
    print(f"\nGoal (round {a.rounds}, K = {K}): the teacher's gap CE(K={K}) - CE(K={a.K0}) = {gap:.3f} ± {gap_se:.3f}\n")
    print(f"| seed | student − control (paired) | z | gap closed: (teacher − student at K = {K}) / gap | student at {K} − teacher at {a.K0} | z |")
    print("|---|---|---|---|---|---|")
    for s in seeds:
        S, C = load(a.dir, f"sdtt-s{s}-r{a.rounds}@{K}"), load(a.dir, f"control-s{s}-r{a.rounds}@{K}")
        d, d_se = paired(C, S)
        c, c_se = paired(S, tK)  # teacher - student at the same K, paired
        frac = c / gap
        frac_se = abs(frac) * math.sqrt((c_se / c) ** 2 + (gap_se / gap) ** 2) if c else float("nan")
        m, m_se = S["ce"] - t0["ce"], math.hypot(S["ce_se"], t0["ce_se"])
        out["goal"].append({"seed": s, "d_control": d, "d_control_se": d_se, "closed": frac, "closed_se": frac_se,
                            "to_teacher_128": m, "to_teacher_128_se": m_se})
        print(f"| {s} | {d:+.3f} ± {d_se:.3f} | {d / d_se:+.1f} | {frac:.2f} ± {frac_se:.2f} | {m:+.3f} ± {m_se:.3f} | "
              f"{m / m_se:+.1f} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
