"""Masked (absorbing-state) diffusion: schedules, forward masking, SUBS log-probs, NELBO (docs/mdlm.md §2-4),
and the float64 draws of one reverse step (MDLM eq. 7; the samplers' loops are in tinydiff/sampling.py).

Notation: x clean tokens (B, L); z_t noised tokens where each position is [MASK] with probability
1 - alpha_t; mask_id = the last embedding row. Sahoo et al. 2024 (MDLM), eqs. 8-11.

The NELBO is a bound up to O(eps) only, as MDLM's: alpha_1 = eps (not 0), so at t = 1 each token is
still clean with probability eps, and the prior term for that state is dropped; training and the held-out
bound also draw t from [eps_t, 1]. The estimate can therefore dip below the model's true NLL by O(eps)
nats per token (tests/test_diffusion.py test_exact_bound_is_tight_for_the_oracle: exact for eps = 0, within
L G (eps + 2 eps_t) of it at the defaults).
"""
import contextlib
import math

import torch
import torch.nn.functional as F


class LogLinearSchedule:
    """alpha_t = 1 - (1 - eps) t: a token is masked with probability (1 - eps) t ~ t (MDLM's choice).

    The NELBO weight -alpha'_t / (1 - alpha_t) = (1 - eps) / ((1 - eps) t) = 1/t exactly.
    """
    name = "loglinear"

    def __init__(self, eps=1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def weight(self, t):
        return 1 / t


class CosineSchedule:
    """alpha_t = eps + (1 - eps) cos(pi t / 2): few masks at small t, most of the change late; MDLM's `cosine`
    noise (Sahoo et al. 2024; there alpha_t = exp(-sigma(t)), sigma(t) = -log(eps + (1 - eps) cos(pi t / 2))).

    The NELBO weight -alpha'_t / (1 - alpha_t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) / tan(pi t/4),
    ~ 2/t at small t. With the exact denoiser the bound equals the log-linear one (the change of variable
    u = 1 - alpha_t turns either integral of MDLM eq. 10 into the same one), so it is a choice of where
    training spends its samples of t, not of what is estimated.
    """
    name = "cosine"

    def __init__(self, eps=1e-3):
        self.eps = eps

    def alpha(self, t):
        return self.eps + (1 - self.eps) * torch.cos(math.pi / 2 * t)

    def weight(self, t):
        return (math.pi / 2) / torch.tan(math.pi / 4 * t)


# The noise schedules by name (docs/mdlm.md §2). A schedule is an object with alpha(t) (the probability that
# a token is still clean at time t, alpha_0 = 1) and weight(t) = -alpha'_t / (1 - alpha_t) (the NELBO's, MDLM
# eq. 10), elementwise on tensors of t; its name and parameters are recorded in every checkpoint
# ("schedule": schedule_spec) and every script and module that needs alpha or w takes the checkpoint's
# (get_schedule). Adding one: a class here and its entry below; --schedule and everything else follow.
SCHEDULES = {s.name: s for s in (LogLinearSchedule, CosineSchedule)}


def schedule_spec(schedule):
    """What a checkpoint records: {"name": ..., "eps": ...} (the constructor's parameters)."""
    return {"name": schedule.name, **vars(schedule)}


def get_schedule(spec=None):
    """The schedule a checkpoint's "schedule" field describes (schedule_spec), a registered name, or a schedule
    object (returned as it is). None, a checkpoint written before the field existed, is the log-linear one."""
    if spec is None:
        return LogLinearSchedule()
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        return spec  # already a schedule
    params = {k: v for k, v in spec.items() if k != "name"}
    if spec.get("name") not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {spec.get('name')!r}: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[spec["name"]](**params)


# Three small numbers, each with its own job (MDLM, Sahoo et al. 2024):
# - a schedule's eps: alpha_1 = eps, not 0 (LogLinearSchedule(eps=1e-3)): the bound's O(eps) slack (above);
# - T_MIN: training and the held-out bound draw t from [T_MIN, 1] (w(t) = 1/t is unbounded at 0);
# - T_END: samplers step down the grid 1 = t_0 > ... > t_K = T_END (tinydiff/sampling.py, tinydiff/sdtt.py).
T_MIN = 1e-3
T_END = 1e-5


def sample_times(batch_size, generator=None, device="cpu", eps_t=T_MIN):
    """Stratified (antithetic) t over the batch: t_b = ((u + b/B) mod 1)(1 - eps_t) + eps_t, one u.
    Lower variance than i.i.d. t (MDLM, 'low-discrepancy sampler'). (B,)"""
    u = torch.rand(1, generator=generator, device=device)  # (1,)
    offsets = torch.arange(batch_size, device=device) / batch_size  # (B,)
    return ((u + offsets) % 1) * (1 - eps_t) + eps_t  # (B,)


def forward_mask(x, t, schedule, mask_id, generator=None, u=None):
    """z_t ~ q(z_t | x): replace each token by mask_id independently with probability 1 - alpha_t (MDLM eq. 2).
    u: the uniforms (B, L) to use (val_bound_windows draws them per window); default: drawn from generator."""
    p_mask = (1 - schedule.alpha(t))[:, None]  # (B, 1)
    u = torch.rand(x.shape, generator=generator, device=x.device) if u is None else u  # (B, L)
    return torch.where(u < p_mask, torch.full_like(x, mask_id), x)


def masked_log_probs(logits, mask_id):
    """log p_theta(v | z_t) with the [MASK] logit at -inf (SUBS: never predict the mask). (B, L, V)."""
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), neg_inf)
    return F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)  # >= fp32


