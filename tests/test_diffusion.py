"""Masked diffusion math (tinydiff/diffusion.py) against ground truth.

Statistical checks use tolerances derived from standard errors (z_threshold: a correct
implementation fails a check by chance with probability <= 1e-4 for the whole family), with
fixed seeds so the suite is deterministic. Ground truth comes from the known-distribution harness
(tests/harness.py): with the exact posterior (the oracle denoiser) the continuous-time NELBO is
tight, so its Monte-Carlo estimate must equal the true -log p(x) of each sequence.
"""
import math

import pytest
import torch

from harness import OracleDenoiser, exact_nelbo, z_threshold
from tinydiff.diffusion import (SCHEDULES, LogLinearSchedule, forward_mask, get_schedule, masked_log_probs, nelbo_loss,
                                nelbo_terms, sample_times, schedule_spec, subs_log_probs, val_bound)
from tinydiff.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHA = 1e-4  # family-wise probability that a correct implementation fails a statistical check


def test_loglinear_schedule():
    s = LogLinearSchedule(eps=1e-3)
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(s.alpha(t), 1 - (1 - 1e-3) * t)
    assert torch.allclose(s.weight(t), 1 / t)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_weight_is_the_nelbo_weight(name):
    """Every registered schedule: alpha_0 = 1, alpha_1 = eps, alpha decreasing, and weight(t) is the NELBO's
    -alpha'_t / (1 - alpha_t) (MDLM eq. 10), by finite differences; its spec round-trips through a checkpoint."""
    s = get_schedule(name)
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 1.0 - 1e-6], dtype=torch.float64)
    h = 1e-7
    deriv = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    assert torch.allclose(-deriv / (1 - s.alpha(t)), s.weight(t), rtol=1e-6)
    ends = s.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == pytest.approx([1.0, s.eps], abs=1e-12)
    assert (s.alpha(torch.linspace(0, 1, 101, dtype=torch.float64)).diff() < 0).all()
    again = get_schedule(schedule_spec(s))
    assert type(again) is type(s) and schedule_spec(again) == schedule_spec(s) and schedule_spec(s)["name"] == name


def test_a_checkpoint_without_a_schedule_is_loglinear():
    assert isinstance(get_schedule(None), LogLinearSchedule) and get_schedule(None).eps == 1e-3
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_schedule({"name": "nope"})


def test_masking_rate_matches_t():
    gen = torch.Generator().manual_seed(0)
    s, mask_id, n = LogLinearSchedule(), 7, 20_000
    t = torch.tensor([0.02, 0.3, 0.6, 0.97])
    x = torch.randint(0, mask_id, (len(t), n), generator=gen)
    z = forward_mask(x, t, s, mask_id, gen)
    rate = (z == mask_id).double().mean(1)  # (4,)
    p = 1 - s.alpha(t.double())  # each token is masked with probability (1 - eps) t
    se = (p * (1 - p) / n).sqrt()
    assert ((rate - p).abs() <= z_threshold(ALPHA, len(t)) * se).all(), (rate, p)
    keep = z != mask_id
    assert torch.equal(z[keep], x[keep])  # unmasked positions are the clean tokens


@pytest.mark.parametrize("B", [1, 7, 64])
def test_stratified_times_one_per_stratum(B):
    gen, eps_t = torch.Generator().manual_seed(B), 1e-3
    firsts = []
    for _ in range(500):
        t = sample_times(B, gen, eps_t=eps_t)
        assert t.shape == (B,) and (t >= eps_t).all() and (t <= 1).all()
        stratum = ((t - eps_t) / (1 - eps_t) * B).floor().long()  # which of B equal slices of [eps_t, 1]
        assert torch.equal(stratum.sort().values, torch.arange(B))
        firsts.append(t[0])
    # each t_b on its own is uniform on [eps_t, 1] (one shared u shifts all strata together)
    first = torch.stack(firsts).double()
    mean, se = (1 + eps_t) / 2, (1 - eps_t) / math.sqrt(12 * len(first))
    assert abs(first.mean().item() - mean) <= z_threshold(ALPHA, 3) * se


