"""A known-distribution harness for tests (docs/design.md, "Tests"; docs/mdlm.md §5).

A tiny "language": V tokens 0..V-1, sequences of length L, and an explicit joint table p(x) over
all V^L sequences. Because everything is small enough to enumerate, every quantity the library
estimates has an exact reference here:

- `Toy`                 the table itself (probabilities, true NLL, marginals, sampling).
- `OracleDenoiser`      the exact posterior marginals p(x_i = v | z) of a masked sequence z: the
                        best possible MDLM denoiser (optionally perturbed, to get a worse one).
- `OracleAR`            exact next-token conditionals p(x_j | x_<j) (an AR teacher / judge, with
                        the same KV-cache interface as tinydiff's Transformer) and the full
                        conditionals p(x_i = v | x_{!=i}) that TCS distils.
- `exact_sampler_law`   the exact distribution of tinydiff.sampling.diffusion_sample's outputs.
- `exact_nelbo`         the exact expectation of the library's Monte-Carlo NELBO estimator.
- `chi2_gof`, `tv`, `z_threshold`: the statistics used to compare samples with exact laws.

Sequences are always enumerated in lexicographic order (itertools.product, position 0 most
significant), so a distribution over sequences is an (N,) vector aligned with `Toy.seqs`.
Everything exact is computed in float64.
"""
import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Toy:
    """An explicit joint distribution over V^L sequences; mask_id = V (as in tinydiff).

    p(x) ∝ exp(sigma * g_x + coupling * #{i : x_i = x_{i+1}}) with g_x ~ N(0, 1) i.i.d. from `seed`:
    strictly positive, with a random component (so no structure the tests could rely on by
    accident) and a nearest-neighbour "copy" term that guarantees real dependence between
    positions (the table is far from the product of its marginals).
    """

    def __init__(self, V=3, L=4, seed=0, sigma=1.0, coupling=1.0):
        self.V, self.L, self.mask_id = V, L, V
        self.seqs = torch.tensor(list(itertools.product(range(V), repeat=L)), dtype=torch.long)  # (N, L)
        self.N = len(self.seqs)
        rng = np.random.default_rng(seed)
        same = (self.seqs[:, 1:] == self.seqs[:, :-1]).sum(1).double()  # (N,)
        energy = sigma * torch.from_numpy(rng.standard_normal(self.N)) + coupling * same
        self.p = torch.softmax(energy, 0)  # (N,) float64, strictly positive, sums to 1
        self.onehot = F.one_hot(self.seqs, V).double()  # (N, L, V)
        self._place = V ** torch.arange(L - 1, -1, -1)  # digit weights of the lexicographic index
        self._table = None  # posterior of every partial sequence, built on first use

    def index(self, x):
        """Row of Toy.seqs for each sequence in x (..., L) -> (...)."""
        return (x.long() * self._place).sum(-1)

    def nll(self, x):
        """True -log p(x) for a batch x (B, L) -> (B,) float64."""
        return -self.p[self.index(x)].log()

    def entropy(self):
        return -(self.p * self.p.log()).sum().item()

    def marginals(self):
        """p(x_i = v), shape (L, V)."""
        return torch.einsum("n,nlv->lv", self.p, self.onehot)

    def product_of_marginals(self):
        """prod_i p(x_i) for every sequence, (N,): what a sampler that ignores dependence gives."""
        m = self.marginals()  # (L, V)
        return m[torch.arange(self.L), self.seqs].prod(-1)

    def conditional(self, init):
        """p(x | x_i = init_i at every position where init (L,) is not mask_id), shape (N,)."""
        keep = init != self.mask_id
        q = self.p * (self.seqs[:, keep] == init[keep]).all(-1)
        return q / q.sum()

    def sample(self, n, generator=None):
        """n i.i.d. sequences from p, (n, L)."""
        return self.seqs[torch.multinomial(self.p, n, replacement=True, generator=generator)]

    def histogram(self, x):
        """Counts of each sequence of Toy.seqs among the rows of x (B, L) -> (N,) float64."""
        return torch.bincount(self.index(x), minlength=self.N).double()

    def states(self):
        """All (V+1)^L partial sequences (token V = mask), lexicographic, (S, L)."""
        return torch.tensor(list(itertools.product(range(self.V + 1), repeat=self.L)), dtype=torch.long)

    def state_index(self, z):
        """Row of Toy.states() for each partial sequence z (..., L) -> (...)."""
        return (z.long() * (self.V + 1) ** torch.arange(self.L - 1, -1, -1)).sum(-1)

    def posterior(self, z):
        """Exact p(x_i = v | unmasked tokens of z) for partial sequences z (B, L) -> (B, L, V) float64
        (one-hot at unmasked positions).

        By enumeration: weights (B, N) = p(x) * [x agrees with z wherever z is not masked], then a
        weighted count of each token at each position. There are only (V+1)^L partial sequences,
        so for small toys this is done once for all of them and later calls are a table look-up.
        """
        if (self.V + 1) ** self.L > 100_000:  # too many states to tabulate: enumerate per call
            return torch.cat([self._posterior(zc) for zc in z.split(4096)])
        if self._table is None:
            self._table = torch.cat([self._posterior(zc) for zc in self.states().split(4096)])
        return self._table[self.state_index(z)]

    def _posterior(self, z):
        free = z == self.mask_id  # (b, L)
        agree = (z[:, None, :] == self.seqs[None]) | free[:, None, :]  # (b, N, L)
        w = self.p * agree.all(-1)  # (b, N): unnormalised posterior over whole sequences
        post = (w @ self.onehot.view(self.N, -1)).view(len(z), self.L, self.V)  # (b, L, V)
        return post / w.sum(-1)[:, None, None]


