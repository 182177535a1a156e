"""TCS: distil an autoregressive (AR) teacher into a masked diffusion student (design.md §7).

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
  topk    candidates = top-K of grad (or prefix) plus x_i; exact S_i for those (optionally over a
          suffix window of W tokens), renormalised over the candidates. K = |V|, no window: exact.
Targets are stored sparse: ids (B, L, K') and log-probs (B, L, K').

Teacher input. Position 0 needs a context for log p_AR(x_0): the teacher reads the eot token as a
BOS prefix, (eot, x_0, ..., x_{L-2}) -> predictions of (x_0, ..., x_{L-1}). The AR models here are
trained on eot-joined documents with random windows, so "eot then x" means "a document starts
here": near the start of a window that is usually mid-document, the teacher's prefix term is biased
toward document-start statistics (the suffix terms of later positions correct most of it). The
window needs L <= the teacher's context.

Loss (design.md §7), at masked positions, with the NELBO's weight w(t) = 1/t:
    L = (1 - lam) * NELBO + lam * L_TCS,   L_TCS = E_t w(t) sum_{i masked} sum_v pi_i(v) (-log p_theta(v | z_t))
i.e. a soft-target cross-entropy on (1 - lam) onehot(x_i) + lam pi_i; pi = onehot(x) gives the MDLM
loss exactly. For fixed z_t the minimiser is E[pi_i | z_t] = p(x_i | z_t) when the teacher is the data
distribution: a Rao-Blackwellised, lower-variance version of the one-hot label.

Cache. Targets depend only on the window, so windows are drawn on a fixed chunk grid over train.bin
(offsets k*L, `grid_batch`) and each chunk's targets are kept in memory: the teacher work for a chunk
is done once however many epochs the run makes. Windows that are not on the grid still work (a
cache miss each time).
"""
import time

import torch

from .common import UserError, load_checkpoint, model_from_checkpoint
from .data import DataError, _open_split, tokenizer_key, windows_at
from .diffusion import LogLinearSchedule, forward_mask, masked_log_probs, sample_times
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
    (v, x_{i+1}, ..., x_{i+W-1}) through the teacher, about L/W times less work than from scratch."""
    B, L, K = cand.shape
    dev, cfg = x.device, teacher.cfg
    clean = teacher.new_cache(B, L)
    logits = teacher(ar_inputs(x, bos_id), input_pos=torch.arange(L, device=dev), cache=clean)  # (B, L, V)
    V = logits.shape[-1]
    out = _log_softmax(logits).gather(-1, cand)  # (B, L, K): the j = i term, log p(v | x_<i)
    rows = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,) window of each rescored row
    for i in range(L - 1):
        w = min(W, L - 1 - i)  # suffix terms j = i+1 .. i+w
        if w <= 0:
            break
        # teacher input position p holds x_{p-1}: positions 0..i (BOS, x_<i) come from the clean cache,
        # positions i+1..i+w are fed (v, x_{i+1}, ..., x_{i+w-1}) and predict x_{i+1} .. x_{i+w}
        feed = x[rows, i:i + w].clone()  # (B*K, w)
        feed[:, 0] = cand[:, i].reshape(-1)
        target = x[rows, i + 1:i + w + 1]  # (B*K, w)
        pos = torch.arange(i + 1, i + w + 1, device=dev)  # (w,)
        step = max(1, max_elems // (w * V + 2 * cfg.n_layer * cfg.n_embd * (i + w + 1)))  # rows per call
        scores = []
        for s in range(0, B * K, step):
            r = rows[s:s + step]
            cache = teacher.new_cache(len(r), i + w + 1)
            cache.k[:, :, :, :i + 1] = clean.k[:, r, :, :i + 1]  # (n_layer, n, H, i+1, hd)
            cache.v[:, :, :, :i + 1] = clean.v[:, r, :, :i + 1]
            lp = token_log_probs(teacher(feed[s:s + step], input_pos=pos, cache=cache), target[s:s + step])  # (n, w)
            scores.append(lp.sum(1))  # (n,)
        out[:, i] += torch.cat(scores).view(B, K)
    return out


def grad_suffix(teacher, x, bos_id):
    """First-order suffix scores (design.md §7, `grad`). Returns (prefix, delta), both (B, L, V):
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


