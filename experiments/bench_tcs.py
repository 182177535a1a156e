"""TCS estimator benchmark: how close each estimator's STORED target comes to the teacher's exact
full-context conditional pi_i(v) = p_AR(x_i = v | x_{!=i}), and what it costs (docs/tcs.md, tinydiff/tcs.py).

On held-out windows, for every estimator and K, the expected stored target E[tau_i] is compared with
pi_i (`exact`, all ids, full window), averaged over positions:
  - exact / prefix / grad store scheme (S): q on the top K plus one tail token drawn from q; E over the
    draw is the dense q, whatever K.
  - topk stores scheme (B): pi renormalised on the candidates when x_i is one of them, else the label;
    its expectation is over x_i ~ pi_i (how the scheme is defined: teacher = data). With candidates from
    `prefix` the set does not depend on x_i; with `grad` it does, and the set is recomputed for every
    substituted x_i (one gradient pass per position and window).
  - "old" rows: the scheme tinydiff used before (top K with x_i forced in, renormalised), for reference.
Columns: TV(E[tau], pi); KL(pi || E[tau]) (the lambda = 1 student's excess cross-entropy at the
full-context optimum); E TV(tau, pi), the distance of ONE stored target (what a single draw adds); the
teacher's wall and CPU ms per sequence for tcs_targets (teacher forward/backward passes included).

CPU (the AR teacher of docs/tcs.md, length 32 where `exact` is affordable):
    python experiments/bench_tcs.py --teacher out-ar/ckpt.pt --seq_len 32 --n_seq 16
GPU: the same with a bigger teacher, e.g. --seq_len 128 --n_seq 64 --batch_size 16.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from tinydiff.common import UserError, emit, load_checkpoint, model_from_checkpoint, pick_device  # noqa: E402
from tinydiff.data import checkpoint_data, val_windows  # noqa: E402
from tinydiff.run import ArgumentParser, int_list, run_main, validate  # noqa: E402
from tinydiff.tcs import dense_targets, grad_suffix, prefix_log_probs, rescore, tcs_targets, to_dense  # noqa: E402

parser = ArgumentParser(description=__doc__)
parser.add_argument("--teacher", required=True, help="AR checkpoint (train.py --model ar)")
parser.add_argument("--data_dir", default=None,
                    help="prepared data folder (default: the one the teacher was trained on)")
parser.add_argument("--seq_len", type=int, default=32, help="window length L (exact rescoring costs L*|V| sequences)")
parser.add_argument("--n_seq", type=int, default=16, help="held-out windows scored")
parser.add_argument("--batch_size", type=int, default=8, help="windows per estimator call")
parser.add_argument("--dense_ks", type=int_list, default=[16, 4, 1],
                    help="comma-separated K of the exact/prefix/grad rows (besides all)")
parser.add_argument("--ks", type=int_list, default=[2, 4, 8, 16, 32], help="comma-separated K of the topk rows (prefix candidates)")
parser.add_argument("--grad_ks", type=int_list, default=[4, 16], help="comma-separated K of the topk rows with grad candidates")
parser.add_argument("--windowed", default="4:4,16:8",
                    help="comma-separated K:W topk rows with a suffix window W (prefix candidates)")
parser.add_argument("--neglect", type=float, default=1e-4,
                    help="grad rows: substitutions x_i := u outside the top-pi set of mass 1 - neglect are not "
                         "recomputed (counted as their label: at most this much TV error)")
parser.add_argument("--old_k", type=int, default=16, help="K of the reference row with the old (biased) scheme")
parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
parser.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (1: timings that do not depend on what else the machine runs; "
                         "0: torch's default)")
args = parser.parse_args()


def timed(device, fn, x):
    """fn over x in batches -> (concatenated outputs, wall ms per sequence, CPU ms per sequence)."""
    outs, wall, cpu = [], 0.0, 0.0
    for i in range(0, len(x), args.batch_size):
        torch.cuda.synchronize() if device == "cuda" else None
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(x[i:i + args.batch_size])
        torch.cuda.synchronize() if device == "cuda" else None
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        outs.append(out)
    cat = tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))) if isinstance(outs[0], tuple) \
        else torch.cat(outs)
    return cat, 1000 * wall / len(x), 1000 * cpu / len(x)


def tv(p, q):
    return 0.5 * (p - q).abs().sum(-1)  # (..., V) -> (...)


def kl(p, q):
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), torch.zeros(())).sum(-1)


def tail_scheme(q, pi, k):
    """Scheme (S) of dense q (N, L, V): (E over the tail draw = q, E over the draw of TV(one target, pi))."""
    V = q.shape[-1]
    if k <= 0 or k >= V:
        return q, tv(q, pi)
    T = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, q.topk(k, -1).indices, True)  # (N, L, V)
    tail = torch.where(T, 0.0, q)
    mass = tail.sum(-1, keepdim=True)  # (N, L, 1)
    a = torch.where(T, (q - pi).abs(), 0.0).sum(-1) + torch.where(T, 0.0, pi).sum(-1)  # TV terms if v* got nothing
    r = tail / mass.clamp_min(1e-300)  # the tail draw's law
    return q, 0.5 * (a + (r * ((mass - pi).abs() - pi)).sum(-1))  # v*: its pi leaves the sum, |mass - pi| enters


def label_scheme(head, inside_T, pi):
    """Scheme (B) for candidate sets independent of x_i: head (N, L, V) = the stored renormalised scores
    on T (zero outside), inside_T (N, L, V) bool. E over x_i ~ pi and E TV(one target, pi)."""
    M = (pi * inside_T).sum(-1, keepdim=True)  # (N, L, 1) = pi(T)
    mean = M * head + torch.where(inside_T, 0.0, pi)
    one = M[..., 0] * tv(head, pi) + torch.where(inside_T, 0.0, pi * (1 - pi)).sum(-1)  # the label: TV = 1 - pi(u)
    return mean, one


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
    N, L, V = len(x), args.seq_len, teacher.cfg.vocab_size
    print(f"teacher {args.teacher}: {teacher.num_params() / 1e6:.2f}M params, |V| = {V}; {N} held-out windows "
          f"of {L} tokens on {device} ({torch.get_num_threads()} threads)")

    rows = []

    def row(name, stored, mean, one, ms, cpu_ms, pi):
        r = {"estimator": name, "stored_ids": stored, "tv": tv(mean, pi).mean().item(),
             "kl": max(kl(pi, mean).mean().item(), 0.0), "tv_one": one.mean().item(), "ms_per_seq": ms, "cpu_ms_per_seq": cpu_ms}
        rows.append(r)
        print(f"| {name} | {stored} | {r['tv']:.4f} | {r['kl']:.4f} | {r['tv_one']:.4f} | {ms:.1f} | {cpu_ms:.1f} |",
              flush=True)

    print("| estimator | ids stored | TV(E[stored], exact) | KL(exact‖E[stored]) nats | E TV(one stored, exact) "
          "| teacher ms/seq | CPU ms/seq |")
    print("|---|---|---|---|---|---|---|")
    dense = {}
    for est in ("exact", "prefix", "grad"):
        logq, ms, cpu_ms = timed(device, lambda b: dense_targets(teacher, b, bos, est), x)  # (N, L, V)
        dense[est] = (logq.double().exp(), ms, cpu_ms)
    pi = dense["exact"][0]  # (N, L, V)
    nll = {est: -dense[est][0].gather(-1, x[..., None]).clamp_min(1e-300).log().mean().item() for est in dense}
    print("held-out tokens' NLL under each dense target, nats/token (exact: the teacher's full-context conditional, "
          "prefix: its next-token NLL): " + ", ".join(f"{k} {v:.4f}" for k, v in nll.items()))
    for est in ("exact", "prefix", "grad"):
        q, ms, cpu_ms = dense[est]
        for k in [0] + args.dense_ks:
            mean, one = tail_scheme(q, pi, k)
            row(f"{est}" + ("" if k == 0 else f" K={k}"), V if k == 0 else k + 1, mean, one, ms, cpu_ms, pi)

    # topk, prefix candidates (independent of x_i): the stored head is exact pi (window W: its windowed scores)
    prefix = prefix_log_probs(teacher, x, bos)  # (N, L, V)
    configs = [(k, None) for k in args.ks]
    configs += windowed
    for k, w in configs:
        (ids, logp), ms, cpu_ms = timed(device, lambda b: tcs_targets(teacher, b, bos, "topk", k, w, "prefix"), x)
        cand = prefix.topk(k, -1).indices  # (N, L, k)
        assert torch.equal(ids[..., :k], cand)
        scores = rescore(teacher, x, cand, bos, V, w).log_softmax(-1).double().exp()  # (N, L, k)
        head = torch.zeros_like(pi).scatter_(-1, cand, scores)  # (N, L, V)
        inside = (cand == x[..., None]).any(-1)  # (N, L): the stored head is this head there
        assert torch.allclose(to_dense(ids, logp.double(), V)[inside], head[inside], atol=1e-5)
        mean, one = label_scheme(head, torch.zeros_like(pi, dtype=torch.bool).scatter_(-1, cand, True), pi)
        row(f"topk K={k}" + (f" W={w}" if w else "") + " (prefix)", k + 1, mean, one, ms, cpu_ms, pi)

    # topk, grad candidates: the set depends on x_i, so it is recomputed for every substitution x_i := u
    # (one gradient pass per position and window over the u that hold all but args.neglect of pi; a
    # neglected u counts as outside its own set, stored as its label: at most that much TV error)
    ks = args.grad_ks
    if ks:
        means = {k: torch.zeros_like(pi) for k in ks}
        ones = {k: torch.zeros(N, L, dtype=pi.dtype, device=device) for k in ks}
        order = pi.sort(-1, descending=True)
        for n in range(N):
            for i in range(L):
                keep = int((order.values[n, i].cumsum(0) < 1 - args.neglect).sum()) + 1  # top-pi tokens to substitute
                us, w = order.indices[n, i, :keep], pi[n, i, order.indices[n, i, :keep]]  # (U,), (U,)
                sub = x[n].repeat(len(us), 1)  # (U, L): x with x_i := u
                sub[:, i] = us
                p, d = grad_suffix(teacher, sub, bos)  # (U, L, V) each
                prop = (p + d)[:, i]  # (U, V): the proposal at position i when x_i = u
                rest = pi[n, i].clone()
                rest[us] = 0  # the neglected u: stored as their label
                for k in ks:
                    T = prop.topk(k, -1).indices  # (U, k)
                    inT = torch.zeros(len(us), V, dtype=torch.bool, device=device).scatter_(-1, T, True)
                    head = torch.where(inT, pi[n, i].log(), float("-inf")).softmax(-1)  # (U, V): pi on T(u)
                    own = inT[torch.arange(len(us)), us]  # (U,): u in T(u)
                    target = torch.where(own[:, None], head, torch.nn.functional.one_hot(us, V).to(pi.dtype))
                    means[k][n, i] = (w[:, None] * target).sum(0) + rest
                    ones[k][n, i] = (w * tv(target, pi[n, i])).sum() + (rest * (1 - rest)).sum()
        for k in ks:
            _, ms, cpu_ms = timed(device, lambda b: tcs_targets(teacher, b, bos, "topk", k, None, "grad"), x)
            row(f"topk K={k} (grad)", k + 1, means[k], ones[k], ms, cpu_ms, pi)

    # the old scheme, top K of the prefix with x_i forced in, renormalised (closed form over x_i ~ pi)
    k = args.old_k
    if k > 0:
        inT = torch.zeros_like(pi, dtype=torch.bool).scatter_(-1, prefix.topk(k, -1).indices, True)  # (N, L, V)
        M = (pi * inT).sum(-1, keepdim=True)  # (N, L, 1)
        out = torch.where(inT, 0.0, pi)
        mean = torch.where(inT, pi * (1 + (out / (M + out)).sum(-1, keepdim=True)), pi * pi / (M + pi))
        one = (M * (1 - M))[..., 0] + (out * (1 - M - out)).sum(-1)  # TV of a renormalised restriction = 1 - its mass
        row(f"old: top-K={k} (prefix) + x_i, renormalised", f"{k}+1", mean, one, float("nan"), float("nan"), pi)
    emit({"teacher": args.teacher, "seq_len": L, "n_seq": N, "vocab_size": V, "device": device, "target_nll": nll,
          "rows": rows})


if __name__ == "__main__":
    run_main(main)