class OracleDenoiser(nn.Module):
    """model(z (B, L)) -> logits (B, L, V+1), float64: the log of the exact posterior marginals.

    At a masked position i the logit of v is log p(x_i = v | unmasked tokens of z) (Toy.posterior,
    exact by enumeration). At an unmasked position the posterior is the one-hot on its own token
    (log-prob 0, -inf elsewhere), which is what SUBS copies anyway. The mask column is -inf (SUBS
    never predicts the mask). Like MDLM's network, it does not see t.

    temperature / perturb make a deliberately worse denoiser that is still a deterministic
    function of z: logits / temperature + a fixed random (L, V) bias with std `perturb`.
    """

    def __init__(self, toy, temperature=1.0, perturb=0.0, seed=0):
        super().__init__()
        self.toy, self.temperature = toy, temperature
        gen = torch.Generator().manual_seed(seed)
        self.bias = perturb * torch.randn(toy.L, toy.V, generator=gen, dtype=torch.float64)  # (L, V)
        self.calls = 0  # network evaluations, so tests can check NFE accounting

    def forward(self, z):
        self.calls += 1
        logits = self.toy.posterior(z).log() / self.temperature + self.bias  # (B, L, V); -inf stays -inf
        mask_col = torch.full(logits.shape[:-1] + (1,), float("-inf"), dtype=logits.dtype)
        return torch.cat([logits, mask_col], dim=-1)  # (B, L, V+1)


class _TokenCache:
    """The 'KV cache' of OracleAR: just the tokens written so far (the oracle needs nothing else)."""

    def __init__(self, batch_size, max_len, bos_id):
        self.tokens = torch.full((batch_size, max_len), bos_id, dtype=torch.long)


