"""Evaluation functions used by train.py, eval.py and bench.py (design.md §8).

- val PPL: AR exact next-token NLL; MDLM the NELBO bound (Sahoo et al. 2024, eq. 10), both on the
  same held-out tokens (heldout_windows).
- generative perplexity: an AR judge scores samples (judge_nll); gen PPL = exp(mean over samples of
  each sample's mean next-token NLL). Convention, identical for every sample set (diffusion samples,
  the AR model's own samples, real text): the judge scores tokens 2..L of a sample given the tokens
  before them; the first token is context only (as MDLM's generative-perplexity code does: logits of
  x[:-1] against x[1:]). No BOS is prepended: windows of the corpus start mid-document, and an
  end-of-text prefix would score the first token as the start of a document.
- unigram entropy of each sample (nats), averaged: low when text is degenerate (Zheng et al. 2024).
- self-BLEU over a sample set (Zhu et al. 2018, Texygen): high when samples repeat each other.
- LAMBADA (Paperno et al. 2016, OpenAI jsonl): last-word accuracy and per-word NLL / NELBO bound.
"""
import contextlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import UserError
from .data import load_meta, tokenizer_key, val_windows
from .diffusion import (LogLinearSchedule, bound_to_ppl, forward_mask, masked_log_probs, nelbo_terms, sample_times,
                        val_bound)


@torch.no_grad()
def ar_nll(model, val_x, batch_size=32, autocast=None):
    """Mean next-token NLL (nats) of an AR model on windows val_x (N, L+1): predicts tokens 1..L."""
    autocast = autocast or contextlib.nullcontext
    total, count = torch.zeros((), dtype=torch.float64, device=val_x.device), 0
    for i in range(0, len(val_x), batch_size):
        x = val_x[i:i + batch_size]  # (b, L+1)
        with autocast():
            logits = model(x[:, :-1])  # (b, L, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").double()
        count += x[:, 1:].numel()
    return total.item() / count


def val_metrics(model, kind, val_x, mask_id=None, draws=2, seed=0, batch_size=32, autocast=None):
    """{"val_loss", "val_ppl"}: AR exact NLL; MDLM the NELBO bound (an upper bound on its NLL).
    val_x: (N, L+1) windows for AR, (N, L) for MDLM (see val_window_len)."""
    if kind == "ar":
        nats = ar_nll(model, val_x, batch_size, autocast)
    else:
        nats = val_bound(model, val_x, LogLinearSchedule(), mask_id, draws, seed, batch_size, autocast=autocast)
    return {"val_loss": nats, "val_ppl": bound_to_ppl(nats)}


def val_window_len(kind, seq_len):
    """An AR model needs one extra token of context to predict all seq_len held-out tokens."""
    return seq_len + 1 if kind == "ar" else seq_len


