"""Sampling (docs/samplers.md): masked-diffusion samplers behind one signature, and AR decoding with a KV cache.

    tokens, nfe = sample(name, model, init, steps, mask_id, generator=None, context=None, **knobs)

model: callable z (B, L) -> logits (B, L, V), the [MASK] column included (never predicted: SUBS).
init: (B, L) token ids with mask_id where free, every other position clamped (a prompt prefix or an
infilling pattern); or a shape (B, L) for unconditional samples (device=...). steps: the step count
(`threshold`: a budget; `semi_ar`: the total over its generated blocks). context: the model's context,
for `semi_ar`. nfe: network evaluations actually made. knobs: temperature / top_k / top_p (COMMON),
applied to the denoiser's output by every sampler, and the sampler's own (SAMPLERS[name].knobs).
The samplers: ancestral (MDLM eq. 7: diffusion_sample, the model's own law), confidence, threshold,
remdm, semi_ar. Adding one: a function with the samplers' signature, decorated @register(name, knob=Knob(...)).

Every random draw is float64 (diffusion.sample_tokens: fp32 Gumbel noise truncates its tail, which silently
lowers the temperature; Zheng et al. 2024, arXiv 2409.02908: MDLM 2048-step gen PPL 31 in fp32 vs 126 in fp64).
"""
import math
from typing import NamedTuple

import torch

from .diffusion import T_END, filter_logits, get_schedule, reveal_tokens, sample_tokens  # noqa: F401 (re-exported)
from .errors import UserError


# ----------------------------------------------------------------------------- the ancestral sampler, AR decoding

def greedy_fill(x, logits, model, mask_id):
    """Masks left after a sampler's last step get one argmax pass (counted in NFE: returns 0 or 1)."""
    left = (x == mask_id).nonzero(as_tuple=True)
    if left[0].numel() == 0:
        return 0
    nfe = 0
    if logits is None:
        logits, nfe = model(x), 1
    reveal_tokens(x, logits, left, mask_id, temperature=0)
    return nfe


@torch.no_grad()
def diffusion_sample(model, batch_size, seq_len, steps, mask_id, init=None, schedule=None, generator=None,
                     device="cpu", temperature=1.0, top_k=0, top_p=1.0, eps=T_END, cache=True):
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
    return x, nfe + greedy_fill(x, logits, model, mask_id)


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


# ----------------------------------------------------------------------------- the registry

class Knob(NamedTuple):
    default: object
    type: type
    help: str
    choices: tuple = None


class Sampler(NamedTuple):
    fn: object
    knobs: dict  # name -> Knob, the sampler's own (the common ones are in COMMON)


COMMON = {"temperature": Knob(1.0, float, "softmax temperature of the denoiser's output (0 = argmax)"),
          "top_k": Knob(0, int, "keep the k most likely tokens of the denoiser's output (0 = all)"),
          "top_p": Knob(1.0, float, "nucleus mass kept of the denoiser's output (1 = off)")}
SAMPLERS = {}


def register(name, **knobs):
    def add(fn):
        for k, knob in knobs.items():  # one flag per knob name: a name shared by two samplers means one thing
            assert all(s.knobs.get(k, knob) == knob for s in SAMPLERS.values()) and k not in COMMON, k
        SAMPLERS[name] = Sampler(fn, knobs)
        return fn
    return add


# ----------------------------------------------------------------------------- shared steps


