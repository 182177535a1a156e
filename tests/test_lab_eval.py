"""The lab as a data source (--data lab) and its exact evaluation (tinydiff/lab/evaluate.py, eval.py).

Statistical checks: standard-error tolerances at family-wise error 1e-4 (harness.z_threshold), fixed seeds.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import z_threshold
from tinydiff.data import DataError, get_batch, get_tokenizer, load_meta, prepare
from tinydiff.lab import Lab, LabParams, OracleAR, OracleDenoiser
from tinydiff.lab import heldout_gap, lab_metrics, lab_of, per_rate, window_word_law, words_of
from tinydiff.sampling import diffusion_sample
from tinydiff.lab import oracle_targets
from tinydiff.tcs import to_dense

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = LabParams(W=16, A=6, b=3, delta=0.02, seed=1, train_tokens=30_000, val_tokens=8_000)
SPEC = "lab:W=16,A=6,b=3,seed=1,train_tokens=30000,val_tokens=8000"  # = SMALL (delta: the default)


@pytest.fixture(scope="module")
def lab():
    return Lab(SMALL)


def test_prepare_lab(tmp_path, lab):
    out = prepare(SPEC, "lab6", root=tmp_path)
    meta = load_meta(out)
    assert meta["tokenizer"] == "lab6" and meta["vocab_size"] == lab.V and meta["eot_id"] == lab.eot
    assert meta["lab"]["W"] == 16 and meta["source"] == SMALL.spec() and meta["train_tokens"] == 30_000
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(train) == 30_000 and len(val) == 8_000 and train.max() < lab.V and not np.array_equal(train[:8000], val)
    assert prepare(SMALL.spec(), "lab6", root=tmp_path) == out  # the same lab, written out in full: reused
    assert lab_of(out).words == lab.words and lab_of(out).params == SMALL
    x = get_batch(out, "train", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32) and torch.isfinite(lab.log_prob(x)).all()
    tok = get_tokenizer("lab6")
    assert tok.decode([0, 1, lab.space, lab.eot, lab.mask_id]) == "ae \n□" and tok.encode("ae \n") == [0, 1, 6, 7]
    with pytest.raises(DataError, match="its own tokenizer lab6"):
        prepare(SPEC, "bytes", root=tmp_path)
    with pytest.raises(DataError, match="unknown lab parameter"):
        prepare("lab:foo=1", "lab12", root=tmp_path)


def test_words_of(lab):
    w0, w1 = list(lab.words[0]), list(lab.words[1])
    cut, sp, eot = [0, 0], [lab.space], [lab.eot]
    junk = [lab.params.A - 1] * 9  # not a word (longer than max_len)
    x = torch.tensor([cut + sp + w0 + sp + w1 + eot + junk + sp + sp + w1 + sp + w0])  # the last run is cut
    assert words_of(lab, x) == [[0, 1, -1, 1]]


def test_ce_of_exact_samples_is_H(lab):
    L, n = 32, 1500
    x = lab.sample(n, L, torch.Generator().manual_seed(3))
    m, H = lab_metrics(lab, x), lab.entropy(L, n=3000, seed=4)
    assert abs(m["ce"] - H["H"]) <= z_threshold(1e-4) * math.hypot(m["ce_se"], H["H_se"]), (m, H)
    # the oracle judge's gen NLL is the chain rule without the first token
    first = lab.marginal().log()[x[:, 0]]
    want = (-(lab.log_prob(x) - first) / (L - 1)).mean().item()
    assert m["oracle_gen_nll"] == pytest.approx(want, rel=1e-10)


def test_word_metrics():
    """Noise-free text has only valid words and its word histogram converges to the window word law; the
    text of another lexicon has no valid word."""
    clean = Lab(LabParams(W=16, A=6, b=3, delta=1e-12, seed=1))
    L, n = 64, 800
    x = clean.sample(n, L, torch.Generator().manual_seed(0))
    m = lab_metrics(clean, x)
    N = m["words_per_sample"] * n
    assert m["valid_words"] == 1.0 and m["word_tv"] < 2 * 0.5 * math.sqrt(16 / N), m
    assert m["word_tv"] < 0.5 * lab_metrics(clean, x.flip(1))["word_tv"]  # reversed words are (mostly) not words
    other = Lab(LabParams(W=16, A=6, b=3, delta=1e-12, seed=2))  # another lexicon
    m2 = lab_metrics(clean, other.sample(200, L, torch.Generator().manual_seed(0)))
    assert m2["valid_words"] < 0.3 and m2["word_tv"] > 0.7
    assert window_word_law(clean, L).sum() == pytest.approx(1.0)


def test_oracle_sampling_ce(lab):
    """The oracle denoiser through tinydiff's sampler: one step samples every position from its marginal
    (CE far above H); with K >> L steps it is (almost) exact ancestral sampling, CE -> H. (The gap falls
    like 1/K: on this lab at L = 16 it is 0.18 nats/token at K = 16, 0.045 at 64, 0.010 at 256.)"""
    L, n = 16, 300
    H = lab.entropy(L, n=3000, seed=5)
    oracle = OracleDenoiser(lab)
    ce = {}
    for K in (1, 256):
        x, _ = diffusion_sample(oracle, n, L, K, lab.mask_id, generator=torch.Generator().manual_seed(K))
        ce[K] = lab_metrics(lab, x, n_boot=10)
    z = z_threshold(1e-4, 2)
    assert ce[1]["ce"] - H["H"] > 10 * ce[1]["ce_se"] + 0.3, (ce, H)
    assert abs(ce[256]["ce"] - H["H"]) <= z * math.hypot(ce[256]["ce_se"], H["H_se"]) + 0.02, (ce, H)


def test_heldout_gap_and_per_rate(lab):
    """The oracles score the truth: the oracle AR's held-out NLL is the true NLL exactly; the oracle
    denoiser's NELBO bound equals it in expectation (within s.e.); per masking rate its KL is 0."""
    gen = torch.Generator().manual_seed(6)
    ar = heldout_gap(OracleAR(lab), "ar", lab, lab.sample(64, 33, gen))
    assert abs(ar["gap"]) < 1e-6 and ar["gap_se"] < 1e-6  # (the AR scoring runs in fp32)
    md = heldout_gap(OracleDenoiser(lab), "mdlm", lab, lab.sample(300, 32, gen), lab.mask_id, draws=4)
    assert abs(md["gap"]) <= z_threshold(1e-4) * md["gap_se"] and md["gap_se"] < 0.05, md
    rows = per_rate(OracleDenoiser(lab), lab, 32, rates=(0.1, 0.9), n=32)
    assert all(abs(r["kl"]) < 1e-9 and r["model"] == pytest.approx(r["oracle"]) for r in rows)
    assert rows[0]["oracle"] < rows[1]["oracle"]  # less context, harder


