"""The sampler registry (tinydiff/sampling.py) against exact laws on the known-distribution harness.

Exact laws come from tests/sampler_laws.py (enumeration, independent of the samplers' code); samples
are compared with them by a chi-square test at ALPHA, and each such test checks its power on a nearby
wrong law (the ancestral law, or the table). Scripts: sample.py, eval.py and bench.py take --sampler.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from harness import chi2_gof, exact_sampler_law, tv, z_threshold
from sampler_laws import confidence_law, counts_per_step, remdm_law, semi_ar_law, threshold_law
from tinydiff.common import UserError, save_checkpoint
from tinydiff.diffusion import LogLinearSchedule
from tinydiff.model import ModelConfig, Transformer
from tinydiff.sampling import diffusion_sample
from tinydiff.sampling import SAMPLERS, describe, remdm_plan, resolve, reveal_counts, sample

pytestmark = pytest.mark.usefixtures("single_thread")
ALPHA = 1e-4
EPS = 1e-5
N = 20_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def draw(name, model, toy, K, n=N, seed=0, init=None, **knobs):
    return sample(name, model, init if init is not None else (n, toy.L), K, toy.mask_id,
                  torch.Generator().manual_seed(seed), eps=EPS, **knobs)


class Counting(torch.nn.Module):
    """Counts network calls; checks every call sees `width` positions (when given)."""

    def __init__(self, net, width=None):
        super().__init__()
        self.net, self.width, self.calls = net, width, 0

    def forward(self, z):
        assert self.width is None or z.shape[1] == self.width, z.shape
        self.calls += 1
        return self.net(z)


# ---------------------------------------------------------------- ancestral: unchanged


def test_ancestral_draws_are_pinned(toy, oracle):
    """The registry's ancestral sampler gives, draw for draw, what tinydiff.sampling.diffusion_sample
    gave before the registry existed (outputs recorded at commit fc06345)."""
    m = toy.mask_id
    cases = [  # (K, init, knobs, seed) -> (tokens, nfe) recorded from the original implementation
        ((3, None, {}, 123), ([[2, 2, 0, 2], [1, 1, 2, 1], [0, 0, 0, 2], [2, 1, 0, 0], [1, 2, 0, 2], [1, 1, 1, 0]], 3)),
        ((2, [[m, 1, m, m]] * 6, {"temperature": 0.7, "top_k": 2}, 7),
         ([[2, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 2], [1, 1, 2, 2], [1, 1, 1, 0], [1, 1, 1, 0]], 2)),
        ((50, None, {"top_p": 0.8}, 9),
         ([[0, 0, 0, 0], [1, 1, 1, 2], [2, 0, 2, 2], [1, 1, 1, 2], [0, 0, 2, 1], [0, 0, 0, 0]], 22)),
    ]
    for (K, init, knobs, seed), (want, want_nfe) in cases:
        init = torch.tensor(init) if init else (6, toy.L)
        x, nfe = sample("ancestral", oracle, init, K, m, torch.Generator().manual_seed(seed), **knobs)
        assert x.tolist() == want and nfe == want_nfe
        y, nfe2 = diffusion_sample(oracle, 6, toy.L, K, m, init=init if torch.is_tensor(init) else None,
                                   generator=torch.Generator().manual_seed(seed), **knobs)
        assert torch.equal(x, y) and nfe == nfe2


# ---------------------------------------------------------------- the registry


def test_every_sampler_fills_keeps_clamps_and_counts_nfe(toy, oracle):
    m, gen = toy.mask_id, torch.Generator().manual_seed(1)
    prompts = toy.sample(64, gen)
    infill = torch.full_like(prompts, m)
    infill[:, [0, 2]] = prompts[:, [0, 2]]
    model = Counting(oracle, width=toy.L)
    for name in SAMPLERS:
        for init in ((64, toy.L), infill):
            for K in (1, 2, 7, 40):
                model.calls = 0
                x, nfe = sample(name, model, init, K, m, gen, **({"block_len": 2} if name == "semi_ar" else {}))
                assert x.shape == (64, toy.L) and (x != m).all(), (name, K)
                if torch.is_tensor(init):
                    assert torch.equal(x[init != m], init[init != m]), (name, K)
                assert nfe == model.calls >= 1, (name, K)
                if name != "semi_ar":  # at most one call per step, plus one greedy pass
                    assert nfe <= K + 1


def test_knobs_are_checked_and_described():
    assert resolve("threshold", {}) == {"tau": 0.9, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    k = resolve("semi_ar", {"inner": "remdm", "eta": 0.1})
    assert k["inner"] == "remdm" and k["eta"] == 0.1 and "remask" in k and "tau" not in k
    assert describe("threshold", resolve("threshold", {"tau": 0.5})) == \
        "threshold(tau=0.5, temperature=1.0, top_k=0, top_p=1.0)"
    for name, knobs, words in [("nope", {}, "unknown sampler"), ("ancestral", {"tau": 0.5}, "no knob tau"),
                               ("threshold", {"tau": 1.5}, "--tau"), ("remdm", {"remask": "x"}, "--remask"),
                               ("remdm", {"remask": "loop", "eta": 0.5}, "loop"),
                               ("ancestral", {"top_p": 0}, "--top_p"),
                               ("semi_ar", {"inner": "semi_ar"}, "--inner"), ("remdm", {"t_on": 0.01}, "t_off")]:
        with pytest.raises(UserError, match=words):
            resolve(name, knobs)


def test_reveal_counts_match_the_ancestral_expectation():
    sched = LogLinearSchedule()
    for n_free, K in [(4, 4), (4, 2), (4, 3), (7, 3), (5, 16), (256, 16), (0, 3)]:
        counts, active = reveal_counts(torch.ones(1, n_free, dtype=torch.bool), K, sched, EPS)
        c = counts[:, 0].tolist()
        assert c == counts_per_step(n_free, K, sched, EPS) and sum(c) == n_free and min(c) >= 0
        assert active == [v > 0 for v in c]
        # cumulative reveals stay within rounding of ancestral's expected n_free (1 - t_{k+1})
        for k in range(K - 1):
            assert abs(sum(c[:k + 1]) - n_free * (k + 1) * (1 - EPS) / K) <= 0.5 + 1e-9
    counts, _ = reveal_counts(torch.ones(1, 4, dtype=torch.bool), 4, sched, EPS)
    assert counts[:, 0].tolist() == [1, 1, 1, 1]  # K = L: one reveal per step


# ---------------------------------------------------------------- confidence


def greedy_hand_run(toy, per_step):
    """Greedy confidence decoding by hand: at each step, the argmax token of the exact posterior at each
    masked position, and the `c` positions whose max probability is highest (ties: lower position)."""
    z = torch.full((toy.L,), toy.mask_id)
    for c in per_step:
        post = toy.posterior(z[None])[0]  # (L, V)
        masked = [i for i in range(toy.L) if z[i] == toy.mask_id]
        for i in sorted(masked, key=lambda i: (-post[i].max().item(), i))[:c]:
            z[i] = post[i].argmax()
    return z


@pytest.mark.parametrize("K", [4, 2])
def test_greedy_confidence_is_a_point_mass_matching_a_hand_run(toy, oracle, K):
    want = greedy_hand_run(toy, [1] * 4 if K == 4 else [2, 2])
    for seed in range(3):
        x, nfe = draw("confidence", oracle, toy, K, n=50, seed=seed, temperature=0)
        assert (x == want).all() and nfe == K
    law = confidence_law(oracle, toy, K, temperature=0)
    assert law[toy.index(want)] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("K,knobs", [(4, {}), (2, {}), (2, {"gumbel": 1.0}), (4, {"gumbel": 2.0}),
                                     (3, {"temperature": 0.7, "top_p": 0.8})])
def test_confidence_matches_exact_law(toy, oracle, K, knobs):
    x, _ = draw("confidence", oracle, toy, K, **knobs)
    hist = toy.histogram(x)
    law = confidence_law(oracle, toy, K, **knobs)
    assert chi2_gof(hist, law)[1] > ALPHA
    filt = {k: v for k, v in knobs.items() if k != "gumbel"}
    assert chi2_gof(hist, exact_sampler_law(oracle, K, toy.V, toy.L, toy.mask_id, eps=EPS, **filt))[1] < ALPHA
    # confidence order is mode-seeking: less entropy than the ancestral sampler with the same K
    anc = exact_sampler_law(oracle, K, toy.V, toy.L, toy.mask_id, eps=EPS, **filt)
    assert -(law[law > 0] * law[law > 0].log()).sum() < -(anc[anc > 0] * anc[anc > 0].log()).sum()


# ---------------------------------------------------------------- threshold


def test_threshold_extremes(toy, oracle):
    # tau = 0: everything at once from the fully masked state: the product of the marginals, 1 NFE
    law, nfe = threshold_law(oracle, toy, 8, 0.0)
    assert tv(law, toy.product_of_marginals()) < 1e-12 and nfe == pytest.approx(1)
    x, n = draw("threshold", oracle, toy, 8, tau=0.0)
    assert n == 1 and chi2_gof(toy.histogram(x), toy.product_of_marginals())[1] > ALPHA
    # tau = 1: one position per step in greedy confidence order (= confidence with K = L)
    law, nfe = threshold_law(oracle, toy, 8, 1.0)
    assert tv(law, confidence_law(oracle, toy, toy.L)) < 1e-12 and nfe == pytest.approx(toy.L)
    # a budget of 2 steps: the second reveals whatever is left
    x, n = draw("threshold", oracle, toy, 2, n=500, tau=1.0)
    assert n == 2 and (x != toy.mask_id).all()


def test_threshold_nfe_falls_with_tau_and_matches_exact(toy, oracle):
    taus = [1.0, 0.6, 0.45, 0.3, 0.0]
    exact = [threshold_law(oracle, toy, 8, tau)[1] for tau in taus]
    assert all(a > b for a, b in zip(exact, exact[1:])), exact  # strictly fewer NFE as tau falls
    z = z_threshold(ALPHA, len(taus))
    for tau, want in zip(taus, exact):  # one sequence at a time: the NFE of a batch is its slowest row's
        nfes = torch.tensor([draw("threshold", oracle, toy, 8, n=1, seed=s, tau=tau)[1] for s in range(600)],
                            dtype=torch.float64)
        se = nfes.std() / math.sqrt(len(nfes))
        assert abs(nfes.mean() - want) <= z * se + 1e-9, (tau, nfes.mean(), want)


@pytest.mark.parametrize("tau,knobs", [(0.5, {}), (0.4, {"top_k": 2, "temperature": 1.3})])
def test_threshold_matches_exact_law(toy, oracle, tau, knobs):
    x, _ = draw("threshold", oracle, toy, 8, tau=tau, **knobs)
    assert (x != toy.mask_id).all()
    hist = toy.histogram(x)
    law, _ = threshold_law(oracle, toy, 8, tau, **knobs)
    assert chi2_gof(hist, law)[1] > ALPHA
    assert chi2_gof(hist, exact_sampler_law(oracle, 8, toy.V, toy.L, toy.mask_id, eps=EPS, **knobs))[1] < ALPHA


# ---------------------------------------------------------------- remdm


def test_remdm_plan_by_hand():
    sched = LogLinearSchedule()
    a = lambda t: 1 - (1 - 1e-3) * t
    ts = [1.0, 0.5, 0.0]
    for remask, eta in [("cap", 0.3), ("rescale", 0.3), ("conf", 0.3)]:
        plan = remdm_plan(2, sched, 0.0, remask, eta, 0.55, 0.05, 0.9)
        for (p, sigma), t, s in zip(plan, ts, ts[1:]):
            bound = (1 - a(s)) / a(t)
            want = {"cap": min(eta, bound), "rescale": eta * min(1, bound), "conf": min(1, bound)}[remask]
            assert sigma == pytest.approx(want)
            sm = 0 if remask == "conf" else want
            assert p == pytest.approx((a(s) - (1 - sm) * a(t)) / (1 - a(t)))
    # loop with K = 10 on [1, 0], t_on 0.55, t_off 0.15: alpha 0 -> 0.9 linearly on [1, 0.55], 0.9 on
    # [0.55, 0.15], -> 1 linearly on [0.15, 0]; steps starting in (0.15, 0.55] re-mask with sigma = eta
    alpha = {1.0: 0, .9: .2, .8: .4, .7: .6, .6: .8, .5: .9, .4: .9, .3: .9, .2: .9, .1: 1 - .1 * .1 / .15, 0.0: 1}
    plan = remdm_plan(10, sched, 0.0, "loop", 0.05, 0.55, 0.15, 0.9)
    for k, (p, sigma) in enumerate(plan):
        t, s = round(1 - k / 10, 1), round(1 - (k + 1) / 10, 1)
        at, as_ = alpha[t], alpha[s]
        want_sigma = min(0.05, (1 - as_) / at) if 0.15 < t <= 0.55 else 0.0
        assert sigma == pytest.approx(want_sigma) and p == pytest.approx((as_ - (1 - want_sigma) * at) / (1 - at))
    assert plan[5] == (pytest.approx(0.05 * 0.9 / 0.1), 0.05)  # inside the loop: alpha stays, reveals balance re-masks
    for K in (1, 2, 3):  # few steps: every probability stays in [0, 1]
        assert all(0 <= p <= 1 and 0 <= sig <= 1 for p, sig in remdm_plan(K, sched, EPS, "loop", 0.1, .55, .05, .9))
    assert remdm_plan(3, sched, EPS, "cap", 0, .55, .05, .9) == remdm_plan(3, sched, EPS, "rescale", 0, .55, .05, .9)


@pytest.mark.parametrize("remask", ["cap", "rescale"])
def test_remdm_without_remasking_is_ancestral_draw_for_draw(toy, oracle, remask):
    m = toy.mask_id
    init = torch.tensor([[m, 2, m, m]] * 300)
    for K, knobs in [(1, {}), (3, {"top_p": 0.8}), (50, {"temperature": 0.6}), (9, {})]:
        for start in ((300, toy.L), init):
            a = draw("ancestral", oracle, toy, K, init=start, seed=K, **knobs)
            b = draw("remdm", oracle, toy, K, init=start, seed=K, remask=remask, eta=0.0, **knobs)
            assert torch.equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize("remask,eta,K,knobs", [("cap", 0.6, 8, {}), ("rescale", 1.0, 4, {"temperature": 0.8}),
                                                 ("loop", 0.08, 8, {})])
def test_remdm_matches_exact_law(toy, oracle, remask, eta, K, knobs):
    plan = remdm_plan(K, LogLinearSchedule(), EPS, remask, eta, 0.55, 0.05, 0.9)
    law = remdm_law(oracle, toy, plan, **knobs)
    anc = exact_sampler_law(oracle, K, toy.V, toy.L, toy.mask_id, eps=EPS, **knobs)
    zero = remdm_plan(K, LogLinearSchedule(), EPS, "cap", 0.0, 0.55, 0.05, 0.9)
    assert tv(remdm_law(oracle, toy, zero, **knobs), anc) < 1e-12  # the enumeration itself: sigma = 0 is ancestral
    x, _ = draw("remdm", oracle, toy, K, remask=remask, eta=eta, **knobs)
    hist = toy.histogram(x)
    assert chi2_gof(hist, law)[1] > ALPHA
    assert chi2_gof(hist, anc)[1] < ALPHA  # power: remasking changed the law


class Recording(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, z):
        self.inputs.append(z.clone())
        return self.net(z)


def test_remdm_conf_remasks_only_free_tokens(toy, oracle):
    """ReMDM-conf has no closed-form law here (its state carries each token's confidence): check its
    structure. Tokens are re-masked (some position is revealed in one network input and masked in a
    later one), never clamped ones, and nothing is left masked."""
    m = toy.mask_id
    init = torch.tensor([[m, 2, m, 0]] * 500)
    model = Recording(oracle)
    x, nfe = draw("remdm", model, toy, 40, init=init, remask="conf")
    assert (x != m).all() and (x[:, 1] == 2).all() and (x[:, 3] == 0).all() and nfe == len(model.inputs)
    seen = torch.stack(model.inputs)  # (calls, B, L)
    for z in seen:
        assert (z[:, 1] == 2).all() and (z[:, 3] == 0).all()
    revealed_then_masked = ((seen[:-1] != m)[:, None] & (seen[1:] == m)[None]).any()
    assert revealed_then_masked


# ---------------------------------------------------------------- semi_ar


def test_semi_ar_beyond_the_context_keeps_every_clamp(toy, oracle):
    m, n_len = toy.mask_id, 11
    gen = torch.Generator().manual_seed(3)
    init = torch.full((200, n_len), m)
    init[:, :2] = torch.randint(0, toy.V, (200, 2), generator=gen)  # a prompt
    spots = torch.rand(200, n_len, generator=gen) < 0.3
    init = torch.where(spots, torch.randint(0, toy.V, (200, n_len), generator=gen), init)  # infilling, past L too
    model = Counting(oracle, width=toy.L)  # every call sees exactly the model's context
    for inner in ("ancestral", "confidence", "threshold", "remdm"):
        for block in (1, 2, 3, 4):
            x, nfe = sample("semi_ar", model, init, 12, m, gen, context=toy.L, block_len=block, inner=inner)
            assert (x != m).all() and torch.equal(x[init != m], init[init != m]), (inner, block)


def test_semi_ar_one_block_is_its_inner_sampler(toy, oracle):
    for inner in ("ancestral", "confidence", "threshold", "remdm"):
        a = draw(inner, oracle, toy, 3, n=500, seed=4)
        b = draw("semi_ar", oracle, toy, 3, n=500, seed=4, inner=inner, block_len=toy.L)
        assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_semi_ar_after_a_prompt_matches_exact_law(toy, oracle):
    """With a prompt the blocks start after it (LLaDA's) and the whole step budget goes to the generated part:
    the law of the exact harness with blocks [P, P + b), ...; with P = 0 it is the law without a prompt."""
    m, n_len, block, K, prompt = toy.mask_id, 6, 2, 4, (1, 0, 2)
    law = semi_ar_law(oracle, toy, n_len, toy.L, block, K, eps=EPS, prompt=prompt)
    assert semi_ar_law(oracle, toy, n_len, toy.L, block, K, eps=EPS, prompt=()) == \
        semi_ar_law(oracle, toy, n_len, toy.L, block, K, eps=EPS)
    init = torch.full((N, n_len), m)
    init[:, :3] = torch.tensor(prompt)
    x, _ = sample("semi_ar", oracle, init, K, m, torch.Generator().manual_seed(6), context=toy.L, eps=EPS,
                  block_len=block)
    seqs = list(law)
    index = {s: i for i, s in enumerate(seqs)}
    hist = torch.zeros(len(seqs), dtype=torch.float64)
    for row in x.tolist():
        hist[index[tuple(row)]] += 1
    assert chi2_gof(hist, torch.tensor([law[s] for s in seqs], dtype=torch.float64))[1] > ALPHA


def test_semi_ar_spends_the_whole_budget_on_generated_blocks():
    """A 200-token prompt in a 256 window, blocks of 32, 28 steps: the 56 generated tokens get all 28 steps
    (16 + 12; before the fix blocks started at 0 and the prompt's blocks took most of the budget)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, seq_len=256)).eval()
    m = 10
    init = torch.full((2, 256), m)
    init[:, :200] = torch.randint(0, m, (2, 200))
    for inner, knobs in (("confidence", {}), ("threshold", {"tau": 1.0})):
        x, nfe = sample("semi_ar", model, init, 28, m, torch.Generator().manual_seed(0), context=256, block_len=32,
                        inner=inner, **knobs)
        assert nfe == 28 and (x != m).all() and torch.equal(x[:, :200], init[:, :200]), inner


@pytest.mark.parametrize("n_len,block,K,knobs", [(4, 2, 4, {}), (6, 2, 6, {"top_p": 0.8}), (7, 3, 3, {})])
def test_semi_ar_matches_exact_law(toy, oracle, n_len, block, K, knobs):
    law = semi_ar_law(oracle, toy, n_len, toy.L, block, K, eps=EPS, **knobs)
    x, _ = sample("semi_ar", oracle, (N, n_len), K, toy.mask_id, torch.Generator().manual_seed(5), context=toy.L,
                  eps=EPS, block_len=block, **knobs)
    assert abs(sum(law.values()) - 1) < 1e-12
    seqs = list(law)
    index = {s: i for i, s in enumerate(seqs)}
    hist = torch.zeros(len(seqs), dtype=torch.float64)
    for row in x.tolist():
        hist[index[tuple(row)]] += 1  # KeyError: a sequence the exact law gives probability 0
    probs = torch.tensor([law[s] for s in seqs], dtype=torch.float64)
    assert chi2_gof(hist, probs)[1] > ALPHA
    if n_len == toy.L:  # power: not the one-window ancestral law
        anc = exact_sampler_law(oracle, K, toy.V, toy.L, toy.mask_id, eps=EPS, **knobs)
        assert chi2_gof(toy.histogram(x), anc)[1] < ALPHA


# ---------------------------------------------------------------- the scripts


def tiny_mdlm(path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=32, seq_len=16)
    save_checkpoint({"kind": "mdlm", "config": cfg.to_dict(), "model": Transformer(cfg).state_dict(), "ema": None,
                     "mask_id": 257, "tokenizer": {"name": "bytes", "vocab_size": 257, "eot_id": 256},
                     "args": {"data": str(path.parent / "tiny.txt")}}, path)
    (path.parent / "tiny.txt").write_text("def f(x):\n    return x + 1\n\n" * 400)
    return str(path)


def run(script, *args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_scripts_take_a_sampler(tmp_path):
    ckpt = tiny_mdlm(tmp_path / "mdlm.pt")
    p = run("sample.py", "--ckpt", ckpt, "--sampler", "semi_ar", "--inner", "threshold", "--tau", "0.5",
            "--block_len", "8", "--seq_len", "40", "--steps", "10", "--num_samples", "2", "--prompt", "def ",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["sampler"] == "semi_ar" and out["sampler_knobs"]["tau"] == 0.5 and out["sampler_knobs"]["block_len"] == 8
    assert "sampler: semi_ar(block_len=8, inner=threshold, tau=0.5" in p.stdout and out["nfe"] >= 2
    bad = run("sample.py", "--ckpt", ckpt, "--sampler", "threshold", "--tau", "2", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "--tau" in bad.stderr
    assert "Traceback" not in bad.stderr
    p = run("eval.py", "--ckpt", ckpt, "--steps", "2,4", "--num_samples", "2", "--val_tokens", "0", "--sampler",
            "remdm", "--eta", "0.1", "--device", "cpu", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["sampler"] == "remdm" and out["sampler_knobs"]["eta"] == 0.1 and "sampler remdm(remask=cap" in p.stdout
    p = run("bench.py", "--ckpt", ckpt, "--seq_len", "16", "--batch_sizes", "1,2", "--steps", "2,8", "--runs", "1",
            "--threads", "1", "--sections", "latency", "--compile", "false", "--device", "cpu",
            "--samplers", ",".join(SAMPLERS), "--block_len", "4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])["rows"]
    got = {(r.get("method"), r["batch"], r["steps"]) for r in rows if r["sampler"] not in ("ar_cache", "ar_nocache")}
    assert got == {(n, b, k) for n in SAMPLERS for b in (1, 2) for k in (2, 8)}
    for r in rows:
        if r.get("method"):
            assert r["nfe"] >= 1 and r["ms_per_sample"] > 0 and "temperature" in r["knobs"]
            assert (r["sampler"] == "diffusion") == (r["method"] == "ancestral")