def propose(logits, rows, mask_id, generator=None, temperature=1.0, top_k=0, top_p=1.0, chunk=2 ** 24):
    """A token for every position in rows (an index tuple from nonzero()): a float64 draw from the
    filtered denoiser output (mask excluded), and its confidence: log p_theta(token | z), the model's
    own log-probability, unfiltered (LLaDA's and Fast-dLLM's choice). Returns (tokens (n,), logp (n,)).
    Rows go through in chunks of <= `chunk` (n, V) elements: a 50k vocabulary keeps its memory bounded."""
    n, V = rows[0].numel(), logits.shape[-1]
    step = max(1, chunk // V)
    toks, logps = [], []
    for i in range(0, n, step):
        chosen = logits[tuple(r[i:i + step] for r in rows)].double()  # (c, V)
        chosen[:, mask_id] = float("-inf")
        tok = sample_tokens(chosen, generator, temperature, top_k, top_p)  # (c,)
        toks.append(tok)
        logps.append(chosen.gather(-1, tok[:, None]).squeeze(-1) - chosen.logsumexp(-1))  # (c,)
    if not toks:
        return rows[0].new_empty(0), torch.empty(0, dtype=torch.float64, device=logits.device)
    return torch.cat(toks), torch.cat(logps)


def scatter_rows(shape, rows, values, fill):
    """A (B, L) tensor holding values at rows and fill elsewhere."""
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out


def reveal_counts(free, steps, schedule, eps):
    """How many positions each row reveals at each step so that the expected reveals per step match
    the ancestral sampler's: after step k a fraction (1 - alpha(t_{k+1})) / (1 - alpha(t_0)) of the
    free positions is still masked in expectation (MDLM eq. 7 on the grid 1 = t_0 > ... > t_K = eps);
    we keep round(n_free x that fraction) masked, and none after the last step. free: (B, L) bool.
    Returns ((K, B) long on free's device, [K] bools: does any row reveal at step k). One host sync."""
    alphas = schedule.alpha(torch.linspace(1.0, eps, steps + 1, dtype=torch.float64))  # (K+1,)
    frac = (1 - alphas[1:]) / (1 - alphas[0])  # (K,)
    n = free.sum(1).cpu().double()  # (B,): the one sync
    left = torch.floor(n[None] * frac[:, None] + 0.5).long()  # (K, B) masks left after each step
    left[-1] = 0
    counts = torch.cat([n.long()[None], left]).diff(dim=0).neg()  # (K, B)
    return counts.to(free.device), (counts.sum(1) > 0).tolist()


def top_per_row(score, counts):
    """(B, L) bool: the counts[b] highest scores of each row b; ties go to the lower position."""
    order = score.argsort(dim=1, descending=True, stable=True)  # (B, L)
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)  # (B, L)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, i]: place of position i in row b
    return rank < counts[:, None]


# ----------------------------------------------------------------------------- the samplers


@register("ancestral")
def ancestral(model, x, steps, mask_id, generator=None, *, temperature=1.0, top_k=0, top_p=1.0, schedule=None,
              eps=T_END):
    """MDLM's ancestral sampler (Sahoo et al. 2024, eq. 7; Austin et al. 2021): diffusion_sample above.

    Law: the model's own. Each step reveals every masked position independently with probability
    (alpha_s - alpha_t) / (1 - alpha_t), the token drawn from p_theta(. | z_t); which positions are
    revealed never depends on the tokens. Positions revealed at the same step are drawn independently
    given z_t (the factorisation error of a finite K): with the exact posterior the law tends to the
    data as K grows, and K = 1 gives the product of the marginals. tests/harness.py's
    exact_sampler_law is this law. Cost: at most min(K, revealed tokens) + 1 forward passes (a pass is
    skipped when no token changed), draws only where a token is revealed."""
    return diffusion_sample(model, x.shape[0], x.shape[1], steps, mask_id, init=x, schedule=schedule,
                            generator=generator, device=x.device, temperature=temperature, top_k=top_k,
                            top_p=top_p, eps=eps)


@register("confidence", gumbel=Knob(0.0, float, "confidence: Gumbel noise scale on log-confidence, annealed "
                                                "to 0 (MaskGIT's choice temperature, 4.5 there); 0 = greedy order"))
