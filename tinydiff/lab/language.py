"""An exact lab: a synthetic "word language" whose likelihood, conditionals and posteriors are exact.

The language is a hidden Markov model (HMM; Rabiner 1989, "A tutorial on hidden Markov models and
selected applications in speech recognition", Proc. IEEE 77(2)):
- a seeded lexicon of W pronounceable words (2-8 letters from a consonant/vowel letter model over the
  first A letters of LETTERS) and one more "word", the sentence end, written as the end-of-text id;
- a sparse word-to-word Markov chain: each word is followed by one of b successors (Zipf-weighted),
  or ends the sentence with probability p_end; after a sentence end, one of b sentence starters;
- a word emits its letters in order, then a space (the sentence end emits only the end-of-text id);
- emission noise: each symbol is replaced by a uniformly drawn one with probability delta, so every
  string over the vocabulary has a finite likelihood.
Hidden states are (word, position in the word). Within a word the next state is fixed; only word ends
branch, through the sparse (W+1) x (b+1) successor table. So the forward and backward recursions are a
shift plus one gather / scatter per position (never a dense S x S matrix): B sequences x L positions
cost O(B L S), with S = sum of word lengths + W + 1 states. Everything is float64 with per-step
scaling (Rabiner 1989, section V.A).

Vocabulary (the `labA` tokenizer, LabTokenizer in data.py): ids 0..A-1 the letters LETTERS[:A], A the space,
A+1 the end-of-text id (the sentence end, decoded as a newline), and V = A+2 the diffusion [MASK].
Why a dedicated tokenizer: |V| = A + 2 (14 by default) keeps the exact TCS target (L x |V| rescoring)
and the oracle cheap, the model head tiny, and the end-of-text id that AR sampling and teachers use as
BOS is a symbol of the language itself, so "eot, then x" is an event of the law: text that starts a
sentence. The prepared data (prepare_lab in data.py) is ONE stationary chain per split with no extra
separators, so every window the pipeline draws is an exact sample of the stationary law.

The exact quantities (batched torch, CPU, float64):
    sample            stationary sequences (n, L)
    log_prob          log p(x) by the forward algorithm, stationary initial law
    next_token_probs  p(x_i | x_<i) for i >= 0 (row 0: the stationary marginal): an ORACLE AR model
    conditionals      p(x_i = v | x_j, j != i) at every position (the exact TCS target), and for a
                      masked z the posterior p(x_i | z) of MDLM (masked emissions summed out):
                      forward-backward, one pass for all positions
    OracleDenoiser    z (B, L) -> logits (B, L, V+1) like an MDLM (SUBS, -inf on [MASK])
    OracleAR          tinydiff's AR model interface (KV-cache included) on the exact conditionals
    entropy           H = E[-log p(X_1..L)] / L of L-windows and the entropy rate h, with s.e.
"""
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn


LETTERS = "aeiou" + "tkmnslprdgbhfvwyzcjqx"  # the lexicon's letters are LETTERS[:A]: vowels first
F64 = torch.float64


@dataclass(frozen=True)
class LabParams:
    """Everything that defines a lab (its language) and its prepared data. Spec string: lab:W=256,delta=0.02
    (or a named instance of PRESETS: lab:easy)."""
    W: int = 32  # words in the lexicon (256: ~3x further from H after the same training; docs/lab.md)
    A: int = 12  # letters; vocabulary = A letters + space + end-of-text
    b: int = 3  # successors per word (branching of the word chain)
    zipf: float = 1.0  # Zipf exponent of word popularity and of each word's successor weights
    p_end: float = 0.1  # probability that the sentence ends after a word
    delta: float = 0.02  # emission noise: a symbol is replaced by a uniform one with this probability
    min_len: int = 2  # word lengths: min_len + Binomial(max_len - min_len, 0.4)
    max_len: int = 8
    seed: int = 0
    train_tokens: int = 2 ** 24  # size of the prepared splits (one stationary chain each); not part of the law
    val_tokens: int = 2 ** 20

    def __post_init__(self):
        ok = (1 <= self.A <= len(LETTERS) and 1 <= self.b <= self.W and 0 < self.delta < 1 and 0 <= self.p_end < 1
              and 1 <= self.min_len <= self.max_len and self.zipf >= 0 and min(self.train_tokens, self.val_tokens) > 0)
        if not ok:
            raise ValueError(f"invalid lab parameters {self}: need 1 <= A <= {len(LETTERS)}, 1 <= b <= W, "
                             f"0 < delta < 1, 0 <= p_end < 1, 1 <= min_len <= max_len, zipf >= 0, tokens > 0")
        if sum(self.A ** n for n in range(self.min_len, self.max_len + 1)) < 2 * self.W:
            raise ValueError(f"{self.A} letters and lengths {self.min_len}-{self.max_len} spell too few words "
                             f"for W = {self.W}: raise A or max_len, or lower W")

    def spec(self):
        return "lab:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


