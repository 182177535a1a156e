"""Exact evaluation of sample sets on the lab (tinydiff/lab/language.py; eval.py runs it when the data is the lab).

Per sample set (n samples of L tokens, independent):
- ce: the TRUE cross-entropy, mean over samples of -log p(x) / L (nats/token), with its standard error.
  The reference is H = E[-log p(X_1..L)] / L (Lab.entropy: the per-token entropy of L-windows). A perfect
  sampler gives ce = H within s.e.; above H: the sampler makes strings the language finds unlikely
  (errors, factorisation error of few-step sampling); below H: it collapses onto the likeliest strings
  (low temperature, lost diversity; the entropy and the word TV then show it).
- oracle_gen_nll: the per-sample mean of -log p(x_j | x_<j) over j = 2..L, averaged: the gen NLL that
  tinydiff.evaluate's protocol computes (first token context only) with the TRUE model as the judge. A
  learned judge's gen_nll on the same samples should match it: their gap is the judge's own error.
- valid_words: the fraction of complete words that are in the lexicon. A word is a non-empty run of
  letters between two separators (space or sentence end); the first and last run of each sample are
  dropped (the window may cut them). The truth scores below 1 (emission noise).
- word_tv: total variation between the samples' word histogram (lexicon words + one bin for invalid
  words) and the law of complete words in an L-window (invalid bin 0): word w occurs with the stationary
  word law Lab.word_law, and is complete inside the window at L - len(w) - 1 of its L offsets, so
  q_w ∝ word_law_w (L - len(w) - 1) (short words are cut less often). It is biased upward at finite n and
  by the noise: compare it with exact samples of the same n (eval.py's `real` row).
  valid_words and word_tv get bootstrap standard errors (resampling whole samples).
"""
import contextlib
import math
import time
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_meta
from ..diffusion import forward_mask, get_schedule, masked_log_probs, nelbo_terms, sample_times
from .language import Lab, LabParams, OracleDenoiser, parse_spec


def lab_of(data_dir):
    """The Lab a prepared data folder was drawn from (its meta.json records the parameters); None otherwise."""
    meta = load_meta(data_dir)
    if "lab" not in meta:
        return None
    names = {f.name for f in fields(LabParams)}
    return Lab(LabParams(**{k: v for k, v in meta["lab"].items() if k in names}))


def words_of(lab, x):
    """Lexicon index (or -1 for an invalid word) of every complete word of each sample: a list of lists."""
    out = []
    for row in x.tolist():
        seps = [j for j, v in enumerate(row) if v >= lab.space]  # space or sentence end (or a [MASK] left)
        runs = [tuple(row[a + 1:b]) for a, b in zip(seps[:-1], seps[1:]) if b > a + 1]
        out.append([lab.word_index.get(r, -1) for r in runs])
    return out


def window_word_law(lab, L):
    """The law of a complete word inside an L-window (noise aside): word_law_w (L - len(w) - 1), normalised."""
    q = lab.word_law.numpy() * np.maximum(L - 1 - np.array([len(w) for w in lab.words]), 0)  # (W,)
    return q / q.sum()


def _word_stats(words, idx, law):
    """(valid fraction, word TV against law (W,)) of the samples idx."""
    ids = np.concatenate([np.asarray(words[i], dtype=np.int64) for i in idx] + [np.zeros(0, np.int64)])
    if len(ids) == 0:
        return float("nan"), float("nan")
    counts = np.bincount(ids + 1, minlength=len(law) + 1) / len(ids)  # bin 0: invalid
    return 1.0 - counts[0], 0.5 * (counts[0] + np.abs(counts[1:] - law).sum())


