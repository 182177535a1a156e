"""Why TCS with the lab's exact targets does (not) train faster: the noise it removes, measured exactly.

The MDLM loss at a masked position is a cross-entropy against the one-hot label e_{x_i}; TCS (lambda = 1)
replaces it with pi_i = p(x_i | x_!=i), its conditional mean given the rest of the window (a Rao-Blackwell
step: same expected gradient, less noise). With p = p(x_i | z_t) (the exact posterior, the loss's optimum),
the squared label noise splits exactly (the cross term vanishes since E[e_x | x_!=i] = pi):

    E|e_x - p|^2 = E|e_x - pi|^2 + E|pi - p|^2 = E[1 - |pi|^2]  +  E|pi - p|^2
       (total)        (removed by TCS: within)     (left: between, what z_t does not reveal)

This is the noise of the gradient with respect to the logits (p_theta - target) that comes from the label,
per masked position and masking rate t, computed with the lab's exact posteriors (part 1). Part 2 measures
the whole parameter-gradient noise of a student checkpoint, tr Cov over batches of the batch gradient, for
lambda = 0 / 0.5 / 1 on the same windows, t and masks (drawn from the same generator for each).

    python experiments/lab_tcs_noise.py --ckpt runs/labtcs/lam0/snap-000125.pt --batches 32
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from tinydiff.common import emit, load_checkpoint, model_from_checkpoint  # noqa: E402
from tinydiff.data import checkpoint_data  # noqa: E402
from tinydiff.lab import lab_of  # noqa: E402
from tinydiff.lab import oracle_targets
from tinydiff.diffusion import forward_mask, get_schedule, sample_times  # noqa: E402
from tinydiff.tcs import tcs_loss  # noqa: E402
from tinydiff.tcs_cache import grid_batch  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", required=True, help="a student trained on the lab (checkpoint or snapshot)")
parser.add_argument("--seq_len", type=int, default=128)
parser.add_argument("--windows", type=int, default=512, help="part 1: stationary windows per masking rate")
parser.add_argument("--rates", default="0.05,0.2,0.4,0.6,0.8,0.95")
parser.add_argument("--batches", type=int, default=32, help="part 2: training batches")
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--lambdas", default="0,0.5,1")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()


def main():
    ckpt = load_checkpoint(args.ckpt)
    data_dir = checkpoint_data(ckpt)
    lab, L = lab_of(data_dir), args.seq_len
    gen = torch.Generator().manual_seed(args.seed)

    # part 1: the label noise, exactly (per masked position), split into what TCS removes and what it leaves
    x = lab.sample(args.windows, L, gen)  # (n, L) stationary windows
    pi = lab.conditionals(x)  # (n, L, V) p(x_i | x_!=i)
    within = (1 - (pi ** 2).sum(-1)).mean().item()  # E[1 - |pi|^2]: does not depend on t
    rows = []
    print(f"E[1 - |pi|^2] = {within:.4f} (removed by TCS at every t); H(x_i | x_!=i) = "
          f"{-(pi * pi.log()).sum(-1).mean().item():.4f} nats; E[1 - pi(x_i)] = "
          f"{(1 - pi.gather(-1, x[..., None])).mean().item():.4f}")
    print("| t | total E[1 - |p|^2] | removed (within) | left E|pi - p|^2 | removed / (removed + left) |")
    for t in [float(v) for v in args.rates.split(",")]:
        z = torch.where(torch.rand(x.shape, generator=gen) < t, lab.mask_id, x)  # (n, L)
        m = z == lab.mask_id
        p = lab.conditionals(z)  # (n, L, V): at masked positions the exact posterior p(x_i | z_t)
        total = (1 - (p ** 2).sum(-1))[m].mean().item()
        left = ((pi - p) ** 2).sum(-1)[m].mean().item()
        w = (1 - (pi ** 2).sum(-1))[m].mean().item()
        rows.append({"t": t, "total": total, "within": w, "between": left, "removed_frac": w / (w + left)})
        print(f"| {t} | {total:.4f} | {w:.4f} | {left:.4f} | {w / (w + left):.3f} |")

    # part 2: the parameter-gradient noise of the student, per lambda, on the same batches, t and masks
    student = model_from_checkpoint(ckpt).train()
    lams = [float(v) for v in args.lambdas.split(",")]
    grads = {lam: [] for lam in lams}
    for b in range(args.batches):
        xb = grid_batch(data_dir, "train", args.batch_size, L, gen, "cpu")  # (B, L) training windows
        ids, logp = oracle_targets(lab, xb)  # (B, L, V) each
        for lam in lams:
            student.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(1000 + b)  # the same t and masks for every lambda
            t = sample_times(len(xb), g)
            z = forward_mask(xb, t, get_schedule(ckpt.get("schedule")), ckpt["mask_id"], g)
            loss, _ = tcs_loss(student, xb, z, t, ids, logp, ckpt["mask_id"], lam, get_schedule(ckpt.get("schedule")))
            loss.backward()
            grads[lam].append(torch.cat([q.grad.flatten() for q in student.parameters() if q.grad is not None]))
    noise = {}
    for lam in lams:
        g = torch.stack(grads[lam]).double()  # (batches, P)
        mean = g.mean(0)
        tr = ((g - mean) ** 2).sum(1).sum().item() / (len(g) - 1)  # tr Cov(batch gradient), unbiased
        noise[lam] = {"signal": (mean ** 2).sum().item(), "noise": tr}
    for lam in lams:
        noise[lam]["noise_vs_plain"] = noise[lam]["noise"] / noise[lams[0]]["noise"]
        print(f"lambda {lam}: |mean grad|^2 {noise[lam]['signal']:.4g}, tr Cov(batch grad) {noise[lam]['noise']:.4g} "
              f"({noise[lam]['noise_vs_plain']:.3f} x lambda {lams[0]})")
    emit({"ckpt": args.ckpt, "iter": ckpt.get("iter"), "windows": args.windows, "within": within, "by_rate": rows,
          "batches": args.batches, "batch_size": args.batch_size, "by_lambda": {str(k): v for k, v in noise.items()}})


if __name__ == "__main__":
    main()
