"""tinydiff/lab/language.py against brute force: a tiny lab (2 letters, 3 words, V = 4 symbols) whose every
string of length L is enumerated, with p(x) summed over every hidden-state path of a DENSE transition
matrix built from the lab's definition (words, successor table) -- not from its structured recursions.
Statistical checks (the samplers) use chi-square / standard-error tolerances at family-wise error 1e-4
with fixed seeds, as tests/test_diffusion.py does.
"""
import dataclasses
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness import chi2_gof, exact_nelbo, exact_sampler_law, tv, z_threshold
from tinydiff.diffusion import LogLinearSchedule
from tinydiff.lab import PRESETS, Lab, LabParams, OracleAR, OracleDenoiser, canonical_source, parse_spec

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = LabParams(W=3, A=2, b=2, min_len=1, max_len=2, delta=0.1, p_end=0.3, seed=3)
L = 5


class Brute:
    """p(x) of every string in V^L by summing over every nonzero-probability hidden-state path."""

    def __init__(self, lab, L):
        V = lab.V
        syms = [list(w) + [lab.space] for w in lab.words] + [[lab.eot]]  # the definition: letters, space; end
        states = [(w, k) for w, s in enumerate(syms) for k in range(len(s))]
        index = {s: i for i, s in enumerate(states)}
        S = len(states)
        A = np.zeros((S, S))  # dense transition matrix, from the successor table
        for (w, k), i in index.items():
            if k + 1 < len(syms[w]):
                A[i, index[(w, k + 1)]] = 1.0
            else:
                for nxt, p in zip(lab.succ_np[w], lab.succ_p[w].tolist()):
                    A[i, index[(int(nxt), 0)]] += p
        # stationary state law: the left eigenvector of A for eigenvalue 1
        vals, vecs = np.linalg.eig(A.T)
        pi = np.real(vecs[:, np.argmin(abs(vals - 1))])
        pi /= pi.sum()
        sym = np.array([syms[w][k] for w, k in states])
        E = lab.params.delta / V + (1 - lab.params.delta) * (sym[:, None] == np.arange(V)[None])  # (S, V)
        paths = [([s], pi[s]) for s in range(S) if pi[s] > 0]
        for _ in range(L - 1):
            paths = [(p + [t], w * A[p[-1], t]) for p, w in paths for t in np.nonzero(A[p[-1]])[0]]
        seqs = np.array(list(itertools.product(range(V), repeat=L)))  # (N, L), lexicographic
        prob = np.zeros(len(seqs))
        for path, w in paths:
            prob += w * np.prod(E[np.array(path)[None, :], seqs], axis=1)  # (N,)
        self.V, self.L, self.pi, self.A = V, L, pi, A
        self.seqs, self.p = torch.from_numpy(seqs), torch.from_numpy(prob)  # (N, L), (N,)
        self.table = self.p.view((V,) * L)

    def index(self, x):
        return (x * self.V ** torch.arange(self.L - 1, -1, -1)).sum(-1)

    def cond(self, z, i, mask_id):
        """p(x_i = v | the unmasked tokens of z other than i), (V,)."""
        ok = torch.ones(len(self.seqs), dtype=torch.bool)
        for j in range(self.L):
            if j != i and z[j] != mask_id:
                ok &= self.seqs[:, j] == z[j]
        w = self.p * ok
        out = torch.zeros(self.V, dtype=torch.float64).index_add_(0, self.seqs[:, i], w)
        return out / out.sum()


@pytest.fixture(scope="module")
def lab():
    return Lab(TINY)


@pytest.fixture(scope="module")
def brute(lab):
    return Brute(lab, L)


def test_definition(lab):
    p = TINY
    assert lab.V == p.A + 2 and len(lab.words) == p.W and len(set(lab.words)) == p.W
    assert all(p.min_len <= len(w) <= p.max_len and max(w) < p.A for w in lab.words)
    assert torch.allclose(lab.succ_p.sum(1), torch.ones(p.W + 1, dtype=torch.float64))
    assert abs(lab.word_pi.sum() - 1) < 1e-12 and (lab.word_pi > 0).all()  # irreducible: every word occurs
    assert abs(lab.pi.sum().item() - 1) < 1e-12
    big = Lab(LabParams(W=64))
    assert (big.word_pi > 0).all() and big.S == sum(len(w) + 1 for w in big.words) + 1
    assert [w for w in big.words] == [w for w in Lab(LabParams(W=64)).words]  # seeded