def confidence(model, x, steps, mask_id, generator=None, *, gumbel=0.0, temperature=1.0, top_k=0, top_p=1.0,
               schedule=None, eps=T_END):
    """Confidence-ordered unmasking: MaskGIT (Chang et al. 2022) / LLaDA's low-confidence remasking
    (Nie et al. 2025). Each step draws a token at EVERY masked position from the denoiser (knobs
    applied) and reveals the k with the highest confidence log p_theta(token | z_t) (+ gumbel x
    (1 - (k+1)/K) x Gumbel noise: MaskGIT's annealed choice temperature); the others stay masked and
    are drawn afresh next step. k per row and step comes from reveal_counts: the expected reveals
    per step of the ancestral sampler, deterministically rounded (MaskGIT uses a cosine schedule,
    LLaDA a linear one; ours matches whatever schedule the model was trained with).

    Law: NOT the model's. Which position is revealed depends on the token drawn there: a token is
    more likely to be committed when it is probable, so the law is tilted toward high-probability
    tokens (mode-seeking, lower entropy) even with the exact posterior and any K. With gumbel = 0
    the order is greedy; with temperature 0 too the sampler is a deterministic function of the
    model (a point mass). With gumbel = g > 0 the k positions are a Plackett-Luce draw without
    replacement with weights p^(1/(g x anneal)). Ties go to the lower position.
    Cost: one forward pass per step that reveals anything (K when K <= L), draws at all masked
    positions each step ((n_masked, V) float64, in chunks)."""
    schedule = get_schedule(schedule)
    x = x.clone()
    counts, active = reveal_counts(x == mask_id, steps, schedule, eps)  # (K, B)
    nfe = 0
    for k in range(steps):
        if not active[k]:
            continue  # no row reveals at this step: no network call
        logits = model(x)  # (B, L, V)
        nfe += 1
        rows = (x == mask_id).nonzero(as_tuple=True)
        tok, logp = propose(logits, rows, mask_id, generator, temperature, top_k, top_p)  # (n,), (n,)
        scale = gumbel * (1 - (k + 1) / steps)  # MaskGIT: log-confidence + annealed Gumbel noise, float64
        if scale > 0:
            u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=torch.float64)  # (n,)
            logp = logp - scale * (-u.log()).log()
        reveal = top_per_row(scatter_rows(x.shape, rows, logp, float("-inf")), counts[k])  # (B, L)
        x = torch.where(reveal, scatter_rows(x.shape, rows, tok, mask_id), x)
    return x, nfe


@register("threshold", tau=Knob(0.9, float, "threshold: reveal every masked position whose confidence "
                                            "p_theta(token) >= tau, at least one per row and step"))
def threshold(model, x, steps, mask_id, generator=None, *, tau=0.9, temperature=1.0, top_k=0, top_p=1.0,
              schedule=None, eps=T_END):
    """Threshold-parallel unmasking: Fast-dLLM's confidence-aware parallel decoding (Wu et al. 2025).
    Each step draws a token at every masked position (knobs applied) and reveals those whose
    confidence p_theta(token | z_t) >= tau, and always the most confident one of each row, so the
    number of steps adapts to how sure the model is. steps is a budget: at the last allowed step
    every remaining position is revealed. The time grid is not used: there is none.

    Law: NOT the model's. Like `confidence`, the tokens decide which positions are committed
    (mode-seeking); tau = 1 reveals one position per step in greedy confidence order (`confidence`
    with one reveal per step), tau = 0 reveals everything at once from the fully masked state: the
    product of the marginals in one NFE (ancestral's K = 1 law). Ties go to the lower position.
    Cost: NFE = steps actually taken (returned), at most min(budget, masked positions); draws at all
    masked positions each step."""
    x = x.clone()
    nfe = 0
    for k in range(steps):
        masked = x == mask_id  # (B, L)
        rows = masked.nonzero(as_tuple=True)  # the one host sync per step (as diffusion_sample's)
        if rows[0].numel() == 0:
            break
        logits = model(x)  # (B, L, V)
        nfe += 1
        tok, logp = propose(logits, rows, mask_id, generator, temperature, top_k, top_p)
        score = scatter_rows(x.shape, rows, logp, float("-inf"))  # (B, L), -inf where not masked
        if k == steps - 1:
            reveal = masked  # budget spent: commit everything
        else:
            best = torch.zeros_like(masked).scatter_(1, score.argmax(1, keepdim=True), True)  # (B, L)
            reveal = masked & ((score.exp() >= tau) | best)
        x = torch.where(reveal, scatter_rows(x.shape, rows, tok, mask_id), x)
    return x, nfe


