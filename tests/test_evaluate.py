"""Evaluation (tinydiff/evaluate.py, eval.py) against exact values.

- generative perplexity: on the known-distribution harness the oracle AR judge scores samples; for
  exact samples the expected value is computed from the table (under the convention the judge
  scores tokens 2..L given the ones before, it is the entropy rate of X_1..X_{L-1} given X_0);
- entropy and self-BLEU: hand-computed values and a brute-force reference;
- LAMBADA: fake models whose logits we construct (an oracle that knows every answer, and the same
  oracle wrong on one token of one multi-token word), both model kinds, bytes and gpt2 tokenizers;
- eval.py end to end on tiny checkpoints written by train.py, and its one-line errors for a
  corrupt judge and a judge with another tokenizer.
"""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import gpt2_or_skip
from harness import exact_sampler_law, z_threshold
from tinydiff.common import UserError, check_checkpoint
from tinydiff.data import BPETokenizer, get_tokenizer
from tinydiff.evaluate import (_lambada_inputs, check_judge, corpus_nll, heldout_windows, judge_nll, lambada,
                               mdlm_judge_tokens, mean_entropy, read_lambada, sample_metrics, self_bleu,
                               split_last_word, unigram_entropy, val_metrics)
from tinydiff.sampling import diffusion_sample

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA = 1e-4


# ---------------------------------------------------------------- generative perplexity on the harness


class NoBOSJudge(nn.Module):
    """OracleAR with the interface of a tinydiff AR model, which has no start token: it reads
    x_0..x_{T-1} (B, T) and returns (B, T, V) logits, row j = log p(x_{j+1} | x_0..x_j)."""

    def __init__(self, oracle_ar):
        super().__init__()
        self.ar = oracle_ar

    def forward(self, idx):
        bos = torch.full((len(idx), 1), self.ar.bos_id, dtype=torch.long)
        return self.ar(torch.cat([bos, idx], 1))[:, 1:]  # drop the row that predicts x_0


def scored_nll(toy):
    """Exact per-sequence value of what judge_nll computes with the oracle: the mean NLL of tokens
    1..L-1 given the tokens before them, -log p(x_1..x_{L-1} | x_0) / (L-1), shape (N,)."""
    first = toy.marginals()[0][toy.seqs[:, 0]]  # (N,) p(x_0)
    return (-toy.p.log() + first.log()) / (toy.L - 1)


def test_judge_nll_is_exact_per_sequence(toy, oracle_ar):
    got = judge_nll(NoBOSJudge(oracle_ar), toy.seqs, batch_size=32)  # (N,)
    assert torch.allclose(got, scored_nll(toy), atol=1e-5)
    ragged = judge_nll(NoBOSJudge(oracle_ar), list(toy.seqs[:5]))  # the re-encoded (list) path
    assert torch.allclose(ragged, got[:5], atol=1e-6)


def test_gen_ppl_of_exact_samples_is_the_entropy_rate(toy, oracle_ar):
    """E[gen NLL] = sum_x p(x) f(x) = (H(X) - H(X_0)) / (L-1): the true entropy per scored token."""
    f = scored_nll(toy)
    expected = (toy.p * f).sum().item()
    assert expected == pytest.approx((toy.entropy() - torch.special.entr(toy.marginals()[0]).sum().item())
                                     / (toy.L - 1), abs=1e-12)
    n = 5_000
    samples = toy.sample(n, torch.Generator().manual_seed(0))  # (n, L) exact draws from the table
    m = sample_metrics(samples, NoBOSJudge(oracle_ar), batch_size=4096)
    se = math.sqrt(((toy.p * f ** 2).sum() - expected ** 2).item() / n)  # exact standard error
    assert abs(m["gen_nll"] - expected) < z_threshold(ALPHA, 2) * se
    assert m["gen_ppl"] == pytest.approx(math.exp(m["gen_nll"]))
    # the sample entropy too has an exact expectation: sum_x p(x) H_unigram(x)
    h = torch.tensor([unigram_entropy(x) for x in toy.seqs], dtype=torch.float64)
    h_exp = (toy.p * h).sum().item()
    h_se = math.sqrt(((toy.p * h ** 2).sum() - h_exp ** 2).item() / n)
    assert abs(m["entropy"] - h_exp) < z_threshold(ALPHA, 2) * h_se

    # degenerate text: the single most likely sequence, repeated. Its gen PPL is lower than that of
    # exact samples (gen PPL alone would rank it better), and its lower entropy gives it away.
    best = toy.seqs[toy.p.argmax()]
    d = sample_metrics(best.expand(500, -1), NoBOSJudge(oracle_ar), batch_size=500)
    z = z_threshold(ALPHA, 2)
    assert d["gen_nll"] == pytest.approx(f[toy.p.argmax()].item(), abs=1e-5)
    assert d["gen_nll"] < m["gen_nll"] - z * se and d["gen_ppl"] < m["gen_ppl"]
    assert d["entropy"] < m["entropy"] - z * h_se
    assert d["self_bleu"] == pytest.approx(1.0)


