"""Evaluation functions used by train.py, eval.py and bench.py (docs/evaluation.md).

- val PPL: AR exact next-token NLL; MDLM the NELBO bound (Sahoo et al. 2024, eq. 10), both on the
  same held-out tokens (heldout_windows).
- generative perplexity, two protocols (GEN_PPL_PROTOCOLS; section "MDLM's protocol" below):
  "sdtt": an AR judge scores samples (judge_nll); gen PPL = exp(mean over samples of
  each sample's mean next-token NLL). Convention, identical for every sample set (diffusion samples,
  the AR model's own samples, real text): the judge scores tokens 2..L of a sample given the tokens
  before them; the first token is context only (as MDLM's generative-perplexity code does: logits of
  x[:-1] against x[1:]). No BOS is prepended: windows of the corpus start mid-document, and an
  end-of-text prefix would score the first token as the start of a document. "mdlm": decode,
  re-tokenise, chunked scoring, token mean over the set (mdlm_judge_tokens, corpus_nll).
- unigram entropy of each sample (nats), averaged: low when text is degenerate (Zheng et al. 2024).
- self-BLEU over a sample set (Zhu et al. 2018, Texygen): high when samples repeat each other.
- LAMBADA (Paperno et al. 2016, OpenAI jsonl): last-word accuracy and per-word NLL / NELBO bound, framed
  as SDTT evaluates it ([BOS] + context + [MASK]s + [EOS]) by default, or not (LAMBADA_FRAMINGS).
"""
import contextlib
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .common import UserError, tokenizer_key
from .data import FRAMINGS, frame, load_meta, val_windows
from .diffusion import (bound_to_ppl, forward_mask, get_schedule, masked_log_probs, nelbo_terms, sample_times,
                        val_bound_windows)


@torch.no_grad()
def ar_nll_windows(model, val_x, batch_size=32, autocast=None):
    """Mean next-token NLL (nats) of an AR model on each window of val_x (N, L+1), float64 (N,): predicts
    tokens 1..L of the window."""
    autocast = autocast or contextlib.nullcontext
    out = torch.empty(len(val_x), dtype=torch.float64, device=val_x.device)  # (N,)
    for i in range(0, len(val_x), batch_size):
        x = val_x[i:i + batch_size]  # (b, L+1)
        with autocast():
            logits = model(x[:, :-1])  # (b, L, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (b, L)
        out[i:i + len(x)] = nll.double().mean(1)
    return out


def ar_nll(model, val_x, batch_size=32, autocast=None):
    """Mean next-token NLL (nats) of an AR model on windows val_x (N, L+1): predicts tokens 1..L."""
    return ar_nll_windows(model, val_x, batch_size, autocast).mean().item()


def val_metrics(model, kind, val_x, mask_id=None, draws=2, seed=0, batch_size=32, autocast=None, schedule=None):
    """{"val_loss", "val_loss_se", "val_ppl"}: AR exact NLL; MDLM the NELBO bound (an upper bound on its NLL),
    with `draws` t draws per window from `seed` (diffusion.val_bound_windows: the number does not depend on
    batch_size), under the model's noise schedule (its checkpoint's: diffusion.get_schedule).
    val_loss_se: the standard error of the mean over windows (None for one window).
    val_x: (N, L+1) windows for AR, (N, L) for MDLM (see val_window_len)."""
    if kind == "ar":
        per_window = ar_nll_windows(model, val_x, batch_size, autocast)  # (N,)
    else:
        per_window = val_bound_windows(model, val_x, get_schedule(schedule), mask_id, draws, seed, batch_size,
                                       autocast=autocast)  # (N,)
    nats = per_window.mean().item()
    se = (per_window.std() / math.sqrt(len(per_window))).item() if len(per_window) > 1 else None
    return {"val_loss": nats, "val_loss_se": se, "val_ppl": bound_to_ppl(nats)}


def periodic_eval(model, it, kind, val_x, mask_id, draws, batch_size, autocast, schedule):
    """The training loops' held-out eval (train.py, distill.py): val_metrics of `model` in eval mode, printed as
    one line. Returns ({"iter": it, **metrics}, seconds)."""
    start, was = time.time(), model.training
    model.eval()
    metrics = val_metrics(model, kind, val_x, mask_id, draws, 0, batch_size, autocast, schedule)
    model.train(was)
    seconds = time.time() - start
    tqdm.write(f"iter {it}: " + " ".join(f"{k} {'-' if v is None else format(v, '.4f')}" for k, v in metrics.items())
               + f" ({seconds:.1f}s)")
    return {"iter": it, **metrics}, seconds


