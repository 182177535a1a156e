"""Why an SDTT student is (or is not) as good as its teacher's two steps, on the exact lab (docs/lab.md §e).

For round r of an SDTT run (distill.py writes OUT/round{r}.pt), on the same stationary windows, times t
(stratified, as in training) and masks z_t, per masked position of z_t:
- T: the round's target, two ancestral steps of size 1/K_r of the round's teacher (tinydiff.sdtt.sdtt_targets;
  round 1: the --teacher checkpoint, its EMA weights (--teacher_raw: its raw ones); round r > 1: the raw weights of round{r-1}.pt, as distill.py);
- X: the same two steps taken by the lab's exact denoiser (the same uniforms, so the same positions are
  revealed in step 1; the tokens drawn there differ where the two denoisers differ);
- S: the student's one-step output (the EMA weights of round{r}.pt, what eval samples with); S0: the student
  at the start of the round (the round's teacher itself, one step).
The targets are random (step 2 is conditioned on the tokens step 1 drew), so --draws M targets are drawn per
z_t. A one-step student sees z_t only: the best it can do against KL(S || target) is the normalised geometric
mean of the targets, g = softmax(E log target), and E KL(g || target) is the FLOOR of the round's loss that no
one-step denoiser can go below (estimated with the M draws: the plug-in g, biased low by ~1/M).
Printed per round (mean per masked position, ± s.e. over windows): KL(S0 || T) and KL(S || T) (the loss the
round minimises, before and after), its floor; KL(S0 || g) and KL(S || g), what the round can still remove
(E KL(S || T) = KL(S || g) + floor; with the plug-in g it is biased high, by the noise of g, ~1/M);
KL(S || X) and the floor against X; KL(X || T) (how far the teacher's target is from the exact one). --exact_teacher: the run's teacher was the exact denoiser (T = X).

    python experiments/lab_sdtt_kl.py --run runs/labeasy/sdtt-s1 --teacher runs/labeasy/teacher/ckpt.pt --K0 128
The last stdout line is one JSON object.
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from tinydiff.common import load_checkpoint, model_from_checkpoint  # noqa: E402
from tinydiff.data import checkpoint_data  # noqa: E402
from tinydiff.diffusion import forward_mask, get_schedule, masked_log_probs, sample_times  # noqa: E402
from tinydiff.lab import OracleDenoiser, lab_of  # noqa: E402
from tinydiff.sdtt import sdtt_targets  # noqa: E402

NAMES = ("s0_t", "s_t", "floor_t", "s_x", "floor_x", "x_t", "s0_g", "s_g")


def kl(lp, lq):
    """KL(p || q) per position (B, L) from log-probs (B, L, V) with no -inf entries."""
    return (lp.exp() * (lp - lq)).sum(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="an SDTT out_dir with round{r}.pt")
    ap.add_argument("--teacher", required=True, help="the checkpoint the run started from (its round-1 teacher)")
    ap.add_argument("--exact_teacher", action="store_true", help="the run's teacher was the lab's exact denoiser")
    ap.add_argument("--teacher_raw", action="store_true",
                    help="the run started from the teacher's raw weights (distill.py without --teacher_ema)")
    ap.add_argument("--K0", type=int, default=128, help="the run's --teacher_steps")
    ap.add_argument("--rounds", default="1,2,3,4")
    ap.add_argument("--windows", type=int, default=512)
    ap.add_argument("--draws", type=int, default=8, help="targets drawn per z_t (for the floor)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tck = load_checkpoint(a.teacher)
    lab = lab_of(checkpoint_data(tck))
    L, mask_id, schedule = tck["config"]["seq_len"], tck["mask_id"], get_schedule(tck.get("schedule"))
    keep = torch.arange(mask_id + 1) != mask_id  # drop the [MASK] column (-inf everywhere)
    oracle, out = OracleDenoiser(lab), {}
    x_all = lab.sample(a.windows, L, torch.Generator().manual_seed(a.seed))  # (N, L) stationary windows
    for r in map(int, a.rounds.split(",")):
        K = a.K0 // 2 ** (r - 1)  # the round's teacher steps
        if r == 1:
            start = model_from_checkpoint(tck, "cpu", use_ema=not a.teacher_raw)
        else:
            start = model_from_checkpoint(load_checkpoint(f"{a.run}/round{r - 1}.pt"), "cpu", use_ema=False)
        teacher = oracle if a.exact_teacher else start
        student = model_from_checkpoint(load_checkpoint(f"{a.run}/round{r}.pt"), "cpu", use_ema=True)
        gen = torch.Generator().manual_seed(a.seed + 1)
        acc = {k: [] for k in NAMES}
        with torch.no_grad():
            for x in x_all.split(a.batch):
                t = sample_times(len(x), gen)  # (B,)
                z = forward_mask(x, t, schedule, mask_id, gen)  # (B, L)
                m = z == mask_id  # (B, L)
                T, X = [], []
                for _ in range(a.draws):
                    state = gen.get_state()
                    T.append(sdtt_targets(teacher, z, t, 2, 1.0 / K, mask_id, schedule, gen).double()[..., keep])
                    gen.set_state(state)  # the exact two steps with the same uniforms
                    X.append(sdtt_targets(oracle, z, t, 2, 1.0 / K, mask_id, schedule, gen).double()[..., keep])
                S = masked_log_probs(student(z), mask_id).double()[..., keep]
                S0 = masked_log_probs(start(z), mask_id).double()[..., keep]
                gT = torch.stack(T).mean(0).log_softmax(-1)  # the one-step optimum against T (geometric mean)
                gX = torch.stack(X).mean(0).log_softmax(-1)
                mean = lambda f, Y: torch.stack([f(y) for y in Y]).mean(0)  # (B, L) over the draws
                vals = {"s0_t": mean(lambda y: kl(S0, y), T), "s_t": mean(lambda y: kl(S, y), T),
                        "floor_t": mean(lambda y: kl(gT, y), T), "s_x": mean(lambda y: kl(S, y), X),
                        "floor_x": mean(lambda y: kl(gX, y), X),
                        "x_t": torch.stack([kl(xx, tt) for xx, tt in zip(X, T)]).mean(0),
                        "s0_g": kl(S0, gT), "s_g": kl(S, gT)}  # = KL(. || T) - floor: the distance to the optimum
                n = m.sum(1).clamp_min(1)  # (B,)
                for k, v in vals.items():
                    acc[k].append(torch.where(m, v, 0.0).sum(1) / n)  # (B,) mean over the window's masked positions
        row = {"K_teacher": K, "K_student": K // 2}
        for k in NAMES:
            v = torch.cat(acc[k])
            row[k], row[k + "_se"] = v.mean().item(), (v.std() / math.sqrt(len(v))).item()
        out[r] = row
        f = lambda k: f"{row[k]:.4f} ± {row[k + '_se']:.4f}"
        print(f"round {r} (teacher {K} -> student {K // 2} steps): KL(S0||T) {f('s0_t')} -> KL(S||T) {f('s_t')} "
              f"(floor {f('floor_t')}; to the optimum g: S0 {f('s0_g')}, S {f('s_g')}) | KL(S||X) {f('s_x')} (floor {f('floor_x')}) | KL(X||T) {f('x_t')}", flush=True)
    print(json.dumps({"run": a.run, "teacher": a.teacher, "exact_teacher": a.exact_teacher, "draws": a.draws,
                      "windows": a.windows, "rounds": out}))


if __name__ == "__main__":
    main()