def test_gen_ppl_of_diffusion_samples_follows_the_exact_sampler_law(toy, oracle, oracle_ar):
    """Samples of the K-step ancestral sampler with the oracle denoiser: their gen NLL matches its
    exact expectation under the sampler's law (exact_sampler_law), which falls towards the entropy
    rate as K grows (at K = 1 the positions are drawn independently: a cross-entropy, higher)."""
    f, n = scored_nll(toy), 10_000
    laws = {K: exact_sampler_law(oracle, K, toy.V, toy.L, toy.mask_id) for K in (1, 2, 64)}
    exact = {K: (law * f).sum().item() for K, law in laws.items()}
    assert exact[1] > exact[2] > exact[64] > (toy.p * f).sum().item() - 1e-9
    for K in (1, 64):
        x, _ = diffusion_sample(oracle, n, toy.L, K, toy.mask_id, generator=torch.Generator().manual_seed(K))
        se = math.sqrt(((laws[K] * f ** 2).sum() - exact[K] ** 2).item() / n)
        got = judge_nll(NoBOSJudge(oracle_ar), x, batch_size=4096).mean().item()
        assert abs(got - exact[K]) < z_threshold(ALPHA, 2) * se, (K, got, exact[K])


# ---------------------------------------------------------------- the two gen PPL protocols, by hand

class BigramJudge(nn.Module):
    """A causal judge with a known table: log p(next = w | current = v) = log_softmax(table[v])[w]."""

    def __init__(self, V=257, seed=0):
        super().__init__()
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2

    def forward(self, idx):
        return self.table[idx].float()  # (B, T, V)

    def logp(self, v, w):
        return torch.log_softmax(self.table[v], -1)[w].item()


EOT = 256


def byte_samples(rows, L=24):
    """(n, L) byte-tokenizer samples from pieces: str -> its bytes, None -> end-of-text; padded with 'z'."""
    out = []
    for pieces in rows:
        ids = [t for p in pieces for t in ([EOT] if p is None else list(p.encode()))]
        out.append(ids + [ord("z")] * (L - len(ids)))
    assert all(len(r) == L for r in out)
    return torch.tensor(out)


ROWS = [["ab . cd", None, "e", None, "gh"],  # two end-of-texts in one chunk: MDLM keeps only the first
        ["it 's here ."],  # clean-up shortens it by two bytes; no end-of-text: its first pad gets scored
        ["no end in this one at all"[:24]],  # the longest of the group: no padding, no end-of-text scored
        [None, "starts with one", None]]


def test_sdtt_gen_ppl_by_hand():
    """SDTT's run_eval: the judge reads the ids as sampled; per sample the mean NLL of tokens 2..L with every
    end-of-text counted; gen NLL = the mean over samples, gen PPL = exp of it."""
    x, judge = byte_samples(ROWS), BigramJudge()
    per = [sum(-judge.logp(r[j - 1], r[j]) for j in range(1, len(r))) / (len(r) - 1) for r in x.tolist()]
    m = sample_metrics(x, judge, batch_size=3)
    assert m["gen_ppl_protocol"] == "sdtt"
    assert m["gen_nll"] == pytest.approx(sum(per) / len(per), rel=1e-6)
    assert m["gen_ppl"] == pytest.approx(math.exp(sum(per) / len(per)), rel=1e-6)
    assert m["gen_nll_se"] == pytest.approx(np.std(per, ddof=1) / math.sqrt(len(per)), rel=1e-5)


