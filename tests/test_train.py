"""End-to-end tests of train.py and sample.py: learning, exact resume, determinism, clear errors.

Each script runs as a subprocess in a temporary folder (so data/ and out/ land there), on a tiny
model and a tiny corpus, the way a user would run it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "32", "--batch_size", "4",
        "--eval_tokens", "256", "--device", "cpu", "--compile", "false", "--tokenizer", "bytes"]


def run(script, *args, cwd, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small, very regular 'language': the loss of any working model falls fast on it."""
    d = tmp_path_factory.mktemp("corpus")
    lines = [f"def f{i % 7}(self, x):\n    return x + {i % 5}\n\n" for i in range(400)]
    (d / "code.txt").write_text("".join(lines))
    return d / "code.txt"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_loss_falls(tmp_path, corpus, kind):
    p = run("train.py", "--model", kind, "--data", corpus, "--max_iters", 60, "--eval_interval", 60, "--lr", 3e-3,
            "--warmup", 5, "--out_dir", "out", *TINY, "--eval_tokens", 4096, "--eval_draws", 8, cwd=tmp_path)
    out = last_json(p)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert out["iter"] == 60 and ckpt["iter"] == 60
    # uniform guessing over 257 bytes costs ln(257) = 5.55 nats; a regular corpus must get far below it.
    # (The MDLM bound is heavy-tailed in t, w = 1/t: score many windows and draws for a stable value.)
    assert out["val_loss"] < 0.6 * 5.55, out
    assert ckpt["history"][-1]["val_loss"] == out["val_loss"]
    assert "sample" in p.stdout


@pytest.mark.slow
def test_resume_is_exact(tmp_path, corpus):
    """N/2 iterations + --resume to N ends with the same weights as N straight iterations."""
    common = ["--data", corpus, "--eval_interval", 3, "--ckpt_interval", 3, "--warmup", 2, "--dropout", 0.1, *TINY]
    run("train.py", "--max_iters", 6, "--out_dir", "straight", *common, cwd=tmp_path)
    run("train.py", "--max_iters", 3, "--out_dir", "halves", *common, cwd=tmp_path)
    run("train.py", "--max_iters", 6, "--out_dir", "halves", "--resume", *common, cwd=tmp_path)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]), k


@pytest.mark.slow
def test_checkpoint_round_trip_and_sampling(tmp_path, corpus):
    run("train.py", "--data", corpus, "--max_iters", 3, "--eval_interval", 3, "--out_dir", "out", *TINY, cwd=tmp_path)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    for key in ("config", "model", "ema", "optimizer", "iter", "args", "tokenizer", "rng", "kind", "mask_id"):
        assert key in ckpt, key
    from tinydiff.common import model_from_checkpoint
    raw, ema = model_from_checkpoint(ckpt, use_ema=False), model_from_checkpoint(ckpt)
    for k, v in ckpt["model"].items():
        assert torch.equal(raw.state_dict()[k], v)
    x = torch.randint(0, 257, (2, 32))
    assert not torch.equal(raw(x), ema(x))  # EMA weights differ from the raw ones and are the default
    # same seed -> same samples; a prompt is kept as the clamped prefix
    args = ["--ckpt", "out/ckpt.pt", "--steps", 8, "--num_samples", 3, "--prompt", "def ", "--seed", 5]
    a = run("sample.py", *args, "--out", "a.jsonl", cwd=tmp_path)
    run("sample.py", *args, "--out", "b.jsonl", cwd=tmp_path)
    ta, tb = [json.loads(l)["text"] for l in open(tmp_path / "a.jsonl")], [json.loads(l)["text"] for l in open(tmp_path / "b.jsonl")]
    assert ta == tb and len(ta) == 3 and all(t.startswith("def ") for t in ta)
    summary = last_json(a)
    assert summary["num_samples"] == 3 and summary["steps"] == 8 and 1 <= summary["nfe"] <= 3 * 9
    c = run("sample.py", *args[:-1], 6, cwd=tmp_path)
    assert c.stdout != a.stdout  # another seed, other samples


@pytest.mark.slow
def test_framing_and_dropout_sites_are_recorded_and_inherited(tmp_path, corpus):
    """--framing bos_eos trains on [BOS] + L-2 + [EOS] windows and records it; --init_from a framed checkpoint
    keeps its framing and dropout sites unless a flag says otherwise."""
    p = run("train.py", "--data", corpus, "--max_iters", 2, "--eval_interval", 2, "--out_dir", "framed", *TINY,
            "--framing", "bos_eos", "--dropout_sites", "residual", "--dropout", 0.1, cwd=tmp_path)
    assert "windows framed as [BOS] + 30 tokens + [EOS]" in p.stdout
    ckpt = torch.load(tmp_path / "framed" / "ckpt.pt", weights_only=False)
    assert ckpt["framing"] == "bos_eos" and ckpt["config"]["dropout_sites"] == "residual"
    run("train.py", "--data", corpus, "--max_iters", 1, "--eval_interval", 1, "--out_dir", "child", *TINY,
        "--init_from", "framed/ckpt.pt", cwd=tmp_path)
    child = torch.load(tmp_path / "child" / "ckpt.pt", weights_only=False)
    assert child["framing"] == "bos_eos" and child["config"]["dropout_sites"] == "residual"
    run("train.py", "--data", corpus, "--max_iters", 1, "--eval_interval", 1, "--out_dir", "plain", *TINY, cwd=tmp_path)
    plain = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=False)
    assert plain["framing"] == "none" and plain["config"]["dropout_sites"] == "all"  # tinydiff's own defaults