def test_brute_force_is_a_distribution(brute):
    assert abs(brute.p.sum().item() - 1) < 1e-12
    # stationary: every position has the same marginal law
    marg = [brute.table.sum(dim=tuple(j for j in range(L) if j != i)) for i in range(L)]
    for m in marg[1:]:
        assert torch.allclose(m, marg[0], atol=1e-12)


def test_log_prob_and_marginal(lab, brute):
    assert torch.allclose(lab.log_prob(brute.seqs), brute.p.log(), rtol=0, atol=1e-10)
    assert torch.allclose(lab.marginal(), brute.table.sum(dim=tuple(range(1, L))), atol=1e-12)


def test_next_token_probs(lab, brute):
    probs = lab.next_token_probs(brute.seqs, extra=True)  # (N, L+1, V)
    for i in range(L):
        prefix = brute.table.sum(dim=tuple(range(i + 1, L))) if i + 1 < L else brute.table  # p(x_<=i)
        want = prefix / prefix.sum(-1, keepdim=True)  # p(x_i | x_<i), indexed by x_<i then x_i
        got = probs[:, i]
        ref = want[tuple(brute.seqs[:, j] for j in range(i))] if i else want.expand(len(brute.seqs), -1)
        assert torch.allclose(got, ref, atol=1e-12), i
    assert torch.allclose(probs[:, L].sum(-1), torch.ones(len(brute.seqs), dtype=torch.float64))


def test_full_conditionals(lab, brute):
    x = brute.seqs[::7]  # (147, L)
    got = lab.conditionals(x)  # (n, L, V)
    for b in range(len(x)):
        for i in range(L):
            rows = x[b].repeat(lab.V, 1)
            rows[:, i] = torch.arange(lab.V)
            want = brute.p[brute.index(rows)]
            assert torch.allclose(got[b, i], want / want.sum(), atol=1e-12)


def test_masked_posterior(lab, brute):
    gen = torch.Generator().manual_seed(0)
    x = brute.seqs[torch.randint(len(brute.seqs), (60,), generator=gen)]
    z = torch.where(torch.rand(x.shape, generator=gen) < 0.5, lab.mask_id, x)
    z[0] = lab.mask_id  # all masked: the marginal
    got = lab.conditionals(z)
    # log_prob sums the masked positions out: the probability of the observed tokens
    seen = torch.stack([(brute.p * ((brute.seqs == zb) | (zb == lab.mask_id)).all(-1)).sum() for zb in z])
    assert torch.allclose(lab.log_prob(z), seen.log(), atol=1e-10)
    for b in range(len(z)):
        for i in range(L):
            assert torch.allclose(got[b, i], brute.cond(z[b], i, lab.mask_id), atol=1e-12), (z[b], i)
    # the oracle denoiser: the posterior at masked positions, SUBS copies elsewhere, never the mask
    logits = OracleDenoiser(lab)(z)
    assert logits.shape == (len(z), L, lab.V + 1) and torch.isneginf(logits[..., lab.mask_id]).all()
    m = z == lab.mask_id
    assert torch.allclose(logits[m].exp()[:, :lab.V], got[m], atol=1e-12)
    assert (logits[~m].gather(-1, z[~m][:, None]) == 0).all()


def test_sampler_law(lab, brute):
    n = 40_000
    x = lab.sample(n, L, torch.Generator().manual_seed(1))
    counts = torch.bincount(brute.index(x), minlength=len(brute.seqs))
    stat, pvalue = chi2_gof(counts, brute.p)
    assert pvalue > 1e-4, (stat, pvalue)


def test_stream_windows_are_stationary_samples(lab, brute):
    """The prepared data: one chain; windows far apart are (nearly independent) exact samples."""
    stream = torch.from_numpy(lab.stream(600_000, np.random.default_rng(5)).astype(np.int64))
    assert len(stream) == 600_000 and stream.max() < lab.V
    x = stream.unfold(0, L, 30)  # windows every 30 symbols: the tiny chain forgets in a few words
    counts = torch.bincount(brute.index(x), minlength=len(brute.seqs))
    stat, pvalue = chi2_gof(counts, brute.p)
    assert pvalue > 1e-4, (stat, pvalue)


