"""TCS: distil an autoregressive (AR) teacher into a masked diffusion student (docs/tcs.md).

Target Concrete Score distillation ("Distilled Diffusion Language Models", ICLR 2025 submission;
published as "Target Concrete Score Matching", Zhang et al., ICML 2025). There is no public code;
this file is written from the math. For a clean window x (length L) the target at position i is the
teacher's full-context conditional

    pi_i(v) = p_AR(x_i = v | x_{!=i}),   log pi_i(v) = log_softmax_v [ log p_AR(v | x_<i) + S_i(v) ],
    S_i(v)  = sum_{j>i} log p_AR(x_j | x_<j with x_i := v)                  (the suffix score)

(Bayes' rule on the AR chain rule: the terms j < i do not depend on x_i and cancel). It depends on
neither t nor the mask pattern, so it is computed once per training window and cached. Estimators:
  exact   rescore all L*|V| substitutions (batched); for tests and short windows with small |V|.
  prefix  drop S_i: the next-token distribution; exact only at the last position.
  grad    first order (Gibbs-with-Gradients): S_i(v) - S_i(x_i) ~ (e_v - e_{x_i}) . g_i with
          g_i = d S_i / d e_i, the gradient of the suffix log-likelihood w.r.t. the input embedding of
          x_i; one forward + one backward gives every i, one (L x d)(d x V) matmul every v.
  topk    exact S_i (optionally over a suffix window of W tokens) for K candidates: the top K of the
          prefix distribution (default) or of grad. K = |V|, no window: exact.
All teacher work runs in fp32 with autocast off, whatever the training loop's dtype (a bf16 sum of
W log-probs per candidate is off by several percent of the target).

Sparse targets, unbiased. Targets are stored as ids (B, L, K+1) and log-probs (B, L, K+1): K ids
plus one slot, -inf log-prob for an empty slot. The student's optimum at a masked position is
E[tau_i | z_t] (tau_i = the stored target), and z_t (position i masked) is a function of x_{!=i} and
the mask pattern only, so E[tau_i | z_t] = E[ E[tau_i | x_{!=i}] | z_t ]: a sparse target whose mean
given x_{!=i} is the dense target q_i has exactly the dense target's optimum. Two schemes do that:
  (S) tail sample, for exact/prefix/grad (the whole q_i is known): keep q_i on T = its top K, not
      renormalised, and put the rest, 1 - q_i(T), on ONE token v* ~ q_i outside T.
      Proof: E_v*[tau_i] = q_T + (1 - q(T)) q_{not T} / (1 - q(T)) = q_i, for every x, so it holds
      whatever T depends on and whatever the data distribution is. v* is drawn by inverse CDF from a
      uniform of a generator seeded with the window's tokens (tail_uniforms): a window always gets
      the same targets (cacheable, reproducible), different windows independent draws.
  (B) label fallback, for topk (its exact scores exist on the candidates only: the normaliser over
      V is unknown, so q(T) is too): T chosen without looking at x_i (the top K of p_AR(. | x_<i));
      store pi renormalised on T when x_i is in T, the one-hot label when it is not.
      Proof (x_i ~ pi_i given x_{!=i}, teacher = data): E[tau_i | x_{!=i}] = pi(T) pi_T / pi(T)
      + sum_{u not in T} pi(u) e_u = pi_i. When teacher and data differ, the tail follows the data.
      With --candidates grad, T depends on x_i (the gradient is taken at the data sequence), so (B)
      is not exactly unbiased: docs/tcs.md measures the residual on the harness; prefix is the default.
The old scheme (top K with x_i forced in, renormalised) is biased: the set depends on the label, so
a token outside the top K gets E[tau(v)] ~ pi(v)^2 / (M + pi(v)) instead of pi(v) (M = top-K mass).
Variance: (S) adds (1 - M)^2 (1 - sum_v r_v^2) per position (r = the renormalised tail), (B) falls
back to the label with probability 1 - M; at K = 1, (B) is the label itself.

Teacher input. Position 0 needs a context for log p_AR(x_0): the teacher reads the eot token as a
BOS prefix, (eot, x_0, ..., x_{L-2}) -> predictions of (x_0, ..., x_{L-1}). The AR models here are
trained on eot-joined documents with random windows, so "eot then x" means "a document starts
here": near the start of a window that is usually mid-document, the teacher's prefix term is biased
toward document-start statistics (the suffix terms of later positions correct most of it). The
window needs L <= the teacher's context.

Loss, at masked positions, with the NELBO's weight w(t) = 1/t (MDLM, Sahoo et al. 2024, eq. 10):
    L = (1 - lam) * NELBO + lam * L_TCS,   L_TCS = E_t w(t) sum_{i masked} sum_v tau_i(v) (-log p_theta(v | z_t))
i.e. a soft-target cross-entropy on (1 - lam) onehot(x_i) + lam tau_i; tau = onehot(x) gives the MDLM
loss exactly. For fixed z_t the minimiser is E[tau_i | z_t] = p(x_i | z_t) when the teacher is the
data distribution: a Rao-Blackwellised, lower-variance version of the one-hot label.

Cache. Targets depend only on the window, so windows are drawn on a fixed chunk grid over train.bin
(offsets k*L, `grid_batch`): in memory (TargetCache, the teacher work for a chunk is done once per
run) or on disk for a fixed set of windows (tinydiff/tcs_cache.py: once across runs, lambdas, seeds
and students).
"""
import contextlib
import hashlib

