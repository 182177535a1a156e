"""Masked (absorbing-state) diffusion: schedule, forward masking, SUBS log-probs, NELBO (design.md §4).

Notation: x clean tokens (B, L); z_t noised tokens where each position is [MASK] with probability
1 - alpha_t; mask_id = the last embedding row. Sahoo et al. 2024 (MDLM), eqs. 8-11.
"""
import contextlib
import math

import torch
import torch.nn.functional as F


class LogLinearSchedule:
    """alpha_t = 1 - (1 - eps) t: a token is masked with probability (1 - eps) t ~ t (MDLM's choice).

    The NELBO weight -alpha'_t / (1 - alpha_t) = (1 - eps) / ((1 - eps) t) = 1/t exactly. Another
    schedule only needs alpha(t) and weight(t).
    """
    name = "loglinear"

    def __init__(self, eps=1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def weight(self, t):
        return 1 / t


_DATA_PARALLEL = None  # (generator, rank, world) inside data_parallel_noise()


@contextlib.contextmanager
def data_parallel_noise(generator, rank, world):
    """DDP training (loop.train under torchrun): inside this block, sample_times and forward_mask draw t
    and the masks of the whole global batch (world x B rows) from `generator`, which is in the same state
    on every rank, and return this rank's rows rank, rank + world, rank + 2 world, ... (the rows of the
    global data batch it holds). So the ranks together see exactly the t and masks of one process with
    batch world x B, and each rank's t still spans [0, 1) evenly. The generator the loss passes them is
    then left for the loss's other draws (SDTT's teacher steps), which differ across ranks."""
    global _DATA_PARALLEL
    before, _DATA_PARALLEL = _DATA_PARALLEL, (generator, rank, world)
    try:
        yield
    finally:
        _DATA_PARALLEL = before


def sample_times(batch_size, generator=None, device="cpu", eps_t=1e-3):
    """Stratified (antithetic) t over the batch: t_b = ((u + b/B) mod 1)(1 - eps_t) + eps_t, one u.
    Lower variance than i.i.d. t (MDLM, 'low-discrepancy sampler')."""
    rows, n = torch.arange(batch_size, device=device), batch_size  # (B,)
    if _DATA_PARALLEL is not None:  # this rank's rows of the global batch
        generator, rank, world = _DATA_PARALLEL
        rows, n = rows * world + rank, batch_size * world
    u = torch.rand(1, generator=generator, device=device)  # (1,)
    offsets = rows / n  # (B,)
    return ((u + offsets) % 1) * (1 - eps_t) + eps_t  # (B,)


def forward_mask(x, t, schedule, mask_id, generator=None):
    """z_t ~ q(z_t | x): replace each token by mask_id independently with probability 1 - alpha_t."""
    p_mask = (1 - schedule.alpha(t))[:, None]  # (B, 1)
    if _DATA_PARALLEL is None:
        u = torch.rand(x.shape, generator=generator, device=x.device)  # (B, L)
    else:  # this rank's rows of the global batch's draw
        generator, rank, world = _DATA_PARALLEL
        u = torch.rand((x.shape[0] * world, *x.shape[1:]), generator=generator, device=x.device)[rank::world]
    move = u < p_mask  # (B, L)
    return torch.where(move, torch.full_like(x, mask_id), x)


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


def nelbo_loss(model, x, schedule, mask_id, generator=None, eps_t=1e-3, masked_only=False):
    """Continuous-time MDLM loss on a clean batch x (B, L): draw stratified t, mask, denoise.
    Returns (loss per token, t, z). The loss is an unbiased estimate of the per-token NELBO.

    masked_only: ask the model for logits at the masked positions only (Transformer's `select`): the
    NELBO integrand is zero at clean positions (eq. 10), so the loss and its gradient are the same while
    the output head and the softmax run on ~half the positions. Its shapes depend on the draw: use it in
    eager mode on the CPU (train.py does), not under torch.compile or where boolean indexing syncs (CUDA)."""
    t = sample_times(x.shape[0], generator, x.device, eps_t)  # (B,)
    z = forward_mask(x, t, schedule, mask_id, generator)  # (B, L)
    if not masked_only:
        terms = nelbo_terms(model(z), x, z, t, schedule, mask_id)  # (B, L)
        return terms.sum() / x.numel(), t, z
    masked = z == mask_id  # (B, L)
    logp = masked_log_probs(model(z, select=masked), mask_id)  # (N, V), N = masked positions
    nll = -logp.gather(-1, x[masked][:, None]).squeeze(-1)  # (N,)
    w = schedule.weight(t)[:, None].expand_as(x)[masked]  # (N,) the weight of each one's row
    return (w * nll).sum() / x.numel(), t, z


@torch.no_grad()
def val_bound(model, val_x, schedule, mask_id, n_draws=4, seed=0, batch_size=32, eps_t=1e-3, autocast=None):
    """Per-token NELBO (nats) of held-out windows val_x (N, L), averaged over n_draws stratified
    t draws per window with a fixed seed: every model is scored on the same tokens and noise.
    exp(bound) upper-bounds the diffusion model's perplexity."""
    autocast = autocast or contextlib.nullcontext
    device = val_x.device  # the caller puts the held-out windows on the model's device
    gen = torch.Generator(device=device).manual_seed(seed)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for _ in range(n_draws):
        for i in range(0, len(val_x), batch_size):
            x = val_x[i:i + batch_size]  # (b, L)
            t = sample_times(x.shape[0], gen, device, eps_t)
            z = forward_mask(x, t, schedule, mask_id, gen)
            with autocast():
                logits = model(z)
            total += nelbo_terms(logits, x, z, t, schedule, mask_id).double().sum()
            count += x.numel()
    return total.item() / count


def bound_to_ppl(nats):
    return math.exp(min(nats, 700.0))