def test_mdlm_gen_ppl_by_hand():
    """MDLM's compute_generative_perplexity, written out: batch_decode (end-of-text as <|endoftext|>,
    transformers' clean-up), re-tokenise (truncated to the model length), pad each group of 8 with end-of-text,
    chunks of the judge's context, score tokens 2.. of each chunk except end-of-texts after the chunk's first;
    gen NLL = total NLL / total scored tokens."""
    tok, judge, L, ctx = get_tokenizer("bytes"), BigramJudge(), 24, 10
    x = byte_samples(ROWS, L)
    cleanup = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
               (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]
    seqs = []
    for r in x.tolist():  # the decoded text as one string, cleaned, then re-encoded around the special token
        text = "".join("<|endoftext|>" if t == EOT else chr(t) for t in r)
        for a, b in cleanup:
            text = text.replace(a, b)
        ids = []
        for k, part in enumerate(text.split("<|endoftext|>")):
            ids += ([EOT] if k else []) + list(part.encode())
        seqs.append(ids[:L])
    assert seqs[1][:10] == list(b"it's here.") and len(seqs[1]) == L - 2
    T = max(len(q) for q in seqs)  # one group: all 4 samples padded together
    total = count = 0.0
    for q in seqs:
        q = q + [EOT] * (T - len(q))
        for lo in range(0, T, ctx):
            chunk, seen = q[lo:lo + ctx], 0
            for j, t in enumerate(chunk):
                seen += t == EOT
                if j > 0 and (t != EOT or seen == 1):
                    total, count = total + -judge.logp(chunk[j - 1], t), count + 1
    got = mdlm_judge_tokens(x, tok, tok, L)
    assert [g.tolist() for g in got] == seqs
    m = sample_metrics(x, judge, got, protocol="mdlm", judge_eot=EOT, judge_context=ctx)
    assert m["gen_ppl_protocol"] == "mdlm" and m["gen_tokens"] == count
    assert m["gen_nll"] == pytest.approx(total / count, rel=1e-6)
    assert m["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    # per sample: the ratio estimator's standard error, and the quirks one at a time
    sums, counts = corpus_nll(judge, got, EOT, ctx)
    assert sums.sum().item() == pytest.approx(total, rel=1e-6) and counts.sum().item() == count
    r = total / count
    se = math.sqrt(((sums - r * counts) ** 2).sum().item() / (4 * 3)) / counts.mean().item()
    assert m["gen_nll_se"] == pytest.approx(se, rel=1e-6)
    # every row is padded to 24 (sample 2), chunks of 10, 10, 4: 9 + 9 + 3 = 21 scored positions at most
    assert len(seqs[0]) == 23 and counts[0].item() == 21 - 1  # its end-of-text at 8 follows the one at 6: dropped
    assert len(seqs[1]) == 22 and counts[1].item() == 21 - 1  # pads at 22, 23: the first is scored as its end
    assert len(seqs[2]) == 24 and counts[2].item() == 21
    assert counts[3].item() == 21  # end-of-text at 0 is context; the one at 16 is chunk 2's first: scored
    # the two protocols differ on the same samples: say which one produced a number
    assert abs(sample_metrics(x, judge)["gen_nll"] - m["gen_nll"]) > 1e-3
    with pytest.raises(UserError, match="unknown gen PPL protocol"):
        sample_metrics(x, judge, protocol="duo")

# ---------------------------------------------------------------- entropy, self-BLEU


def test_unigram_entropy_by_hand():
    # counts 2, 1, 1 of 4: -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2
    assert unigram_entropy(torch.tensor([0, 0, 1, 2])) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert unigram_entropy(torch.tensor([7, 7, 7])) == 0.0
    assert unigram_entropy(torch.tensor([5, 1, 9, 3])) == pytest.approx(math.log(4), abs=1e-12)
    assert mean_entropy(torch.tensor([[0, 0, 1, 2], [7, 7, 7, 7]])) == pytest.approx(0.75 * math.log(2))


def brute_bleu(hyp, refs, max_n=4, smooth=0.1):
    """BLEU of one hypothesis against references, written the slow obvious way."""
    logs = []
    for n in range(1, max_n + 1):
        grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        if not grams:
            continue
        ref_max = Counter()
        for r in refs:
            for g, k in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                ref_max[g] = max(ref_max[g], k)
        total = sum(grams.values())
        matched = sum(min(k, ref_max[g]) for g, k in grams.items())
        logs.append(math.log(matched / total if matched else smooth / total))
    r = min((len(x) for x in refs), key=lambda x: (abs(x - len(hyp)), x))
    bp = 1.0 if len(hyp) > r else math.exp(1 - r / len(hyp))
    return bp * math.exp(sum(logs) / len(logs))


def test_self_bleu():
    # by hand: [1,2,3,4] vs [1,2,3,5]: p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> smoothed 0.1/1
    hand = (3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** 0.25
    assert self_bleu([torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 5])]) == pytest.approx(hand)
    assert self_bleu(torch.tensor([[3, 1, 4, 1, 5]] * 3)) == pytest.approx(1.0)
    # clipping: [1,1,1,1] against [1,2,3,4] matches one unigram of four (not four), no bigram...
    clipped = (1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25  # ...and the reverse direction gives the same
    assert self_bleu([torch.tensor([1, 1, 1, 1]), torch.tensor([1, 2, 3, 4])]) == pytest.approx(clipped)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 12, (7,), generator=gen).tolist()
    samples = [torch.randint(0, 4, (n,), generator=gen).tolist() for n in lengths]
    want = sum(brute_bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)) / len(samples)
    assert self_bleu(samples) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- held-out windows: the same tokens


