"""SDTT (docs/sdtt.md): Algorithm 1's targets and the divergences against hand computations, distillation
against ground truth on the known-distribution harness, and distill.py's rounds end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import exact_sampler_law
from tinydiff.diffusion import LogLinearSchedule, forward_mask, masked_log_probs, sample_times, subs_log_probs
from tinydiff.sdtt import DIVERGENCES, divergence, sdtt_loss, sdtt_targets

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHED = LogLinearSchedule()


def noised(toy, B, seed):
    g = torch.Generator().manual_seed(seed)
    x = toy.sample(B, g)  # (B, L)
    t = sample_times(B, g)  # (B,)
    return forward_mask(x, t, SCHED, toy.mask_id, g), t


# ----------------------------------------------------------------------------- targets (Algorithm 1)

def test_one_teacher_step_gives_the_teachers_log_probs(toy, oracle):
    z, t = noised(toy, 256, 0)
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    target = sdtt_targets(oracle, z, t, 1, 1 / 8, toy.mask_id, SCHED, g)
    assert target.dtype == torch.float64 and target.shape == (256, toy.L, toy.V + 1)  # >= fp32, as the teacher
    masked = z == toy.mask_id  # (256, L)
    exact = toy.posterior(z).log()  # (256, L, V): p(x_i | z_t) by enumeration, independent of the network
    assert torch.allclose(target[masked][:, :toy.V], exact[masked], atol=1e-9)
    assert (target[masked][:, toy.V] == float("-inf")).all()  # the mask is never a target
    assert torch.equal(target, subs_log_probs(oracle(z), z, toy.mask_id))  # clean positions: SUBS copies
    assert torch.equal(g.get_state(), before)  # n = 1 draws nothing


def test_two_teacher_steps_by_hand(toy, oracle):
    """Positions revealed in step 1 carry step-1 log-probs, every other masked position the step-2 ones,
    recomputed by hand with the same seed (float64 Bernoulli reveals, then Gumbel-max tokens)."""
    m, K, eps = toy.mask_id, 4, 1e-5
    z, t = noised(toy, 512, 2)
    target = sdtt_targets(oracle, z, t, 2, 1 / K, m, SCHED, torch.Generator().manual_seed(3), eps=eps)

    g = torch.Generator().manual_seed(3)
    t0 = t.double().clamp_min(eps)
    s0 = (t0 - 1 / K).clamp_min(eps)  # step 1 runs t -> max(t - Δ, ε)
    r = (SCHED.alpha(s0) - SCHED.alpha(t0)) / (1 - SCHED.alpha(t0))  # (B,)
    reveal = (z == m) & (torch.rand(z.shape, generator=g, dtype=torch.float64) < r[:, None])  # (B, L)
    logits = oracle(z)[reveal].double()  # (n, V+1)
    logits[:, m] = float("-inf")
    gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=g, dtype=torch.float64)))
    z1 = z.clone()
    z1[reveal] = (logits + gumbel).argmax(-1)
    lp0, lp1 = masked_log_probs(oracle(z), m), masked_log_probs(oracle(z1), m)  # (B, L, V+1) each
    later = (z == m) & ~reveal  # masked in z_t, not revealed by step 1

    assert 0.1 < reveal.sum() / (z == m).sum() < 0.9 and later.any()  # both kinds of positions occur
    assert torch.equal(target[reveal], lp0[reveal])
    assert torch.equal(target[later], lp1[later])
    assert not torch.allclose(lp0[later], lp1[later])  # the two steps' log-probs really differ there
    assert torch.equal(target[z != m], subs_log_probs(oracle(z), z, m)[z != m])  # clean: SUBS copies


# ----------------------------------------------------------------------------- divergences

def brute_force(kind, ls, lt, masked, mask_id):
    """The textbook formulas, one position and one token at a time, in float64."""
    vals = []
    for b, i in masked.nonzero().tolist():
        d = 0.0
        for v in range(ls.shape[-1]):
            if v == mask_id:
                continue
            a, c = ls[b, i, v].item(), lt[b, i, v].item()
            p, q = np.exp(a), np.exp(c)
            d += {"kl_bwd": p * (a - c), "kl_fwd": q * (c - a), "mse": (a - c) ** 2 / ls.shape[-1],  # mean over V
                  "tvd": 0.5 * abs(p - q)}[kind]
        vals.append(d)
    return sum(vals) / len(vals)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_values_and_gradient(kind):
    g = torch.Generator().manual_seed(0)
    B, L, V, mask_id = 3, 5, 6, 5
    student_logits = torch.randn(B, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    lt = masked_log_probs(torch.randn(B, L, V, generator=g, dtype=torch.float64), mask_id)  # (B, L, V)
    masked = torch.rand(B, L, generator=g) < 0.6
    ls = masked_log_probs(student_logits, mask_id).double()

    d = divergence(ls, lt, masked, kind, mask_id)
    assert d.dtype == torch.float64
    assert abs(d.item() - brute_force(kind, ls.detach(), lt, masked, mask_id)) < 1e-12
    assert divergence(lt, lt, masked, kind, mask_id).item() == 0.0
    # fp32 inputs: same value to fp32 precision; bf16 inputs are computed in fp32
    assert abs(divergence(ls.float(), lt.float(), masked, kind, mask_id).item() - d.item()) < 1e-5
    assert divergence(ls.bfloat16(), lt.bfloat16(), masked, kind, mask_id).dtype == torch.float32
    # a small step along -grad lowers it
    (grad,) = torch.autograd.grad(d, student_logits)
    with torch.no_grad():
        stepped = masked_log_probs(student_logits - 1e-3 * grad / grad.norm(), mask_id).double()
        assert divergence(stepped, lt, masked, kind, mask_id) < d



def test_mse_is_a_mean_over_the_vocabulary_as_the_official_mse_loss():
    """Paper eq. 11 weights the squared log-prob error by 1/|Ω|; the official `_mse` is F.mse_loss over the
    (masked positions, vocabulary) entries, i.e. a mean over both. Its [MASK] column carries the same
    large negative log-prob on both sides (a finite -inf), so it adds 0 and counts in |V|."""
    g = torch.Generator().manual_seed(3)
    B, L, V, mask_id = 2, 4, 7, 6
    ls = masked_log_probs(torch.randn(B, L, V, generator=g, dtype=torch.float64), mask_id)  # (B, L, V)
    lt = masked_log_probs(torch.randn(B, L, V, generator=g, dtype=torch.float64), mask_id)
    masked = torch.tensor([[True, False, True, True], [False, True, False, False]])
    finite = lambda lp: lp.clamp_min(-1e6)  # the official code's finite stand-in for -inf
    official = torch.nn.functional.mse_loss(finite(ls)[masked], finite(lt)[masked])  # mean over 4 x 7 entries
    assert divergence(ls, lt, masked, "mse", mask_id).item() == pytest.approx(official.item(), rel=1e-12)
    by_hand = sum(((ls[b, i, v] - lt[b, i, v]) ** 2).item() for b, i in masked.nonzero().tolist()
                  for v in range(V - 1)) / (4 * V)
    assert divergence(ls, lt, masked, "mse", mask_id).item() == pytest.approx(by_hand, rel=1e-12)

# ----------------------------------------------------------------------------- ground truth: distillation works

class TableStudent(torch.nn.Module):
    """A logits table over all (V+1)^L partial states: the most flexible student there is."""

    def __init__(self, toy, init):
        super().__init__()
        self.toy = toy
        self.table = torch.nn.Parameter(init.double().nan_to_num(neginf=-30.0))  # (S, L, V+1)

    def forward(self, z):
        return self.table[self.toy.state_index(z)]  # (B, L, V+1)


def step_matrix(toy, logp, r):
    """T[s, s'] of one ancestral step from every partial state s: each masked position is revealed with
    probability r with a token drawn from exp(logp[s, i]); clean positions never change. (S, S)"""
    states, m = toy.states(), toy.mask_id  # (S, L)
    T = torch.ones(len(states), len(states), dtype=torch.float64)
    for i in range(toy.L):
        a, b = states[:, i, None], states[None, :, i]  # (S, 1) from, (1, S) to
        draw = logp[:, i, :toy.V].exp().gather(1, b.clamp(max=toy.V - 1).expand(len(states), -1))  # (S, S)
        from_mask = torch.where(b == m, 1 - r, r * draw)
        T *= torch.where(a == m, from_mask, (a == b).double())
    return T


def ideal_kl_bwd_student(toy, teacher, K, eps_t=1e-3, eps=1e-5):
    """The exact minimiser over tabular students of E[kl_bwd(student, SDTT target)] with n = 2, Δ = 1/K
    and t ~ U[eps_t, 1] as in training: at each state z and masked position i, the normalised geometric
    mean exp E[log target_i | z] of the targets (the minimiser of an expected KL(s ‖ q_j) over s)."""
    states, m, L = toy.states(), toy.mask_id, toy.L
    masked = states == m  # (S, L)
    agree = ((toy.seqs[None] == states[:, None]) | masked[:, None]).all(-1)  # (S, N)
    p_clean = agree.double() @ toy.p  # (S,) probability of z's clean tokens
    k = masked.sum(1).double()  # (S,)
    logp = masked_log_probs(teacher(states), m).double()  # (S, L, V+1), the teacher at every state
    logp_masked = torch.where(masked[..., None], logp, 0.0)  # zeros where there is no target
    acc, wsum = torch.zeros_like(logp), torch.zeros(len(states), dtype=torch.float64)
    # E over t by Gauss-Legendre on [eps_t, Δ] and [Δ, 1] (the step size is clamped below Δ)
    nodes, weights = np.polynomial.legendre.leggauss(48)
    for lo, hi in ((eps_t, 1 / K), (1 / K, 1.0)):
        for x, w in zip(nodes, weights):
            t = torch.tensor((x + 1) / 2 * (hi - lo) + lo, dtype=torch.float64)
            mprob = 1 - SCHED.alpha(t)
            pz = w * (hi - lo) / 2 * p_clean * mprob ** k * (1 - mprob) ** (L - k)  # (S,) weight of z at this t
            r = (SCHED.alpha((t - 1 / K).clamp_min(eps)) - SCHED.alpha(t)) / (1 - SCHED.alpha(t))
            T = step_matrix(toy, logp, r)  # (S, S)
            # revealed in step 1 (prob r): step-1 log-probs at z; else step-2 log-probs at the next state
            e = r * logp_masked + torch.einsum("ab,blv->alv", T, logp_masked * masked[..., None])
            acc += pz[:, None, None] * e
            wsum += pz
    return acc / wsum[:, None, None]  # (S, L, V+1) logits; the mask column is dropped by the sampler


def kl(p, q):
    return (p * (p / q).log()).sum().item()


@pytest.mark.slow
def test_distillation_moves_the_fast_sampler_toward_the_slow_one(toy, oracle):
    """The oracle teacher samples in K = 8 steps; a tabular student, started as a copy of it and trained
    with sdtt_loss (kl_bwd, n = 2, Δ = 1/K, the training path of distill.py), samples in K/2 = 4 steps
    with a law closer to the teacher's 8-step law than the teacher's own 4-step law, in both KL
    directions, all laws exact (harness.exact_sampler_law).

    Why the effect is modest (≈ 12%) and why K = 8: the oracle is the perfect denoiser, so the whole gap
    between its 8- and 4-step laws is the factorisation error (positions revealed in one step are drawn
    independently), which no per-position student can undo. What SDTT can change is the marginals it
    reveals from each state: kl_bwd's minimiser is the geometric mean of the targets, which sharpens
    them and partly compensates. Exactly computed (ideal_kl_bwd_student) on this toy: K = 8 -> 4: 0.0128
    -> 0.0110; K = 4 -> 2: 0.0383 -> 0.0350; K = 2 -> 1: no gain (a one-step law is a product of
    marginals whatever the student). kl_fwd's exact minimiser (the arithmetic mean: the teacher's
    two-step marginals) gains nothing here (0.0128 -> 0.0129).
    """
    m, K = toy.mask_id, 8
    law_K = exact_sampler_law(oracle, K, toy.V, toy.L, m)
    law_half = exact_sampler_law(oracle, K // 2, toy.V, toy.L, m)

    student = TableStudent(toy, oracle(toy.states()))
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    iters = 400
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (1 - it / iters)  # decay to 0: the last iterate sits near the optimum
        x = toy.sample(256, g)
        t = sample_times(len(x), g)
        z = forward_mask(x, t, SCHED, m, g)  # noised data, as distill.py draws it
        loss = sdtt_loss(student, oracle, z, t, K, 2, m, SCHED, g, "kl_bwd")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        law_student = exact_sampler_law(student, K // 2, toy.V, toy.L, m)
    ideal = TableStudent(toy, ideal_kl_bwd_student(toy, oracle, K))
    law_ideal = exact_sampler_law(ideal, K // 2, toy.V, toy.L, m)

    teacher_gap, student_gap = kl(law_K, law_half), kl(law_K, law_student)
    assert student_gap < 0.95 * teacher_gap, (student_gap, teacher_gap)
    assert kl(law_student, law_K) < 0.95 * kl(law_half, law_K)
    # and SGD on sampled targets lands where the exact expected targets say it should
    assert kl(law_K, law_ideal) < 0.9 * teacher_gap
    assert abs(student_gap - kl(law_K, law_ideal)) < 0.1 * teacher_gap


# ----------------------------------------------------------------------------- distill.py end to end

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "32", "--batch_size", "2",
        "--tokenizer", "bytes", "--eval_tokens", "256", "--data", "play.txt", "--device", "cpu"]
ROUNDS = ["--rounds", "2", "--iters_per_round", "3", "--teacher_steps", "8", "--batch_size", "2",
          "--eval_tokens", "64", "--warmup", "2", "--device", "cpu"]


def run(script, *args, cwd, check=True):
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


def load(path):
    return torch.load(path, weights_only=False)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdtt")
    # a small corpus written here (tests read nothing outside the repository)
    (d / "play.txt").write_text("".join(f"KING {i % 5}:\nWhat light through yonder window {i % 9} breaks?\n\n"
                                        for i in range(300)))
    run("train.py", *TINY, "--max_iters", 3, "--eval_interval", 3, "--out_dir", "mdlm", cwd=d)
    return d


@pytest.mark.slow
def test_rounds_checkpoints_and_exact_resume(teacher_dir):
    d = teacher_dir
    out = last_json(run("distill.py", "--teacher", "mdlm/ckpt.pt", *ROUNDS, "--out_dir", "straight", cwd=d))
    assert out["iter"] == 6 and out["sample_steps"] == 2 and out["method"] == "sdtt"
    r1, r2, final = (load(d / "straight" / f) for f in ("round1.pt", "round2.pt", "ckpt.pt"))
    # teacher steps halve each round; round r's student samples with K0 / 2^r steps
    assert (r1["iter"], r1["sample_steps"], r1["extra"]["teacher_steps"]) == (3, 4, 8)
    assert (r2["iter"], r2["sample_steps"], r2["extra"]["teacher_steps"]) == (6, 2, 4)
    assert final["sample_steps"] == 2 and final["kind"] == "mdlm" and final["method"] == "sdtt"
    assert r1["optimizer"] is None and "teacher" not in r1["extra"]  # sampling files, not resume points
    # teacher <- raw (non-EMA) student at the boundary: round 2's teacher is round 1's raw weights
    assert same_weights(final["extra"]["teacher"], r1["model"])
    assert not same_weights(r1["model"], r1["ema"]["model"])

    # stop mid-round 2 and resume: the same final weights as the straight run
    run("distill.py", "--teacher", "mdlm/ckpt.pt", *ROUNDS, "--out_dir", "halves", "--max_iters", 4, cwd=d)
    mid = load(d / "halves" / "ckpt.pt")
    assert (mid["iter"], mid["sample_steps"], mid["extra"]["teacher_steps"]) == (4, 4, 4)
    assert same_weights(mid["extra"]["teacher"], r1["model"])  # the teacher a resume must restore
    # (a resumed run keeps its own --max_iters unless told: the full R x N steps are asked for explicitly)
    run("distill.py", "--teacher", "mdlm/ckpt.pt", *ROUNDS, "--out_dir", "halves", "--resume", "--max_iters", 6, cwd=d)
    resumed = load(d / "halves" / "ckpt.pt")
    assert resumed["iter"] == 6
    assert same_weights(resumed["model"], final["model"])
    assert same_weights(resumed["ema"]["model"], final["ema"]["model"])
    assert same_weights(load(d / "halves" / "round2.pt")["model"], r2["model"])

    # every round's checkpoint samples with its recorded step count
    for r, steps in ((1, 4), (2, 2)):
        s = last_json(run("sample.py", "--ckpt", f"straight/round{r}.pt", "--num_samples", 1, "--device", "cpu", cwd=d))
        assert s["steps"] == steps and s["nfe"] <= steps + 1


@pytest.mark.slow
def test_framed_teacher_is_distilled_on_framed_windows(tmp_path):
    """A teacher that records framing bos_eos and residual-only dropout (what hub.py writes for MDLM's DiT):
    distill.py trains and evaluates on [BOS] + L-2 + [EOS] windows and the student records both; --framing
    none overrides."""
    d = tmp_path
    (d / "tiny.txt").write_text("".join(f"def f{i % 7}(x):\n    return x + {i % 5}\n\n" for i in range(300)))
    run("train.py", *TINY[:-3], "tiny.txt", "--device", "cpu", "--max_iters", 1, "--eval_interval", 1,
        "--out_dir", "mdlm", cwd=d)
    ckpt = load(d / "mdlm" / "ckpt.pt")
    ckpt["framing"] = "bos_eos"
    ckpt["config"] = dict(ckpt["config"], dropout=0.1, dropout_sites="residual")
    torch.save(ckpt, d / "framed.pt")
    common = ["--teacher", "framed.pt", "--rounds", "1", "--iters_per_round", "2", "--teacher_steps", "8",
              "--batch_size", "2", "--eval_tokens", "64", "--device", "cpu", "--compile", "false"]
    p = run("distill.py", *common, "--out_dir", "framed", cwd=d)
    assert "windows framed as [BOS] + 30 tokens + [EOS]" in p.stdout
    out = load(d / "framed" / "ckpt.pt")
    assert out["framing"] == "bos_eos" and out["args"]["framing"] == "bos_eos"
    assert out["config"]["dropout_sites"] == "residual"
    p = run("distill.py", *common, "--framing", "none", "--dropout_sites", "all", "--out_dir", "plain", cwd=d)
    assert "windows framed" not in p.stdout
    out = load(d / "plain" / "ckpt.pt")
    assert out["framing"] == "none" and out["config"]["dropout_sites"] == "all"

def check_error(p, *words):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.mark.slow
def test_clear_errors(teacher_dir):
    d = teacher_dir
    check_error(run("distill.py", "--teacher", "mdlm/ckpt.pt", *ROUNDS[:2], "--teacher_steps", 6, cwd=d, check=False),
                "divisible")