REMASK = ("cap", "rescale", "conf", "loop")


def remdm_plan(steps, schedule, eps, remask, eta, t_on, t_off, alpha_on):
    """Per step (p_reveal, sigma) of ReMDM (Wang et al. 2025, arXiv 2503.00307): from z_t to z_s a masked
    position is revealed with probability (a_s - (1 - sigma) a_t) / (1 - a_t), an unmasked one is
    re-masked with probability sigma, 0 <= sigma <= sigma_max = min(1, (1 - a_s) / a_t). Schedules: cap
    sigma = min(eta, (1 - a_s) / a_t); rescale sigma = eta x sigma_max; conf sigma_max, spread over
    the unmasked positions by confidence (the sampler does that; masked positions use sigma = 0);
    loop: alpha rises linearly from 0 at t = 1 to alpha_on at t_on, stays there down to t_off, then
    rises linearly to 1 at t = 0; steps starting in (t_off, t_on] re-mask with sigma = eta (capped at
    (1 - a_s) / a_t), the others are MDLM steps. (The paper's code extrapolates the phase of a step's
    start to its end, which passes alpha = 1 when steps are few; we evaluate alpha at both ends.)"""
    ts = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    if remask == "loop":
        alpha = lambda t: alpha_on * (1 - t) / (1 - t_on) if t > t_on else \
            alpha_on if t >= t_off else 1 - (1 - alpha_on) * t / t_off
        alphas = [alpha(t) for t in ts.tolist()]
    else:
        alphas = schedule.alpha(ts).tolist()
    plan = []
    for t, a_t, a_s in zip(ts.tolist(), alphas[:-1], alphas[1:]):
        bound = (1 - a_s) / a_t if a_t > 0 else math.inf
        sigma = {"cap": min(eta, bound), "rescale": eta * min(1.0, bound), "conf": min(1.0, bound),
                 "loop": min(eta, bound) if t_off < t <= t_on else 0.0}[remask]
        sigma_masked = 0.0 if remask == "conf" else sigma
        plan.append(((a_s - (1 - sigma_masked) * a_t) / (1 - a_t), sigma))
    return plan


@register("remdm", remask=Knob("cap", str, "remdm: remasking schedule sigma_t", REMASK),
          eta=Knob(0.02, float, "remdm: remasking probability eta (cap, rescale, loop; the paper's best on "
                                "OWT: cap 0.008, rescale 0.015, loop 0.02)"),
          t_on=Knob(0.55, float, "remdm loop: time the loop phase starts"),
          t_off=Knob(0.05, float, "remdm loop: time the loop phase ends"),
          alpha_on=Knob(0.9, float, "remdm loop: alpha held during the loop phase"))
