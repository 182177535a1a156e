"""Samplers (tinydiff/sampling.py) against exact laws from the known-distribution harness.

The diffusion sampler's output distribution is computed exactly by `exact_sampler_law` (a
distribution over partial states propagated step by step), so the empirical distribution of many
samples is compared with it by a chi-square test (p-value threshold ALPHA, fixed seeds). Each
such test also checks its own power: the same samples must reject a nearby wrong law.
"""
import math

import pytest
import torch

from harness import OracleDenoiser, chi2_gof, exact_sampler_law, tv
from tinydiff.diffusion import SCHEDULES, get_schedule
from tinydiff.model import ModelConfig, Transformer
from tinydiff.sampling import ar_sample, diffusion_sample, filter_logits, sample_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHA = 1e-4  # a correct sampler fails a chi-square test by chance with probability 1e-4
EPS = 1e-5  # the sampler's final time t_K
N_SAMPLES = 40_000


def law(model, toy, K, **kw):
    return exact_sampler_law(model, K, toy.V, toy.L, toy.mask_id, eps=EPS, **kw)


def draw(model, toy, K, n=N_SAMPLES, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    x, nfe = diffusion_sample(model, n, toy.L, K, toy.mask_id, generator=gen, eps=EPS, **kw)
    return x, nfe


def distinct_steps_prob(K, n_free, eps=EPS):
    """P(every one of n_free masked positions is revealed at a different step, none left over).

    Under the log-linear schedule a position is still masked after step k with probability t_{k+1}
    (1 - alpha_t is proportional to t), so it is revealed at step k with probability
    t_k - t_{k+1} = (1 - eps) / K, independently of everything else."""
    return math.prod(K - j for j in range(n_free)) * ((1 - eps) / K) ** n_free


# ---------------------------------------------------------------- the exact law itself


def test_exact_law_converges_to_the_table(toy, oracle):
    tvs = []
    for K in [1, 2, 4, 8, 4 * toy.L]:
        q = law(oracle, toy, K)
        assert (q >= 0).all() and q.sum().item() == pytest.approx(1, abs=1e-12)
        tvs.append(tv(q, toy.p))
    assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs  # more steps, closer to the table
    # Coupling bound: if all positions are revealed at different steps, the sampler with the exact
    # posterior draws them by the chain rule in a random order (independent of the tokens), i.e.
    # exactly from p. So TV(law, table) <= P(two reveals share a step, or a mask is left over).
    for K in [4 * toy.L, 64, 1024]:
        assert tv(law(oracle, toy, K), toy.p) <= 1 - distinct_steps_prob(K, toy.L) + 1e-12
    assert tv(law(oracle, toy, 1024), toy.p) < 0.01  # many steps: the sampler samples the table


def test_one_step_law_is_product_of_marginals(toy, oracle):
    # at K = 1 every position is revealed at once from the fully masked state, each from its
    # marginal, except with probability eps per position (left masked, then greedy-filled)
    prod = toy.product_of_marginals()
    assert tv(law(oracle, toy, 1), prod) <= 1 - (1 - EPS) ** toy.L + 1e-12
    assert tv(prod, toy.p) > 0.3  # the table has real dependence, so this is far from the table


# ---------------------------------------------------------------- empirical vs exact


@pytest.mark.parametrize("K", [1, 2, 3])
def test_sampler_matches_exact_law_oracle(toy, oracle, K):
    x, _ = draw(oracle, toy, K)
    assert (x != toy.mask_id).all()
    hist = toy.histogram(x)
    assert chi2_gof(hist, law(oracle, toy, K))[1] > ALPHA
    # power: the same samples reject the table and the law of K + 1 steps
    assert chi2_gof(hist, toy.p)[1] < ALPHA
    assert chi2_gof(hist, law(oracle, toy, K + 1))[1] < ALPHA
    if K == 1:
        assert chi2_gof(hist, toy.product_of_marginals())[1] > ALPHA


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sampler_matches_exact_law_every_schedule(toy, oracle, name):
    """The sampler reveals with the schedule it is given (a checkpoint's): its samples follow the exact law of
    that schedule's grid, and reject the law of another schedule at the same K."""
    K, schedule = 3, get_schedule(name)
    x, _ = draw(oracle, toy, K, schedule=schedule)
    hist = toy.histogram(x)
    assert chi2_gof(hist, law(oracle, toy, K, schedule=schedule))[1] > ALPHA
    assert chi2_gof(hist, law(oracle, toy, K + 1, schedule=schedule))[1] < ALPHA  # power
    for other in SCHEDULES:
        if other != name:
            assert chi2_gof(hist, law(oracle, toy, K, schedule=get_schedule(other)))[1] < ALPHA


@pytest.mark.parametrize("knobs", [{}, {"temperature": 0.7, "top_k": 2}, {"top_p": 0.8}])
def test_sampler_matches_exact_law_perturbed(toy, knobs):
    """A denoiser that is not the posterior (so the law is not tied to the table), and the
    temperature / top-k / top-p knobs."""
    model = OracleDenoiser(toy, temperature=1.5, perturb=0.5, seed=3)
    x, _ = draw(model, toy, 2, **knobs)
    hist = toy.histogram(x)
    assert chi2_gof(hist, law(model, toy, 2, **knobs))[1] > ALPHA
    assert chi2_gof(hist, law(model, toy, 3, **knobs))[1] < ALPHA


def test_clamped_positions_never_change(toy, oracle):
    gen, m = torch.Generator().manual_seed(1), toy.mask_id
    prompts = toy.sample(500, gen)
    prefix = torch.full_like(prompts, m)
    prefix[:, :2] = prompts[:, :2]  # a prompt: the first two positions given
    infill = torch.full_like(prompts, m)
    infill[:, [0, 2]] = prompts[:, [0, 2]]  # infilling: positions 1 and 3 free
    for init in (prefix, infill):
        for K in (1, 3, 50):
            x, _ = diffusion_sample(oracle, len(init), toy.L, K, m, init=init, generator=gen)
            clamped = init != m
            assert torch.equal(x[clamped], init[clamped])
            assert (x != m).all()


def test_infilling_law(toy, oracle):
    m = toy.mask_id
    init = torch.tensor([m, 2, m, 0])  # infill positions 0 and 2 around two given tokens
    x, _ = diffusion_sample(oracle, 20_000, toy.L, 2, m, init=init.expand(20_000, -1),
                            generator=torch.Generator().manual_seed(2), eps=EPS)
    hist = toy.histogram(x)
    cond = toy.conditional(init)  # p(x | x_1 = 2, x_3 = 0)
    assert chi2_gof(hist, law(oracle, toy, 2, init=init))[1] > ALPHA
    assert chi2_gof(hist, cond)[1] < ALPHA  # 2 steps for 2 positions: not yet the conditional
    # with many steps the law is the conditional (same coupling bound, 2 free positions)
    assert tv(law(oracle, toy, 256, init=init), cond) <= 1 - distinct_steps_prob(256, 2) + 1e-12


# ---------------------------------------------------------------- determinism, caching, NFE


def test_same_seed_same_samples(toy, oracle):
    a, _ = draw(oracle, toy, 3, n=2000, seed=5)
    b, _ = draw(oracle, toy, 3, n=2000, seed=5)
    c, _ = draw(oracle, toy, 3, n=2000, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


class CountingModel(torch.nn.Module):
    """Counts network calls, to check the sampler's NFE accounting."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, z):
        self.calls += 1
        return self.net(z)


@pytest.mark.parametrize("which", ["oracle", "transformer"])
def test_cache_changes_nothing_but_nfe(toy, oracle, which):
    if which == "oracle":
        net, L, V = oracle, toy.L, toy.V
    else:  # a float32 network: caching must reuse its outputs bit for bit, not recompute them
        torch.manual_seed(0)
        L, V = 8, 5
        net = Transformer(ModelConfig(vocab_size=V + 1, n_layer=2, n_head=2, n_embd=32, seq_len=L)).eval()
    model = CountingModel(net)
    for batch, steps in [(1, 200), (1, 3), (16, 20), (64, 2 * L)]:
        out = {}
        for cache in (True, False):
            model.calls = 0
            gen = torch.Generator().manual_seed(11)
            x, nfe = diffusion_sample(model, batch, L, steps, V, generator=gen, cache=cache)
            assert nfe == model.calls  # NFE counts real network evaluations
            out[cache] = (x, nfe)
        assert torch.equal(out[True][0], out[False][0])  # the cache only skips forward passes
        assert out[False][1] in (steps, steps + 1)  # one per step (+ the final greedy pass)
        # a forward pass happens only after some token changed: at most one per revealed token
        assert out[True][1] <= min(steps, batch * L) + 1
        if batch == 1:
            assert out[True][1] <= min(steps, L) + 1


def test_greedy_is_argmax(toy, oracle):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 7, generator=gen, dtype=torch.float64)
    argmax = logits.argmax(-1)
    assert torch.equal(sample_tokens(logits, gen, temperature=0), argmax)
    assert torch.equal(sample_tokens(logits, gen, top_k=1), argmax)
    assert torch.equal(sample_tokens(logits, gen, top_p=1e-9), argmax)
    # one diffusion step with eps = 0 reveals everything at once from the marginals: greedy gives
    # the argmax of each marginal, for every row
    x, _ = diffusion_sample(oracle, 50, toy.L, 1, toy.mask_id, generator=gen, temperature=0, eps=0.0)
    assert (x == toy.marginals().argmax(-1)).all()
    x, _ = diffusion_sample(oracle, 50, toy.L, 1, toy.mask_id, generator=gen, top_k=1, eps=0.0)
    assert (x == toy.marginals().argmax(-1)).all()


def test_token_draws_are_float64_gumbel_max():
    """Replaying the generator: sample_tokens is Gumbel-max with float64 uniforms (fp32 noise
    would truncate the tail: docs/mdlm.md §6, Zheng et al. 2024), on the filtered logits."""
    logits = torch.randn(500, 9, generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"temperature": 0.5, "top_k": 4}, {"top_p": 0.7}):
        got = sample_tokens(logits, torch.Generator().manual_seed(1), **kw)
        u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert torch.equal(got, (filter_logits(logits, **kw) - (-u.log()).log()).argmax(-1))


def test_filter_logits():
    probs = torch.tensor([[0.2, 0.4, 0.1, 0.3]], dtype=torch.float64)  # sorted: 0.4, 0.3, 0.2, 0.1
    logits = probs.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].tolist()

    assert kept() == [True] * 4
    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_p=0.35) == [False, True, False, False]  # {0.4} already reaches 0.35
    assert kept(top_p=0.65) == [False, True, False, True]  # 0.4 + 0.3 = 0.7 >= 0.65
    assert kept(top_p=0.75) == [True, True, False, True]  # needs 0.4 + 0.3 + 0.2
    assert kept(top_p=0.95) == [True] * 4
    # kept tokens keep their relative probabilities
    assert torch.allclose(filter_logits(logits, top_p=0.75).softmax(-1), torch.tensor([[2, 4, 0, 3]], dtype=torch.float64) / 9)
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)
    # the smallest set whose mass reaches top_p: with four equal tokens and top_p = 0.5, two
    # tokens (0.25 + 0.25 = 0.5 exactly, no rounding) are enough
    flat = filter_logits(torch.zeros(1, 4), top_p=0.5)
    assert torch.isfinite(flat).sum() == 2


# ---------------------------------------------------------------- AR sampler


def test_oracle_ar_chain_rule(toy, oracle_ar):
    """Harness self-check: the AR oracle's conditionals multiply to the table, and its cached
    decoding gives the same logits as a full forward."""
    assert torch.allclose(oracle_ar.log_prob(toy.seqs), toy.p.log(), atol=1e-12)
    bos = torch.full((toy.N, 1), oracle_ar.bos_id)
    full = oracle_ar(torch.cat([bos, toy.seqs[:, :-1]], 1))  # (N, L, V)
    cache = oracle_ar.new_cache(toy.N)
    steps = [oracle_ar(bos, input_pos=torch.tensor([0]), cache=cache)]
    for j in range(1, toy.L):
        steps.append(oracle_ar(toy.seqs[:, j - 1:j], input_pos=torch.tensor([j]), cache=cache))
    assert torch.equal(torch.cat(steps, 1), full)


def test_ar_sampler_matches_table(toy, oracle_ar):
    bos = torch.full((N_SAMPLES, 1), oracle_ar.bos_id)
    out = {}
    for use_cache in (True, False):
        x, nfe = ar_sample(oracle_ar, N_SAMPLES, toy.L + 1, bos, generator=torch.Generator().manual_seed(3),
                           use_cache=use_cache)
        assert nfe == toy.L and (x[:, 0] == oracle_ar.bos_id).all()
        out[use_cache] = x
    assert torch.equal(out[True], out[False])
    hist = toy.histogram(out[True][:, 1:])
    assert chi2_gof(hist, toy.p)[1] > ALPHA
    assert chi2_gof(hist, toy.product_of_marginals())[1] < ALPHA  # power


def test_ar_sampler_prompt_and_greedy(toy, oracle_ar):
    prompt = torch.tensor([[oracle_ar.bos_id, 1, 2]]).expand(20_000, -1)
    x, nfe = ar_sample(oracle_ar, len(prompt), toy.L + 1, prompt, generator=torch.Generator().manual_seed(4))
    assert torch.equal(x[:, :3], prompt) and nfe == toy.L + 1 - 3
    init = torch.tensor([1, 2, toy.mask_id, toy.mask_id])
    assert chi2_gof(toy.histogram(x[:, 1:]), toy.conditional(init))[1] > ALPHA
    # greedy decoding follows the argmax of each conditional
    x, _ = ar_sample(oracle_ar, 1, toy.L + 1, prompt[:1, :1], temperature=0)
    for j in range(1, toy.L + 1):
        assert x[0, j] == oracle_ar(x[:, :j])[0, -1].argmax()


def tiny_causal(seed=0, V=11, L=16):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, seq_len=L, causal=True)).eval()


def test_kv_cache_matches_full_forward():
    model = tiny_causal()
    x = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)  # (3, 12, V)
        cache = model.new_cache(3, 16)
        got = [model(x[:, :5], input_pos=torch.arange(5), cache=cache)]  # prefill
        got.append(model(x[:, 5:7], input_pos=torch.arange(5, 7), cache=cache))  # a two-token chunk
        for pos in range(7, 12):  # then one token at a time
            got.append(model(x[:, pos:pos + 1], input_pos=torch.tensor([pos]), cache=cache))
    assert torch.allclose(torch.cat(got, 1), full, atol=1e-5, rtol=1e-4)


def test_ar_sample_cache_equivalence_transformer():
    model = tiny_causal()
    prompt = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(1))
    out = [ar_sample(model, 4, 16, prompt, generator=torch.Generator().manual_seed(2), use_cache=c) for c in (True, False)]
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1] == 16 - 3