def candidate_ids(score, x, k):
    """The k best-scoring ids plus the true token: top-(k+1) with x_i forced in, so the set always
    contains top-k U {x_i} (one spare slot when x_i is already in the top k). score (B, L, V) -> (B, L, K')."""
    V = score.shape[-1]
    if k <= 0 or k + 1 >= V:
        return torch.arange(V, device=x.device).expand(*x.shape, V)  # (B, L, V): everything
    forced = score.scatter(-1, x[..., None], float("inf"))  # (B, L, V)
    return forced.topk(k + 1, dim=-1).indices  # (B, L, k+1)


@torch.no_grad()
def tcs_targets(teacher, x, bos_id, estimator="topk", topk=16, window=None, candidates="grad", max_elems=2 ** 24):
    """Sparse TCS targets for clean windows x (B, L): (ids (B, L, K') int64, logp (B, L, K')), where
    logp are log pi_i over the stored ids (they sum to one in probability).

    exact/prefix/grad compute the whole distribution and keep the top `topk` ids plus x_i,
    renormalised (topk <= 0 or >= |V| - 1: keep all |V|, ids = arange). topk rescores the top `topk`
    candidates of `candidates` (grad or prefix) plus x_i exactly, over a suffix window `window`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown TCS estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    if estimator == "grad" or (estimator == "topk" and candidates == "grad"):
        prefix, delta = grad_suffix(teacher, x, bos_id)  # (B, L, V) each
        proposal = prefix + delta
    else:
        prefix = _log_softmax(teacher(ar_inputs(x, bos_id)))  # (B, L, V)
        proposal = prefix
    V = prefix.shape[-1]
    if estimator in ("prefix", "grad"):
        full = proposal.log_softmax(-1)  # (B, L, V)
    elif estimator == "exact":
        ids = torch.arange(V, device=x.device).expand(*x.shape, V)  # (B, L, V)
        full = rescore(teacher, x, ids, bos_id, V, None, max_elems).log_softmax(-1)
    else:  # topk: exact scores of the candidates only
        ids = candidate_ids(proposal, x, topk)  # (B, L, K')
        return ids, rescore(teacher, x, ids, bos_id, V, window, max_elems).log_softmax(-1)
    ids = candidate_ids(full, x, topk)  # (B, L, K') sparse storage
    return ids, full.gather(-1, ids).log_softmax(-1)


def to_dense(ids, logp, vocab_size):
    """Sparse targets -> probabilities (B, L, vocab_size), zero outside the stored ids."""
    return torch.zeros(*ids.shape[:-1], vocab_size, dtype=logp.dtype, device=ids.device).scatter_(-1, ids, logp.exp())


# ----------------------------------------------------------------------------- loss

def tcs_terms(logits, x, z, t, ids, logp, mask_id, lam=1.0, schedule=None):
    """Per-position loss integrands, each (B, L): (mixed, nelbo, tcs) with
    nelbo = w(t) [z_i = m] (-log p_theta(x_i | z_t))                  (diffusion.nelbo_terms),
    tcs   = w(t) [z_i = m] sum_v pi_i(v) (-log p_theta(v | z_t))      (soft-target cross-entropy),
    mixed = (1 - lam) nelbo + lam tcs. The targets never put mass on the student's [MASK] id (it is
    not a teacher token), whose log-prob is -inf under SUBS."""
    schedule = schedule or LogLinearSchedule()
    logp_s = masked_log_probs(logits, mask_id)  # (B, L, V+1), -inf at the mask id
    w = schedule.weight(t)[:, None] * (z == mask_id)  # (B, L): 1/t at masked positions, else 0
    nelbo = w * -logp_s.gather(-1, x[..., None]).squeeze(-1)  # (B, L)
    tcs = w * -(logp.exp().to(logp_s.dtype) * logp_s.gather(-1, ids)).sum(-1)  # (B, L)
    return (1 - lam) * nelbo + lam * tcs, nelbo, tcs


def tcs_loss(model, x, ids, logp, mask_id, lam, generator=None, schedule=None, eps_t=1e-3):
    """The training loss on a clean batch x (B, L) with its targets: draws t and z_t exactly as
    diffusion.nelbo_loss does (same generator calls, so lam = 0 reproduces train.py's MDLM).
    Returns (loss per token, logs) where logs hold the data-only NELBO and the TCS term."""
    schedule = schedule or LogLinearSchedule()
    t = sample_times(x.shape[0], generator, x.device, eps_t)  # (B,)
    z = forward_mask(x, t, schedule, mask_id, generator)  # (B, L)
    mixed, nelbo, tcs = tcs_terms(model(z), x, z, t, ids, logp, mask_id, lam, schedule)
    n = x.numel()
    return mixed.sum() / n, {"nelbo": nelbo.detach().sum() / n, "tcs": tcs.detach().sum() / n}


# ----------------------------------------------------------------------------- cache and chunk grid

class TargetCache:
    """Sparse targets of every window seen, keyed by its tokens (so the key is the chunk), on the CPU.
    Stops adding (but keeps serving) once max_bytes is reached."""

    def __init__(self, compute, max_bytes=1 << 30):
        self.compute, self.max_bytes = compute, max_bytes
        self.store, self.nbytes, self.hits, self.misses, self.seconds = {}, 0, 0, 0, 0.0

    def __call__(self, x):
        """x (B, L) -> (ids (B, L, K'), logp (B, L, K')) on x's device; computes only the misses."""
        keys = [r.tobytes() for r in x.cpu().numpy()]
        miss = [b for b, k in enumerate(keys) if k not in self.store]
        hit = [b for b, k in enumerate(keys) if k in self.store]
        self.hits, self.misses = self.hits + len(hit), self.misses + len(miss)
        if not miss:
            return self._stack([keys[b] for b in hit], x.device)
        ids, logp = self._compute(x[miss])  # (b, L, K') each, b = #misses
        self._keep([keys[b] for b in miss], ids, logp)
        if not hit:
            return ids, logp
        cached_ids, cached_logp = self._stack([keys[b] for b in hit], x.device)
        out_ids = torch.empty((len(keys),) + ids.shape[1:], dtype=torch.long, device=x.device)  # (B, L, K')
        out_logp = torch.empty((len(keys),) + logp.shape[1:], dtype=logp.dtype, device=x.device)  # (B, L, K')
        out_ids[miss], out_logp[miss] = ids, logp
        out_ids[hit], out_logp[hit] = cached_ids, cached_logp
        return out_ids, out_logp

    def _stack(self, keys, device):
        ids = torch.stack([self.store[k][0] for k in keys]).to(device, torch.long)  # (b, L, K')
        logp = torch.stack([self.store[k][1] for k in keys]).to(device)  # (b, L, K')
        return ids, logp

    def _compute(self, x):
        t0 = time.perf_counter()
        out = self.compute(x)
        self.seconds += time.perf_counter() - t0
        return out

    def _keep(self, keys, ids, logp):
        ids_c, logp_c = ids.to("cpu", torch.int32), logp.cpu()
        for k, i, lp in zip(keys, ids_c, logp_c):
            size = i.numel() * 4 + lp.numel() * lp.element_size()
            if self.nbytes + size > self.max_bytes:
                return
            self.store[k] = (i.clone(), lp.clone())  # clone: do not pin the whole batch's storage
            self.nbytes += size

    def stats(self):
        return {"chunks": len(self.store), "hits": self.hits, "misses": self.misses, "mb": self.nbytes / 2 ** 20,
                "teacher_seconds": self.seconds}


def grid_batch(data_dir, split, batch_size, seq_len, generator=None, device="cpu"):
    """Like data.get_batch, but windows start on the fixed chunk grid 0, L, 2L, ... of the split, so a
    window's TCS targets can be cached and reused in later epochs."""
    data = _open_split(data_dir, split)
    n_chunks = len(data) // seq_len
    if n_chunks < 1:
        raise DataError(f"{split} split of {data_dir} has {len(data)} tokens, fewer than seq_len = {seq_len}")
    ix = torch.randint(n_chunks, (batch_size,), generator=generator) * seq_len  # (B,) chunk starts
    return windows_at(data, ix, seq_len, device)


# ----------------------------------------------------------------------------- distill.py plumbing

def _add(parser, flag, **kw):
    """Add a flag unless the script already defines it (--teacher is shared with SDTT)."""
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kw)