def test_oracle_ar_chain_rule_and_cache(lab, brute):
    ar = OracleAR(lab)
    x = brute.seqs[::5]
    logits = ar(x)  # (n, L, V): row j predicts x_{j+1}
    chain = lab.marginal().log()[x[:, 0]] + logits[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1).sum(-1)
    assert torch.allclose(chain, lab.log_prob(x), atol=1e-10)
    # incremental decoding through the cache gives the same rows
    cache = ar.new_cache(len(x))
    first = ar(x[:, :2], input_pos=torch.arange(2), cache=cache)
    rest = [ar(x[:, j:j + 1], input_pos=torch.tensor([j]), cache=cache) for j in range(2, L)]
    assert torch.allclose(torch.cat([first, *rest], 1), logits, atol=1e-12)


def test_oracle_denoiser_nelbo_is_the_nll(lab, brute):
    """With the exact posterior the continuous-time bound is tight (it averages the chain rule over
    random unmasking orders): exact_nelbo (2^L patterns, Gauss-Legendre in t) = -log p(x)."""
    toy = SimpleNamespace(L=L, N=len(brute.seqs), mask_id=lab.mask_id, seqs=brute.seqs)
    nelbo = exact_nelbo(OracleDenoiser(lab), toy, LogLinearSchedule(eps=0.0), eps_t=0.0)
    assert torch.allclose(nelbo, -brute.p.log(), rtol=0, atol=1e-9)


def test_oracle_sampling_factorisation_error(lab):
    """The exact law of K-step ancestral sampling with the oracle (harness.exact_sampler_law, L = 4):
    K = 1 draws every position from its marginal (CE well above H); many steps give back p."""
    b4 = Brute(lab, 4)
    oracle = OracleDenoiser(lab)
    H = -(b4.p * b4.p.log()).sum().item() / 4
    ce = {}
    for K in (1, 4, 16, 2000):
        q = exact_sampler_law(oracle, K, lab.V, 4, lab.mask_id)
        assert abs(q.sum().item() - 1) < 1e-9
        ce[K] = -(q * b4.p.log()).sum().item() / 4
        if K == 1:  # the product of the marginals (up to the ~1e-5 left masked for the greedy pass)
            assert tv(q, lab.marginal()[b4.seqs].prod(-1)) < 1e-4
        if K == 2000:
            assert tv(q, b4.p) < 0.01
    assert ce[1] > ce[4] > ce[16] > ce[2000] and ce[1] > H + 0.05 and abs(ce[2000] - H) < 0.01, (ce, H)


def test_entropy(lab, brute):
    H = -(brute.p * brute.p.log()).sum().item() / L
    e = lab.entropy(L, n=4000, seed=2)
    assert abs(e["H"] - H) <= z_threshold(1e-4) * e["H_se"], (e, H)
    assert e["h_rate"] <= e["H"] + 5 * e["h_rate_se"]  # the first positions cost more than the rate


def test_spec():
    assert parse_spec("lab") == LabParams() and parse_spec("stdlib") is None and parse_spec("labs.txt") is None
    p = parse_spec("lab:W=8,delta=0.1,seed=4")
    assert (p.W, p.delta, p.seed, p.A) == (8, 0.1, 4, LabParams().A)
    assert parse_spec(canonical_source("lab:W=8,delta=0.1")) == parse_spec("lab:W=8,delta=0.1")
    assert canonical_source("stdlib") == "stdlib"
    for bad, words in [("lab:X=1", "unknown lab parameter"), ("lab:W=x", "not a valid int"), ("lab:delta=0", "invalid"),
                       ("lab:W=100,A=2,max_len=3", "too few words")]:
        with pytest.raises(ValueError, match=words):
            parse_spec(bad)


def test_preset_resolves_to_its_full_spec():
    """A named instance is only a shorthand: it resolves to every parameter (checkpoints and data folders record
    the full spec), later items override it, and an unknown name is a clear error. The literal spec below is the
    one docs/lab.md §e documents: changing the preset changes the lab every §e number refers to."""
    full = ("lab:W=8,A=12,b=3,zipf=1.0,p_end=0.03,delta=0.02,min_len=3,max_len=3,seed=0,"
            "train_tokens=16777216,val_tokens=1048576")
    assert canonical_source("lab:easy") == full
    assert parse_spec("lab:easy") == parse_spec(full) == LabParams(**PRESETS["easy"])
    assert parse_spec("lab:easy,seed=3") == dataclasses.replace(parse_spec(full), seed=3)
    with pytest.raises(ValueError, match="unknown lab preset 'hard'"):
        parse_spec("lab:hard")