def heldout_windows(data_dir, kind, seq_len, max_tokens):
    """Held-out windows on which an AR and an MDLM model score exactly the same tokens.

    From the start of val.bin take T = n*L + 1 tokens v_0 .. v_{nL} (n = budget // L). The scored
    tokens are v_1 .. v_{nL} for both kinds:
      MDLM: (n, L) windows v_{1+kL} .. v_{(k+1)L}, each scored as a whole (bidirectional bound);
      AR:   (n, L+1) windows v_{kL} .. v_{(k+1)L}: the first token is context only, so an AR model
            sees one token of context more than the MDLM (the only difference left).
    Returns (windows, number of scored tokens)."""
    available = load_meta(data_dir)["val_tokens"]
    if available < seq_len + 1:
        raise UserError(f"the val split of {data_dir} has {available} tokens, fewer than seq_len+1 = {seq_len + 1}: "
                        f"use a smaller --seq_len or a bigger corpus")
    n = max(1, min(max_tokens, available - 1) // seq_len)
    flat = val_windows(data_dir, n * seq_len + 1, n * seq_len + 1)[0]  # (nL+1,) the first nL+1 val tokens
    if kind == "ar":
        return flat.unfold(0, seq_len + 1, seq_len), n * seq_len  # (n, L+1), stride L: overlap of one token
    return flat[1:].view(n, seq_len), n * seq_len  # (n, L)


def per_byte(data_dir, tok, seq_len, max_tokens, nats_per_token):
    """A held-out loss per byte, comparable across tokenizers, next to a unigram model of the corpus.

    nats_per_token: val_metrics' loss on heldout_windows(data_dir, ..., seq_len, max_tokens). Bytes are the
    UTF-8 bytes of the scored tokens (an end-of-text counts 1, as in the byte tokenizer). The unigram model is
    the training split's token frequencies, add-one smoothed, scored on the same held-out tokens."""
    scored = heldout_windows(data_dir, "mdlm", seq_len, max_tokens)[0].flatten().numpy()  # (n,) the scored tokens
    n_bytes = int(tok.byte_lengths()[scored].sum())
    counts = np.bincount(np.fromfile(Path(data_dir) / "train.bin", dtype=np.uint16), minlength=tok.vocab_size)
    logp = np.log((counts + 1) / (counts.sum() + tok.vocab_size))  # (V,)
    return {"heldout_tokens": len(scored), "heldout_bytes": n_bytes,
            "val_loss_per_byte": nats_per_token * len(scored) / n_bytes,
            "unigram_per_byte": float(-logp[scored].sum() / n_bytes)}


# ----------------------------------------------------------------------------- generative perplexity, entropy

def check_judge(jckpt, tok, retokenize, path):
    """Validate a loaded judge checkpoint against the evaluated model's tokenizer `tok`.
    Returns True when samples must be decoded and re-encoded for the judge. Raises UserError."""
    if jckpt["kind"] != "ar":
        raise UserError(f"judge {path} is a {jckpt['kind']} model: the judge must be an AR checkpoint "
                        f"(train one with train.py --model ar)")
    key = tokenizer_key(jckpt["tokenizer"])  # a bpe tokenizer is its merges (their hash), not its name
    if key == tok.key:
        return False
    if not retokenize:
        raise UserError(f"judge {path} uses the {key} tokenizer but the model uses {tok.key}: use a judge trained "
                        f"with the model's tokenizer (--tokenizer {tok.name}; bpe: on the same --data, same "
                        f"--vocab_size), or pass --retokenize to decode and re-encode the samples")
    return True


def retokenize(samples, tok, judge_tok, max_len):
    """Decode each sample (L,) with the model's tokenizer and encode the text with the judge's,
    keeping at most max_len judge tokens. Returns a list of 1-D int64 tensors (lengths differ)."""
    out = []
    for row in samples:
        ids = judge_tok.encode(tok.decode(row.tolist()))[:max_len]
        out.append(torch.tensor(ids, dtype=torch.long, device=row.device))
    return out


@torch.no_grad()
def judge_nll(judge, samples, batch_size=32):
    """Per-sample mean next-token NLL (nats) under an AR judge, float64 (n,).

    samples: (n, L) tokens, or a list of 1-D tensors of any lengths (re-encoded samples). The judge
    reads x[:-1] and scores x[1:] (module docstring: the first token is context only). It runs in
    float32, as the papers' GPT-2 judge does."""
    if isinstance(samples, torch.Tensor):
        groups = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    else:
        groups = [s[None] for s in samples]  # one sample at a time: lengths differ
    out = []
    for x in groups:
        if x.shape[1] < 2:  # nothing to score
            out.append(torch.full((len(x),), float("nan"), dtype=torch.float64))
            continue
        logits = judge(x[:, :-1])  # (b, L-1, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (b, L-1)
        out.append(nll.double().mean(1).cpu())
    return torch.cat(out)


def unigram_entropy(tokens):
    """Entropy (nats) of the empirical token distribution of one sample (L,): -sum_v p_v log p_v."""
    counts = torch.bincount(torch.as_tensor(tokens).flatten().long().cpu()).double()
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()


def mean_entropy(samples):
    """Unigram entropy of each sample, averaged over the set."""
    return sum(unigram_entropy(s) for s in samples) / len(samples)


def _ngrams(seq, n):
    return Counter(zip(*(seq[i:] for i in range(n))))


def self_bleu(samples, max_n=4, smooth=0.1):
    """Self-BLEU (Zhu et al. 2018): BLEU-max_n of every sample against all the others as references,
    averaged. 1 = the samples repeat each other, near 0 = no shared n-grams. Token level, uniform
    weights over n = 1..max_n (Papineni et al. 2002: clipped n-gram precisions, brevity penalty);
    a precision with no match counts smooth/total instead of 0 (Chen & Cherry 2014, method 1).

    Clipping against "all other samples" needs, per n-gram, the largest count among the others: we
    keep the two largest counts and the owner of the first, so the cost is linear in the set size."""
    seqs = [tuple(torch.as_tensor(s).tolist()) for s in samples]
    S = len(seqs)
    if S < 2:
        return None
    log_prec = [[] for _ in range(S)]  # per sample, log p_n for each n-gram order with at least one n-gram
    for n in range(1, max_n + 1):
        grams = [_ngrams(s, n) for s in seqs]
        top = {}  # n-gram -> (largest count, its owner, second largest count)
        for j, counts in enumerate(grams):
            for g, k in counts.items():
                c1, owner, c2 = top.get(g, (0, -1, 0))
                top[g] = (k, j, c1) if k > c1 else (c1, owner, max(c2, k))
        for j, counts in enumerate(grams):
            total = sum(counts.values())
            if total == 0:
                continue
            matched = 0
            for g, k in counts.items():
                c1, owner, c2 = top[g]
                matched += min(k, c2 if owner == j else c1)  # clip by the max count in the other samples
            log_prec[j].append(math.log(matched / total if matched else smooth / total))
    lengths, scores = Counter(len(s) for s in seqs), []
    for j, s in enumerate(seqs):
        others = [n for n, k in lengths.items() if k - (n == len(s)) > 0]  # lengths of the other samples
        r = min(others, key=lambda x: (abs(x - len(s)), x))  # closest reference length
        bp = 1.0 if len(s) > r else math.exp(1 - r / max(len(s), 1))
        scores.append(bp * math.exp(sum(log_prec[j]) / len(log_prec[j])) if log_prec[j] else 0.0)
    return sum(scores) / S


def sample_metrics(samples, judge=None, judge_tokens=None, batch_size=32):
    """gen NLL / PPL under the judge (when given), mean unigram entropy and self-BLEU of a sample set.
    samples: (n, L) in the model's tokens; judge_tokens: the same samples re-encoded for the judge."""
    out = {"entropy": mean_entropy(samples), "self_bleu": self_bleu(samples)}
    if judge is not None:
        per_sample = judge_nll(judge, samples if judge_tokens is None else judge_tokens, batch_size)  # (n,)
        per_sample = per_sample[~per_sample.isnan()]  # a re-encoded sample may be too short to score
        nll = per_sample.mean().item()
        out.update(gen_nll=nll, gen_ppl=bound_to_ppl(nll),
                   gen_nll_se=(per_sample.std() / math.sqrt(len(per_sample))).item() if len(per_sample) > 1 else None)
    return out


# ----------------------------------------------------------------------------- LAMBADA

def split_last_word(text):
    """(context, target): target = the last whitespace-separated word with the whitespace before it
    (e.g. ' signs'), context = everything before. Trailing whitespace is dropped."""
    text = text.rstrip()
    cut = max(text.rfind(c) for c in " \t\n\r")
    if cut < 0:  # a single word: no context, no leading space
        return "", text
    return text[:cut], text[cut:]


def read_lambada(path, limit=None):
    """The OpenAI LAMBADA jsonl (one {"text": ...} per line) -> [(context, target)], at most `limit`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
    except OSError as e:
        raise UserError(f"cannot read LAMBADA file {path} ({e.strerror}): give the OpenAI jsonl, "
                        f"e.g. --lambada ../shared/data/lambada_test.jsonl") from None
    passages = []
    for i, line in enumerate(lines[:limit] if limit else lines, 1):
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {i} is not a JSON object with a \"text\" field "
                            f"(expected the OpenAI LAMBADA jsonl format)") from None
        passages.append(split_last_word(text))
    if not passages:
        raise UserError(f"{path} holds no passages")
    return passages


def _lambada_inputs(tok, passages, kind, seq_len):
    """Tokenize (context, target) pairs -> [(tokens, context length)], contexts left-truncated to fit.
    The context and the target are tokenized separately: the target keeps its leading space (GPT-2's
    BPE never merges across it anyway). Returns (inputs, number truncated)."""
    inputs, truncated = [], 0
    for context, target in passages:
        ctx, tgt = tok.encode(context), tok.encode(target)
        if not ctx and kind == "ar":
            ctx = [tok.eot_id]  # an AR model needs something to predict the first token from
        room = seq_len - len(tgt) + (kind == "ar")  # AR reads context + target minus its last token
        if room < 1:
            raise UserError(f"a LAMBADA target of {len(tgt)} tokens does not fit in seq_len {seq_len}")
        if len(ctx) > room:
            ctx, truncated = ctx[-room:], truncated + 1
        inputs.append((ctx + tgt, len(ctx)))
    return inputs, truncated


@torch.no_grad()
def lambada(model, kind, tok, passages, seq_len, mask_id=None, draws=8, seed=0, autocast=None, device="cpu",
            batch_size=32):
    """Last-word prediction on LAMBADA (design.md §8), passages = [(context, target)].

    AR: one teacher-forced pass on context + target; correct iff every target token is the argmax
        given the true tokens before it; per-word NLL = sum of the target tokens' NLLs (exact).
    MDLM: input = context + [MASK] * len(target), one forward pass; correct iff the argmax (mask
        excluded) matches at every target position (MDLM's protocol). Per-word NLL: the NELBO bound
        on -log p(target | context), diffusing only the target positions (context clamped), with
        `draws` stratified t values; those rows go through the network with the accuracy row.
    Contexts longer than the model allows are left-truncated (counted in "truncated"). Passages whose
    inputs have the same length share a forward pass (no padding: it would change what a
    bidirectional model sees); batch_size bounds the rows of one pass.
    Returns {"acc", "nll" (nats per word, mean), "ppl" (exp nll), "n", "truncated", "target_tokens"}.
    """
    autocast = autocast or contextlib.nullcontext
    schedule, gen = LogLinearSchedule(), torch.Generator(device=device).manual_seed(seed)
    inputs, truncated = _lambada_inputs(tok, passages, kind, seq_len)
    by_len = {}
    for i, (ids, c) in enumerate(inputs):
        by_len.setdefault(len(ids), []).append(i)
    rows_each = 1 if kind == "ar" else 1 + draws  # network rows per passage
    per_pass = max(1, batch_size // rows_each)
    correct, nll = [False] * len(inputs), [0.0] * len(inputs)
    for n, idx in sorted(by_len.items()):
        for start in range(0, len(idx), per_pass):
            chunk = idx[start:start + per_pass]
            x = torch.tensor([inputs[i][0] for i in chunk], dtype=torch.long, device=device)  # (g, n)
            ctx = [inputs[i][1] for i in chunk]
            if kind == "ar":
                with autocast():
                    logits = model(x[:, :-1])  # (g, n-1, V): row j predicts token j+1
                for r, (i, c) in enumerate(zip(chunk, ctx)):
                    logp = F.log_softmax(logits[r, c - 1:].float(), -1)  # (m, V): the rows that predict the target
                    correct[i] = bool((logp.argmax(-1) == x[r, c:]).all())
                    nll[i] = -logp.gather(-1, x[r, c:, None]).sum().item()
                continue
            g = len(chunk)
            row0 = x.clone()
            keep = torch.arange(n, device=device)[None, :] < torch.tensor(ctx, device=device)[:, None]  # (g, n) context
            row0[~keep] = mask_id  # the accuracy inputs: every target token masked
            t = torch.cat([sample_times(draws, gen, device) for _ in chunk])  # (g*K,) stratified per passage
            xk = x.repeat_interleave(draws, 0)  # (g*K, n)
            z = forward_mask(xk, t, schedule, mask_id, gen)  # (g*K, n)
            z = torch.where(keep.repeat_interleave(draws, 0), xk, z)  # the context is clamped
            with autocast():
                logits = model(torch.cat([row0, z]))  # (g + g*K, n, V)
            pred = masked_log_probs(logits[:g], mask_id).argmax(-1)  # (g, n), mask excluded
            terms = nelbo_terms(logits[g:], xk, z, t, schedule, mask_id).view(g, draws, n)  # (g, K, n)
            bound = terms.sum(-1).double().mean(-1)  # (g,): bound on -log p(target | context), nats
            for r, (i, c) in enumerate(zip(chunk, ctx)):
                correct[i] = bool((pred[r, c:] == x[r, c:]).all())
                nll[i] = bound[r].item()
    N = len(inputs)
    mean_nll = sum(nll) / N
    return {"acc": sum(correct) / N, "nll": mean_nll, "ppl": bound_to_ppl(mean_nll), "n": N,
            "truncated": truncated, "target_tokens": sum(len(ids) - c for ids, c in inputs) / N,
            "correct": correct}