def test_heldout_windows_score_the_same_tokens(tmp_path):
    vals = np.arange(1000, dtype=np.uint16) % 250
    (tmp_path / "val.bin").write_bytes(vals.tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"val_tokens": len(vals)}))
    mdlm, n1 = heldout_windows(tmp_path, "mdlm", 32, 200)  # (6, 32)
    ar, n2 = heldout_windows(tmp_path, "ar", 32, 200)  # (6, 33)
    assert n1 == n2 == 6 * 32 and mdlm.shape == (6, 32) and ar.shape == (6, 33)
    assert torch.equal(ar[:, 1:], mdlm)  # the AR model predicts exactly the MDLM's tokens
    assert torch.equal(mdlm.flatten(), torch.from_numpy(vals[1:193].astype(np.int64)))
    assert torch.equal(ar[1:, 0], mdlm[:-1, -1])  # an AR window's context token ends the previous window

    class Uniform(nn.Module):  # exact NLL log V on every token
        def forward(self, idx):
            return torch.zeros(*idx.shape, 250)
    assert val_metrics(Uniform(), "ar", ar)["val_loss"] == pytest.approx(math.log(250))


def test_framed_heldout_windows(tmp_path):
    """framing bos_eos: both kinds get the same windows [eot] + L-2 consecutive val tokens + [eot]; the MDLM
    bound scores all L positions (MDLM's val loss counts BOS and EOS), the AR model the L-1 after the first."""
    vals = np.arange(1000, dtype=np.uint16) % 250
    (tmp_path / "val.bin").write_bytes(vals.tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"val_tokens": len(vals), "eot_id": 250}))
    mdlm, n1 = heldout_windows(tmp_path, "mdlm", 32, 200, framing="bos_eos")
    ar, n2 = heldout_windows(tmp_path, "ar", 32, 200, framing="bos_eos")
    assert mdlm.shape == ar.shape == (6, 32) and torch.equal(mdlm, ar)
    assert (n1, n2) == (6 * 32, 6 * 31)
    assert (mdlm[:, 0] == 250).all() and (mdlm[:, -1] == 250).all()
    assert torch.equal(mdlm[:, 1:-1].flatten(), torch.from_numpy(vals[:6 * 30].astype(np.int64)))

    class Uniform(nn.Module):  # exact NLL log V on every token
        def forward(self, idx):
            return torch.zeros(*idx.shape, 251)
    assert val_metrics(Uniform(), "ar", ar)["val_loss"] == pytest.approx(math.log(251))
    with pytest.raises(UserError, match="unknown framing"):
        heldout_windows(tmp_path, "mdlm", 32, 200, framing="bos")

# ---------------------------------------------------------------- LAMBADA with constructed models