def add_tcs_args(parser):
    """The flags of distill.py --method tcs."""
    _add(parser, "--teacher", default=None, help="teacher checkpoint (TCS: an AR model from train.py --model ar)")
    _add(parser, "--init", default="scratch",
         help="TCS student: 'scratch' (fresh MDLM, size from --n_layer/--n_head/--n_embd, default the teacher's) "
              "or an MDLM checkpoint to fine-tune")
    _add(parser, "--estimator", default="topk", choices=list(ESTIMATORS),
         help="TCS target estimator: exact (all L*|V| substitutions), prefix (next-token only), "
              "grad (first order), topk (exact rescoring of K candidates)")
    _add(parser, "--topk", type=int, default=16,
         help="TCS: candidates (topk) / stored ids (other estimators) per position, plus the true token; 0 = all")
    _add(parser, "--window", type=int, default=None, help="TCS topk: suffix tokens rescored after i (default: all)")
    _add(parser, "--candidates", default="grad", choices=["grad", "prefix"], help="TCS topk: how candidates are proposed")
    _add(parser, "--tcs_lambda", type=float, default=1.0,
         help="TCS weight lam: loss = (1 - lam) NELBO + lam TCS (0 = plain MDLM)")
    _add(parser, "--tcs_cache_mb", type=float, default=1024, help="TCS: memory for cached targets (MiB, 0 = no cache)")
    _add(parser, "--teacher_elems", type=int, default=0,
         help="TCS: teacher logits per rescoring chunk (0 = auto: 2^24 on CPU, 2^27 on GPU)")
    for flag, what in (("--n_layer", "blocks"), ("--n_head", "heads"), ("--n_embd", "width")):
        _add(parser, flag, type=int, default=None, help=f"TCS student from scratch: {what} (default: the teacher's)")


