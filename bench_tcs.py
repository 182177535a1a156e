"""TCS estimator benchmark: how close each estimator of the teacher's full-context conditional
pi_i(v) = p_AR(x_i = v | x_{!=i}) comes to `exact`, and what it costs (docs/tcs.md, tinydiff/tcs.py).

On held-out windows of real text, for every estimator: the mean over positions of KL(exact || est)
and of the total variation to exact, the exact mass that falls outside the stored/candidate ids
(topk renormalises over its candidates, so its KL is taken on them: exact restricted and
renormalised to the candidates), and the teacher's cost in ms per sequence (targets of a whole
batch, teacher forward/backward passes included).

CPU (a tiny byte-level AR teacher on tiny shakespeare, length 32 where `exact` is affordable):
    python train.py --model ar --data shakespeare --n_layer 2 --n_head 2 \
        --n_embd 64 --seq_len 32 --max_iters 300 --batch_size 32 --lr 3e-3 --warmup 30 --out_dir out-ar-tiny
    python bench_tcs.py --teacher out-ar-tiny/ckpt.pt --seq_len 32 --n_seq 32
GPU: the same with a bigger teacher, e.g. --seq_len 128 --n_seq 64 --batch_size 16.
"""
import argparse
import time

import torch

from tinydiff.checks import ArgumentParser, int_list, run_main, validate
from tinydiff.common import UserError, emit, load_checkpoint, model_from_checkpoint, pick_device
from tinydiff.data import checkpoint_data, val_windows
from tinydiff.tcs import tcs_targets, to_dense
from tinydiff.timing import sync

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--teacher", required=True, help="AR checkpoint (train.py --model ar)")
parser.add_argument("--data_dir", default=None, help="prepared data folder (default: the one the teacher was trained on)")
parser.add_argument("--seq_len", type=int, default=32, help="window length L (exact rescoring costs L*|V| sequences)")
parser.add_argument("--n_seq", type=int, default=32, help="held-out windows scored")
parser.add_argument("--batch_size", type=int, default=8, help="windows per estimator call")
parser.add_argument("--ks", type=int_list, default=[2, 4, 8, 16, 32], help="comma-separated K for topk (candidates from grad)")
parser.add_argument("--prefix_k", type=int, default=16, help="K of the topk row with candidates from prefix")
parser.add_argument("--windowed", default="4:4,16:8", help="comma-separated K:W topk rows with a suffix window W (grad)")
parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
parser.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (1: timings that do not depend on what else the machine runs; "
                         "0: torch's default)")
args = parser.parse_args()


def run_estimator(teacher, x, bos, device, **kw):
    """All windows' targets in batches -> (dense probs (N, L, V), kept-id mask (N, L, V), wall and CPU ms per sequence)."""
    probs, kept, seconds, cpu = [], [], 0.0, 0.0
    for i in range(0, len(x), args.batch_size):
        xb = x[i:i + args.batch_size]  # (b, L)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        ids, logp = tcs_targets(teacher, xb, bos, **kw)
        sync(device)
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        V = teacher.cfg.vocab_size
        probs.append(to_dense(ids, logp.double(), V).cpu())  # (b, L, V)
        kept.append(torch.zeros(*xb.shape, V, dtype=torch.bool, device=ids.device).scatter_(-1, ids, True).cpu())
    return torch.cat(probs), torch.cat(kept), 1000 * seconds / len(x), 1000 * cpu / len(x)


def compare(exact, est, kept):
    """Mean over positions of KL(exact || est) on the kept ids, TV, and the exact mass not kept."""
    inside = (exact * kept).sum(-1)  # (N, L)
    p = exact * kept / inside[..., None]  # exact renormalised to the kept ids
    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - est.clamp_min(1e-300).log()), torch.zeros(()))
    return {"kl": kl.sum(-1).mean().item(), "tv": 0.5 * (exact - est).abs().sum(-1).mean().item(),
            "missed": (1 - inside).clamp_min(0).mean().item()}


def windowed_rows(text):
    """--windowed 'K:W,K:W' -> [(K, W)], each at least 1."""
    try:
        rows = [tuple(int(v) for v in kw.split(":")) for kw in filter(None, text.split(","))]
    except ValueError:
        rows = [()]
    if any(len(r) != 2 or min(r) < 1 for r in rows):
        raise UserError(f"--windowed {text!r}: give comma-separated K:W pairs of positive integers, e.g. 4:4,16:8")
    return rows


def main():
    validate(args)
    windowed = windowed_rows(args.windowed)
    device, _ = pick_device(args.device)
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.teacher, kind="ar", what=f"--teacher {args.teacher}")
    if args.seq_len > ckpt["config"]["seq_len"]:
        raise UserError(f"--seq_len {args.seq_len} is longer than the teacher's context {ckpt['config']['seq_len']}")
    teacher = model_from_checkpoint(ckpt, device).requires_grad_(False)
    bos = ckpt["tokenizer"]["eot_id"]  # the eot token as BOS prefix (see tinydiff/tcs.py)
    data_dir = args.data_dir or checkpoint_data(ckpt, what=f"the teacher {args.teacher}")  # as it was trained on
    x = val_windows(data_dir, args.seq_len, args.n_seq * args.seq_len).to(device)  # (N, L)
    V = teacher.cfg.vocab_size
    print(f"teacher {args.teacher}: {teacher.num_params() / 1e6:.2f}M params, |V| = {V}; {len(x)} held-out windows "
          f"of {args.seq_len} tokens on {device} ({torch.get_num_threads()} threads)")

    configs = [("exact", {"estimator": "exact", "topk": 0}), ("prefix", {"estimator": "prefix", "topk": 0}),
               ("grad", {"estimator": "grad", "topk": 0})]
    configs += [(f"topk K={k} (grad)", {"estimator": "topk", "topk": k, "candidates": "grad"})
                for k in args.ks]
    configs.append((f"topk K={args.prefix_k} (prefix)", {"estimator": "topk", "topk": args.prefix_k, "candidates": "prefix"}))
    for k, w in windowed:
        configs.append((f"topk K={k} W={w} (grad)", {"estimator": "topk", "topk": k, "candidates": "grad", "window": w}))

    rows, exact = [], None
    print("| estimator | KL(exact‖est) nats | TV to exact | exact mass missed | teacher ms/seq | CPU ms/seq |")
    print("|---|---|---|---|---|---|")
    for name, kw in configs:
        probs, kept, ms, cpu_ms = run_estimator(teacher, x, bos, device, **kw)
        exact = probs if exact is None else exact
        row = {"estimator": name, **compare(exact, probs, kept), "ms_per_seq": ms, "cpu_ms_per_seq": cpu_ms}
        rows.append(row)
        print(f"| {name} | {max(row['kl'], 0):.4f} | {row['tv']:.4f} | {row['missed']:.4f} | {ms:.1f} | {cpu_ms:.1f} |",
              flush=True)
    emit({"teacher": args.teacher, "seq_len": args.seq_len, "n_seq": len(x), "vocab_size": V, "device": device,
          "rows": rows})


if __name__ == "__main__":
    run_main(main)