PASSAGES = [
    "The fisherman pulled his net from the water and counted every hippopotamus",
    "She opened the old letter, read it twice, and whispered the name Bartholomew",
    "After the storm the children ran outside to look for the rainbow",
]


class FakeLM(nn.Module):
    """Logits we construct: for every row, find the passage (full token list) that agrees with the
    input wherever it is not masked, and put LOGIT on its true tokens (MDLM: the token at the
    position; AR: the next token). `wrong` = {(passage, position)}: there the logit goes to another
    token instead, so that token's argmax is wrong."""
    LOGIT = 10.0

    def __init__(self, seqs, vocab, causal, mask_id=None, wrong=()):
        super().__init__()
        self.seqs, self.vocab, self.causal, self.mask_id, self.wrong = seqs, vocab, causal, mask_id, set(wrong)

    def find(self, row):
        T = len(row) + self.causal
        for k, s in enumerate(self.seqs):
            if len(s) == T and all(a == b or a == self.mask_id for a, b in zip(row.tolist(), s)):
                return k, s
        raise AssertionError(f"no passage matches {row.tolist()}")

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)  # (B, T, V)
        for b, row in enumerate(idx):
            k, s = self.find(row)
            for j in range(idx.shape[1]):
                pos = j + self.causal  # the position whose token row j predicts
                token = s[pos]
                if (k, pos) in self.wrong:
                    token = (token + 1) % (self.vocab - (self.mask_id is not None))
                logits[b, j, token] = self.LOGIT
        return logits


def tokenizer_or_skip(name):
    return gpt2_or_skip() if name == "gpt2" else get_tokenizer(name)


@pytest.mark.parametrize("framing", ["sdtt", "none"])
@pytest.mark.parametrize("tok_name", ["bytes", "gpt2"])
@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_lambada_oracle_and_one_wrong_token(tmp_path, kind, tok_name, framing):
    tok = tokenizer_or_skip(tok_name)
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t + ("\n" if i == 1 else "")}) + "\n" for i, t in enumerate(PASSAGES)))
    passages = read_lambada(path)
    assert [p[1] for p in passages] == [" hippopotamus", " Bartholomew", " rainbow"]
    assert all(c + t == p.rstrip() for (c, t), p in zip(passages, PASSAGES))
    inputs, truncated = _lambada_inputs(tok, passages, kind, 512, framing)
    assert truncated == 0
    seqs = [ids for ids, _, _ in inputs]
    c1, m1 = inputs[1][1:]
    assert m1 >= 2, "the test needs a multi-token target"
    mask_id = tok.vocab_size if kind == "mdlm" else None
    vocab = tok.vocab_size + (kind == "mdlm")
    run = lambda model: lambada(model, kind, tok, passages, 512, mask_id, draws=16, seed=0, batch_size=8,
                                framing=framing)

    oracle = run(FakeLM(seqs, vocab, kind == "ar", mask_id))
    assert oracle["acc"] == 1.0 and oracle["n"] == 3 and oracle["correct"] == [True, True, True]
    assert oracle["framing"] == framing
    per_token = math.log1p((vocab - 1 - (kind == "mdlm")) * math.exp(-FakeLM.LOGIT))  # NLL of the right token
    words = sum(m for _, _, m in inputs)
    if kind == "ar":  # exact per-word NLL
        assert oracle["nll"] == pytest.approx(per_token * words / 3, rel=1e-4)
    else:  # a Monte-Carlo bound whose expectation is (1 - eps) * the exact value here
        assert 0 < oracle["nll"] < 3 * per_token * words / 3

    # wrong on one token (the second) of the multi-token word of passage 1 only
    wrong = run(FakeLM(seqs, vocab, kind == "ar", mask_id, wrong={(1, c1 + 1)}))
    assert wrong["correct"] == [True, False, True] and wrong["acc"] == pytest.approx(2 / 3)
    assert wrong["nll"] > oracle["nll"]