# Named instances (docs/lab.md): 'lab:NAME' stands for these parameters (the rest default), and items after
# the name override them ('lab:easy,seed=3'). Checkpoints and data folders record the full spec, never the name.
PRESETS = {
    # docs/lab.md §e: 8 words of 3 letters, long sentences; a 0.80M-parameter MDLM gets close to the exact
    # denoiser in 30 CPU-minutes at L = 64, while 8-step sampling still costs the exact denoiser ~0.5 nats/token
    "easy": dict(W=8, min_len=3, max_len=3, p_end=0.03),
}


def parse_spec(source):
    """'lab', 'lab:W=256,delta=0.02,...' or 'lab:NAME[,key=value...]' (a PRESETS name) -> LabParams;
    anything else -> None. Raises ValueError."""
    if source != "lab" and not str(source).startswith("lab:"):
        return None
    types = {f.name: f.type for f in fields(LabParams)}
    kw = {}
    for item in filter(None, str(source)[4:].split(",")):
        key, eq, value = item.partition("=")
        if not eq:  # a bare name: a preset, whose items later ones override
            if key not in PRESETS:
                raise ValueError(f"unknown lab preset {key!r} in {source!r}: choose from {', '.join(PRESETS)} "
                                 f"(or give parameters as key=value)")
            kw.update(PRESETS[key])
            continue
        if key not in types:
            raise ValueError(f"unknown lab parameter {key!r} in {source!r}: choose from {', '.join(types)}")
        try:
            kw[key] = types[key](value)
        except ValueError:
            raise ValueError(f"lab parameter {key}={value!r} is not a valid {types[key].__name__}") from None
    return LabParams(**kw)


def canonical_source(source):
    """A --data value with a lab spec written out in full (every parameter), so checkpoints record the
    lab exactly; other sources unchanged. Raises ValueError for a bad spec."""
    params = parse_spec(source)
    return source if params is None else params.spec()