# ----------------------------------------------------------------------------- the scripts on --data lab

def run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.slow
def test_scripts_on_the_lab(tmp_path):
    tiny = ["--data", SPEC, "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "32", "--batch_size",
            "4", "--eval_tokens", "256", "--max_iters", "3", "--device", "cpu"]
    for kind in ("mdlm", "ar"):
        p = run(os.path.join(ROOT, "train.py"), "--model", kind, "--out_dir", kind, *tiny, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]
    ckpt = torch.load(tmp_path / "mdlm" / "ckpt.pt", weights_only=False)
    assert ckpt["args"]["data"] == SMALL.spec() and ckpt["tokenizer"]["name"] == "lab6"  # the lab, in full
    common = ["--judge", "ar/ckpt.pt", "--num_samples", "8", "--val_tokens", "256", "--lab_draws", "256"]
    p = run(os.path.join(ROOT, "eval.py"), "--ckpt", "mdlm/ckpt.pt", "--oracle", "--steps", "1,64", *common,
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["oracle"] and out["lab_H"]["L"] == 32 and "ORACLE" in p.stdout
    rows = {r["row"]: r for r in out["rows"]}
    assert set(rows) == {"1", "64", "real"} and rows["1"]["ce"] > rows["64"]["ce"]
    assert all(k in rows["real"] for k in ("ce", "ce_se", "valid_words", "word_tv", "oracle_gen_nll", "gen_nll"))
    # the val bound of the exact denoiser is close to H (a bound on 8 windows: loose)
    assert abs(out["val_loss"] - out["lab_H"]["H"]) < 0.3
    p = run(os.path.join(ROOT, "eval.py"), "--ckpt", "ar/ckpt.pt", *common, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ce" in json.loads(p.stdout.strip().splitlines()[-1])["rows"][0]
    # SDTT with the lab's exact denoiser as the teacher of every round, the student from the MDLM
    sdtt = ["--method", "sdtt", "--rounds", "2", "--iters_per_round", "2", "--teacher_steps", "8", "--batch_size",
            "2", "--eval_tokens", "64", "--warmup", "1", "--device", "cpu"]
    p = run(os.path.join(ROOT, "distill.py"), "--teacher", "lab-oracle", "--init", "mdlm/ckpt.pt", "--teacher_ema",
            *sdtt, "--out_dir", "sdtt", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "EXACT denoiser" in p.stdout and json.loads(p.stdout.strip().splitlines()[-1])["sample_steps"] == 2
    final = torch.load(tmp_path / "sdtt" / "ckpt.pt", weights_only=False)
    assert final["extra"]["teacher"] == {} and final["args"]["teacher"] == "lab-oracle"  # never replaced by the student
    assert torch.load(tmp_path / "sdtt" / "round1.pt", weights_only=False)["sample_steps"] == 4
    p = run(os.path.join(ROOT, "distill.py"), "--teacher", "lab-oracle", *sdtt, "--out_dir", "x", cwd=tmp_path)
    assert p.returncode == 2 and "needs --init CKPT" in p.stderr.strip().splitlines()[-1]
    # bad input: one clear line
    p = run(os.path.join(ROOT, "train.py"), "--data", "lab:nope=1", cwd=tmp_path)
    assert p.returncode == 2 and "unknown lab parameter 'nope'" in p.stderr
    p = run(os.path.join(ROOT, "train.py"), *tiny, "--tokenizer", "bytes", "--out_dir", "x", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: the lab is written in its own")


# ----------------------------------------------------------------------------- TCS with the lab's exact targets

def test_tcs_oracle_targets_are_the_brute_force_conditionals():
    """distill.py --method tcs --teacher lab-oracle stores p(x_i = v | x_!=i) with all |V| ids: against brute force
    (every string of the tiny lab of tests/test_lab.py, p summed over the paths of a dense transition matrix)."""
    from test_lab import L, TINY, Brute
    tiny = Lab(TINY)
    brute = Brute(tiny, L)
    x = brute.seqs[::11]  # (94, L)
    ids, logp = oracle_targets(tiny, x)
    assert ids.shape == logp.shape == (len(x), L, tiny.V) and logp.dtype == torch.float32
    assert torch.equal(ids, torch.arange(tiny.V).expand(len(x), L, tiny.V))  # every id: no tail draw, no estimator
    dense = to_dense(ids, logp, tiny.V + 1)  # (n, L, V+1): the student's vocabulary
    assert (dense[..., tiny.mask_id] == 0).all()
    for b in range(len(x)):
        for i in range(L):
            want = brute.cond(x[b], i, tiny.mask_id)  # (V,) p(x_i = v | x_j, j != i)
            assert torch.allclose(dense[b, i, :tiny.V].double(), want, rtol=1e-5, atol=1e-7), (b, i)


@pytest.mark.slow
def test_distill_tcs_lab_oracle_end_to_end(tmp_path):
    """From scratch on --data lab (no checkpoint), then TCS fine-tuning of that MDLM (--init); a bad use: one line."""
    tiny = ["--method", "tcs", "--teacher", "lab-oracle", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
            "--seq_len", "32", "--batch_size", "4", "--eval_tokens", "256", "--max_iters", "3", "--warmup", "1",
            "--device", "cpu"]
    p = run(os.path.join(ROOT, "distill.py"), *tiny, "--data", SPEC, "--tcs_lambda", "0.5", "--out_dir", "s",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["method"] == "tcs" and out["iter"] == 3 and math.isfinite(out["val_loss"])
    assert "EXACT full conditionals" in p.stdout
    ckpt = torch.load(tmp_path / "s" / "ckpt.pt", weights_only=False)
    assert ckpt["kind"] == "mdlm" and ckpt["args"]["data"] == SMALL.spec() and ckpt["tokenizer"]["name"] == "lab6"
    assert ckpt["tcs"]["estimator"] == "lab-oracle" and ckpt["tcs"]["lambda"] == 0.5
    assert ckpt["config"]["vocab_size"] == 9 and ckpt["config"]["n_layer"] == 1 and ckpt["config"]["seq_len"] == 32
    p = run(os.path.join(ROOT, "distill.py"), *tiny, "--init", "s/ckpt.pt", "--out_dir", "f", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch.load(tmp_path / "f" / "ckpt.pt", weights_only=False)["args"]["data"] == SMALL.spec()
    scratch = "error: --method tcs --teacher lab-oracle from scratch needs --data lab"
    for bad, says in (([], scratch), (["--data", "stdlib"], scratch),  # no lab to take the exact targets from
                      (["--data", SPEC, "--precompute_only", "--tcs_windows", "8"], "error: --precompute_only")):
        p = run(os.path.join(ROOT, "distill.py"), *tiny, *bad, "--out_dir", "x", cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-2000:]
        assert lines[0].startswith(says), lines[0]
