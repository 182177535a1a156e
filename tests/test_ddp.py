"""Multi-process training (DDP, torchrun) on the CPU with gloo, and preemption (SIGTERM, Ctrl-C) with exact resume.

DDP: 2 processes with batch_size B equal one process with batch_size 2B (same global batch: same rows,
t and masks) up to float round-off, with gradient accumulation (no_sync) on. Preemption: SIGTERM makes
the run write ckpt.pt and exit with 143 (Ctrl-C: 130); --resume then ends exactly where an uninterrupted
run to the same step ends. The signal never races the clock: the interrupted run cannot reach its
--max_iters, it is signalled once its first checkpoint exists, and the reference and the resumed run
both end a few steps after wherever it stopped.
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


FAR = 1_000_000  # a --max_iters no run reaches before it is signalled: the signal never races the end of the run


def run_until_signal(cmd, cwd, out_dir, sig=signal.SIGTERM):
    """Start a run that cannot end on its own (--max_iters FAR), wait for its first ckpt.pt (--ckpt_interval),
    send `sig` to its whole process group (as a cluster scheduler, or Ctrl-C in a terminal, does), wait.
    Whatever the machine's speed, the run is then stopped mid-way at some iteration j; the caller compares
    the resumed run with a straight run at a later step. Returns (exit status, log, checkpoint)."""
    with open(cwd / "log.txt", "w") as log:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        ckpt, t0 = cwd / out_dir / "ckpt.pt", time.time()
        while not ckpt.exists():
            assert p.poll() is None, f"the run ended before it was signalled:\n{(cwd / 'log.txt').read_text()[-3000:]}"
            assert time.time() - t0 < 120, "no checkpoint after 120 s"
            time.sleep(0.02)
        os.killpg(p.pid, sig)
        p.wait(timeout=120)
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
DDP_ARGS = ["--eval_interval", N, "--grad_accum", 2, "--lr", 5e-4, *TINY]


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The reference: one process, batch_size 4 x grad_accum 2."""
    d = tmp_path_factory.mktemp("one")
    run(command("--data", corpus, "--batch_size", 4, "--out_dir", "one", "--max_iters", N, *DDP_ARGS), d)
    return torch.load(d / "one" / "ckpt.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_processes(corpus, tmp_path_factory):
    """torchrun, 2 processes of batch_size 2 x grad_accum 2 (no_sync on the first micro-batch): the same
    global batch. Returns (stdout, ckpt)."""
    d = tmp_path_factory.mktemp("two")
    p = run(command("--data", corpus, "--batch_size", 2, "--out_dir", "two", "--max_iters", N, *DDP_ARGS, nproc=2), d)
    return p.stdout, torch.load(d / "two" / "ckpt.pt", weights_only=False)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch(one_process, two_processes):
    """Same rows, t and masks: equal weights up to float round-off (the sums run in another order)."""
    stdout, two = two_processes
    # rank 0 alone prints: one summary line, one sample, one device line
    assert len(json_lines(stdout)) == 1 and stdout.count(" sample: ") == 1, stdout  # the end-of-run sample
    assert stdout.count("DDP over 2 processes (gloo)") == 1, stdout
    assert one_process["iter"] == two["iter"] == N
    assert not torch.equal(one_process["model"]["tok_emb.weight"], two["model"]["tok_emb.weight"])  # not bitwise
    assert_same_weights(one_process, two, atol=1e-5)


@pytest.mark.slow
def test_sigterm_under_torchrun_then_resume_is_exact(tmp_path, corpus):
    """Preempt a 2-process run (SIGTERM to torchrun and its workers, as a scheduler does), resume it with
    torchrun to a later step: bit-identical to an uninterrupted 2-process run to that step."""
    common = ["--data", corpus, "--batch_size", 2, *DDP_ARGS, "--ckpt_interval", 2, "--eval_interval", 5]
    code, log, ckpt = run_until_signal(command(*common, "--out_dir", "cut", "--max_iters", FAR, nproc=2), tmp_path, "cut")
    # the workers exit 143; torchrun itself reports the signal it got (a SignalException, status 1)
    assert code != 0 and log.count("SIGTERM: stopped after iter") == 1, log  # rank 0 alone says it
    end = ckpt["iter"] + 4  # a later step, reached by the reference and by the resumed run
    run(command(*common, "--out_dir", "straight", "--max_iters", end, nproc=2), tmp_path)
    run(command(*common, "--out_dir", "cut", "--max_iters", end, "--resume", nproc=2), tmp_path)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == end
    assert_same_weights(a, b)
    assert a["history"] == b["history"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,status,name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_signal_checkpoints_and_resume_is_exact(tmp_path, corpus, sig, status, name):
    """One process: SIGTERM or Ctrl-C -> finish the step, write ckpt.pt, one line, exit 143 / 130 (no
    traceback); --resume to a later step -> bit-identical weights, EMA and eval history to an uninterrupted
    run to that step (dropout on)."""
    common = ["--data", corpus, "--eval_interval", 5, "--ckpt_interval", 2, "--batch_size", 4, "--dropout", 0.1, *TINY]
    code, log, ckpt = run_until_signal(command("--out_dir", "cut", "--max_iters", FAR, *common), tmp_path, "cut", sig)
    assert code == status, log
    assert f"{name}: stopped after iter {ckpt['iter']}/{FAR}" in log and "--resume" in log, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert not json_lines(log)  # no summary line: the run is not complete
    end = ckpt["iter"] + 4
    run(command("--out_dir", "straight", "--max_iters", end, *common), tmp_path)
    run(command("--out_dir", "cut", "--max_iters", end, "--resume", *common), tmp_path)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == end
    assert_same_weights(a, b)
    assert a["history"] == b["history"]