import numpy as np
import torch

from .common import UserError, load_checkpoint, model_from_checkpoint
from .common import tokenizer_key
from .diffusion import get_schedule, masked_log_probs
from .model import Transformer

ESTIMATORS = ("exact", "prefix", "grad", "topk")


# ----------------------------------------------------------------------------- teacher scores

def ar_inputs(x, bos_id):
    """Teacher input for windows x (B, L): (bos, x_0, ..., x_{L-2}); output row j predicts x_j."""
    bos = torch.full_like(x[:, :1], bos_id)  # (B, 1)
    return torch.cat([bos, x[:, :-1]], dim=1)  # (B, L)


def _upcast(logits):
    """At least fp32: bf16/fp16 logits from autocast are upcast, fp32/fp64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _log_softmax(logits):
    return _upcast(logits).log_softmax(-1)


def token_log_probs(logits, seq):
    """log p(seq_j | seq_<j) from teacher logits (n, T, V) and the tokens they predict (n, T) -> (n, T),
    without materialising the whole log-softmax: logit of the token minus the log normaliser."""
    logits = _upcast(logits)
    return logits.gather(-1, seq[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (n, T)


def rescore(teacher, x, cand, bos_id, vocab_size, window=None, max_elems=2 ** 24, use_cache=None):
    """Exact substitution scores: out[b, i, k] = sum_{j=i}^{i+W} log p_AR(x'_j | x'_<j) where x' is
    x[b] with x_i := cand[b, i, k]. The j = i term is the prefix term log p_AR(v | x_<i), so
    log_softmax over k of the result is pi_i restricted to the candidates (window=None: whole suffix).
    x (B, L), cand (B, L, K) -> (B, L, K); about max_elems teacher logits (and cached keys/values) at
    a time, never B*L*V*L. A tinydiff Transformer teacher takes the KV-cache path (use_cache=None:
    automatic), any other causal model `teacher(idx) -> logits` the generic one.
    """
    W = x.shape[1] if window is None else window
    if use_cache is None:
        use_cache = isinstance(teacher, Transformer) and teacher.cfg.causal
    if use_cache:
        return _rescore_cached(teacher, x, cand, bos_id, W, max_elems)
    return _rescore_full(teacher, x, cand, bos_id, vocab_size, W, max_elems)


def _rescore_full(teacher, x, cand, bos_id, vocab_size, W, max_elems):
    """Generic rescoring: every substituted sequence is run through the teacher from its start. The
    B*L*K jobs are sorted by position so that with a window each chunk is cut after the last token it
    needs (a causal teacher ignores what comes after)."""
    B, L, K = cand.shape
    dev = x.device
    pos = torch.arange(L, device=dev).repeat_interleave(B * K)  # (N,) position i of each job, sorted
    row = torch.arange(B, device=dev).repeat_interleave(K).repeat(L)  # (N,) which window
    tok = cand.transpose(0, 1).reshape(-1)  # (N,) substituted token, same (L, B, K) order
    N, out, s = len(pos), [], 0
    end_of = lambda e: min(L, (e - 1) // (B * K) + W + 1)  # tokens needed by jobs [s, e): job j is at i = j // BK
    while s < N:
        e = min(N, s + max(1, max_elems // (vocab_size * end_of(s + 1))))
        while e - s > 1 and (e - s) * end_of(e) * vocab_size > max_elems:  # the chunk grew longer: shrink
            e = s + max(1, max_elems // (vocab_size * end_of(e)))
        T, n = end_of(e), e - s
        seq = x[row[s:e], :T].clone()  # (n, T)
        seq[torch.arange(n, device=dev), pos[s:e]] = tok[s:e]  # x_i := v
        lp = token_log_probs(teacher(ar_inputs(seq, bos_id)), seq)  # (n, T)
        j = torch.arange(T, device=dev)[None]  # (1, T)
        keep = (j >= pos[s:e, None]) & (j <= pos[s:e, None] + W)  # (n, T): terms i .. i+W
        out.append((lp * keep).sum(1))  # (n,)
        s = e
    return torch.cat(out).view(L, B, K).transpose(0, 1)  # (B, L, K)


def _rescore_cached(teacher, x, cand, bos_id, W, max_elems):
    """rescore() for a tinydiff Transformer: the clean sequence's keys/values are computed once (a KV
    cache); substitution (i, v) then reuses the cached prefix x_<i and runs only its own W tokens
    (v, x_{i+1}, ..., x_{i+W-1}) through the teacher, about L/W times less work than from scratch.
    The K candidates of a window attend to its one copy of the prefix (Transformer's prefix=): no per-row copy."""
    B, L, K = cand.shape
    dev, cfg = x.device, teacher.cfg
    clean = teacher.new_cache(B, L)
    logits = teacher(ar_inputs(x, bos_id), input_pos=torch.arange(L, device=dev), cache=clean)  # (B, L, V)
    V = logits.shape[-1]
    out = _log_softmax(logits).gather(-1, cand)  # (B, L, K): the j = i term, log p(v | x_<i)
    for i in range(L - 1):
        w = min(W, L - 1 - i)  # suffix terms j = i+1 .. i+w
        if w <= 0:
            break
        # teacher input position p holds x_{p-1}: positions 0..i (BOS, x_<i) come from the clean cache,
        # positions i+1..i+w are fed (v, x_{i+1}, ..., x_{i+w-1}) and predict x_{i+1} .. x_{i+w}
        feed = x[:, None, i:i + w].repeat(1, K, 1)  # (B, K, w)
        feed[:, :, 0] = cand[:, i]
        target = x[:, None, i + 1:i + w + 1].expand(B, K, w)  # (B, K, w)
        pos = torch.arange(i + 1, i + w + 1, device=dev)  # (w,)
        per_window = K * w * (V + 4 * cfg.n_embd + cfg.n_head * (i + w + 1))  # logits, activations, attention
        step = max(1, max_elems // per_window)  # windows per call
        for s in range(0, B, step):
            # (b, K, w, V): the K substitutions of each window attend to its one cached prefix (Transformer's prefix)
            lg = teacher(feed[s:s + step], input_pos=pos, prefix=(clean, slice(s, s + step), i + 1))
            out[s:s + step, i] += token_log_probs(lg, target[s:s + step]).sum(-1)  # (b, K)
    return out


def grad_suffix(teacher, x, bos_id):
    """First-order suffix scores (`grad`). Returns (prefix, delta), both (B, L, V):
    prefix[b, i, v] = log p_AR(v | x_<i) and delta[b, i, v] ~ S_i(v) - S_i(x_i) = (e_v - e_{x_i}) . g_i.

    x_i enters the teacher only as the input embedding at position i+1, which feeds the predictions
    of x_{i+1}, ..., x_{L-1}: so the gradient of the whole log-likelihood w.r.t. that input is exactly
    g_i, the gradient of the suffix log-likelihood (the prefix term log p(x_i | x_<i) reaches x_i only
    through the output head, not through this input). x_{L-1} is not an input: g_{L-1} = 0.
    """
    emb = getattr(teacher, "tok_emb", None)
    if not isinstance(emb, torch.nn.Embedding):
        raise ValueError("the grad estimator (and topk with --candidates grad) needs a teacher with input "
                         "embeddings `tok_emb` that accepts `embeds=`: use --estimator prefix/topk --candidates prefix")
    E = emb.weight.detach()  # (V_in, d)
    e = E[ar_inputs(x, bos_id)].clone().requires_grad_(True)  # (B, L, d)
    with torch.enable_grad():
        logits = teacher(embeds=e)  # (B, L, V)
        ll = token_log_probs(logits, x)  # (B, L): log p(x_j | x_<j)
        (g,) = torch.autograd.grad(ll.sum(), e)  # (B, L, d); row i+1 belongs to x_i
    V = logits.shape[-1]
    g = torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], dim=1).to(E.dtype)  # (B, L, d): g_i of token x_i
    delta = g @ E[:V].T - (g * E[x]).sum(-1, keepdim=True)  # (B, L, V): (e_v - e_{x_i}) . g_i
    return _log_softmax(logits.detach()), delta