def subs_log_probs(logits, z, mask_id):
    """The full SUBS parameterisation: masked positions get masked_log_probs, clean positions are
    copied (log-prob 0 on their own token, -inf elsewhere). logits (B, L, V), z (B, L) -> (B, L, V)."""
    logp = masked_log_probs(logits, mask_id)  # (B, L, V)
    copy = torch.full_like(logp, float("-inf")).scatter_(-1, z[..., None], 0.0)  # (B, L, V)
    return torch.where((z == mask_id)[..., None], logp, copy)


def nelbo_terms(logits, x, z, t, schedule, mask_id):
    """Per-position NELBO integrand w(t) * [z_i = m] * (-log p_theta(x_i | z_t)), shape (B, L).
    Summed over positions and divided by B*L it is the per-token bound (nats)."""
    logp = masked_log_probs(logits, mask_id)  # (B, L, V)
    nll = -logp.gather(-1, x[..., None]).squeeze(-1)  # (B, L)
    # where, not a product with the mask: a clean position may carry nll = inf (0 * inf = nan)
    return torch.where(z == mask_id, schedule.weight(t)[:, None] * nll, torch.zeros_like(nll))


def nelbo_loss(model, x, z, t, schedule, mask_id, masked_only=False):
    """The MDLM training loss of a clean batch x (B, L) noised to z (B, L) at times t (B,) (sample_times, then
    forward_mask): the sum of nelbo_terms over the batch divided by B*L, an unbiased estimate of the per-token
    NELBO, which bounds the NLL up to O(eps) (module docstring).

    masked_only: the same loss and gradient with the network's output head run at the masked positions only
    (Transformer's `select`): the integrand is zero at clean positions (eq. 10), and with a 4096-id head the
    logits of the other ~half are most of a small model's step. Its shapes depend on the draw: eager CPU only
    (train.py uses it there), not under torch.compile or where boolean indexing syncs (CUDA)."""
    if not masked_only:
        return nelbo_terms(model(z), x, z, t, schedule, mask_id).sum() / x.numel()
    masked = z == mask_id  # (B, L)
    logp = masked_log_probs(model(z, select=masked), mask_id)  # (N, V), N = masked positions
    nll = -logp.gather(-1, x[masked][:, None]).squeeze(-1)  # (N,)
    w = schedule.weight(t)[:, None].expand_as(x)[masked]  # (N,) the weight of each one's row
    return (w * nll).sum() / x.numel()


@torch.no_grad()
def val_bound_windows(model, val_x, schedule, mask_id, n_draws=4, seed=0, batch_size=32, eps_t=T_MIN, autocast=None):
    """Per-token NELBO (nats) of each held-out window of val_x (N, L), float64 (N,): the mean over n_draws
    t draws of the window's integrand (Sahoo et al. 2024, eq. 10), an unbiased estimate of its bound.

    The noise belongs to the window, not to the batch it is scored in: one CPU generator seeded with
    `seed` draws, window after window, u_k (1,) then the mask uniforms (n_draws, L). Window k's t are
    stratified over its own draws, t_kd = ((u_k + d / n_draws) mod 1)(1 - eps_t) + eps_t, so each t is
    uniform on [eps_t, 1] and the draws of one window cover it evenly. The result therefore depends only
    on (model, tokens, seed, n_draws): not on batch_size (rows per forward pass), the device or the number
    of windows after k (the same for train.py's periodic eval and eval.py)."""
    autocast = autocast or contextlib.nullcontext
    n, L = val_x.shape
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(n_draws) / n_draws  # (D,)
    t, u = torch.empty(n, n_draws), torch.empty(n, n_draws, L)
    for k in range(n):  # window order: window k's draws do not depend on the windows after it
        t[k] = ((torch.rand(1, generator=gen) + offsets) % 1) * (1 - eps_t) + eps_t  # (D,)
        u[k] = torch.rand(n_draws, L, generator=gen)  # (D, L)
    t, u = t.flatten(), u.flatten(0, 1)  # rows = (window, draw) pairs, window-major: (N*D,), (N*D, L)
    sums = torch.empty(n * n_draws, dtype=torch.float64, device=val_x.device)  # (N*D,) each row's integrand
    for i in range(0, n * n_draws, batch_size):
        rows = torch.arange(i, min(i + batch_size, n * n_draws))  # (b,)
        x = val_x[(rows // n_draws).to(val_x.device)]  # (b, L)
        tb, ub = t[rows].to(val_x.device), u[rows].to(val_x.device)  # (b,), (b, L)
        z = forward_mask(x, tb, schedule, mask_id, u=ub)  # z_t ~ q(z_t | x)
        with autocast():
            logits = model(z)  # (b, L, V)
        sums[i:i + len(rows)] = nelbo_terms(logits, x, z, tb, schedule, mask_id).double().sum(1)
    return sums.view(n, n_draws).mean(1) / L  # (N,)


def val_bound(model, val_x, schedule, mask_id, n_draws=4, seed=0, batch_size=32, eps_t=T_MIN, autocast=None):
    """Per-token NELBO (nats) of held-out windows val_x (N, L): the mean of val_bound_windows, so every
    model is scored on the same tokens and noise, whatever the batch size. exp(bound) upper-bounds the
    diffusion model's perplexity up to O(eps) (alpha_1 = eps and the dropped prior term: module docstring)."""
    return val_bound_windows(model, val_x, schedule, mask_id, n_draws, seed, batch_size, eps_t, autocast).mean().item()


def bound_to_ppl(nats):
    return math.exp(min(nats, 700.0))


# ----------------------------------------------------------------------------- the reverse step's draws
# One step of the reverse process (MDLM eq. 7) reveals a masked position with a token drawn from p_theta(. | z_t),
# [MASK] excluded. The draws are float64: fp32 Gumbel noise truncates its tail, which silently lowers the
# temperature (Zheng et al. 2024). Used by every sampler (tinydiff/sampling.py) and by SDTT's teacher steps.

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
