"""Multi-process training (DDP, torchrun) on the CPU with gloo, and preemption (SIGTERM) with exact resume.

DDP: 2 processes with batch_size B equal one process with batch_size 2B (same global batch: same rows,
t and masks) up to float round-off, with gradient accumulation (no_sync) on. Preemption: SIGTERM makes
the run write ckpt.pt and exit with 143; --resume then ends exactly where an uninterrupted run ends.
Every run is a subprocess, as a user would launch it (OMP_NUM_THREADS=1: the CI machine has 2 cores).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "32", "--eval_tokens", "256",
        "--device", "cpu", "--compile", "false", "--warmup", "2", "--tokenizer", "bytes"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def command(*args, nproc=1):
    script = os.path.join(ROOT, "train.py")
    return [*(TORCHRUN if nproc == 2 else [sys.executable]), script, *map(str, args)]


def run(cmd, cwd):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def run_and_preempt(cmd, cwd, out_dir, max_iters):
    """Start a run, wait for its first ckpt.pt (written by the --ckpt_minutes timer: the iteration interval
    is never reached), send SIGTERM to its whole process group (as a cluster scheduler does), wait."""
    with open(cwd / "log.txt", "w") as log:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        ckpt, t0 = cwd / out_dir / "ckpt.pt", time.time()
        while not ckpt.exists():
            assert p.poll() is None, f"the run ended before it was preempted:\n{(cwd / 'log.txt').read_text()[-3000:]}"
            assert time.time() - t0 < 120, "no checkpoint after 120 s"
            time.sleep(0.02)
        timed = torch.load(ckpt, weights_only=False)["iter"]
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=120)
    assert 0 < timed < max_iters  # the time-based checkpoint, mid-run
    return p.returncode, (cwd / "log.txt").read_text(), torch.load(ckpt, weights_only=False)


def json_lines(text):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def assert_same_weights(a, b, atol=0.0):
    for part in ("model", "ema"):
        sa, sb = (a[part], b[part]) if part == "model" else (a[part]["model"], b[part]["model"])
        for k in sa:
            if atol == 0:
                assert torch.equal(sa[k], sb[k]), (part, k)
            else:
                torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=f"{part} {k}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "code.txt").write_text("".join(f"def f{i % 7}(self, x):\n    return x + {i % 5}\n\n" for i in range(400)))
    return d / "code.txt"


N = 30  # iterations of the DDP runs: few enough that float round-off stays far below the 1e-5 tolerance
DDP_ARGS = ["--max_iters", N, "--eval_interval", N, "--ckpt_interval", 1000, "--ckpt_minutes", 0.002,
            "--grad_accum", 2, "--lr", 5e-4, *TINY]


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The reference: one process, batch_size 4 x grad_accum 2."""
    d = tmp_path_factory.mktemp("one")
    run(command("--data", corpus, "--batch_size", 4, "--out_dir", "one", *DDP_ARGS), d)
    return torch.load(d / "one" / "ckpt.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_processes(corpus, tmp_path_factory):
    """torchrun, 2 processes of batch_size 2 x grad_accum 2 (no_sync on the first micro-batch): the same
    global batch. Returns (stdout, ckpt)."""
    d = tmp_path_factory.mktemp("two")
    p = run(command("--data", corpus, "--batch_size", 2, "--out_dir", "two", *DDP_ARGS, nproc=2), d)
    return p.stdout, torch.load(d / "two" / "ckpt.pt", weights_only=False)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch(one_process, two_processes):
    """Same rows, t and masks: equal weights up to float round-off (the sums run in another order)."""
    stdout, two = two_processes
    # rank 0 alone prints: one summary line, one sample, one device line
    assert len(json_lines(stdout)) == 1 and stdout.count(" sample ") == 1, stdout
    assert stdout.count("DDP over 2 processes (gloo)") == 1, stdout
    assert one_process["iter"] == two["iter"] == N
    assert not torch.equal(one_process["model"]["tok_emb.weight"], two["model"]["tok_emb.weight"])  # not bitwise
    assert_same_weights(one_process, two, atol=1e-5)


@pytest.mark.slow
def test_sigterm_under_torchrun_then_resume_is_exact(tmp_path, corpus, two_processes):
    """Preempt a 2-process run (SIGTERM to torchrun and its workers, as a scheduler does), resume it with
    torchrun: bit-identical to the uninterrupted 2-process run."""
    cmd = command("--data", corpus, "--batch_size", 2, "--out_dir", "two", *DDP_ARGS, nproc=2)
    code, log, ckpt = run_and_preempt(cmd, tmp_path, "two", N)
    # the workers exit 143; torchrun itself reports the signal it got (a SignalException, status 1)
    assert code != 0 and log.count("SIGTERM: stopped after iter") == 1, log  # rank 0 alone says it
    assert 0 < ckpt["iter"] < N
    run([*cmd, "--resume"], tmp_path)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)
    assert b["iter"] == N
    assert_same_weights(two_processes[1], b)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, corpus):
    """One process: a time-based checkpoint (--ckpt_minutes) mid-run, SIGTERM -> ckpt.pt and exit 143,
    --resume -> bit-identical weights, EMA and eval history to an uninterrupted run (dropout on)."""
    n = 40
    common = ["--data", corpus, "--max_iters", n, "--eval_interval", 15, "--ckpt_interval", 1000,
              "--ckpt_minutes", 0.002, "--batch_size", 4, "--dropout", 0.1, *TINY]
    run(command("--out_dir", "straight", *common), tmp_path)
    code, log, ckpt = run_and_preempt(command("--out_dir", "cut", *common), tmp_path, "cut", n)
    assert code == 143, log
    assert "SIGTERM: stopped after iter" in log and "--resume" in log, log
    assert 0 < ckpt["iter"] < n and not json_lines(log)  # no summary line: the run is not complete
    run(command("--out_dir", "cut", "--resume", *common), tmp_path)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == n
    assert_same_weights(a, b)
    assert a["history"] == b["history"]
