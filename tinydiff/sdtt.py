"""SDTT: Self-Distillation Through Time (Deschenaux & Gulcehre, ICLR 2025, arXiv 2410.21035), docs/sdtt.md.

A round teaches the student to do in ONE step of size 2Δ what the teacher does in TWO ancestral
steps of size Δ = 1/K_teacher. The student starts as a copy of the teacher; at the end of a round
the raw student becomes the teacher and K_teacher halves, so after R rounds the student samples
with K_0 / 2^R steps. This file holds the math (targets and divergences); the rounds live in
distill.py.

Time grid. We follow the paper's Algorithm 1: teacher step i runs from t_i = max(t - iΔ, ε) to
max(t_i - Δ, ε). The official repository instead builds its teacher times as t·s + (1 - t)·t_end,
which looks like a typo of the above; we do not reproduce it.
"""
import torch

from .diffusion import T_END, masked_log_probs, reveal_tokens, subs_log_probs

DIVERGENCES = ("kl_bwd", "kl_fwd", "mse", "tvd")


@torch.no_grad()
def sdtt_targets(teacher, z_t, t, n_steps, delta, mask_id, schedule, generator=None, eps=T_END):
    """The SDTT targets of paper Algorithm 1 for a noised DATA batch z_t (B, L) at times t (B,).

    From the same z_t, the teacher takes n_steps ancestral steps of size delta (MDLM eq. 7, as in
    tinydiff.sampling): step i runs from t_i = max(t - i·delta, eps) to max(t_i - delta, eps) and
    reveals each still-masked position with probability (α_s - α_t)/(1 - α_t), with a token drawn
    from the teacher. Every position keeps the teacher log-probs of the step that revealed it;
    positions still masked after the n steps keep the last step's log-probs. Draws are float64 (as
    in the sampler). The last step's draws are skipped: they cannot change any target.

    teacher: callable z (B, L) -> logits (B, L, V); put it in eval mode (no dropout) beforehand.
    It runs under whatever autocast the caller is in (the training loop's), log-probs are fp32.
    Returns (B, L, V) log-probs, float32 (float64 for a float64 teacher); clean positions of z_t
    hold SUBS copies (0 on their token, -inf elsewhere).
    """
    z = z_t.clone()  # (B, L), revealed in place step by step
    t = t.to(torch.float64)  # (B,)
    target = None
    for i in range(n_steps):
        logits = teacher(z)  # (B, L, V) p_teacher(. | z at t_i)
        logp = subs_log_probs(logits, z, mask_id)  # (B, L, V) fp32 or wider
        masked = z == mask_id  # (B, L) positions this step may reveal
        # a position masked now carries this step's log-probs; a later step overwrites it only if it
        # is still masked then, so in the end it holds the step that revealed it (or the last step)
        target = logp if target is None else torch.where(masked[..., None], logp, target)
        if i == n_steps - 1:
            break
        t_i = (t - i * delta).clamp_min(eps)  # (B,)
        s_i = (t_i - delta).clamp_min(eps)  # (B,)
        a_t, a_s = schedule.alpha(t_i), schedule.alpha(s_i)
        p_reveal = (a_s - a_t) / (1 - a_t)  # (B,) float64
        u = torch.rand(z.shape, generator=generator, device=z.device, dtype=torch.float64)  # (B, L)
        rows = (masked & (u < p_reveal[:, None])).nonzero(as_tuple=True)
        reveal_tokens(z, logits, rows, mask_id, generator)  # the samplers' own reveal step
    return target


def divergence(student_logp, target_logp, masked, kind, mask_id):
    """Mean over the masked positions of the batch of a divergence between the student's and the
    target's distributions (docs/sdtt.md §3; no 1/t weight). Computed in float32 or wider.

    student_logp, target_logp: (B, L, V) log-probs; masked: (B, L) bool, the positions masked in z_t.
    kind: kl_bwd = KL(student ‖ target) (the paper's default and winner), kl_fwd = KL(target ‖ student),
    mse = (1/|V|) Σ_v (log p_s - log p_t)² (on log-probs, a mean over the vocabulary: the 1/|Ω| weight of
    paper eq. 11, as the official code's F.mse_loss; |V| counts the [MASK] column, whose term is 0),
    tvd = ½ Σ_v |p_s - p_t| (on probabilities).
    The mask column (probability 0 in both) is dropped, so the [MASK] id adds no 0·(-inf).
    """
    dtype = torch.promote_types(student_logp.dtype, torch.float32)
    keep = torch.arange(student_logp.shape[-1], device=student_logp.device) != mask_id  # (V,)
    # every (position, token) outside the masked positions x non-mask tokens gets log-prob 0 on both
    # sides: it adds exactly 0 to each divergence, with no 0*(-inf) and no data-dependent shape (no sync)
    sel = masked[..., None] & keep  # (B, L, V)
    ls = torch.where(sel, student_logp.to(dtype), 0.0)  # (B, L, V)
    lt = torch.where(sel, target_logp.to(dtype), 0.0)  # (B, L, V)
    if kind == "kl_bwd":
        per_pos = (ls.exp() * (ls - lt)).sum(-1)  # (B, L)
    elif kind == "kl_fwd":
        # a token the target gives probability 0 (an exact teacher can) adds 0, not 0 * (-inf) = nan
        per_pos = torch.where(lt > float("-inf"), lt.exp() * (lt - ls), 0.0).sum(-1)
    elif kind == "mse":
        # a mean over the vocabulary, not a sum: a sum is |V| (~50k at GPT-2 scale) times larger, so with
        # clip 1 every step would be clipped and Adam's step weighting would change
        per_pos = (ls - lt).pow(2).sum(-1) / student_logp.shape[-1]
    elif kind == "tvd":
        # the real total variation, on probabilities. The official code's "TVD" is an L1 distance
        # between LOG-probs, a different loss (the paper found it poor); we implement the real one.
        per_pos = 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)
    else:
        raise ValueError(f"unknown SDTT divergence {kind!r}: choose one of {', '.join(DIVERGENCES)}")
    return per_pos.sum() / masked.sum().clamp_min(1)  # mean over masked positions (0 if none)


def sdtt_loss(student, teacher, z, t, teacher_steps, n_steps, mask_id, schedule, generator=None, kind="kl_bwd"):
    """One SDTT training loss on noised DATA z (B, L) at times t (B,) (drawn as for MDLM training: sample_times,
    forward_mask): the teacher's targets from z with step size 1/teacher_steps (generator: its draws), and the
    divergence of the student's one forward pass on z from them at the masked positions."""
    target = sdtt_targets(teacher, z, t, n_steps, 1.0 / teacher_steps, mask_id, schedule, generator)  # (B, L, V)
    logp = masked_log_probs(student(z), mask_id)  # (B, L, V) fp32
    return divergence(logp, target, z == mask_id, kind, mask_id)