def prefix_log_probs(teacher, x, bos_id):
    """log p_AR(v | x_<i) for every position, (B, L, V): one teacher forward."""
    return _log_softmax(teacher(ar_inputs(x, bos_id)))


def dense_targets(teacher, x, bos_id, estimator, max_elems=2 ** 24):
    """The whole target distribution log q_i(v), (B, L, V), of estimator exact, prefix or grad."""
    if estimator == "prefix":
        return prefix_log_probs(teacher, x, bos_id)
    if estimator == "grad":
        prefix, delta = grad_suffix(teacher, x, bos_id)  # (B, L, V) each
        return (prefix + delta).log_softmax(-1)
    if estimator == "exact":
        V = prefix_log_probs(teacher, x[:1], bos_id).shape[-1]  # the teacher's vocabulary
        return rescore(teacher, x, all_ids(x, V), bos_id, V, None, max_elems).log_softmax(-1)
    raise ValueError(f"no dense distribution for estimator {estimator!r}")


def all_ids(x, V):
    return torch.arange(V, device=x.device).expand(*x.shape, V)  # (B, L, V)


def tail_uniforms(x):
    """One uniform in (0, 1] per position, (B, L) float64 on x's device, from a CPU generator seeded with
    a hash of the window's tokens: the same window always draws the same tail tokens, on any device."""
    u = torch.empty(x.shape, dtype=torch.float64)
    for b, row in enumerate(x.cpu().numpy().astype(np.int64)):
        seed = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
        u[b] = 1 - torch.rand(x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u.to(x.device)


def tail_sample(logq, k, u):
    """Scheme (S) (module docstring): the dense targets log q (B, L, V) -> sparse (ids, logp), each
    (B, L, k+1): q on its top k (not renormalised) and the tail mass on one token v* drawn from q
    restricted to the other ids, by inverse CDF at u (B, L) in (0, 1]. E over u of the stored target
    is q exactly. k <= 0 or k >= V: everything, (ids = arange(V), logq)."""
    B, L, V = logq.shape
    if k <= 0 or k >= V:
        return all_ids(logq[..., 0], V), logq
    head = logq.topk(k, dim=-1)  # values/indices (B, L, k)
    tail_ids, tail_logp = [], []
    rows = max(1, 2 ** 24 // (L * V))  # windows at a time: the fp64 CDF stays below 2^24 entries
    for s in range(0, B, rows):
        tail = logq[s:s + rows].double().exp().scatter(-1, head.indices[s:s + rows], 0.0)  # (b, L, V): q outside T
        cdf = tail.cumsum(-1)  # (b, L, V), fp64: the sampling needs it
        mass = cdf[..., -1:]  # (b, L, 1) = 1 - q(T), summed so that the stored target sums to sum q
        # the first id whose CDF reaches u * mass: u > 0, so an id of positive tail probability
        tail_ids.append(torch.searchsorted(cdf, u[s:s + rows, :, None].to(cdf.dtype) * mass).clamp_max(V - 1))
        tail_logp.append(mass.log().to(logq.dtype))  # (b, L, 1); -inf when T holds all the mass
    return torch.cat([head.indices, torch.cat(tail_ids)], -1), torch.cat([head.values, torch.cat(tail_logp)], -1)


def label_fallback(scores, cand, x):
    """Scheme (B) (module docstring): exact unnormalised scores (B, L, K) of candidates cand (B, L, K)
    that were chosen without looking at x_i -> (ids, logp), each (B, L, K+1): the scores renormalised
    on the candidates when x_i is one of them (last slot empty), else the one-hot label in the last slot."""
    inside = (cand == x[..., None]).any(-1, keepdim=True)  # (B, L, 1)
    neg_inf = torch.full_like(scores[..., :1], float("-inf"))  # (B, L, 1)
    head = torch.where(inside, scores.log_softmax(-1), neg_inf)  # (B, L, K)
    label = torch.where(inside, neg_inf, torch.zeros_like(neg_inf))  # (B, L, 1)
    return torch.cat([cand, x[..., None]], -1), torch.cat([head, label], -1)


def _fp32(device):
    """Autocast off (on the device and the CPU): the teacher's scores are summed and sampled in fp32."""
    stack = contextlib.ExitStack()
    for kind in {torch.device(device).type, "cpu"}:
        if kind in ("cpu", "cuda", "mps", "xpu"):
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


@torch.no_grad()
def tcs_targets(teacher, x, bos_id, estimator="topk", topk=16, window=None, candidates="prefix", max_elems=2 ** 24,
                u=None):
    """Sparse, unbiased TCS targets for clean windows x (B, L): (ids (B, L, K') int64, logp (B, L, K') fp32+),
    K' = topk + 1, or |V| when topk <= 0 or >= |V| (everything, exact for `exact`/`topk`).

    exact/prefix/grad: the whole distribution, stored by scheme (S) with tail uniforms u (B, L)
    (default: seeded by each window's tokens, tail_uniforms). topk: the top `topk` candidates of
    `candidates` (prefix: independent of x_i, exactly unbiased; grad: see the module docstring),
    rescored exactly over a suffix window `window` (None: all), stored by scheme (B). Runs in fp32
    with autocast off.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown TCS estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    with _fp32(x.device):
        if estimator != "topk":
            logq = dense_targets(teacher, x, bos_id, estimator, max_elems)  # (B, L, V)
            return tail_sample(logq, topk, tail_uniforms(x) if u is None else u)
        if candidates == "grad":
            prefix, delta = grad_suffix(teacher, x, bos_id)  # (B, L, V) each
            proposal = prefix + delta
        elif candidates == "prefix":
            proposal = prefix_log_probs(teacher, x, bos_id)  # (B, L, V): depends on x_<i only
        else:
            raise ValueError(f"unknown candidates {candidates!r}: choose prefix or grad")
        V = proposal.shape[-1]
        if topk <= 0 or topk >= V:  # every id is a candidate: the exact distribution (over the window)
            ids = all_ids(x, V)
            return ids, rescore(teacher, x, ids, bos_id, V, window, max_elems).log_softmax(-1)
        cand = proposal.topk(topk, dim=-1).indices  # (B, L, K)
        return label_fallback(rescore(teacher, x, cand, bos_id, V, window, max_elems), cand, x)



def to_dense(ids, logp, vocab_size):
    """Sparse targets -> probabilities (B, L, vocab_size), zero outside the stored ids (a repeated id's
    slots add up: an empty slot may repeat an id)."""
    out = torch.zeros(*ids.shape[:-1], vocab_size, dtype=logp.dtype, device=ids.device)  # (B, L, vocab_size)
    return out.scatter_add_(-1, ids, logp.exp())


# ----------------------------------------------------------------------------- loss

def tcs_terms(logits, x, z, t, ids, logp, mask_id, lam=1.0, schedule=None):
    """Per-position loss integrands, each (B, L): (mixed, nelbo, tcs) with
    nelbo = w(t) [z_i = m] (-log p_theta(x_i | z_t))                  (diffusion.nelbo_terms),
    tcs   = w(t) [z_i = m] sum_k tau_i(k) (-log p_theta(ids_k | z_t))  (soft-target cross-entropy),
    mixed = (1 - lam) nelbo + lam tcs. The sparse target tau = exp(logp) need not be renormalised over
    ids (scheme (S) is not), ids may repeat and empty slots have logp = -inf (no mass, no NaN). The
    targets never put mass on the student's [MASK] id (not a teacher token; -inf under SUBS)."""
    schedule = get_schedule(schedule)
    logp_s = masked_log_probs(logits, mask_id)  # (B, L, V+1), -inf at the mask id
    w, masked = schedule.weight(t)[:, None], z == mask_id  # (B, 1) w(t) (log-linear: 1/t); (B, L)
    p = logp.exp().to(logp_s.dtype)  # (B, L, K')
    # where, not a product with the mask: a clean position may carry -log p = inf (0 * inf = nan)
    nelbo = torch.where(masked, w * -logp_s.gather(-1, x[..., None]).squeeze(-1), 0.0)  # (B, L)
    tcs = torch.where(masked, w * -torch.where(p > 0, p * logp_s.gather(-1, ids), 0.0).sum(-1), 0.0)  # (B, L)
    return (1 - lam) * nelbo + lam * tcs, nelbo, tcs


def tcs_loss(model, x, z, t, ids, logp, mask_id, lam, schedule=None):
    """The training loss on a clean batch x (B, L) noised to z at times t (as for MDLM: sample_times, forward_mask;
    lam = 0 is train.py's MDLM loss) with its targets (ids, logp). Returns (loss per token, logs) where logs hold
    the data-only NELBO and the TCS term."""
    mixed, nelbo, tcs = tcs_terms(model(z), x, z, t, ids, logp, mask_id, lam, schedule)
    n = x.numel()
    return mixed.sum() / n, {"nelbo": nelbo.detach().sum() / n, "tcs": tcs.detach().sum() / n}


# ----------------------------------------------------------------------------- the teacher

def load_teacher(path, student_tok, student_vocab, window, device):
    """Load the AR teacher (EMA weights when present), refusing anything that cannot teach this student."""
    ckpt = load_checkpoint(path, kind="ar", what=f"--teacher {path} of TCS")
    check_tokenizers(ckpt["tokenizer"], student_tok, student_vocab, path)
    if ckpt["config"]["seq_len"] < window:
        raise UserError(f"TCS window {window} is longer than the teacher's context {ckpt['config']['seq_len']}: "
                        f"use --seq_len {ckpt['config']['seq_len']} or less")
    teacher = model_from_checkpoint(ckpt, device).requires_grad_(False)
    return teacher, ckpt


def check_tokenizers(teacher_tok, student_tok, student_vocab, path="--teacher"):
    """Teacher and student must share the tokenizer: the targets are distributions over its ids.
    teacher_tok: the teacher checkpoint's spec; student_tok: a spec or a tokenizer name. Compared by key:
    two bpe tokenizers are the same only with the same merges."""
    student_tok = {"name": student_tok} if isinstance(student_tok, str) else student_tok
    teacher, student = tokenizer_key(teacher_tok), tokenizer_key(student_tok)
    if teacher != student or teacher_tok["vocab_size"] + 1 != student_vocab:
        raise UserError(f"tokenizer mismatch: the teacher {path} uses {teacher} "
                        f"({teacher_tok['vocab_size']} ids) but the student uses {student} "
                        f"({student_vocab - 1} ids + [MASK]); TCS needs the same tokenizer (bpe: the same merges): "
                        f"pass --tokenizer {teacher_tok['name']}, or train the teacher with --tokenizer "
                        f"{student_tok['name']}")
