"""Samplers: the diffusion ancestral sampler (docs/mdlm.md §6; MDLM eq. 7) and the AR sampler with a static
KV cache.

Both take any callable `model(tokens) -> logits (B, T, V)` and return (tokens, nfe), where nfe counts
network evaluations. All random draws are float64: fp32 Gumbel noise truncates its tail, which
silently lowers the temperature (Zheng et al. 2024: MDLM 2048-step gen PPL 31 in fp32 vs 126 in fp64).
"""
import torch

from .diffusion import get_schedule


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Temperature, top-k and nucleus (top-p) filtering of logits (n, V), in float64."""
    logits = logits.double()  # (n, V); may alias the input, so only out-of-place ops on it below
    if temperature != 1.0:  # x / 1 == x exactly: skip a full pass over (n, V) in the common case
        logits = logits / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (n, V)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token once the tokens before it
        # already reach it (>=, not >: with mass exactly top_p before it, it is not needed), and
        # always keep the most likely one
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_tokens(logits, generator=None, temperature=1.0, top_k=0, top_p=1.0):
    """One categorical draw per row of logits (n, V) -> (n,), by Gumbel-max in float64.
    temperature 0 means argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits, temperature, top_k, top_p)  # (n, V) float64
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)  # (n, V)
    gumbel = u.log_().neg_().log_().neg_()  # -log(-log u) in place (same values, no new (n, V) buffers); u = 0 -> -inf
    return gumbel.add_(logits).argmax(-1)


@torch.no_grad()
def reveal_tokens(x, logits, rows, mask_id, generator=None, temperature=1.0, top_k=0, top_p=1.0):
    """One ancestral reveal, in place: x[rows] <- a float64 draw from softmax(logits[rows]) with the
    [MASK] id excluded (SUBS: never predict the mask). rows: an index tuple from nonzero()."""
    chosen = logits[rows].double()  # (n, V)
    chosen[:, mask_id] = float("-inf")
    x[rows] = sample_tokens(chosen, generator, temperature, top_k, top_p)


@torch.no_grad()
def diffusion_sample(model, batch_size, seq_len, steps, mask_id, init=None, schedule=None, generator=None,
                     device="cpu", temperature=1.0, top_k=0, top_p=1.0, eps=1e-5, cache=True):
    """Ancestral sampling of a masked diffusion LM over the grid t_0 = 1 > ... > t_K = eps.

    At each step every still-masked position is revealed with probability
    (alpha_s - alpha_t) / (1 - alpha_t) (MDLM eq. 7), with a token drawn from p_theta(. | z_t);
    revealed positions never change. We draw "reveal?" first and the token only where it is revealed:
    the same law as drawing a token everywhere and keeping it with that probability, and cheap.
    init: (B, L) tokens, mask_id where free; any other position is clamped (a prompt prefix or an
    infilling pattern) and is never masked. Masks left after the last step get one greedy pass.
    cache: the network ignores t, so if no token changed since the last forward pass its output is
    the same: reuse it (MDLM's ddpm_cache). This matters when steps >> seq_len.
    """
    schedule = get_schedule(schedule)  # the model's (its checkpoint's); None: log-linear
    if init is None:
        x = torch.full((batch_size, seq_len), mask_id, dtype=torch.long, device=device)
    else:
        x = init.to(device=device, dtype=torch.long).clone()  # (B, L)
    ts = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    # every step's reveal probability up front, as Python floats: the loop then costs no tensor op or
    # host sync for them (alpha is elementwise, so the values are the ones step-by-step calls give)
    alphas = schedule.alpha(ts).tolist()
    p_reveals = [(a_s - a_t) / (1 - a_t) for a_t, a_s in zip(alphas[:-1], alphas[1:])]
    nfe, logits = 0, None
    u = torch.empty(x.shape, device=x.device, dtype=torch.float64)  # (B, L) uniforms, refilled each step
    for p_reveal in p_reveals:
        if not cache:
            logits = model(x)  # uncached: one network call per step, whatever happens
            nfe += 1
        u.uniform_(generator=generator)  # the same numbers torch.rand would draw, no allocation
        reveal = (x == mask_id) & (u < p_reveal)  # (B, L)
        rows = reveal.nonzero(as_tuple=True)
        if rows[0].numel() == 0:
            continue  # nothing changes at this step: no network call needed
        if logits is None:
            logits = model(x)  # (B, L, V): p_theta(. | z_t); stays valid until x changes
            nfe += 1
        reveal_tokens(x, logits, rows, mask_id, generator, temperature, top_k, top_p)
        logits = None  # x changed: the cached output is stale
    left = (x == mask_id).nonzero(as_tuple=True)
    if left[0].numel() > 0:  # final greedy pass (counted in nfe)
        if logits is None:
            logits = model(x)
            nfe += 1
        reveal_tokens(x, logits, left, mask_id, temperature=0)  # argmax, the mask excluded
    return x, nfe


@torch.no_grad()
def ar_sample(model, batch_size, seq_len, prompt, generator=None, temperature=1.0, top_k=0, top_p=1.0,
              use_cache=True, decode=None, cache=None):
    """Autoregressive sampling: prefill the prompt (B, P) in one pass, then one token per step.

    use_cache: decode with the model's static KV cache (one token through the network per step);
    otherwise re-run the whole prefix each step (the baseline that shows what the cache buys).
    decode: optional (compiled) function with the model's forward signature used for the one-token
    steps. cache: a KVCache from model.new_cache(batch_size, >= seq_len) to decode into; default a
    fresh one. Passing one lets a caller reuse it across calls and choose its dtype (bf16 under
    autocast), and lets a compiled decode step own it (bench.py). Old entries need no clearing: the
    mask hides every position not yet written by this call.
    Returns (tokens (B, seq_len) including the prompt, nfe).
    """
    device = prompt.device
    P = prompt.shape[1]
    x = torch.empty((batch_size, seq_len), dtype=torch.long, device=device)
    x[:, :P] = prompt
    positions = torch.arange(seq_len, device=device)  # input_pos of each step is a view of it: no per-step copy
    if use_cache:
        cache = cache if cache is not None else model.new_cache(batch_size, seq_len)
        decode = decode or model
        logits = model(x[:, :P], input_pos=positions[:P], cache=cache)[:, -1]  # (B, V)
    else:
        logits = model(x[:, :P])[:, -1]
    nfe = 1
    for pos in range(P, seq_len):
        x[:, pos] = sample_tokens(logits, generator, temperature, top_k, top_p)
        if pos + 1 == seq_len:
            break
        if use_cache:
            logits = decode(x[:, pos:pos + 1], input_pos=positions[pos:pos + 1], cache=cache)[:, -1]  # (B, V)
        else:
            logits = model(x[:, :pos + 1])[:, -1]
        nfe += 1
    return x, nfe