def remdm(model, x, steps, mask_id, generator=None, *, remask="cap", eta=0.02, t_on=0.55, t_off=0.05, alpha_on=0.9,
          temperature=1.0, top_k=0, top_p=1.0, schedule=None, eps=T_END):
    """ReMDM remasking (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time
    Scaling"): a predictor-corrector that may re-mask revealed (never clamped) tokens, so later steps
    re-predict them with more context. Per step: the same float64 uniform per position as the
    ancestral sampler decides a masked position's reveal and an unmasked one's re-mask (remdm_plan);
    revealed tokens are drawn as ancestral ones; masks left at the end get the greedy pass.
    conf (ReMDM-conf): sigma_l = sigma_max x softmax over the unmasked free positions of
    -p_theta(token when it was revealed) (the paper takes p after nucleus filtering; we take the
    model's own p, as `confidence` does).

    Law: with sigma = 0 (eta = 0 under cap / rescale) exactly ancestral's, draw for draw. With
    sigma > 0 a different chain: its transitions keep the forward marginals q(z_s | x) (the paper's
    construction), so with the exact JOINT posterior it would sample the data for any sigma, but a
    denoiser gives per-position marginals, and then the law is neither p_theta's nor ancestral's; the
    re-masking acts as a corrector that can undo errors of earlier parallel reveals as steps grow.
    Cost: like ancestral, except a step that may re-mask (sigma > 0) counts as a change, so the next
    reveal needs a fresh forward pass (checking would cost a host sync): NFE ~ min(K, ...) + 1."""
    schedule = get_schedule(schedule)
    plan = remdm_plan(steps, schedule, eps, remask, eta, t_on, t_off, alpha_on)
    x = x.clone()
    free = x == mask_id  # (B, L): clamped positions are never re-masked
    conf = torch.full(x.shape, float("-inf"), dtype=torch.float64, device=x.device) if remask == "conf" else None
    u = torch.empty(x.shape, dtype=torch.float64, device=x.device)  # (B, L)
    nfe, logits = 0, None
    for p_reveal, sigma in plan:
        u.uniform_(generator=generator)  # one uniform per position, as diffusion_sample draws them
        masked = x == mask_id
        if sigma > 0:  # decided on z_t, applied after the reveals
            if conf is None:
                remasked = free & ~masked & (u < sigma)  # (B, L)
            else:  # rows with nothing unmasked give nan weights: none re-masked there
                w = torch.where(free & ~masked, conf, float("-inf")).softmax(1).nan_to_num(0.0)  # (B, L)
                remasked = free & ~masked & (u < sigma * w)
        rows = (masked & (u < p_reveal)).nonzero(as_tuple=True)  # the one host sync per step
        if rows[0].numel() > 0:
            if logits is None:
                logits = model(x)  # (B, L, V)
                nfe += 1
            if conf is None:
                reveal_tokens(x, logits, rows, mask_id, generator, temperature, top_k, top_p)
            else:
                tok, logp = propose(logits, rows, mask_id, generator, temperature, top_k, top_p)
                x[rows], conf[rows] = tok, -logp.exp()
            logits = None
        if sigma > 0:
            x.masked_fill_(remasked, mask_id)
            if conf is not None:
                conf.masked_fill_(remasked, float("-inf"))
            logits = None
    nfe += greedy_fill(x, logits, model, mask_id)
    return x, nfe


@register("semi_ar", block_len=Knob(32, int, "semi_ar: tokens per block (at most the context)"),
          inner=Knob("ancestral", str, "semi_ar: the sampler used inside each block (threshold: Fast-dLLM's setting)"))
def semi_ar(model, x, steps, mask_id, generator=None, *, block_len=32, inner="ancestral", context=None, **knobs):
    """Semi-autoregressive generation, block by block, of any length (MDLM's semi-autoregressive sampler,
    Sahoo et al. 2024; LLaDA's blocks, Nie et al. 2025). The blocks start at the first position that any row
    generates (after a prompt, as LLaDA's first block starts after the prompt; position 0 without one) and
    are generated left to right by the `inner` sampler, each in a window of W = min(context, length)
    positions ending at the block (or the first W positions): the earlier tokens in it are clamped, later
    positions inside it are shown as they are in init (masks: LLaDA's future blocks; or clamped tokens) and
    not touched. Past the context the window slides: each block sees the W - block_len tokens before it.
    steps is the budget of the generated part: a block of n of its G positions gets max(1, round(steps n / G)).

    Law: within one window, the inner sampler's law for that block given everything clamped before it
    (ancestral inside: the model's own law of the block). Beyond the context it is a Markov chain of order
    W - block_len over blocks: NOT a law of the model over the whole length (it has none past its context).
    Cost: the inner sampler's, summed over blocks (NFE returned is the sum)."""
    x = x.clone()
    N = x.shape[1]
    W = min(context or N, N)
    b = min(block_len, W)
    free = (x == mask_id).any(0).nonzero()  # (n, 1) positions some row generates (one host sync)
    start = int(free[0]) if len(free) else N
    nfe = 0
    for a in range(start, N, b):
        e = min(a + b, N)
        s = max(0, e - W)  # the window [s, s + W) ends at the block (or is the first W positions)

        def block_model(z, a=a, e=e, s=s):  # z (B, e - a) -> logits (B, e - a, V) of the block in its window
            window = x[:, s:s + W].clone()  # (B, W)
            window[:, a - s:e - s] = z
            return model(window)[:, a - s:e - s]
        x[:, a:e], n = SAMPLERS[inner].fn(block_model, x[:, a:e], max(1, round(steps * (e - a) / (N - start))),
                                          mask_id, generator, **knobs)
        nfe += n
    return x, nfe