def val_window_len(kind, seq_len):
    """An AR model needs one extra token of context to predict all seq_len held-out tokens."""
    return seq_len + 1 if kind == "ar" else seq_len


def heldout_len(data_dir, seq_len):
    """The held-out window length: seq_len, or every token the val split holds when that is less than one window
    (a small file: the bound then rests on those few tokens). A UserError when there are too few to score."""
    available = load_meta(data_dir)["val_tokens"]
    if available < 3:
        raise UserError(f"the held-out split of {data_dir} holds {available} tokens: too few to score; use a bigger "
                        f"file (or a folder of several)")
    return min(seq_len, available - 1)


def heldout_windows(data_dir, kind, seq_len, max_tokens, framing="none"):
    """Held-out windows on which an AR and an MDLM model score exactly the same tokens.

    framing "none": from the start of val.bin take T = n*L + 1 tokens v_0 .. v_{nL} (n = budget // L).
    The scored tokens are v_1 .. v_{nL} for both kinds:
      MDLM: (n, L) windows v_{1+kL} .. v_{(k+1)L}, each scored as a whole (bidirectional bound);
      AR:   (n, L+1) windows v_{kL} .. v_{(k+1)L}: the first token is context only, so an AR model
            sees one token of context more than the MDLM (the only difference left).
    framing "bos_eos" (models trained on MDLM's chunks, tinydiff/data.py frame): both kinds get the same
    (n, L) windows [EOT] + v_{k(L-2)} .. v_{(k+1)(L-2)-1} + [EOT]. As in MDLM's validation loss, the MDLM
    bound scores all L positions (the two framing tokens included); the AR model predicts positions
    1..L-1 from the ones before (MDLM's AR baseline on the same chunks).
    Returns (windows, number of scored positions)."""
    available = load_meta(data_dir)["val_tokens"]
    if available < seq_len + 1:
        raise UserError(f"the val split of {data_dir} has {available} tokens, fewer than seq_len+1 = {seq_len + 1}: "
                        f"use a smaller --seq_len or a bigger corpus")
    if framing == "bos_eos":
        n = max(1, min(max_tokens // seq_len, available // (seq_len - 2)))
        text = val_windows(data_dir, seq_len - 2, n * (seq_len - 2))  # (n, L-2) consecutive val tokens
        return frame(text, load_meta(data_dir)["eot_id"]), n * (seq_len - (kind == "ar"))  # (n, L)
    if framing != "none":
        raise UserError(f"unknown framing {framing!r}: choose one of {', '.join(FRAMINGS)}")
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
    """Validate a loaded judge checkpoint (an AR model: load_checkpoint(kind="ar")) against the evaluated
    model's tokenizer `tok`. Returns True when samples must be decoded and re-encoded for the judge. Raises
    UserError."""
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


# ----------------------------------------------------------------------------- gen PPL, MDLM's protocol
#
# Two generative-perplexity protocols are in use, and their numbers differ:
#   "sdtt" (SDTT's run_eval.py; judge_nll above): the judge reads the sample's own token ids; per sample the
#          mean NLL of tokens 2..L; gen PPL = exp(mean over samples); every end-of-text token is scored.
#   "mdlm" (MDLM's compute_generative_perplexity, behind the MDLM-family numbers of the literature, e.g. 105
#          at 1024 steps): decode every sample to text and re-tokenise it for the judge (mdlm_judge_tokens),
#          pad each group of MDLM_PPL_BATCH samples to its longest with end-of-text, cut the rows into chunks
#          of the judge's context and score each chunk's tokens 2.. (corpus_nll); an end-of-text token counts
#          only when it is the first of its chunk; gen PPL = exp(token-weighted mean over the whole set).

GEN_PPL_PROTOCOLS = ("sdtt", "mdlm")
MDLM_PPL_BATCH = 8  # MDLM's eval.perplexity_batch_size: the samples padded together (a pad can be scored, below)
# transformers' clean_up_tokenization, on by default for GPT-2 in the transformers 4.38.2 that MDLM pins: its
# batch_decode drops the space before these (so the judge re-encodes " ." as ".", and so on)
_HF_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
               (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def hf_cleanup(text):
    for a, b in _HF_CLEANUP:
        text = text.replace(a, b)
    return text


def mdlm_judge_tokens(samples, tok, judge_tok, max_len):
    """MDLM's re-tokenisation: each sample (L,) decoded as transformers' GPT-2 batch_decode does (end-of-text
    written as <|endoftext|>, clean-up on) and re-encoded by the judge's tokenizer, which reads <|endoftext|>
    back as its end-of-text id; at most max_len judge tokens (MDLM: truncation at the model length).
    Equivalently: split at end-of-text, decode and clean each piece, encode it, join with the judge's
    end-of-text (the clean-up patterns start with a space, so none spans a split). List of 1-D int64 tensors."""
    out = []
    for row in samples:
        ids, piece = [], []
        for i in row.tolist() + [None]:  # None: flush the last piece
            if i is not None and i != tok.eot_id:
                piece.append(i)
                continue
            ids += judge_tok.encode(hf_cleanup(tok.decode(piece))) if piece else []
            if i is not None:
                ids.append(judge_tok.eot_id)
            piece = []
        out.append(torch.tensor(ids[:max_len], dtype=torch.long, device=row.device))
    return out


@torch.no_grad()
def corpus_nll(judge, seqs, eot_id, context, batch_size=MDLM_PPL_BATCH):
    """MDLM's scoring of re-tokenised samples `seqs` (a list of 1-D tensors): per sample the summed NLL and
    the number of scored tokens, float64 (n,) each. Each group of batch_size samples is right-padded with
    eot_id to its longest (MDLM pads with end-of-text); every row is cut into chunks of `context` tokens; in
    a chunk the judge scores tokens 2.. given the ones before (a causal judge: the right padding changes no
    real token's score), and a token counts unless it is an end-of-text after the chunk's first one. So a
    sample with no end-of-text of its own, shorter than the longest of its group, gets its first pad scored
    as its end (as in MDLM's code)."""
    sums, counts = [], []
    for g in range(0, len(seqs), batch_size):
        group = seqs[g:g + batch_size]
        x = torch.full((len(group), max(len(s) for s in group)), eot_id, dtype=torch.long, device=group[0].device)
        for r, ids in enumerate(group):
            x[r, :len(ids)] = ids  # (b, T) right-padded with end-of-text
        total = torch.zeros(len(group), dtype=torch.float64, device=x.device)
        count = torch.zeros(len(group), dtype=torch.float64, device=x.device)
        for lo in range(0, x.shape[1], context):
            chunk = x[:, lo:lo + context]  # (b, c)
            if chunk.shape[1] < 2:
                continue
            logits = judge(chunk[:, :-1])  # (b, c-1, V)
            nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (b, c-1)
            eos = chunk == eot_id  # (b, c)
            keep = (~eos | (eos.cumsum(-1) == 1))[:, 1:]  # (b, c-1): drop every end-of-text after the first
            total += torch.where(keep, nll.double(), 0.0).sum(-1)
            count += keep.sum(-1).double()
        sums.append(total.cpu())
        counts.append(count.cpu())
    return torch.cat(sums), torch.cat(counts)


def sample_metrics(samples, judge=None, judge_tokens=None, batch_size=32, protocol="sdtt", judge_eot=None,
                   judge_context=None):
    """gen NLL / PPL under the judge (when given), mean unigram entropy and self-BLEU of a sample set.
    samples: (n, L) in the model's tokens; judge_tokens: the same samples re-encoded for the judge.
    protocol "sdtt": per-sample mean NLL (judge_nll), averaged over samples; gen_nll_se = the standard error
    of that mean. "mdlm": judge_tokens from mdlm_judge_tokens, scored by corpus_nll (needs judge_eot and
    judge_context); gen NLL = total NLL / total scored tokens, gen_nll_se its ratio-estimator standard error."""
    if protocol not in GEN_PPL_PROTOCOLS:
        raise UserError(f"unknown gen PPL protocol {protocol!r}: choose one of {', '.join(GEN_PPL_PROTOCOLS)}")
    out = {"entropy": mean_entropy(samples), "self_bleu": self_bleu(samples)}
    if judge is not None and protocol == "mdlm":
        sums, counts = corpus_nll(judge, judge_tokens, judge_eot, judge_context)  # (n,), (n,)
        keep = counts > 0
        sums, counts = sums[keep], counts[keep]
        nll, n = (sums.sum() / counts.sum()).item(), len(sums)
        # ratio estimator: the se of sum(s) / sum(c) over samples is ~ sd(s_i - r c_i) / (sqrt(n) mean(c))
        se = None
        if n > 1:
            se = ((sums - nll * counts).pow(2).sum() / (n * (n - 1))).sqrt().item() / counts.mean().item()
        out.update(gen_nll=nll, gen_ppl=bound_to_ppl(nll), gen_nll_se=se, gen_tokens=int(counts.sum().item()))
    elif judge is not None:
        per_sample = judge_nll(judge, samples if judge_tokens is None else judge_tokens, batch_size)  # (n,)
        per_sample = per_sample[~per_sample.isnan()]  # a re-encoded sample may be too short to score
        nll = per_sample.mean().item()
        out.update(gen_nll=nll, gen_ppl=bound_to_ppl(nll),
                   gen_nll_se=(per_sample.std() / math.sqrt(len(per_sample))).item() if len(per_sample) > 1 else None)
    if judge is not None:
        out["gen_ppl_protocol"] = protocol
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
                        f"e.g. --lambada lambada_test.jsonl") from None
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


LAMBADA_FRAMINGS = ("sdtt", "none")


def lambada_framing(tok, framing=None):
    """The LAMBADA framing to run: `framing` when given, else SDTT's ("sdtt", the papers' protocol) when the
    tokenizer has an end-of-text id to frame with, else "none"."""
    if framing is None:
        return "sdtt" if tok.eot_id is not None else "none"
    if framing not in LAMBADA_FRAMINGS:
        raise UserError(f"unknown LAMBADA framing {framing!r}: choose one of {', '.join(LAMBADA_FRAMINGS)}")
    if framing == "sdtt" and tok.eot_id is None:
        raise UserError(f"LAMBADA framing sdtt needs an end-of-text id; the {tok.name} tokenizer has none")
    return framing


def _lambada_inputs(tok, passages, kind, seq_len, framing="none"):
    """Tokenize (context, target) pairs -> [(tokens, start, m)]: the target's m tokens sit at positions
    start .. start+m-1 of tokens. Contexts are left-truncated to fit. The context and the target are
    tokenized separately: the target keeps its leading space (GPT-2's BPE never merges across it anyway).

    framing "none": context + target. "sdtt" (SDTT's eval_lambada and harness_gpt2 --add_bos --add_eos,
    BOS = EOS = end-of-text): [BOS] + context + target + [EOS] for the diffusion model, whose EOS stays
    clamped and tells it the passage ends after the word; [BOS] + context + target for an AR model (SDTT's
    GPT-2 harness appends the EOS too, but a causal model's predictions of the target cannot see it).
    Returns (inputs, number truncated)."""
    bos = [tok.eot_id] if framing == "sdtt" else []
    eos = [tok.eot_id] if framing == "sdtt" and kind == "mdlm" else []
    inputs, truncated = [], 0
    for context, target in passages:
        ctx, tgt = tok.encode(context), tok.encode(target)
        if not ctx and not bos and kind == "ar":
            ctx = [tok.eot_id]  # an AR model needs something to predict the first token from
        room = seq_len - len(tgt) + (kind == "ar") - len(bos) - len(eos)  # AR reads all but the last token
        if room < 1:
            raise UserError(f"a LAMBADA target of {len(tgt)} tokens does not fit in seq_len {seq_len}")
        if len(ctx) > room:
            ctx, truncated = ctx[-room:], truncated + 1
        inputs.append((bos + ctx + tgt + eos, len(bos) + len(ctx), len(tgt)))
    return inputs, truncated


@torch.no_grad()
def lambada(model, kind, tok, passages, seq_len, mask_id=None, draws=8, seed=0, autocast=None, device="cpu",
            batch_size=32, framing=None, schedule=None):
    """Last-word prediction on LAMBADA (docs/evaluation.md §4), passages = [(context, target)].

    framing (_lambada_inputs): "sdtt" frames every passage as SDTT evaluates it, [BOS] + context +
    target (+ [EOS], clamped, for the diffusion model); "none" feeds context + target alone. Default
    (None): "sdtt" when the tokenizer has an end-of-text id (lambada_framing).
    AR: one teacher-forced pass on the input; correct iff every target token is the argmax given the
        true tokens before it; per-word NLL = sum of the target tokens' NLLs (exact).
    MDLM: the input with every target token masked, one forward pass; correct iff the argmax (mask
        excluded) matches at every target position (SDTT's eval_lambada; MDLM's paper has no LAMBADA
        accuracy). Per-word NLL: the NELBO bound on -log p(target | the rest), diffusing only the
        target positions (context and framing clamped), with `draws` stratified t values under the
        model's noise schedule; those rows go through the network with the accuracy row.
    Contexts longer than the model allows are left-truncated (counted in "truncated"). Passages whose
    inputs have the same length share a forward pass (no padding: it would change what a
    bidirectional model sees); batch_size bounds the rows of one pass.
    Returns {"acc", "nll" (nats per word, mean), "ppl" (exp nll), "n", "truncated", "target_tokens",
    "framing", "correct"}.
    """
    framing = lambada_framing(tok, framing)
    autocast = autocast or contextlib.nullcontext
    schedule, gen = get_schedule(schedule), torch.Generator(device=device).manual_seed(seed)
    inputs, truncated = _lambada_inputs(tok, passages, kind, seq_len, framing)
    by_len = {}
    for i, (ids, c, m) in enumerate(inputs):
        by_len.setdefault(len(ids), []).append(i)
    rows_each = 1 if kind == "ar" else 1 + draws  # network rows per passage
    per_pass = max(1, batch_size // rows_each)
    correct, nll = [False] * len(inputs), [0.0] * len(inputs)
    for n, idx in sorted(by_len.items()):
        for start in range(0, len(idx), per_pass):
            chunk = idx[start:start + per_pass]
            x = torch.tensor([inputs[i][0] for i in chunk], dtype=torch.long, device=device)  # (g, n)
            spans = [inputs[i][1:] for i in chunk]  # (start, m) of each target
            if kind == "ar":
                with autocast():
                    logits = model(x[:, :-1])  # (g, n-1, V): row j predicts token j+1
                for r, (i, (c, m)) in enumerate(zip(chunk, spans)):
                    logp = F.log_softmax(logits[r, c - 1:c - 1 + m].float(), -1)  # (m, V): rows predicting the target
                    correct[i] = bool((logp.argmax(-1) == x[r, c:c + m]).all())
                    nll[i] = -logp.gather(-1, x[r, c:c + m, None]).sum().item()
                continue
            g = len(chunk)
            row0 = x.clone()
            pos = torch.arange(n, device=device)[None, :]  # (1, n)
            lo = torch.tensor([c for c, _ in spans], device=device)[:, None]  # (g, 1) first target position
            hi = lo + torch.tensor([m for _, m in spans], device=device)[:, None]  # (g, 1) one past the last
            keep = (pos < lo) | (pos >= hi)  # (g, n): context and framing, clamped
            row0[~keep] = mask_id  # the accuracy inputs: every target token masked
            t = torch.cat([sample_times(draws, gen, device) for _ in chunk])  # (g*K,) stratified per passage
            xk = x.repeat_interleave(draws, 0)  # (g*K, n)
            z = forward_mask(xk, t, schedule, mask_id, gen)  # (g*K, n)
            z = torch.where(keep.repeat_interleave(draws, 0), xk, z)  # context and framing clamped
            with autocast():
                logits = model(torch.cat([row0, z]))  # (g + g*K, n, V)
            pred = masked_log_probs(logits[:g], mask_id).argmax(-1)  # (g, n), mask excluded
            terms = nelbo_terms(logits[g:], xk, z, t, schedule, mask_id).view(g, draws, n)  # (g, K, n)
            bound = terms.sum(-1).double().mean(-1)  # (g,): bound on -log p(target | context), nats
            for r, (i, (c, m)) in enumerate(zip(chunk, spans)):
                correct[i] = bool((pred[r, c:c + m] == x[r, c:c + m]).all())
                nll[i] = bound[r].item()
    N = len(inputs)
    mean_nll = sum(nll) / N
    return {"acc": sum(correct) / N, "nll": mean_nll, "ppl": bound_to_ppl(mean_nll), "n": N,
            "truncated": truncated, "target_tokens": sum(m for _, _, m in inputs) / N, "framing": framing,
            "correct": correct}
