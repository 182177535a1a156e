"""Data-only val-bound curves with standard errors, for the TCS experiment of docs/tcs.md.

Every snapshot of every run (distill.py --tcs_snapshots N writes OUT_DIR/snap-ITER.pt; a plain
checkpoint counts as one point) is scored on the same held-out windows with the same t and mask draws
(tinydiff.diffusion.val_bound's procedure, kept per window), so differences between runs are paired:
their standard error is the s.e. over windows of the per-window difference.

    python experiments/tcs_curves.py --data_dir DATA --seq_len 128 --base plain \
        --run plain=OUT_PLAIN --run tcs1=OUT_TCS1 --run tcs05=OUT_TCS05

Prints, per step, every run's bound (nats/token) +- s.e. and its paired difference from --base; then
the goal checks against the base's final bound B_S: the first snapshot of each run at or below B_S, and
d = B_S - (the run's bound at step frac * S) with its s.e. (goal met iff d > 2 s.e.); and at S itself.
The last line is one JSON object with every number.
"""
import argparse
import glob
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from tinydiff.common import emit, load_checkpoint, model_from_checkpoint  # noqa: E402
from tinydiff.diffusion import forward_mask, get_schedule, nelbo_terms, sample_times  # noqa: E402
from tinydiff.evaluate import heldout_windows  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", required=True, help="prepared data folder whose val split is scored")
parser.add_argument("--seq_len", type=int, default=128)
parser.add_argument("--eval_tokens", type=int, default=32768, help="held-out tokens (the training eval's default)")
parser.add_argument("--draws", type=int, default=2, help="stratified t draws per window")
parser.add_argument("--batch_size", type=int, default=32, help="windows per forward (fixes the noise stream)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--run", action="append", required=True, help="NAME=OUT_DIR (its snap-*.pt, else ckpt.pt)")
parser.add_argument("--base", required=True, help="the run the others are compared with")
parser.add_argument("--frac", type=float, default=0.6, help="goal: reach the base's final bound in frac of its steps")
parser.add_argument("--t_grid", default="0.05,0.1,0.25,0.5,0.75,0.9",
                    help="final snapshots only: the NLL of masked tokens at these fixed mask rates t (where a run gains/loses)")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()


@torch.no_grad()
def per_window_bound(model, val_x, mask_id, schedule):
    """(N,) per-token NELBO of each window, averaged over draws: val_bound's draws, kept per window."""
    gen = torch.Generator().manual_seed(args.seed)
    total = torch.zeros(len(val_x), dtype=torch.float64)
    for _ in range(args.draws):
        for i in range(0, len(val_x), args.batch_size):
            x = val_x[i:i + args.batch_size]  # (b, L)
            t = sample_times(x.shape[0], gen)
            z = forward_mask(x, t, schedule, mask_id, gen)
            total[i:i + len(x)] += nelbo_terms(model(z), x, z, t, schedule, mask_id).double().mean(1)
    return total / args.draws


@torch.no_grad()
def per_window_nll_at(model, val_x, mask_id, t, schedule):
    """(N,) mean -log p(x_i | z_t) over each window's masked tokens at a fixed time t (the model's schedule;
    log-linear: mask rate (1 - eps) t), without the NELBO weight."""
    gen = torch.Generator().manual_seed(args.seed)
    num, den = torch.zeros(len(val_x), dtype=torch.float64), torch.zeros(len(val_x), dtype=torch.float64)
    for _ in range(args.draws):
        for i in range(0, len(val_x), args.batch_size):
            x = val_x[i:i + args.batch_size]  # (b, L)
            tt = torch.full((len(x),), t)
            z = forward_mask(x, tt, schedule, mask_id, gen)
            terms = nelbo_terms(model(z), x, z, tt, schedule, mask_id).double() / schedule.weight(tt)[:, None]  # (b, L)
            num[i:i + len(x)] += terms.sum(1)
            den[i:i + len(x)] += (z == mask_id).sum(1)
    return num / den.clamp_min(1)


def snapshots(out_dir):
    """{iter: path} of a run's snapshots (or its ckpt.pt)."""
    snaps = {int(re.search(r"snap-(\d+)\.pt$", p).group(1)): p for p in glob.glob(os.path.join(out_dir, "snap-*.pt"))}
    if not snaps:
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        snaps = {ckpt["iter"]: os.path.join(out_dir, "ckpt.pt")}
    return dict(sorted(snaps.items()))