# ----------------------------------------------------------------------------- entry points


def knobs_of(name, inner=None):
    """{knob: Knob} that sampler `name` takes (semi_ar: its own, then its inner sampler's)."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    own = dict(SAMPLERS[name].knobs)
    if name == "semi_ar":
        inner = inner or own["inner"].default
        if inner not in SAMPLERS or inner == "semi_ar":
            raise UserError(f"semi_ar: --inner {inner!r} must be one of {', '.join(n for n in SAMPLERS if n != name)}")
        own.update(knobs_of(inner))
    return {**own, **COMMON}


def resolve(name, knobs):
    """The full knob dict of `name` (defaults filled in), checked: UserError on a bad value."""
    spec = knobs_of(name, knobs.get("inner"))
    unknown = set(knobs) - set(spec)
    if unknown:
        raise UserError(f"sampler {name} has no knob {', '.join(sorted(unknown))} (its knobs: {', '.join(spec)})")
    k = {n: knobs.get(n, knob.default) for n, knob in spec.items()}
    bad = [f"--{n} {k[n]!r} ({why})" for n, ok, why in [
        ("temperature", k["temperature"] >= 0, ">= 0"), ("top_k", k["top_k"] >= 0, ">= 0"),
        ("top_p", 0 < k["top_p"] <= 1, "in (0, 1]"), ("gumbel", k.get("gumbel", 0) >= 0, ">= 0"),
        ("tau", 0 <= k.get("tau", 0) <= 1, "in [0, 1]"), ("eta", 0 <= k.get("eta", 0) <= 1, "in [0, 1]"),
        ("remask", k.get("remask", "cap") in REMASK, "one of " + ", ".join(REMASK)),
        ("t_on", 0 < k.get("t_off", .05) < k.get("t_on", .55) < 1, "0 < t_off < t_on < 1"),
        ("alpha_on", 0 < k.get("alpha_on", .9) < 1, "in (0, 1)"),
        ("block_len", k.get("block_len", 1) >= 1, ">= 1")] if n in k and not ok]
    if k.get("remask") == "loop" and k["eta"] * k["alpha_on"] > 1 - k["alpha_on"]:
        bad.append(f"--eta {k['eta']} (loop: at most (1 - alpha_on) / alpha_on, or the reveal probability exceeds 1)")
    if bad:
        raise UserError(f"sampler {name}: bad knob " + "; ".join(bad))
    return k


def sample(name, model, init, steps, mask_id, generator=None, context=None, device=None, schedule=None, eps=T_END,
           **knobs):
    """Run sampler `name`: (tokens (B, L), nfe). The one entry point for scripts and experiments."""
    knobs = resolve(name, knobs)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if isinstance(init, torch.Tensor):
        x = init.to(device=device or init.device, dtype=torch.long)
    else:
        x = torch.full(tuple(init), mask_id, dtype=torch.long, device=device or "cpu")
    if name == "semi_ar":
        knobs["context"] = context
    return SAMPLERS[name].fn(model, x, steps, mask_id, generator, schedule=schedule, eps=eps, **knobs)


def describe(name, knobs):
    """One line naming the sampler and every knob it ran with, printed beside every number."""
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in knobs.items() if k != "context") + ")"