class OracleAR(nn.Module):
    """Exact autoregressive conditionals of a Toy, with tinydiff's AR model interface.

    Input convention: position 0 holds a BOS token (id V, which is also the diffusion mask id; they
    never meet) so that the first real token has something to be predicted from:
        idx = (BOS, x_0, ..., x_{T-2})  ->  logits (B, T, V) with logits[:, j] = log p(x_j | x_<j).
    So (BOS, x_0, ..., x_{L-2}) predicts x_0 .. x_{L-1}, and ar_sample(model, B, L + 1,
    prompt=BOS column) samples whole sequences (drop column 0). An input of length L + 1 (the whole
    sequence after BOS) is accepted; its last row has no next token and is uniform (logits 0).

    forward(idx, input_pos=None, cache=None) mirrors Transformer.forward: with a cache from
    new_cache, idx is written at input_pos and the logits of those positions are returned.
    """

    def __init__(self, toy):
        super().__init__()
        self.toy, self.bos_id = toy, toy.V
        self.calls = 0

    def new_cache(self, batch_size, max_len=None, dtype=None):
        return _TokenCache(batch_size, max_len or self.toy.L + 1, self.bos_id)

    def forward(self, idx, input_pos=None, cache=None, embeds=None):
        assert embeds is None, "the oracle has no embeddings"
        self.calls += 1
        if cache is None:
            return self._logits(idx)
        cache.tokens[:, input_pos] = idx
        return self._logits(cache.tokens[:, :int(input_pos[-1]) + 1])[:, input_pos]

    def _logits(self, idx):
        toy = self.toy
        B, T = idx.shape
        if T > toy.L + 1 or not (idx[:, 0] == self.bos_id).all():
            raise ValueError(f"OracleAR expects (BOS={self.bos_id}, up to {toy.L} tokens), got shape {tuple(idx.shape)}")
        J = min(T, toy.L)  # rows that have a next token to predict
        # row j sees x_<j = idx[:, 1:j+1]; p(x_j | x_<j) is the posterior of position j of the
        # partial sequence (x_<j, mask, ..., mask)
        z = torch.full((B, J, toy.L), toy.mask_id, dtype=torch.long)
        for j in range(1, J):
            z[:, j, :j] = idx[:, 1:j + 1]
        post = toy.posterior(z.view(-1, toy.L)).view(B, J, toy.L, toy.V)
        logits = post[:, torch.arange(J), torch.arange(J)].log()  # (B, J, V)
        if T > J:  # position L: nothing left to predict
            logits = torch.cat([logits, torch.zeros(B, T - J, toy.V, dtype=torch.float64)], 1)
        return logits

    def log_prob(self, x):
        """log p(x) of clean sequences x (B, L) by the chain rule (equals toy.p[index].log())."""
        bos = torch.full((len(x), 1), self.bos_id, dtype=torch.long)
        logp = self._logits(torch.cat([bos, x[:, :-1]], 1))  # (B, L, V)
        return logp.gather(-1, x[..., None]).squeeze(-1).sum(-1)

    def full_conditional(self, x):
        """p(x_i = v | x_{!=i}) exactly, (B, L, V) float64: the TCS target of each position."""
        toy = self.toy
        z = x[:, None, :].repeat(1, toy.L, 1)  # (B, L, L): copy i has position i masked
        z[:, torch.arange(toy.L), torch.arange(toy.L)] = toy.mask_id
        post = toy.posterior(z.view(-1, toy.L)).view(len(x), toy.L, toy.L, toy.V)
        return post[:, torch.arange(toy.L), torch.arange(toy.L)]


def _state_index(z, V):
    """Row of Toy.states() (lexicographic over V+1 symbols, mask = V) of a partial sequence z (L,)."""
    return int((z.long() * (V + 1) ** torch.arange(len(z) - 1, -1, -1)).sum())


def _masked_probs(logits, mask_id, temperature=1.0, top_k=0, top_p=1.0):
    """Token probabilities (n, V+1) exactly as diffusion_sample draws them from logits rows (n, V+1)."""
    from tinydiff.sampling import filter_logits
    logits = logits.double().clone()
    logits[:, mask_id] = float("-inf")
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return filter_logits(logits, temperature, top_k, top_p).softmax(-1)