def check_error(p, *words):
    """Bad input: non-zero exit, a one-line 'error:' message naming the problem, no traceback."""
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.mark.slow
def test_bad_input_gets_clear_errors(tmp_path, corpus):
    check_error(run("train.py", "--data", tmp_path / "nope.txt", *TINY, cwd=tmp_path, check=False), "does not exist")
    (tmp_path / "empty.txt").write_text("")
    check_error(run("train.py", "--data", tmp_path / "empty.txt", *TINY, cwd=tmp_path, check=False), "empty")
    check_error(run("train.py", "--data", corpus, *TINY, "--tokenizer", "klingon", cwd=tmp_path, check=False), "tokenizer")
    (tmp_path / "bad.pt").write_bytes(b"this is not a checkpoint")
    check_error(run("sample.py", "--ckpt", tmp_path / "bad.pt", cwd=tmp_path, check=False), "corrupt")
    check_error(run("sample.py", "--ckpt", tmp_path / "missing.pt", cwd=tmp_path, check=False), "does not exist")
    run("train.py", "--data", corpus, "--max_iters", 1, "--eval_interval", 1, "--out_dir", "out", *TINY, cwd=tmp_path)
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    check_error(run("sample.py", "--ckpt", "out/ckpt.pt", "--seq_len", 64, cwd=tmp_path, check=False), "context")
    p = run("train.py", "--data", corpus, "--max_iters", 2, "--out_dir", "out", "--resume", *TINY[:6], "--seq_len", 64,
            "--tokenizer", "bytes", cwd=tmp_path, check=False)
    check_error(p, "--seq_len 64", "holds --seq_len 32")  # a resumed run keeps its context
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before  # a refused run destroys nothing