def load_teacher(path, student_tok, student_vocab, window, device):
    """Load the AR teacher (EMA weights when present), refusing anything that cannot teach this student."""
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "ar":
        raise UserError(f"--teacher {path} is a {ckpt['kind']} model: TCS needs an AR teacher "
                        f"(train one with train.py --model ar)")
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


def build_tcs(args, student, device, run):
    """Everything distill.py --method tcs hands to loop.train: (loss_fn, hooks, meta_extra).
    Sets run["get_batch"] = grid_batch so a loop that honours it draws chunk-aligned windows."""
    mask_id = student.cfg.vocab_size - 1
    # the student's tokenizer: its spec from distill.py (bpe: with the merges' hash), else the --tokenizer name
    teacher, ckpt = load_teacher(args.teacher, run.get("tokenizer", args.tokenizer), student.cfg.vocab_size,
                                 run["window"], device)
    bos_id = ckpt["tokenizer"]["eot_id"]
    if args.estimator == "exact" and run["window"] * ckpt["config"]["vocab_size"] > 1e5:
        print(f"warning: exact TCS targets rescore {run['window']} x {ckpt['config']['vocab_size']} sequences "
              f"per window: use --estimator topk for anything but tiny settings")
    max_elems = args.teacher_elems or (2 ** 27 if str(device).startswith("cuda") else 2 ** 24)

    def compute(x):
        if args.tcs_lambda == 0:  # plain MDLM through the same code path: no teacher work at all
            return x[..., None], torch.zeros(*x.shape, 1, device=x.device)  # pi = onehot(x)
        return tcs_targets(teacher, x, bos_id, args.estimator, args.topk, args.window, args.candidates, max_elems)

    cache = TargetCache(compute, int(args.tcs_cache_mb * 2 ** 20)) if args.tcs_cache_mb > 0 else compute
    run["get_batch"] = grid_batch

    def loss_fn(fwd, x, gen):
        ids, logp = cache(x)  # (B, L, K') each, no gradient
        return tcs_loss(fwd, x, ids, logp, mask_id, args.tcs_lambda, gen)

    def cache_hook(it, state):
        return {"tcs_cache": cache.stats()} if isinstance(cache, TargetCache) else None

    meta_extra = {"tcs": {"teacher": args.teacher, "teacher_config": ckpt["config"], "bos_id": bos_id,
                          "estimator": args.estimator, "topk": args.topk, "window": args.window,
                          "candidates": args.candidates, "lambda": args.tcs_lambda, "chunk_grid": run["window"]}}
    return loss_fn, (cache_hook,), meta_extra