def test_lambada_truncates_long_contexts_from_the_left():
    tok = get_tokenizer("bytes")
    passages = [split_last_word("abcdefghij klm")]  # context 'abcdefghij', target ' klm'
    (ids, c, m), = _lambada_inputs(tok, passages, "mdlm", seq_len=8)[0]
    assert bytes(ids[:c]) == b"ghij" and bytes(ids[c:]) == b" klm" and m == 4
    (ids, c, m), = _lambada_inputs(tok, passages, "ar", seq_len=8)[0]
    assert bytes(ids[:c]) == b"fghij"  # an AR model reads context + target minus its last token
    assert _lambada_inputs(tok, passages, "ar", seq_len=64)[1] == 0
    # SDTT's framing keeps BOS (and the diffusion model's EOS) and truncates the context between them
    (ids, c, m), = _lambada_inputs(tok, passages, "mdlm", seq_len=10, framing="sdtt")[0]
    assert ids == [256] + list(b"ghij klm") + [256] and (c, m) == (5, 4)
    (ids, c, m), = _lambada_inputs(tok, passages, "ar", seq_len=8, framing="sdtt")[0]
    assert ids == [256] + list(b"ghij klm") and (c, m) == (5, 4)


class FramingSensitiveMDLM(nn.Module):
    """A denoiser whose answer depends on the framing it sees: at every position it predicts the answer
    byte of that position when the input starts and ends with end-of-text (SDTT's clamped BOS/EOS), and the
    byte 'x' otherwise. It records its inputs."""

    def __init__(self, answer, eot=256, mask_id=257):
        super().__init__()
        self.answer, self.eot, self.mask_id, self.seen = answer, eot, mask_id, []

    def forward(self, idx):
        self.seen.append(idx.clone())
        framed = (idx[:, :1] == self.eot) & (idx[:, -1:] == self.eot)  # (B, 1)
        want = torch.tensor(self.answer, dtype=torch.long)[None, :idx.shape[1]].expand(len(idx), -1)  # (B, T)
        tok = torch.where(framed, want, torch.full_like(want, ord("x")))
        return torch.nn.functional.one_hot(tok, self.mask_id + 1).float() * 10  # (B, T, V)


class FramingSensitiveAR(nn.Module):
    """An AR model that predicts the true next byte only when the sequence starts with end-of-text (BOS)."""

    def __init__(self, seq, eot=256):
        super().__init__()
        self.seq, self.eot = seq, eot

    def forward(self, idx):
        framed = idx[:, :1] == self.eot  # (B, 1)
        nxt = torch.tensor(self.seq[1:idx.shape[1] + 1], dtype=torch.long)[None].expand(len(idx), -1)  # (B, T)
        tok = torch.where(framed, nxt, torch.full_like(nxt, ord("x")))
        return torch.nn.functional.one_hot(tok, 257).float() * 10  # (B, T, V)


def test_lambada_framing_is_what_the_model_sees():
    """SDTT's protocol ([BOS] + context + [MASK] x m + [EOS], EOS clamped; [BOS] + context for GPT-2) against
    none, on models that answer right only when they see the framing; the default is SDTT's."""
    tok = get_tokenizer("bytes")
    passages = [split_last_word("the cat sat on the mat")]
    framed = [256] + list(b"the cat sat on the mat") + [256]
    model = FramingSensitiveMDLM(framed)
    run = lambda m, kind, framing: lambada(m, kind, tok, passages, 64, 257 if kind == "mdlm" else None, draws=4,
                                           seed=0, batch_size=8, framing=framing)
    out = run(model, "mdlm", "sdtt")
    assert out["acc"] == 1.0 and out["framing"] == "sdtt"
    rows = model.seen[0]  # (1 + draws, n): the accuracy row, then the bound's rows
    assert rows[0].tolist() == [256] + list(b"the cat sat on the") + [257] * 4 + [256]  # [BOS] ctx [MASK]x4 [EOS]
    assert (rows[:, 0] == 256).all() and (rows[:, -1] == 256).all()  # BOS and EOS clamped in every row
    assert (rows[:, 1:-5] == rows[0, 1:-5]).all()  # the context too
    assert out["nll"] < 2 * 4 * math.log1p(256 * math.exp(-10))  # the right token everywhere: ~its exact NLL
    model.seen.clear()
    out = run(model, "mdlm", "none")
    assert out["acc"] == 0.0 and out["framing"] == "none" and out["nll"] > 4
    assert model.seen[0][0].tolist() == list(b"the cat sat on the") + [257] * 4
    assert run(FramingSensitiveMDLM(framed), "mdlm", None)["acc"] == 1.0  # the default: SDTT's framing

    ar = FramingSensitiveAR(framed)
    assert run(ar, "ar", "sdtt")["acc"] == 1.0 and run(ar, "ar", None)["framing"] == "sdtt"
    assert run(ar, "ar", "none")["acc"] == 0.0
    with pytest.raises(UserError, match="unknown LAMBADA framing"):
        run(ar, "ar", "bos")