@torch.no_grad()
def exact_sampler_law(model_probs, K, V, L, mask_id, schedule=None, eps=1e-5, init=None,
                      temperature=1.0, top_k=0, top_p=1.0):
    """The exact output distribution of diffusion_sample(model_probs, ..., steps=K, eps=eps), (N,)
    float64 aligned with Toy(V, L).seqs.

    Propagates a distribution over all (V+1)^L partial states z (token V = mask; fine for
    (V+1)^L up to ~1000). Starting from the fully masked state (or `init`, one (L,) state with
    clamped tokens), each of the K steps of the grid torch.linspace(1, eps, K+1) reveals every masked
    position independently with probability r = (a_s - a_t)/(1 - a_t), with a token drawn from the
    model's probabilities at the current state. So the transition s -> s' has probability
        r^(#revealed) (1 - r)^(#still masked) * prod_{revealed i} q_i(s'_i | s)
    and is 0 unless s' agrees with s on every unmasked position of s. Masks left after the last step
    are filled by the argmax of the model at that state, as the sampler's final greedy pass does.
    """
    from tinydiff.diffusion import LogLinearSchedule
    assert mask_id == V, "the enumeration uses token V for the mask"
    schedule = schedule or LogLinearSchedule()
    states = torch.tensor(list(itertools.product(range(V + 1), repeat=L)), dtype=torch.long)  # (S, L)
    S = len(states)
    logits = model_probs(states).double()  # (S, L, V+1)
    q = _masked_probs(logits.reshape(S * L, -1), mask_id, temperature, top_k, top_p).view(S, L, -1)[..., :V]
    masked = states == mask_id  # (S, L)

    # A[s, s'] = prod over revealed i of q_i(s'_i | s), 0 if s' contradicts s; nrev = #revealed
    q_or_stay = torch.cat([q, torch.ones(S, L, 1, dtype=torch.float64)], -1)  # digit V = "still masked"
    A = torch.ones(S, S, dtype=torch.float64)
    nrev = torch.zeros(S, S, dtype=torch.float64)
    for i in range(L):
        target = states[:, i]  # (S,) digit of s' at position i
        from_masked = q_or_stay[:, i, :][:, target]  # (S, S)
        from_clean = (states[:, i, None] == target[None, :]).double()  # (S, S): clean tokens never change
        A *= torch.where(masked[:, i, None], from_masked, from_clean)
        nrev += (masked[:, i, None] & (target[None, :] != mask_id)).double()
    nstay = masked.sum(1, keepdim=True).double() - nrev  # (S, S): masked positions of s left masked
    # r^nrev (1-r)^nstay only takes (L+1)^2 values: index them instead of calling pow on (S, S)
    code = (nrev * (L + 1) + nstay).long()  # (S, S)
    counts = torch.arange(L + 1, dtype=torch.float64)

    P = torch.zeros(S, dtype=torch.float64)
    P[S - 1 if init is None else _state_index(init, V)] = 1.0  # the all-mask state is the last one
    ts = torch.linspace(1.0, eps, K + 1, dtype=torch.float64)
    for k in range(K):
        a_t, a_s = schedule.alpha(ts[k]).item(), schedule.alpha(ts[k + 1]).item()
        r = (a_s - a_t) / (1 - a_t)
        coef = (r ** counts[:, None] * (1 - r) ** counts[None, :]).flatten()  # [nrev * (L+1) + nstay]
        P = P @ (A * coef[code])  # (S,) @ (S, S) transition matrix

    # final greedy pass: masked positions take the argmax of the (unfiltered) model logits
    greedy = logits.clone()
    greedy[..., mask_id] = float("-inf")
    final = torch.where(masked, greedy.argmax(-1), states)  # (S, L)
    place = V ** torch.arange(L - 1, -1, -1)
    return torch.zeros(V ** L, dtype=torch.float64).index_add_(0, (final * place).sum(-1), P)