class Lab:
    """The hidden Markov word language of `params` (see the module docstring). V = A + 2 symbols."""

    def __init__(self, params=LabParams()):
        self.params = p = params
        self.V, self.space, self.eot = p.A + 2, p.A, p.A + 1
        self.mask_id = self.V
        self.words = _lexicon(p, np.random.default_rng([p.seed, 0]))  # W tuples of letter ids
        self.word_index = {w: k for k, w in enumerate(self.words)}
        succ, succ_p = _chain(p, np.random.default_rng([p.seed, 1]))  # (W+1, b+1) word ids / probabilities
        self.word_pi = _stationary(succ, succ_p)  # (W+1,) stationary law of the word chain (END = W)
        # states: word w's letters then its space, contiguous; the sentence end (word W) is the last state
        syms = [list(w) + [self.space] for w in self.words] + [[self.eot]]
        n = np.array([len(s) for s in syms])  # (W+1,) states per word
        start = np.concatenate([[0], np.cumsum(n)[:-1]])  # (W+1,)
        self.S = int(n.sum())
        cum = np.cumsum(succ_p, 1)  # (W+1, K) for the stream sampler; its last nonzero entry exactly 1
        cum[np.arange(len(cum)), (succ_p > 0).cumsum(1).argmax(1)] = 1.0
        self.n_states, self.start_np, self.succ_np, self.cum_np = n, start, succ, cum
        self.sym = torch.tensor(np.concatenate(syms))  # (S,) the symbol each state emits
        self.word_of = torch.from_numpy(np.repeat(np.arange(p.W + 1), n))  # (S,)
        self.start = torch.from_numpy(start)  # (W+1,) first state of each word
        self.last = torch.from_numpy(start + n - 1)  # (W+1,) last state (the space / the eot)
        self.is_last = torch.zeros(self.S, dtype=torch.bool).index_fill_(0, self.last, True)  # (S,)
        self.not_start = torch.ones(self.S, dtype=F64).index_fill_(0, self.start, 0.0)  # (S,)
        self.succ_start = self.start[torch.from_numpy(succ)]  # (W+1, K) first state of each successor
        self.succ_p = torch.from_numpy(succ_p)  # (W+1, K)
        # a visit to word w lasts n_w steps: the stationary state law is pi_w / sum_w' pi_w' n_w' on each state
        self.pi = torch.from_numpy(np.repeat(self.word_pi / (self.word_pi * n).sum(), n))  # (S,)
        # emissions: E[s, v] = delta/V + (1 - delta) [v == sym_s]
        self.E = p.delta / self.V + (1 - p.delta) * torch.nn.functional.one_hot(self.sym, self.V).to(F64)  # (S, V)
        self.word_law = torch.from_numpy(self.word_pi[:p.W] / self.word_pi[:p.W].sum())  # (W,) law of word tokens

    def text(self, ids):
        """Symbols -> text: letters, ' ', and '\\n' for the sentence end; [MASK] as '_'."""
        chars = LETTERS[:self.params.A] + " \n_"
        return "".join(chars[i] for i in ids)

    # ------------------------------------------------------------------ recursions (Rabiner 1989, eqs. 19-25)
    # Laws over hidden states are kept state-major, (S, B): every gather / scatter below then moves whole
    # contiguous rows of B numbers, which is several times faster on a CPU than the batch-major layout.
    def _emission(self, zi):
        """e(z_i | s) (S, B) for symbols zi (B,): delta/V + (1 - delta)[z_i == sym_s]; 1 where z_i is [MASK]
        (the masked emission summed over v is 1 for every state)."""
        lo, hi = self.params.delta / self.V, 1 - self.params.delta + self.params.delta / self.V
        masked = zi == self.mask_id  # (B,)
        lo = torch.full(zi.shape, lo, dtype=F64).masked_fill_(masked, 1.0)  # (B,)
        hi = torch.full(zi.shape, hi, dtype=F64).masked_fill_(masked, 1.0)  # (B,)
        return torch.where(self.sym[:, None] == zi, hi, lo)  # (S, B)

    def _advance(self, a):
        """Filtered law p(s_i | z_<=i) (S, B) -> prior p(s_{i+1} | z_<=i) (S, B)."""
        out = torch.empty_like(a)
        out[0] = 0.0
        out[1:] = a[:-1]  # inside a word the next state is the next one ...
        out *= self.not_start[:, None]  # ... but a word's first state is entered only from a word end:
        flow = a[self.last][:, None, :] * self.succ_p[:, :, None]  # (W+1, K, B) mass from word ends to successors
        return out.index_add_(0, self.succ_start.flatten(), flow.flatten(0, 1))

    def _retreat(self, c):
        """c(s') = e(z_{i+1} | s') beta_{i+1}(s') (S, B) -> beta_i(s) = sum_s' A(s, s') c(s') (S, B)."""
        out = torch.empty_like(c)
        out[:-1] = c[1:]  # inside a word (word ends are overwritten next)
        out[self.last] = (c[self.succ_start] * self.succ_p[:, :, None]).sum(1)  # (W+1, B)
        return out

    def _forward(self, z, prior=None, pred=False, post=None):
        """Scaled forward pass over z (B, T), masked positions (id V) summed out.

        Returns (log p(z_i | z_<i) (B, T) (0 where masked), the prior of position T (S, B), and if pred
        the next-token laws p(x_i | z_<i) (B, T+1, V), rows 0..T). post: (T, S, B) backward messages,
        multiplied in place by the priors: post[i] <- p(s_i | z_<i) beta_i (the unnormalised posterior
        of s_i given every z_j, j != i).
        """
        B, T = z.shape
        prior = self.pi[:, None].expand(self.S, B) if prior is None else prior  # (S, B)
        logc = torch.empty(T, B, dtype=F64)
        laws = torch.empty(T + 1, self.V, B, dtype=F64) if pred else None
        for i in range(T):
            if pred:
                torch.mm(self.E.T, prior, out=laws[i])  # (V, B)
            if post is not None:
                post[i] *= prior
            a = prior * self._emission(z[:, i])  # (S, B) p(s_i, z_i | z_<i)
            c = a.sum(0)  # (B,) p(z_i | z_<i), the scaling factor
            logc[i] = c.log()
            prior = self._advance(a.div_(c))
        if pred:
            torch.mm(self.E.T, prior, out=laws[T])
            laws = laws.permute(2, 0, 1)  # (B, T+1, V)
        return logc.T, prior, laws

    def _backward(self, z):
        """Scaled backward messages beta_i(s) ∝ p(z_>i | s_i = s), (T, S, B)."""
        B, T = z.shape
        betas = torch.empty(T, self.S, B, dtype=F64)
        betas[T - 1] = 1.0
        for i in range(T - 1, 0, -1):
            beta = self._retreat(self._emission(z[:, i]).mul_(betas[i]))
            betas[i - 1] = beta.div_(beta.sum(0))  # any positive scale: posteriors are renormalised
        return betas

    def _chunks(self, z, budget=2 ** 24):
        """Split a batch so that rows x T x S stays under `budget` float64 elements (128 MB)."""
        return z.split(max(1, budget // (z.shape[1] * self.S)))

    # ------------------------------------------------------------------ exact quantities
    def log_prob(self, x):
        """log p(x) (B,) of sequences x (B, L) under the stationary law; [MASK] ids are summed out."""
        return self._forward(x.cpu())[0].sum(-1)

    def next_token_probs(self, x, extra=False):
        """p(x_i = v | x_<i) (B, L, V) for i = 0..L-1 (row 0 = the stationary marginal; extra: also row L)."""
        laws = self._forward(x.cpu(), pred=True)[2]
        return laws if extra else laws[:, :-1]

    def conditionals(self, z):
        """p(x_i = v | z_j for every j != i) (B, L, V), every position, by forward-backward.

        For a clean x this is the full conditional p(x_i = v | x_!=i) (the exact TCS target). For a
        partially masked z (mask id V) the masked positions' emissions are summed out (emission 1 for
        every state), so at a masked position i it is the MDLM posterior p(x_i = v | z): the best
        denoiser. The posterior of the state is p(s_i | z_<i) beta_i(s) (the emission at i left out);
        the token law is that mixed through the emissions E.
        """
        out = []
        for zc in self._chunks(z.cpu()):
            g = self._backward(zc)  # (T, S, b)
            self._forward(zc, post=g)  # g <- prior * beta
            probs = torch.matmul(self.E.T, g) / g.sum(1, keepdim=True)  # (T, V, b)
            out.append(probs.permute(2, 0, 1))  # (b, T, V)
        return torch.cat(out)

    def sample(self, n, L, generator=None):
        """n sequences of L symbols from the stationary law, (n, L) int64 (CPU generator)."""
        s = torch.multinomial(self.pi, n, replacement=True, generator=generator)  # (n,) s_0 ~ pi
        x = torch.empty(n, L, dtype=torch.long)
        for i in range(L):
            noise = torch.rand(n, generator=generator, dtype=F64) < self.params.delta
            x[:, i] = torch.where(noise, torch.randint(self.V, (n,), generator=generator), self.sym[s])
            w = self.word_of[s]  # (n,)
            k = torch.multinomial(self.succ_p[w], 1, generator=generator).squeeze(1)  # successor if s ends w
            s = torch.where(self.is_last[s], self.succ_start[w, k], s + 1)
        return x

    def stream(self, n_tokens, rng):
        """One stationary chain of n_tokens symbols, np.uint16 (the prepared data). Word by word with a
        numpy Generator: the whole split is one chain, so every window of it is an exact sample."""
        s0 = rng.choice(self.S, p=self.pi.numpy())
        w = int(self.word_of[s0])
        first = self.sym[s0:int(self.last[w]) + 1].numpy()  # the rest of the first word
        mean_len = float((self.word_pi * self.n_states).sum())
        words, total = [], len(first)
        succ, cum = self.succ_np.tolist(), self.cum_np.tolist()
        while total < n_tokens:  # the word chain, in blocks of uniforms
            for u in rng.random(int((n_tokens - total) / mean_len) + 64).tolist():
                k = 0
                row = cum[w]
                while k < len(row) - 1 and u >= row[k]:
                    k += 1
                w = succ[w][k]
                words.append(w)
                total += int(self.n_states[w])
        ws = np.array(words, dtype=np.int64)
        lens = self.n_states[ws]
        offsets = np.repeat(self.start_np[ws] - (np.cumsum(lens) - lens), lens)  # state = offset + position
        states = offsets + np.arange(int(lens.sum()))
        x = np.concatenate([first, self.sym.numpy()[states]])[:n_tokens]
        noise = rng.random(n_tokens) < self.params.delta
        x[noise] = rng.integers(self.V, size=int(noise.sum()))
        return x.astype(np.uint16)

    def marginal(self):
        """The stationary law of one symbol, p(x_i = v), (V,)."""
        return self.pi @ self.E

    def entropy(self, L, n=2048, seed=0):
        """H = E[-log p(X_1..L)] / L (the per-token entropy of L-windows: what CE of L-token samples and a
        held-out bound on L-windows are compared with) and the entropy rate h (positions >= L/2), with
        standard errors over n sampled windows. Rao-Blackwellised: E[-log p(x_i | x_<i)] = E[entropy of
        p(. | x_<i)], so each position contributes the entropy of its exact next-token law."""
        x = self.sample(n, L, torch.Generator().manual_seed(seed))
        h = torch.cat([_entropy_of(self.next_token_probs(xc)) for xc in x.split(512)])  # (n, L)
        window, rate = h.mean(1), h[:, L // 2:].mean(1)  # (n,) each
        se = lambda v: (v.std() / math.sqrt(n)).item()
        return {"H": window.mean().item(), "H_se": se(window), "h_rate": rate.mean().item(), "h_rate_se": se(rate),
                "L": L, "n": n}


def _entropy_of(p):
    return -(p * p.log()).sum(-1)


def _lexicon(p, rng):
    """W distinct pronounceable words: consonant/vowel alternation (C -> V with prob 0.85, V -> C 0.8)."""
    vowels = [i for i, c in enumerate(LETTERS[:p.A]) if c in "aeiou"]
    cons = [i for i, c in enumerate(LETTERS[:p.A]) if c not in "aeiou"] or vowels
    vowels = vowels or cons
    words, seen = [], set()
    for _ in range(1000 * p.W):
        n = p.min_len + rng.binomial(p.max_len - p.min_len, 0.4)
        vowel, w = rng.random() < 0.3, []
        for _ in range(n):
            w.append(int(rng.choice(vowels if vowel else cons)))
            vowel = rng.random() < (0.2 if vowel else 0.85)
        if tuple(w) not in seen:
            seen.add(tuple(w))
            words.append(tuple(w))
            if len(words) == p.W:
                return words
    raise ValueError(f"could not draw {p.W} distinct words: raise A or max_len")


def _chain(p, rng):
    """Successor table (W+1, b+1): word w < W goes to one of b successors with Zipf weights (1 - p_end),
    or to the sentence end W (p_end); the sentence end goes to one of b sentence starters. Successors are
    drawn by word popularity (Zipf over a random ranking); every word's list holds the next word of a
    random cycle through all W words, so the chain is irreducible (every word occurs)."""
    W, b = p.W, p.b
    pop = (rng.permutation(W) + 1.0) ** -p.zipf
    pop /= pop.sum()
    cycle = rng.permutation(W)
    nxt = np.empty(W, dtype=np.int64)
    nxt[cycle] = np.roll(cycle, -1)
    weights = (np.arange(b) + 1.0) ** -p.zipf
    weights /= weights.sum()
    succ = np.full((W + 1, b + 1), W, dtype=np.int64)
    prob = np.zeros((W + 1, b + 1))
    for w in range(W + 1):
        chosen = [int(nxt[w])] if w < W else []
        while len(chosen) < b:
            c = int(rng.choice(W, p=pop))
            if c not in chosen:
                chosen.append(c)
        succ[w, :b] = rng.permutation(chosen)  # the cycle's word gets a random rank
        prob[w, :b] = weights * (1 - p.p_end if w < W else 1.0)
        prob[w, b] = p.p_end if w < W else 0.0  # column b: the sentence end (unused by the end itself)
    return succ, prob


def _stationary(succ, prob):
    """Stationary law of the word chain: solve pi P = pi, sum pi = 1 (a dense (W+1)^2 system, once)."""
    n = len(succ)
    P = np.zeros((n, n))
    np.add.at(P, (np.repeat(np.arange(n), succ.shape[1]), succ.flatten()), prob.flatten())
    A = P.T - np.eye(n)
    A[-1] = 1.0
    rhs = np.zeros(n)
    rhs[-1] = 1.0
    return np.linalg.solve(A, rhs)


class OracleDenoiser(nn.Module):
    """The exact MDLM denoiser of a lab: z (B, L) -> logits (B, L, V+1), float64, on z's device.

    Masked positions: log p(x_i = v | z) (Lab.conditionals). Clean positions: SUBS copies (0 on the
    token, -inf elsewhere). The [MASK] column is -inf. Like MDLM's network it does not see t."""

    def __init__(self, lab):
        super().__init__()
        self.lab = lab

    def forward(self, z):
        zc = z.cpu()
        logp = self.lab.conditionals(zc).log()  # (B, L, V)
        copy = torch.full_like(logp, float("-inf")).scatter_(-1, zc.clamp_max(self.lab.V - 1)[..., None], 0.0)
        logp = torch.where((zc == self.lab.mask_id)[..., None], logp, copy)
        return torch.cat([logp, torch.full_like(logp[..., :1], float("-inf"))], -1).to(z.device)  # (B, L, V+1)


class _StateCache:
    """OracleAR's 'KV cache': the prior law of the next hidden state, (B, S)."""

    def __init__(self):
        self.prior = None


class OracleAR(nn.Module):
    """The exact next-token conditionals of a lab with tinydiff's AR model interface:
    idx (B, T) -> logits (B, T, V), row j = log p(x_{j+1} | idx_<=j), the first token read as a
    stationary symbol (so an end-of-text BOS means 'a sentence just ended'). With a cache from new_cache,
    idx continues the sequence at input_pos (as Transformer.forward with its KV cache)."""

    def __init__(self, lab):
        super().__init__()
        self.lab = lab

    def new_cache(self, batch_size, max_len=None, dtype=None):
        return _StateCache()

    def forward(self, idx, input_pos=None, cache=None, embeds=None):
        assert embeds is None, "the oracle has no embeddings"
        prior = None
        if cache is not None and input_pos is not None and int(input_pos[0]) > 0:
            prior = cache.prior  # continue the sequence
        _, prior, laws = self.lab._forward(idx.cpu(), prior=prior, pred=True)
        if cache is not None:
            cache.prior = prior
        return laws[:, 1:].log().to(idx.device)  # (B, T, V)


def oracle_targets(lab, x):
    """The exact TCS target of a lab (docs/lab.md §d): pi_i(v) = p(x_i = v | x_!=i) by forward-backward over its
    hidden states, for clean windows x (B, L) -> (ids, logp), each (B, L, |V|): every id stored, so no estimator
    and no tail draw (tau_i = pi_i exactly). fp32 log-probs on x's device."""
    logp = lab.conditionals(x).log().float()  # (B, L, V), computed in float64 on the CPU
    return torch.arange(lab.V, device=x.device).expand(*x.shape, lab.V), logp.to(x.device)