# ---------------------------------------------------------------- eval.py end to end


def run_scripts(jobs, cwd):
    """Run several scripts at once (each mostly waits on its torch import), return their results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script, *args in jobs]
    outputs = [p.communicate(timeout=300) for p in procs]  # (stdout, stderr); sets returncode
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


# a small play-like corpus written here (tests read nothing outside the repository): ~9 kB, two speakers
PLAY = "".join(f"{('ROMEO', 'JULIET')[i % 2]}:\nO gentle night, thy {('moon', 'star', 'rose')[i % 3]} is {i % 7} times "
               f"more fair than day.\n\n" for i in range(160))
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "32", "--batch_size", "2",
        "--tokenizer", "bytes", "--eval_tokens", "256", "--max_iters", "2", "--data", "tiny.txt"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An AR model (bytes) and an MDLM (a BPE learned from the corpus), tiny, 2 iterations each, written by
    train.py: two tokenizers, so that --retokenize is exercised (offline)."""
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "tiny.txt").write_text(PLAY)
    jobs = [("train.py", *TINY, "--model", "ar", "--out_dir", "ar"),
            ("train.py", *TINY, "--tokenizer", "bpe", "--vocab_size", "300", "--out_dir", "mdlm_bpe")]
    for r in run_scripts(jobs, tmp):
        assert r.returncode == 0, r.stderr[-2000:]
    lam = tmp / "lambada.jsonl"
    lam.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    return tmp


@pytest.mark.slow
def test_eval_script_end_to_end(ckpts):
    common = ["--num_samples", "2", "--batch_size", "2", "--val_tokens", "64", "--lambada", "lambada.jsonl",
              "--limit", "2", "--lambada_draws", "2"]
    ar, mdlm = run_scripts([("eval.py", "--ckpt", "ar/ckpt.pt", "--judge", "ar/ckpt.pt", *common),
                            # an MDLM with a bpe tokenizer, the bytes judge allowed by --retokenize
                            ("eval.py", "--ckpt", "mdlm_bpe/ckpt.pt", "--judge", "ar/ckpt.pt", "--retokenize",
                             "--steps", "2,4", *common)], ckpts)
    assert ar.returncode == 0, ar.stderr[-2000:]
    out = json.loads(ar.stdout.strip().splitlines()[-1])
    assert out["kind"] == "ar" and out["judge"] == "ar/ckpt.pt" and out["sampling_dtype"] == "float64"
    assert set(out["gen_ppl"]) == {"ar", "real"} and all(v > 1 for v in out["gen_ppl"].values())
    assert out["val_ppl"] == pytest.approx(out["val_ppl_judge"])  # the same model on the same tokens
    assert out["lambada_n"] == 2 and 0 <= out["lambada_acc"] <= 1 and out["lambada_nll"] > 0

    assert mdlm.returncode == 0, mdlm.stderr[-2000:]
    out = json.loads(mdlm.stdout.strip().splitlines()[-1])
    assert out["retokenized"] and "RE-ENCODED" in mdlm.stdout  # the output says the samples were re-encoded
    assert out["steps"] == [2, 4] and set(out["gen_ppl"]) == {"2", "4", "real"}
    assert set(out["entropy"]) == {"2", "4", "real"} and out["nfe"]["2"] <= 2
    for key in ("val_ppl", "lambada_acc", "seed", "num_samples", "judge"):
        assert out[key] is not None, key


@pytest.mark.slow
def test_eval_script_bad_judges(ckpts):
    """A corrupt judge and a judge with another tokenizer: exit 2 and one clear line on stderr."""
    (ckpts / "corrupt.pt").write_bytes(b"this is not a checkpoint" * 10)
    cases = {"corrupt.pt": "corrupt", "ar/ckpt.pt": "uses the bytes tokenizer but the model uses bpe-"}
    results = run_scripts([("eval.py", "--ckpt", "mdlm_bpe/ckpt.pt", "--judge", judge) for judge in cases], ckpts)
    for (judge, words), r in zip(cases.items(), results):
        assert r.returncode == 2, (judge, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0] and "judge" in lines[0], lines


