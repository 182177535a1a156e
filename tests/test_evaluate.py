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

from harness import exact_sampler_law, z_threshold
from tinydiff.common import UserError
from tinydiff.data import BPETokenizer, get_tokenizer
from tinydiff.evaluate import (_lambada_inputs, check_judge, heldout_windows, judge_nll, lambada, mean_entropy,
                               read_lambada, sample_metrics, self_bleu, split_last_word, unigram_entropy, val_metrics)
from tinydiff.sampler import diffusion_sample

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIKTOKEN_CACHE = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
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
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    try:
        return get_tokenizer(name)
    except Exception as e:  # gpt2 without tiktoken or without its cached vocabulary
        pytest.skip(f"{name} tokenizer unavailable: {e}")


@pytest.mark.parametrize("tok_name", ["bytes", "gpt2"])
@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_lambada_oracle_and_one_wrong_token(tmp_path, kind, tok_name):
    tok = tokenizer_or_skip(tok_name)
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t + ("\n" if i == 1 else "")}) + "\n" for i, t in enumerate(PASSAGES)))
    passages = read_lambada(path)
    assert [p[1] for p in passages] == [" hippopotamus", " Bartholomew", " rainbow"]
    assert all(c + t == p.rstrip() for (c, t), p in zip(passages, PASSAGES))
    inputs, truncated = _lambada_inputs(tok, passages, kind, seq_len=512)
    assert truncated == 0
    seqs = [ids for ids, _ in inputs]
    c1, m1 = inputs[1][1], len(seqs[1]) - inputs[1][1]
    assert m1 >= 2, "the test needs a multi-token target"
    mask_id = tok.vocab_size if kind == "mdlm" else None
    vocab = tok.vocab_size + (kind == "mdlm")
    run = lambda model: lambada(model, kind, tok, passages, 512, mask_id, draws=16, seed=0, batch_size=8)

    oracle = run(FakeLM(seqs, vocab, kind == "ar", mask_id))
    assert oracle["acc"] == 1.0 and oracle["n"] == 3 and oracle["correct"] == [True, True, True]
    per_token = math.log1p((vocab - 1 - (kind == "mdlm")) * math.exp(-FakeLM.LOGIT))  # NLL of the right token
    words = sum(len(s) - c for s, (_, c) in zip(seqs, inputs))
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
    (ids, c), = _lambada_inputs(tok, passages, "mdlm", seq_len=8)[0]
    assert bytes(ids[:c]) == b"ghij" and bytes(ids[c:]) == b" klm"
    (ids, c), = _lambada_inputs(tok, passages, "ar", seq_len=8)[0]
    assert bytes(ids[:c]) == b"fghij"  # an AR model reads context + target minus its last token
    assert _lambada_inputs(tok, passages, "ar", seq_len=64)[1] == 0


# ---------------------------------------------------------------- eval.py end to end


def run_scripts(jobs, cwd):
    """Run several scripts at once (each mostly waits on its torch import), return their results."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": os.path.abspath(TIKTOKEN_CACHE), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script, *args in jobs]
    outputs = [p.communicate(timeout=300) for p in procs]  # (stdout, stderr); sets returncode
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "32", "--batch_size", "2",
        "--eval_tokens", "256", "--max_iters", "2", "--data", "tiny.txt", "--tokenizer", "bytes"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An AR model (bytes) and an MDLM (gpt2), tiny, 2 iterations each, written by train.py."""
    tmp = tmp_path_factory.mktemp("eval")
    # English-like text made here (tests read nothing outside the repository)
    words = "the king said that all his men would ride to the old castle before night and rest there".split()
    (tmp / "tiny.txt").write_text("".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) + ".\n"
                                          for i in range(200)))
    jobs = [("train.py", *TINY, "--model", "ar", "--out_dir", "ar"),
            ("train.py", *TINY, "--tokenizer", "gpt2", "--out_dir", "mdlm_gpt2")]
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
                            # an MDLM with the gpt2 tokenizer, the bytes judge allowed by --retokenize
                            ("eval.py", "--ckpt", "mdlm_gpt2/ckpt.pt", "--judge", "ar/ckpt.pt", "--retokenize",
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
    cases = {"corrupt.pt": "corrupt", "ar/ckpt.pt": "uses the bytes tokenizer but the model uses gpt2"}
    results = run_scripts([("eval.py", "--ckpt", "mdlm_gpt2/ckpt.pt", "--judge", judge) for judge in cases], ckpts)
    for (judge, words), r in zip(cases.items(), results):
        assert r.returncode == 2, (judge, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0] and "judge" in lines[0], lines


def test_check_judge():
    bytes_tok = get_tokenizer("bytes")
    ar = {"kind": "ar", "tokenizer": {"name": "bytes"}}
    assert check_judge(ar, bytes_tok, retokenize=False, path="j.pt") is False
    with pytest.raises(UserError, match="must be an AR checkpoint"):
        check_judge({**ar, "kind": "mdlm"}, bytes_tok, False, "j.pt")
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