@torch.no_grad()
def exact_nelbo(model, toy, schedule=None, eps_t=1e-3, n_quad=64):
    """Exact expectation, for every sequence of toy.seqs, of the per-sequence Monte-Carlo NELBO
    that tinydiff.diffusion estimates: E_{t ~ U[eps_t, 1]} E_z [ w(t) sum_{i masked} -log p(x_i|z) ],
    returned as (N,) float64 (sum over positions, not divided by L).

    Given t, a mask pattern M has probability m^|M| (1-m)^(L-|M|) with m = 1 - alpha_t, so the
    inner expectation is a finite sum over the 2^L patterns; the t integral is done by
    Gauss-Legendre quadrature (exact for the log-linear schedule, whose integrand is a polynomial
    of degree L-1 in t; for the cosine one, a smooth integrand, to rounding). With eps = eps_t = 0 and the
    oracle this is exactly -log p(x) for any schedule: the
    continuous-time bound averages the chain rule over random unmasking orders.
    """
    from tinydiff.diffusion import LogLinearSchedule
    schedule = schedule or LogLinearSchedule()
    L, N, m_id = toy.L, toy.N, toy.mask_id
    patterns = torch.tensor(list(itertools.product([False, True], repeat=L)))  # (P, L): True = masked
    z = torch.where(patterns[None], m_id, toy.seqs[:, None, :]).view(-1, L)  # (N*P, L)
    logits = model(z).double()
    logits[..., m_id] = float("-inf")
    logp = logits.log_softmax(-1).view(N, len(patterns), L, -1)  # (N, P, L, V+1)
    x = toy.seqs[:, None, :, None].expand(N, len(patterns), L, 1)
    nll = -logp.gather(-1, x).squeeze(-1)  # (N, P, L)
    g = (nll * patterns).sum(-1)  # (N, P): sum of -log p over the masked positions of each pattern

    nodes, weights = np.polynomial.legendre.leggauss(n_quad)  # on [-1, 1]
    t = torch.from_numpy((nodes + 1) / 2 * (1 - eps_t) + eps_t)  # (Q,) on [eps_t, 1]
    density = torch.from_numpy(weights / 2)  # quadrature weights of the uniform density on [eps_t, 1]
    m = 1 - schedule.alpha(t)  # (Q,) mask probability
    k = patterns.sum(1, keepdim=True).double()  # (P, 1)
    prob = m[None] ** k * (1 - m[None]) ** (L - k)  # (P, Q)
    return g @ (prob * schedule.weight(t)[None] * density[None]).sum(1)


# ---------------------------------------------------------------- statistics


def tv(p, q):
    """Total variation distance between two distributions on the same support."""
    return 0.5 * (p - q).abs().sum().item()


def chi2_gof(counts, probs, min_expected=5.0):
    """Pearson chi-square goodness of fit of counts (N,) to probs (N,) -> (statistic, p-value).

    Cells with probability 0 must be empty (else the p-value is 0). Cells expecting fewer than
    min_expected counts are pooled into one, so the chi-square approximation holds; the p-value
    uses the chi-square law with (#cells - 1) degrees of freedom (regularised upper incomplete
    gamma function).
    """
    counts, probs = counts.double(), probs.double()
    n = counts.sum()
    support = probs > 0
    if counts[~support].sum() > 0:
        return float("inf"), 0.0
    counts, expected = counts[support], n * probs[support]
    small = expected < min_expected
    if small.any():  # pool the rare cells into one
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(len(counts) - 1.0, dtype=torch.float64)
    return stat.item(), torch.special.gammaincc(df / 2, stat / 2).item()


def z_threshold(alpha=1e-4, n_tests=1):
    """Two-sided normal quantile for a family of n_tests checks with family-wise error alpha
    (Bonferroni): |estimate - truth| <= z * SE fails by chance with probability <= alpha."""
    return math.sqrt(2) * torch.erfinv(torch.tensor(1 - alpha / n_tests, dtype=torch.float64)).item()


def ar_toy(model, V, L, bos_id):
    """A Toy whose table is a causal model's own chain rule, p(x) = prod_j p_model(x_j | bos, x_<j) over
    all V^L sequences (the model's output ids must be exactly 0..V-1; bos_id is one of them, as eot is
    in real data). The model is then an exact AR teacher of the toy (teacher = data) that has real
    input embeddings, so every TCS estimator (grad included) can be checked against exact expectations."""
    toy = Toy(V, L)
    with torch.no_grad():
        idx = torch.cat([torch.full((toy.N, 1), bos_id), toy.seqs[:, :-1]], 1)  # (N, L)
        logp = model(idx).double().log_softmax(-1)  # (N, L, V)
    joint = logp.gather(-1, toy.seqs[..., None]).squeeze(-1).sum(-1).exp()  # (N,)
    toy.p, toy._table = joint / joint.sum(), None
    return toy