def lab_metrics(lab, samples, n_boot=200, seed=0):
    """The exact figures of one sample set (n, L) (module docstring). Returns a dict of floats."""
    x = samples.cpu()
    n, L = x.shape
    nll = -lab.log_prob(x) / L  # (n,)
    logp = lab.next_token_probs(x).log().gather(-1, x[..., None]).squeeze(-1)  # (n, L) log p(x_j | x_<j)
    gen = -logp[:, 1:].mean(1)  # (n,) the gen-PPL convention: tokens 2..L
    se = lambda v: (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else float("nan")
    words = words_of(lab, x)
    law = window_word_law(lab, L)
    valid, tv = _word_stats(words, range(n), law)
    rng = np.random.default_rng(seed)
    boot = np.array([_word_stats(words, rng.integers(n, size=n), law) for _ in range(n_boot)])  # (n_boot, 2)
    return {"ce": nll.mean().item(), "ce_se": se(nll),
            "oracle_gen_nll": gen.mean().item(), "oracle_gen_nll_se": se(gen),
            "valid_words": valid, "valid_words_se": float(np.nanstd(boot[:, 0])), "word_tv": tv,
            "word_tv_se": float(np.nanstd(boot[:, 1])), "words_per_sample": sum(map(len, words)) / n}


@torch.no_grad()
def heldout_gap(model, kind, lab, val_x, mask_id=None, draws=4, seed=0, batch_size=32, autocast=None, schedule=None):
    """Paired, per held-out window (the (N, L) / (N, L+1) windows of tinydiff.evaluate.heldout_windows): the
    model's NLL per scored token (AR exact; MDLM the NELBO bound with `draws` stratified t draws) and the
    TRUE NLL of the same scored tokens (AR: -log p(x_1..L | x_0), MDLM: -log p(x_1..L)); the MDLM's bound under
    its noise schedule (its checkpoint's: diffusion.get_schedule). Returns the means,
    the gap model - true and its standard error over windows."""
    autocast = autocast or contextlib.nullcontext
    gen, schedule, out = torch.Generator(device=val_x.device).manual_seed(seed), get_schedule(schedule), []
    for i in range(0, len(val_x), batch_size):
        x = val_x[i:i + batch_size]  # (b, L) or (b, L+1)
        if kind == "ar":
            with autocast():
                logits = model(x[:, :-1])  # (b, L, V)
            out.append(F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none").double().mean(1))
            continue
        nll = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for _ in range(draws):
            t = sample_times(len(x), gen, x.device)
            z = forward_mask(x, t, schedule, mask_id, gen)
            with autocast():
                logits = model(z)
            nll += nelbo_terms(logits, x, z, t, schedule, mask_id).double().mean(1) / draws  # (b,)
        out.append(nll)
    got, xc = torch.cat(out).cpu(), val_x.cpu()
    true = -lab.log_prob(xc)  # (N,)
    if kind == "ar":  # the first token is context only
        true = (true + lab.marginal().log()[xc[:, 0]]) / (xc.shape[1] - 1)
    else:
        true = true / xc.shape[1]
    gap, n = got - true, len(xc)
    return {"model": got.mean().item(), "true": true.mean().item(), "true_se": (true.std() / math.sqrt(n)).item(),
            "gap": gap.mean().item(), "gap_se": (gap.std() / math.sqrt(n)).item(), "windows": n}


@torch.no_grad()
def per_rate(model, lab, L, rates=(0.05, 0.2, 0.4, 0.6, 0.8, 0.95), n=128, seed=0, device="cpu"):
    """Where an MDLM's bound loses to the truth: for each masking rate t, over masked positions of stationary
    windows, the model's and the oracle's -log p(x_i | z_t) and KL(oracle posterior || model). Written in the
    masking rate r = 1 - alpha_t, the NELBO of any schedule is the integral over r in (0, 1] of the
    per-masked-token loss times 1/r (MDLM eq. 10), so these rows integrate to bound (model) and NLL (oracle)."""
    gen, oracle, rows = torch.Generator().manual_seed(seed), OracleDenoiser(lab), []
    x = lab.sample(n, L, gen)  # (n, L)
    for t in rates:
        z = torch.where(torch.rand(x.shape, generator=gen) < t, lab.mask_id, x)  # (n, L)
        m = z == lab.mask_id
        lp = masked_log_probs(model(z.to(device)), lab.mask_id).double().cpu()  # (n, L, V+1)
        lo = oracle(z).log_softmax(-1)  # (n, L, V+1)
        kl = (lo.exp() * (lo - lp)).nan_to_num(0.0).sum(-1)  # (n, L); 0 * -inf terms (the mask column) -> 0
        take = lambda v: v[m].mean().item()
        rows.append({"t": t, "model": take(-lp.gather(-1, x[..., None]).squeeze(-1)),
                     "oracle": take(-lo.gather(-1, x[..., None]).squeeze(-1)), "kl": take(kl)})
    return rows


def lab_table(rows, H):
    """Text table of lab_metrics rows ({"row", ...}) against the reference entropy H (Lab.entropy)."""
    lines = [f"exact (the lab): H = {H['H']:.4f} ± {H['H_se']:.4f} nats/token (entropy of {H['L']}-token windows, "
             f"{H['n']} draws; entropy rate h = {H['h_rate']:.4f} ± {H['h_rate_se']:.4f})",
             f"{'row':>6} {'CE':>8} {'(se)':>7} {'CE - H':>8} {'oracle gen NLL':>14} {'judge gen NLL':>13} "
             f"{'valid words':>11} {'(se)':>7} {'word TV':>8} {'(se)':>7}"]
    f = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    for r in rows:
        lines.append(f"{r['row']:>6} {r['ce']:>8.4f} {r['ce_se']:>7.4f} {r['ce'] - H['H']:>+8.4f} "
                     f"{r['oracle_gen_nll']:>14.4f} {f(r.get('gen_nll'), '.4f'):>13} {r['valid_words']:>11.4f} "
                     f"{r['valid_words_se']:>7.4f} {r['word_tv']:>8.4f} {r['word_tv_se']:>7.4f}")
    lines.append("(CE = mean -log p_true(sample)/token; perfect sampler: CE = H. oracle gen NLL: the gen-NLL protocol "
                 "with the true model as judge; judge gen NLL: the learned judge. real = exact samples of the lab)")
    return "\n".join(lines)


def describe(spec="lab", L=128, n=1000, draws=2048, seed=0):
    """The numbers of docs/lab.md's instance table (experiments/lab_describe.py prints them): size, H, and the cost of each exact function on n
    sequences of L tokens (milliseconds per 1000 sequences, this machine, torch's default threads)."""
    lab, gen = Lab(parse_spec(spec)), torch.Generator().manual_seed(seed)
    x = lab.sample(n, L, gen)  # (n, L)
    t = torch.rand(n, 1, generator=gen)  # a masking rate per sequence, as in training
    z = torch.where(torch.rand(n, L, generator=gen) < t, lab.mask_id, x)  # (n, L)
    jobs = {"sample": lambda: lab.sample(n, L, gen), "log_prob": lambda: lab.log_prob(x),
            "next_token_probs (oracle AR)": lambda: lab.next_token_probs(x),
            "conditionals (full, TCS target)": lambda: lab.conditionals(x),
            "OracleDenoiser (masked z)": lambda: OracleDenoiser(lab)(z)}
    ms = {}
    for name, job in jobs.items():
        t0 = time.perf_counter()
        job()
        ms[name] = (time.perf_counter() - t0) * 1e3 * 1000 / n
    t0 = time.perf_counter()
    H = lab.entropy(L, draws, seed)
    ms[f"entropy ({draws} draws, total)"] = (time.perf_counter() - t0) * 1e3
    info = {"spec": lab.params.spec(), "W": lab.params.W, "V": lab.V, "S": lab.S, "L": L, **H,
            "mean_word_len": float((lab.word_pi * lab.n_states).sum() - 1), "ms_per_1000": ms,
            "threads": torch.get_num_threads()}
    print(f"{info['spec']}\nW {info['W']} words, |V| {lab.V} (+ [MASK]), S {lab.S} hidden states, mean word length "
          f"{info['mean_word_len']:.2f} letters\nH = {H['H']:.4f} ± {H['H_se']:.4f} nats/token ({L}-token windows), "
          f"entropy rate h = {H['h_rate']:.4f} ± {H['h_rate_se']:.4f}")
    for name, v in ms.items():
        print(f"  {name:<36} {v:9.0f} ms" + ("" if "total" in name else f" per 1000 sequences of {L}"))
    return info