def test_check_judge():
    bytes_tok = get_tokenizer("bytes")
    ar = {"kind": "ar", "tokenizer": {"name": "bytes"}}
    assert check_judge(ar, bytes_tok, retokenize=False, path="j.pt") is False
    with pytest.raises(UserError, match="j.pt is an MDLM with the bytes tokenizer, not an AR model"):
        check_checkpoint({**ar, "kind": "mdlm"}, kind="ar", what="j.pt")  # eval.py: load_checkpoint(kind="ar")
    other = {"kind": "ar", "tokenizer": {"name": "gpt2"}}
    with pytest.raises(UserError, match="--retokenize"):
        check_judge(other, bytes_tok, False, "j.pt")
    assert check_judge(other, bytes_tok, retokenize=True, path="j.pt") is True
    # two bpe tokenizers are the same only with the same merges: the name alone does not make a judge fit
    a = BPETokenizer.learn(["def f(self):\n    return self.x\n" * 3], 262)
    b = BPETokenizer.learn(["while n < 3:\n    n += 1\n" * 3], 262)
    assert a.name == b.name and a.vocab_size == b.vocab_size and a.key != b.key
    judge_a = {"kind": "ar", "tokenizer": a.spec()}
    assert check_judge(judge_a, a, retokenize=False, path="j.pt") is False
    with pytest.raises(UserError, match=f"uses the {a.key} tokenizer but the model uses {b.key}.*--retokenize"):
        check_judge(judge_a, b, False, "j.pt")
    assert check_judge(judge_a, b, retokenize=True, path="j.pt") is True


@pytest.mark.slow
def test_eval_script_names_every_protocol(tmp_path):
    """eval.py on a checkpoint that records framing bos_eos (as hub.py writes for MDLM's DiT): the val bound on
    framed windows, gen PPL under MDLM's protocol, LAMBADA under SDTT's framing by default; each named in the
    output and the JSON. Then the other protocols by flag. Everything generated here (bytes, tiny corpus)."""
    (tmp_path / "tiny.txt").write_text("".join(f"def f{i % 7}(x):\n    return x + {i % 5}\n\n" for i in range(300)))
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    tiny = [*TINY[:-1], "tiny.txt", "--device", "cpu", "--compile", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *tiny, *extra], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in (["--model", "ar", "--out_dir", "ar"], ["--framing", "bos_eos", "--out_dir", "mdlm"])]
    for p in train:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert torch.load(tmp_path / "mdlm" / "ckpt.pt", weights_only=False)["framing"] == "bos_eos"
    common = ["--ckpt", "mdlm/ckpt.pt", "--judge", "ar/ckpt.pt", "--steps", "2", "--num_samples", "3",
              "--batch_size", "3", "--val_tokens", "64", "--lambada", "lambada.jsonl", "--lambada_draws", "2",
              "--device", "cpu"]
    runs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *common, *extra], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in (["--gen_ppl_protocol", "mdlm"],
                          ["--framing", "none", "--lambada_framing", "none"])]
    (paper, plain) = [(p, *p.communicate(timeout=300)) for p in runs]
    for p, out, err in (paper, plain):
        assert p.returncode == 0, err[-2000:]
    p, out, _ = paper
    js = json.loads(out.strip().splitlines()[-1])
    assert js["val_framing"] == "bos_eos" and "framing bos_eos" in out
    assert js["gen_ppl_protocol"] == "mdlm" and "gen PPL protocol mdlm" in out
    assert all(r["gen_ppl_protocol"] == "mdlm" and r["gen_ppl"] > 1 for r in js["rows"])
    assert js["lambada_framing"] == "sdtt" and "LAMBADA protocol: framing sdtt: [BOS] + context + [MASK]" in out
    p, out, _ = plain
    js = json.loads(out.strip().splitlines()[-1])
    assert (js["val_framing"], js["gen_ppl_protocol"], js["lambada_framing"]) == ("none", "sdtt", "none")
    assert all(r["gen_ppl_protocol"] == "sdtt" for r in js["rows"])
