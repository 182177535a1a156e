"""How much gradient noise do the TCS targets remove? A diagnostic for the experiment of docs/tcs.md.

TCS can only speed training up by replacing the one-hot label (a noisy sample of p(x_i | x_!=i)) with
the teacher's distribution: the expected gradient is the same when teacher = data, the noise is not.
For a student checkpoint this script draws --batches training batches from the fixed windows, and for
each batch computes the parameter gradient of the loss with lambda = 0 (plain MDLM), 0.5 and 1, on the
SAME t and masks (drawn from the same generator for every lambda). It reports, per lambda, the
squared norm of the mean gradient (signal), the trace of the covariance of the per-batch gradient
(noise), and the noise relative to lambda = 0 with its s.e. (paired over the same batches).

    python experiments/tcs_grad_noise.py --ckpt scratch-lam0/snap-000060.pt --teacher ar/ckpt.pt \
        --tcs_windows 1024 --topk 16 --window 8 --batches 32
(run where the targets were precomputed: they are read from the disk cache, not recomputed).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from tinydiff.common import emit, load_checkpoint, model_from_checkpoint  # noqa: E402
from tinydiff.diffusion import forward_mask, get_schedule, sample_times  # noqa: E402
from tinydiff.tcs import load_teacher, tcs_loss, tcs_targets  # noqa: E402
from tinydiff.tcs_cache import grid_batch, target_settings, target_store  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", required=True, help="the student (an MDLM checkpoint or snapshot)")
parser.add_argument("--teacher", required=True, help="the AR teacher whose targets were precomputed")
parser.add_argument("--batches", type=int, default=32)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--seq_len", type=int, default=128)
parser.add_argument("--lambdas", default="0,0.5,1")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--tcs_windows", type=int, default=1024, help="the fixed windows of the run (distill.py's)")
parser.add_argument("--tcs_cache_dir", default=None, help="where their targets were precomputed (distill.py's)")
parser.add_argument("--estimator", default="topk")
parser.add_argument("--topk", type=int, default=16)
parser.add_argument("--window", type=int, default=None)
parser.add_argument("--candidates", default="prefix")
args = parser.parse_args()


def main():
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.ckpt)
    student = model_from_checkpoint(ckpt).train()  # the weights the snapshot holds (EMA for snapshots)
    teacher, tckpt = load_teacher(args.teacher, ckpt["tokenizer"], student.cfg.vocab_size, args.seq_len, "cpu")
    data_dir, bos_id, mask_id = tckpt["data_dir"], tckpt["tokenizer"]["eot_id"], ckpt["mask_id"]
    schedule = get_schedule(ckpt.get("schedule"))
    settings = target_settings(teacher, tckpt["config"], bos_id, args.estimator, args.topk, args.window, args.candidates)
    targets, chunks = target_store(lambda x: tcs_targets(teacher, x, bos_id, args.estimator, args.topk, args.window,
                                                         args.candidates), data_dir, args.seq_len, args.tcs_windows,
                                   args.tcs_cache_dir, batch_size=args.batch_size, settings=settings)
    lams = [float(v) for v in args.lambdas.split(",")]
    grads = {lam: [] for lam in lams}
    gen = torch.Generator().manual_seed(args.seed)
    for b in range(args.batches):
        x = grid_batch(data_dir, "train", args.batch_size, args.seq_len, gen, "cpu", chunks)  # (B, L) fixed windows
        ids, logp = targets(x)
        for lam in lams:
            student.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(args.seed * 1000 + b)  # the same t and masks for every lambda
            t = sample_times(len(x), g)
            z = forward_mask(x, t, schedule, mask_id, g)
            loss, _ = tcs_loss(student, x, z, t, ids, logp, mask_id, lam, schedule)
            loss.backward()
            grads[lam].append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    out, dev = {}, {}
    for lam in lams:
        g = torch.stack(grads[lam]).double()  # (batches, P)
        mean = g.mean(0)
        dev[lam] = ((g - mean) ** 2).sum(1)  # (batches,) squared deviation of each batch's gradient
        noise = dev[lam].mean().item() * args.batches / (args.batches - 1)  # tr Cov per batch
        out[lam] = {"signal": (mean ** 2).sum().item(), "noise": noise}
    for lam in lams:  # ratio of means over the same batches: delta-method s.e. of the paired per-batch terms
        a, c = dev[lam], dev[lams[0]]
        r = a.mean().item() / c.mean().item()
        se = r * ((a / a.mean() - c / c.mean()).std().item() / args.batches ** 0.5)
        out[lam].update(noise_vs_plain=r, noise_vs_plain_se=se)
        print(f"lambda {lam}: |mean grad|^2 {out[lam]['signal']:.4g}, tr Cov(batch grad) {out[lam]['noise']:.4g} "
              f"({r:.3f} ± {se:.3f} x lambda {lams[0]})")
    emit({"ckpt": args.ckpt, "batches": args.batches, "batch_size": args.batch_size,
          "by_lambda": {str(k): v for k, v in out.items()}})


if __name__ == "__main__":
    main()