def test_ranks_rows_average_to_the_global_loss():
    """DDP (train.py, distill.py): every rank draws the global batch's t and masks and keeps rows r, r + world, ...;
    the mean of the ranks' losses is the one-process loss of the global batch (what DDP's gradient average needs)."""
    world, B, L, mask_id, s = 3, 4, 6, 7, LogLinearSchedule()
    x = torch.randint(0, mask_id, (world * B, L), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    t = sample_times(world * B, gen)
    z = forward_mask(x, t, s, mask_id, gen)
    model = lambda z: torch.randn(*z.shape, mask_id + 1, generator=torch.Generator().manual_seed(len(z)))
    whole = nelbo_terms(model(z), x, z, t, s, mask_id)  # (world*B, L)
    losses = [nelbo_loss(lambda zr, r=r: model(z)[r::world], x[r::world], z[r::world], t[r::world], s, mask_id)
              for r in range(world)]
    assert torch.stack(losses).mean().item() == pytest.approx(whole.mean().item(), rel=1e-6)


def test_subs_invariants():
    gen = torch.Generator().manual_seed(0)
    B, L, V = 3, 6, 5
    mask_id = V - 1
    logits = torch.randn(B, L, V, generator=gen) * 3
    z = torch.randint(0, V, (B, L), generator=gen)  # contains masks and clean tokens
    z[0, 0], z[0, 1] = mask_id, 0  # make sure both kinds are present
    lp = masked_log_probs(logits, mask_id)
    assert torch.isneginf(lp[..., mask_id]).all()  # the mask is never predicted: prob exactly 0
    assert torch.allclose(lp.logsumexp(-1), torch.zeros(B, L), atol=1e-6)
    assert torch.allclose(lp[..., :mask_id], logits[..., :mask_id].log_softmax(-1), atol=1e-6)

    sp = subs_log_probs(logits, z, mask_id)
    masked = z == mask_id
    assert torch.equal(sp[masked], lp[masked])  # masked positions: the network's distribution
    clean = sp[~masked]  # (n, V)
    own = z[~masked]
    assert (clean.gather(-1, own[:, None]) == 0).all()  # clean positions copy their token: log-prob 0
    others = torch.ones_like(clean, dtype=torch.bool).scatter_(-1, own[:, None], False)
    assert torch.isneginf(clean[others]).all()
    assert torch.isneginf(sp[..., mask_id]).all()


def test_nelbo_terms_against_python_loops():
    gen = torch.Generator().manual_seed(1)
    B, L, V = 4, 5, 6
    mask_id = V - 1
    s = LogLinearSchedule()
    logits = torch.randn(B, L, V, generator=gen) * 2
    x = torch.randint(0, mask_id, (B, L), generator=gen)
    t = torch.tensor([0.1, 0.35, 0.7, 0.99])
    z = forward_mask(x, t, s, mask_id, gen)
    z[0, 0] = mask_id  # at least one masked position
    terms = nelbo_terms(logits, x, z, t, s, mask_id)
    for b in range(B):
        for i in range(L):
            if z[b, i] != mask_id:
                expected = 0.0  # clean positions cost nothing
            else:
                row = logits[b, i].tolist()
                log_norm = math.log(sum(math.exp(row[v]) for v in range(V) if v != mask_id))
                expected = (log_norm - row[x[b, i]]) / t[b].item()  # weight 1/t times -log p(x_i | z)
            assert terms[b, i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_nelbo_loss_is_mean_of_terms():
    s, mask_id = LogLinearSchedule(), 4
    x = torch.randint(0, mask_id, (8, 5), generator=torch.Generator().manual_seed(2))
    model = lambda z: torch.randn(*z.shape, mask_id + 1, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(5)
    t = sample_times(len(x), gen)
    z = forward_mask(x, t, s, mask_id, gen)
    loss = nelbo_loss(model, x, z, t, s, mask_id)
    assert loss.item() == pytest.approx(nelbo_terms(model(z), x, z, t, s, mask_id).sum().item() / x.numel())


def test_masked_only_loss_equals_the_full_loss():
    """nelbo_loss(masked_only=True) asks the model for logits at masked positions only (Transformer's select):
    the same loss and the same gradient as the full (B, L, V) computation, over batches from almost clean to
    fully masked (t spans [0, 1) across the batch)."""
    torch.manual_seed(0)
    s, mask_id = LogLinearSchedule(), 11
    model = Transformer(ModelConfig(vocab_size=mask_id + 1, n_layer=2, n_head=2, n_embd=16, seq_len=12))
    x = torch.randint(0, mask_id, (16, 12), generator=torch.Generator().manual_seed(1))
    z = forward_mask(x, torch.rand(16), s, mask_id, torch.Generator().manual_seed(2))
    assert torch.allclose(model(z, select=z == mask_id), model(z)[z == mask_id], atol=1e-6)  # (N, V)
    results = []
    for masked_only in (False, True):
        model.zero_grad()
        gen = torch.Generator().manual_seed(3)
        t = sample_times(len(x), gen)
        z = forward_mask(x, t, s, mask_id, gen)
        loss = nelbo_loss(model, x, z, t, s, mask_id, masked_only=masked_only)
        loss.backward()
        results.append((loss.detach(), z, [p.grad.clone() for p in model.parameters()]))
    (full, z_full, g_full), (part, z_part, g_part) = results
    assert torch.equal(z_full, z_part) and 0 < (z_full == mask_id).sum() < z_full.numel()
    assert torch.allclose(full, part, rtol=1e-5)
    for a, b in zip(g_full, g_part):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_oracle_posterior_against_python_loops(toy, oracle):
    """Harness self-check: the oracle denoiser is the posterior p(x_i = v | unmasked tokens)."""
    m = toy.mask_id
    z = torch.tensor([[m, m, m, m], [0, m, 2, m], [m, 1, m, 1], [2, 2, 2, m]])
    logits = oracle(z)
    assert torch.isneginf(logits[..., m]).all()
    for b, zb in enumerate(z.tolist()):
        for i in range(toy.L):
            if zb[i] != m:
                continue
            num = [0.0] * toy.V
            for seq, p in zip(toy.seqs.tolist(), toy.p.tolist()):
                if all(zb[j] in (m, seq[j]) for j in range(toy.L)):
                    num[seq[i]] += p
            for v in range(toy.V):
                assert math.exp(logits[b, i, v].item()) == pytest.approx(num[v] / sum(num), rel=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_bound_is_tight_for_the_oracle(toy, oracle, name):
    """With exact conditionals the continuous-time bound averages the chain rule over random
    unmasking orders, so it equals -log p(x) exactly (eps = 0), whatever the schedule (u = 1 - alpha_t
    turns MDLM eq. 10 into the same integral); the eps's of the schedule and of the time sampler leave
    out O(eps) of the time integral."""
    nll = toy.nll(toy.seqs)
    tight = exact_nelbo(oracle, toy, SCHEDULES[name](eps=0.0), eps_t=0.0)
    assert torch.allclose(tight, nll, rtol=0, atol=1e-10)
    # with eps = eps_t = 1e-3: per unit of t the integrand w(t) E[sum_masked -log p] is at most
    # L * G * w(t)(1 - alpha_t) = L * G * |alpha'_t| (G the largest per-token NLL); the estimator misses
    # [0, eps_t] of the time axis and rescales by 1/(1 - eps_t), and alpha_1 = eps leaves out the mask
    # rates (1 - eps, 1], at most L * G per unit of mask rate
    eps = eps_t = 1e-3
    schedule = SCHEDULES[name](eps=eps)
    default = exact_nelbo(oracle, toy, schedule, eps_t=eps_t)
    states = toy.states()
    G = -toy.posterior(states)[states == toy.mask_id].log().min()  # largest -log p(x_i = v | z)
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    slope = (schedule.alpha(t).diff().abs() / t.diff()).max()  # max |alpha'_t| (loglinear 1 - eps, cosine ~pi/2)
    bound = toy.L * G * (eps + slope * (eps_t + eps_t / (1 - eps_t)))
    assert (default - nll).abs().max() <= bound


def _mc_nelbo(models, toy, draws, copies, seed, schedule):
    """Per-sequence Monte-Carlo NELBO (summed over positions) of every toy sequence, using the
    library's sample_times / forward_mask / nelbo_terms exactly as training does.

    Each replicate is one batch holding `copies` copies of every sequence, interleaved (row
    b*N + n is sequence n) so that the batch's stratified times give each sequence `copies` times
    spread over all of [eps_t, 1]. The same t and z are used for every model (common random
    numbers). Returns (n_models, draws, N): one estimate per replicate.
    """
    gen = torch.Generator().manual_seed(seed)
    x = toy.seqs.repeat(copies, 1)  # (copies*N, L)
    out = torch.empty(len(models), draws, toy.N, dtype=torch.float64)
    for r in range(draws):
        t = sample_times(len(x), gen)
        z = forward_mask(x, t, schedule, toy.mask_id, gen)
        for k, model in enumerate(models):
            terms = nelbo_terms(model(z), x, z, t, schedule, toy.mask_id)  # (copies*N, L)
            out[k, r] = terms.sum(-1).double().view(copies, toy.N).mean(0)
    return out


@pytest.fixture(scope="module", params=list(SCHEDULES))
def mc_bounds(request, toy, oracle, single_thread):
    """MC NELBO of every sequence under the oracle and a perturbed oracle, 200 x 64 t draws each, for each
    registered noise schedule."""
    worse = OracleDenoiser(toy, temperature=1.3, perturb=0.3, seed=1)
    schedule = get_schedule(request.param)
    return _mc_nelbo([oracle, worse], toy, draws=200, copies=64, seed=0, schedule=schedule), worse, schedule


def test_mc_nelbo_with_oracle_equals_true_nll(toy, oracle, mc_bounds):
    est, schedule = mc_bounds[0][0], mc_bounds[2]  # (draws, N)
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    z = z_threshold(ALPHA, toy.N)
    nll = toy.nll(toy.seqs)
    # 1) the library's estimator has exactly the expectation computed by enumeration
    expected = exact_nelbo(oracle, toy, schedule, eps_t=1e-3)
    assert ((mean - expected).abs() <= z * se).all()
    # 2) so it estimates the true NLL of each sequence, up to the exactly known eps effect
    assert ((mean - nll).abs() <= z * se + (expected - nll).abs()).all()
    # 3) averaged over the table it is the entropy H(p)
    joint = est @ toy.p  # (draws,)
    joint_se = joint.std() / math.sqrt(len(joint))
    gap = abs((expected - nll) @ toy.p)
    assert abs(joint.mean() - toy.entropy()) <= z_threshold(ALPHA) * joint_se + gap
    # the test has power: a bound that ignored the dependence between positions (the sum of
    # marginal NLLs, what a denoiser that sees no context would give) is rejected by a wide margin
    marginal_nll = -toy.marginals().log()[torch.arange(toy.L), toy.seqs].sum(1)  # (N,)
    assert abs(joint.mean() - marginal_nll @ toy.p) > 10 * (z_threshold(ALPHA) * joint_se + gap)
    assert ((mean - marginal_nll).abs() > z * se + (expected - nll).abs()).float().mean() > 0.5


def test_perturbed_denoiser_has_larger_bound(toy, oracle, mc_bounds):
    est, worse, schedule = mc_bounds
    joint = est @ toy.p  # (2, draws): bound averaged over the table, oracle and perturbed
    diff = joint[1] - joint[0]  # common random numbers: same t and z for both models
    se = diff.std() / math.sqrt(len(diff))
    assert diff.mean() > z_threshold(ALPHA) * se  # strictly larger, beyond MC error
    # and by the amount enumeration predicts
    exact_gap = (exact_nelbo(worse, toy, schedule) - exact_nelbo(oracle, toy, schedule)) @ toy.p
    assert exact_gap > 0
    assert abs(diff.mean() - exact_gap) <= z_threshold(ALPHA) * se


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_val_bound_matches_the_exact_nelbo(toy, oracle, name):
    """The held-out bound is an unbiased estimate of the exact per-token NELBO of those sequences
    (enumerated over mask patterns, t by quadrature): for the oracle and for a random network."""
    s, mask_id = get_schedule(name), toy.mask_id
    val_x = toy.sample(100, torch.Generator().manual_seed(0))
    cfg = ModelConfig(vocab_size=toy.V + 1, n_layer=1, n_head=2, n_embd=16, seq_len=toy.L)
    torch.manual_seed(0)
    for model in (oracle, Transformer(cfg).eval()):
        with torch.no_grad():
            exact = (exact_nelbo(model, toy, s)[toy.index(val_x)].mean() / toy.L).item()
        draws = torch.tensor([val_bound(model, val_x, s, mask_id, n_draws=1, seed=k, batch_size=32) for k in range(40)])
        se = draws.std() / math.sqrt(len(draws))  # the seeds' draws are independent
        assert abs(draws.mean() - exact) <= z_threshold(ALPHA, 2) * se
        # and n_draws draws in one call are n_draws t draws of the same estimator, one generator
        assert val_bound(model, val_x, s, mask_id, n_draws=3, seed=7, batch_size=32) == pytest.approx(
            exact, abs=z_threshold(ALPHA, 2) * draws.std().item() / math.sqrt(3))