def mean_se(v):
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


def main():
    torch.set_num_threads(args.threads)
    runs = dict(r.split("=", 1) for r in args.run)
    val_x = heldout_windows(args.data_dir, "mdlm", args.seq_len, args.eval_tokens)[0]  # (N, L)
    bounds = {}  # name -> {iter: (N,) per-window bounds}
    for name, out in runs.items():
        bounds[name] = {}
        for it, path in snapshots(out).items():
            ckpt = load_checkpoint(path)
            bounds[name][it] = per_window_bound(model_from_checkpoint(ckpt), val_x, ckpt["mask_id"],
                                                get_schedule(ckpt.get("schedule")))
            print(f"{name} iter {it}: {bounds[name][it].mean().item():.4f}", file=sys.stderr, flush=True)
    base = bounds[args.base]
    iters = sorted({it for b in bounds.values() for it in b})
    names = list(runs)
    print(f"{len(val_x)} held-out windows of {args.seq_len} tokens, {args.draws} t draws each; "
          f"bound in nats/token ± s.e. over windows; Δ = run − {args.base} at the same step (paired)")
    print("| step | " + " | ".join(names) + " | " + " | ".join(f"Δ {n}" for n in names if n != args.base) + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    table = []
    for it in iters:
        cells, deltas, rec = [], [], {"iter": it}
        for n in names:
            if it in bounds[n]:
                m, se = mean_se(bounds[n][it])
                cells.append(f"{m:.4f} ± {se:.4f}")
                rec[n] = [m, se]
            else:
                cells.append("")
        for n in names:
            if n == args.base:
                continue
            if it in bounds[n] and it in base:
                m, se = mean_se(bounds[n][it] - base[it])
                deltas.append(f"{m:+.4f} ± {se:.4f}")
                rec[f"delta_{n}"] = [m, se]
            else:
                deltas.append("")
        table.append(rec)
        print(f"| {it} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")

    S = max(base)
    final = base[S]
    goals = {}
    print(f"\nbase {args.base}: final bound {final.mean().item():.4f} at step {S}")
    for n in names:
        if n == args.base:
            continue
        reach = next((it for it in sorted(bounds[n]) if bounds[n][it].mean() <= final.mean()), None)
        g = {"first_step_at_or_below_base_final": reach}
        for label, it in (("frac", min(bounds[n], key=lambda i: abs(i - args.frac * S))), ("final", max(bounds[n]))):
            d, se = mean_se(final - bounds[n][it])
            g[label] = {"step": it, "d": d, "se": se, "met": d > 2 * se}
            print(f"{n}: at step {it} its bound is {'below' if d > 0 else 'above'} the base's final by {abs(d):.4f} "
                  f"± {se:.4f} ({d / se if se else 0:+.1f} s.e.)")
        print(f"{n}: first snapshot at or below the base's final bound: {reach}")
        goals[n] = g

    by_t = {}
    ts = [float(t) for t in args.t_grid.split(",") if t]
    if ts:
        finals = {}
        for n in names:
            ckpt = load_checkpoint(snapshots(runs[n])[max(bounds[n])])
            model = model_from_checkpoint(ckpt)
            finals[n] = {t: per_window_nll_at(model, val_x, ckpt["mask_id"], t, get_schedule(ckpt.get("schedule")))
                         for t in ts}
        print(f"\nfinal snapshots: NLL of the masked tokens (nats/token) at a fixed mask rate t, ± s.e.; "
              f"Δ = run − {args.base} (paired)")
        print("| t | " + " | ".join(names) + " | " + " | ".join(f"Δ {n}" for n in names if n != args.base) + " |")
        print("|---" * (2 * len(names)) + "|")
        for t in ts:
            cells = ["%.4f ± %.4f" % mean_se(finals[n][t]) for n in names]
            deltas = ["%+.4f ± %.4f" % mean_se(finals[n][t] - finals[args.base][t]) for n in names if n != args.base]
            by_t[t] = {n: mean_se(finals[n][t]) for n in names}
            by_t[t].update({f"delta_{n}": mean_se(finals[n][t] - finals[args.base][t]) for n in names if n != args.base})
            print(f"| {t} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    emit({"windows": len(val_x), "seq_len": args.seq_len, "draws": args.draws, "base": args.base, "base_final_step": S,
          "table": table, "goals": goals, "by_t": by_t})


if __name__ == "__main__":
    main()