@pytest.mark.slow
def test_noise_schedule_is_recorded_and_followed(tmp_path, corpus):
    """--schedule cosine is recorded in the checkpoint, and eval.py scores the bound of that schedule: the
    held-out bound train.py reported, to rounding (the log-linear bound of the same weights differs)."""
    trained = last_json(run("train.py", "--data", corpus, "--max_iters", 3, "--eval_interval", 3, "--out_dir", "out",
                            *TINY, "--schedule", "cosine", cwd=tmp_path))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert ckpt["schedule"] == {"name": "cosine", "eps": 1e-3} and ckpt["args"]["schedule"] == "cosine"
    e = last_json(run("eval.py", "--ckpt", "out/ckpt.pt", "--batch_size", 3, "--num_samples", 1, "--steps", 2,
                      "--device", "cpu", cwd=tmp_path))
    assert e["schedule"] == "cosine" and e["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    from tinydiff.common import model_from_checkpoint
    from tinydiff.data import checkpoint_data
    from tinydiff.evaluate import heldout_windows, val_metrics
    val_x = heldout_windows(checkpoint_data(ckpt), "mdlm", 32, 256)[0]
    loglinear = val_metrics(model_from_checkpoint(ckpt), "mdlm", val_x, ckpt["mask_id"], 2)["val_loss"]
    assert abs(loglinear - trained["val_loss"]) > 1e-3  # the eval above could not have passed by following it
    p = run("train.py", "--data", corpus, "--max_iters", 4, "--out_dir", "out", "--resume", *TINY, "--schedule",
            "loglinear", cwd=tmp_path, check=False)
    check_error(p, "--schedule loglinear", "holds --schedule cosine")
def test_bpe_checkpoints_are_self_describing(tmp_path, corpus):
    """--tokenizer bpe: the merges travel in the checkpoint (sample.py decodes with the data folder gone); a model
    whose merges differ is refused as judge, for --resume and as --init_from, by their hash, not their name."""
    other = tmp_path / "other.txt"
    other.write_text("".join(f"while n{i % 11} < {i}:\n    n{i % 11} += items[{i % 13}]\n" for i in range(400)))
    bpe = ["--tokenizer", "bpe", "--vocab_size", 270, "--max_iters", 2, "--eval_interval", 2, *TINY[:-2]]
    p = run("train.py", "--data", corpus, "--out_dir", "mdlm", *bpe, cwd=tmp_path)
    assert "nats/byte" in p.stdout and "unigram" in p.stdout and "--model ar --out_dir mdlm-ar" in p.stdout
    out = last_json(p)
    assert out["unigram_per_byte"] > 0 and out["heldout_bytes"] > out["heldout_tokens"]  # > 1 byte per token
    assert out["val_loss_per_byte"] == pytest.approx(out["val_loss"] * out["heldout_tokens"] / out["heldout_bytes"])
    run("train.py", "--data", other, "--out_dir", "ar_other", "--model", "ar", *bpe, cwd=tmp_path)
    ckpt = torch.load(tmp_path / "mdlm" / "ckpt.pt", weights_only=False)
    assert ckpt["tokenizer"]["name"] == "bpe" and len(ckpt["tokenizer"]["merges"]) == 270 - 257
    assert ckpt["config"]["vocab_size"] == 271  # 270 ids + [MASK]
    data_dir = tmp_path / "data"
    data_dir.rename(tmp_path / "data_gone")
    s = run("sample.py", "--ckpt", "mdlm/ckpt.pt", "--steps", 4, "--num_samples", 1, "--prompt", "def f", cwd=tmp_path)
    assert "def f" in s.stdout and not data_dir.exists()
    (tmp_path / "data_gone").rename(data_dir)
    check_error(run("eval.py", "--ckpt", "mdlm/ckpt.pt", "--judge", "ar_other/ckpt.pt", "--num_samples", 1,
                    "--val_tokens", 0, cwd=tmp_path, check=False), "judge", "bpe-", "--retokenize")
    # --resume keeps the data its merges were learned from (the folder is pinned by content: docs/troubleshooting.md)
    check_error(run("train.py", "--data", other, "--out_dir", "mdlm", "--resume", *bpe, cwd=tmp_path, check=False),
                "--data", "contradicts")
    check_error(run("train.py", "--data", other, "--out_dir", "x", "--init_from", "mdlm/ckpt.pt", *bpe, cwd=tmp_path,
                    check=False), "tokenizer", "bpe-")


# ----------------------------------------------------------------------------- a user's own small file

PARAGRAPH = ("Am Rand des kleinen Dorfes stand eine alte Mühle. Jeden Morgen ging der Müller mit seinem Hund über "
             "die Brücke, grüßte die Bäckerin und sah nach dem Wasser im Bach. Im Sommer war der Bach schmal und "
             "warm, im Winter lag Eis auf den Steinen. Die Kinder des Dorfes liefen nach der Schule zur Mühle, "
             "weil der Müller Geschichten erzählte: von Riesen im Wald, von einem Fuchs, der lesen konnte, und "
             "von einem Boot, das über die Wolken fuhr. Niemand glaubte ihm, aber alle hörten zu, bis es dunkel "
             "wurde und die Mütter nach ihnen riefen. Dann liefen sie nach Hause.\n")


def _stories(n):
    names, things = ["Mia", "Tom", "Lily", "Ben", "Sam"], ["a red ball", "a little boat", "a kite", "a lost cat"]
    out = []
    for i in range(n):
        who, what = names[i % 5], things[i % 4]
        out.append(f"Once upon a time, {who} found {what} in the park. {who} was very happy and showed it to "
                   f"a friend. They played with it all day, and when the sun went down they went home together.\n")
    return "".join(out)


@pytest.mark.slow
def test_the_defaults_train_on_a_small_file_and_a_folder(tmp_path):
    """train.py --data FILE with the default tokenizer (a 4096-id BPE) on text too small for it: it trains with
    the largest vocabulary the file allows (one line says so; the checkpoint records it) and the windows the
    splits allow; an explicit --vocab_size above the limit is still an error."""
    (tmp_path / "absatz.txt").write_text(PARAGRAPH, encoding="utf-8")
    assert 550 <= len(PARAGRAPH.encode()) <= 650
    (tmp_path / "stories.txt").write_text(_stories(22))
    assert 3800 <= (tmp_path / "stories.txt").stat().st_size <= 4300
    (tmp_path / "notes").mkdir()
    for i in range(4):
        (tmp_path / "notes" / f"note{i}.txt").write_text(_stories(i + 2))
    quick = ["--max_iters", 2, "--eval_interval", 2, "--device", "cpu"]
    for data in ("absatz.txt", "stories.txt", "notes"):
        p = run("train.py", "--data", data, *quick, "--out_dir", f"out-{data}", cwd=tmp_path)
        out = last_json(p)
        assert out["iter"] == 2 and out["val_loss"] is not None, p.stdout[-2000:]
        note = [ln for ln in p.stdout.splitlines() if ln.startswith("note: ") and "--vocab_size" in ln]
        assert len(note) == 1, p.stdout[-3000:]
        ckpt = torch.load(tmp_path / f"out-{data}" / "ckpt.pt", weights_only=True)
        assert ckpt["args"]["vocab_size"] == ckpt["tokenizer"]["vocab_size"] < 4096
        assert f"--vocab_size {ckpt['tokenizer']['vocab_size']}" in note[0]
    # the held-out split of the paragraph holds a few tokens only: the bound says what it rests on
    p = run("train.py", "--data", "absatz.txt", *quick, "--out_dir", "again", cwd=tmp_path)
    assert "rests on" in p.stdout
    p = run("train.py", "--data", "absatz.txt", "--vocab_size", 4096, *quick, "--out_dir", "x", cwd=tmp_path,
            check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--vocab_size" in p.stderr
    assert not (tmp_path / "x" / "ckpt.pt").exists()
