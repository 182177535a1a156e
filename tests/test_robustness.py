"""Nothing lost, nothing silently wrong: the QA report's reproducers (bad flags, --resume, out_dir
safety, failed saves, binary inputs, strict JSON, a held-out bound independent of the batch size).

Bad flags are checked by running the scripts in this process (runpy, as `python SCRIPT ...` would):
they stop before any work. Everything that trains, locks or saves runs as a subprocess on a tiny
model (1 layer, 32 wide, seq 32) and a corpus generated here.
"""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tinydiff import run as cli
from tinydiff.common import StopSignals, UserError, emit
from tinydiff.run import RESUMABLE
from tinydiff.outdir import claim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--seq_len", "32", "--batch_size", "4",
        "--eval_tokens", "256", "--device", "cpu", "--compile", "false", "--warmup", "2", "--tokenizer", "bytes"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, *args, cwd, check=True, prefix=()):
    """Run a script as a user does; prefix: python code run first in the same process (a fault to inject)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    if prefix:
        code = "\n".join(["import runpy, sys", f"sys.path.insert(0, {ROOT!r})", *prefix, f"sys.argv = {cmd[1:]!r}",
                          f"runpy.run_path({cmd[1]!r}, run_name='__main__')"])
        cmd = [sys.executable, "-c", code]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def strict_json(line):
    """The JSON contract: parses with NaN/Infinity refused."""
    def refuse(name):
        raise AssertionError(f"{name} in a JSON line: {line}")
    return json.loads(line, parse_constant=refuse)


def last_json(p):
    return strict_json(p.stdout.strip().splitlines()[-1])


def error_line(stderr, *words):
    """One `error:` line naming the problem, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def check_error(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    return error_line(p.stderr, *words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "code.txt").write_text("".join(f"def f{i % 7}(self, x):\n    return x + {i % 5}\n\n" for i in range(400)))
    return d / "code.txt"


# ----------------------------------------------------------------------------- every numeric flag, up front

BAD_FLAGS = [  # (script, flags, words the error line must hold): the QA cases and their kin
    ("train.py", ["--grad_accum", "0"], ["--grad_accum 0", "at least 1"]),
    ("train.py", ["--batch_size", "0"], ["--batch_size 0"]),
    ("train.py", ["--seq_len", "0"], ["--seq_len 0"]),
    ("train.py", ["--eval_interval", "0"], ["--eval_interval 0"]),
    ("train.py", ["--ckpt_interval", "0"], ["--ckpt_interval 0"]),
    ("train.py", ["--log_interval", "0"], ["--log_interval 0"]),
    ("train.py", ["--eval_tokens", "0"], ["--eval_tokens 0"]),
    ("train.py", ["--eval_draws", "0"], ["--eval_draws 0"]),
    ("train.py", ["--max_iters", "0"], ["--max_iters 0"]),
    ("train.py", ["--lr", "-1"], ["--lr -1"]),
    ("train.py", ["--lr", "0"], ["--lr 0", "learns nothing"]),
    ("train.py", ["--lr", "nan"], ["--lr nan"]),
    ("train.py", ["--lr", "inf"], ["--lr inf"]),
    ("train.py", ["--min_lr", "0.5", "--lr", "0.1"], ["--min_lr 0.5 is above --lr 0.1"]),
    ("train.py", ["--warmup", "-1"], ["--warmup -1"]),
    ("train.py", ["--ema", "1"], ["--ema 1"]),
    ("train.py", ["--dropout", "1.5"], ["--dropout 1.5"]),
    ("train.py", ["--ckpt_minutes", "-2"], ["--ckpt_minutes -2"]),
    ("train.py", ["--n_head", "3", "--n_embd", "32"], ["not divisible by --n_head 3"]),
    ("train.py", ["--n_head", "16", "--n_embd", "48"], ["head dim 3", "odd"]),
    ("train.py", ["--n_layer", "0"], ["--n_layer 0"]),
    ("train.py", ["--batch_size", "x"], ["--batch_size", "invalid int value"]),
    ("train.py", ["--no_such_flag", "1"], ["unrecognized arguments"]),
    ("train.py", ["--resume", "--overwrite"], ["contradict"]),
    ("distill.py", ["--rounds", "0"], ["--rounds 0"]),
    ("distill.py", ["--iters_per_round", "0"], ["--iters_per_round 0"]),
    ("distill.py", ["--n_teacher_steps", "0"], ["--n_teacher_steps 0"]),
    ("distill.py", ["--teacher_steps", "-8"], ["--teacher_steps -8"]),
    ("distill.py", ["--method", "tcs", "--topk", "-1"], ["--topk -1"]),
    ("distill.py", ["--method", "tcs", "--tcs_lambda", "2"], ["--tcs_lambda 2"]),
    ("distill.py", ["--method", "tcs", "--window", "0"], ["--window 0"]),
    ("distill.py", ["--grad_accum", "0"], ["--grad_accum 0"]),
    ("sample.py", ["--steps", "0"], ["--steps 0", "at least 1"]),
    ("sample.py", ["--steps", "-3"], ["--steps -3"]),
    ("sample.py", ["--temperature", "-1"], ["--temperature -1", ">= 0"]),  # knobs: tinydiff/sampling.py
    ("sample.py", ["--temperature", "nan"], ["--temperature nan"]),
    ("sample.py", ["--top_k", "-5"], ["--top_k -5"]),
    ("sample.py", ["--top_p", "0"], ["--top_p 0", "(0, 1]"]),
    ("sample.py", ["--top_p", "1.5"], ["--top_p 1.5"]),
    ("sample.py", ["--sampler", "threshold", "--tau", "2"], ["--tau 2"]),
    ("sample.py", ["--num_samples", "0"], ["--num_samples 0"]),
    ("sample.py", ["--batch_size", "0"], ["--batch_size 0"]),
    ("sample.py", ["--seq_len", "0"], ["--seq_len 0"]),
    ("sample.py", ["--out", "no/such/folder/s.jsonl"], ["does not exist"]),
    ("eval.py", ["--steps", "8,0"], ["--steps 8,0"]),
    ("eval.py", ["--steps", "8,x"], ["comma-separated list of integers"]),
    ("eval.py", ["--num_samples", "0"], ["--num_samples 0"]),
    ("eval.py", ["--batch_size", "0"], ["--batch_size 0"]),
    ("eval.py", ["--val_tokens", "-1"], ["--val_tokens -1"]),
    ("eval.py", ["--val_draws", "0"], ["--val_draws 0"]),
    ("eval.py", ["--gen_len", "1"], ["--gen_len 1"]),
    ("eval.py", ["--limit", "0"], ["--limit 0"]),
    ("eval.py", ["--lambada_draws", "0"], ["--lambada_draws 0"]),
    ("eval.py", ["--lambada_batch", "0"], ["--lambada_batch 0"]),
    ("bench.py", ["--runs", "0"], ["--runs 0"]),
    ("bench.py", ["--batch_sizes", "1,0"], ["--batch_sizes 1,0"]),
    ("bench.py", ["--steps", "8,-1"], ["--steps 8,-1"]),
    ("bench.py", ["--train_iters", "0"], ["--train_iters 0"]),
    ("bench.py", ["--threads", "-1"], ["--threads -1"]),
    ("bench.py", ["--steps", "a"], ["comma-separated list of integers"]),
    ("experiments/bench_tcs.py", ["--teacher", "t.pt", "--n_seq", "0"], ["--n_seq 0"]),
    ("experiments/bench_tcs.py", ["--teacher", "t.pt", "--ks", "2,0"], ["--ks 2,0"]),
    ("experiments/bench_tcs.py", ["--teacher", "t.pt", "--windowed", "4:x"], ["--windowed", "K:W"]),
    ("experiments/bench_tcs.py", ["--teacher", "t.pt", "--seq_len", "0"], ["--seq_len 0"]),
]


@pytest.mark.parametrize("script,flags,words", BAD_FLAGS, ids=[f"{s}:{' '.join(f)}" for s, f, _ in BAD_FLAGS])
def test_bad_flags_are_one_error_line_before_any_work(tmp_path, monkeypatch, capsys, script, flags, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *flags])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    error_line(err, *words)
    assert len(err.strip().splitlines()) == 1, err  # argparse's usage block is not printed either
    assert not any(tmp_path.iterdir())  # nothing was created: no out_dir, no data folder


def test_a_bad_flag_in_a_real_process(tmp_path):
    """The same through the interpreter (QA: --grad_accum 0 ran 9 empty steps, then AttributeError)."""
    check_error(run("train.py", "--grad_accum", 0, cwd=tmp_path, check=False), "--grad_accum 0")
    assert not any(tmp_path.iterdir())


def test_rules_and_flag_detection():
    assert cli.Rule(0, 1, lo_open=True).says() == "must be in (0, 1]"
    with pytest.raises(UserError, match=r"--steps 8,32,0: must be at least 1"):
        cli.check("steps", [8, 32, 0])
    cli.check("steps", None)  # None = "the checkpoint's": not checked
    p = cli.ArgumentParser(prog="x.py")
    p.add_argument("--max_iters", type=int, default=5)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(lr=2.0)  # a script's or a preset's default is not "given"
    assert cli.given_flags(p, ["--max", "7", "--resume"]) == {"max_iters", "resume"}  # argparse's prefixes
    assert cli.given_flags(p, []) == set() and p.parse_args([]).lr == 2.0 and p.parse_args([]).max_iters == 5


def test_ctrl_c_outside_the_training_loop_is_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run_main(interrupted)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "interrupted" in err


def test_second_ctrl_c_aborts():
    """The loop's handler: SIGTERM or a first Ctrl-C ask for a stop after the step; a second Ctrl-C aborts."""
    before = signal.getsignal(signal.SIGINT)
    signals = StopSignals()
    try:
        assert signal.getsignal(signal.SIGINT) == signals.handle
        signals.handle(signal.SIGTERM)
        signals.handle(signal.SIGINT)
        assert signals.got == [signal.SIGTERM, signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            signals.handle(signal.SIGINT)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) == before


def test_json_lines_hold_no_nan(capsys):
    emit({"train_loss": float("nan"), "rows": [{"x": float("inf")}, 1.5], "n": 3})
    assert strict_json(capsys.readouterr().out) == {"train_loss": None, "rows": [{"x": None}, 1.5], "n": 3}


# ----------------------------------------------------------------------------- --resume continues the run

@pytest.mark.slow
def test_resume_continues_the_run_that_was_started(tmp_path, corpus):
    """QA 9-12: the data, tokenizer and architecture come from the checkpoint; contradictions are errors;
    --max_iters below the checkpoint is an error; a run already complete prints null, not NaN."""
    run("train.py", "--data", corpus, "--max_iters", 4, "--eval_interval", 2, "--out_dir", "out", *TINY, cwd=tmp_path)
    first = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert os.path.isabs(first["data_dir"]) and first["data_dir"].endswith(first["data_key"])
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    contradictions = [(["--n_embd", 64], ["--n_embd 64", "holds --n_embd 32"]),  # QA 10: was silently ignored
                      (["--model", "ar"], ["--model ar", "holds --model mdlm"]),
                      (["--tokenizer", "gpt2"], ["holds --tokenizer bytes"]),
                      (["--data", "stdlib"], ["--data stdlib", str(corpus)]),
                      (["--seq_len", 64], ["--seq_len 64", "holds --seq_len 32"]),
                      (["--eval_tokens", 512], ["--eval_tokens 512"]),
                      (["--max_iters", 3], ["--max_iters 3 is below", "(4)"])]  # QA 12: was NaN in the JSON
    for flags, words in contradictions:
        check_error(run("train.py", "--resume", "--out_dir", "out", *flags, cwd=tmp_path, check=False), *words)
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before  # a refused run destroys nothing

    # already complete: nothing to do, strict JSON (train_loss null: no step was run)
    assert last_json(run("train.py", "--resume", "--out_dir", "out", cwd=tmp_path))["train_loss"] is None
    # the source is edited: the resumed run still reads the folder it was trained on (QA 11, 27)
    corpus_copy = tmp_path / "code.txt"
    shutil.copy(corpus, corpus_copy)
    run("train.py", "--data", "code.txt", "--max_iters", 2, "--out_dir", "rel", *TINY, cwd=tmp_path)
    rel = torch.load(tmp_path / "rel" / "ckpt.pt", weights_only=False)
    corpus_copy.write_text("z\n" * 20000)
    # no --data, no architecture flags: all from the checkpoint; the allowed flags (RESUMABLE) may change
    p = run("train.py", "--resume", "--out_dir", "rel", "--max_iters", 4, "--eval_interval", 1, cwd=tmp_path)
    assert "prepared" not in p.stdout  # neither the edited file nor stdlib was prepared
    done = torch.load(tmp_path / "rel" / "ckpt.pt", weights_only=False)
    assert done["iter"] == 4 and done["config"] == rel["config"] and done["data_dir"] == rel["data_dir"]
    assert done["args"]["data"] == "code.txt" and done["args"]["eval_interval"] == 1
    assert [h["iter"] for h in done["history"]] == [2, 3, 4]
    assert all(d.endswith(rel["data_key"]) for d in os.listdir(tmp_path / "data"))  # the edit was never prepared
    assert "max_iters" in RESUMABLE and "eval_tokens" not in RESUMABLE


@pytest.mark.slow
def test_help_lists_what_resume_may_change(tmp_path):
    out = " ".join(run("train.py", "--help", cwd=tmp_path).stdout.split())
    assert "may change on resume: --" + ", --".join(RESUMABLE) in out and "--overwrite" in out


@pytest.mark.slow
def test_distill_help_shows_the_defaults_of_the_method(tmp_path):
    """distill.py --help shows real defaults, those of --method (SDTT's run length follows its rounds)."""
    def shown(*flags):
        out = " ".join(run("distill.py", *flags, "--help", cwd=tmp_path).stdout.split())
        return {f: out.split(f"--{f} {f.upper()} ")[1].split(")")[0] for f in ("max_iters", "lr", "eval_interval")}
    assert shown() == {"max_iters": "optimizer steps in total (default 600", "lr": "peak learning rate (AdamW; "
                       "default 0.0003", "eval_interval": "evaluate every N steps (and at the end; default 150"}
    assert shown("--method", "tcs")["max_iters"].endswith("default 2000") and "0.001" in shown("--method", "tcs")["lr"]
    assert shown("--rounds", 7, "--iters_per_round", 300)["max_iters"].endswith("default 2100")


# ----------------------------------------------------------------------------- out_dir: nothing overwritten

@pytest.mark.slow
def test_out_dir_with_a_checkpoint_is_refused(tmp_path, corpus):
    """QA 19: a new run (or a preempted run restarted without --resume) replaced a 2600-iter model."""
    common = ["--data", corpus, "--max_iters", 2, "--eval_interval", 2, *TINY]
    run("train.py", "--out_dir", "out", *common, cwd=tmp_path)
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    check_error(run("train.py", "--out_dir", "out", *common, "--model", "ar", cwd=tmp_path, check=False),
                "already holds a checkpoint", "--resume", "--overwrite")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    check_error(run("train.py", "--out_dir", "empty", "--resume", *common, cwd=tmp_path, check=False), "does not exist")
    assert not (tmp_path / "empty").exists()  # a refused run leaves no empty folder behind
    run("train.py", "--out_dir", "out", *common, "--model", "ar", "--overwrite", cwd=tmp_path)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["kind"] == "ar"
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt"]  # the lock is gone with the run


@pytest.mark.slow
def test_one_run_per_out_dir(tmp_path, corpus):
    """QA 25: two runs on one out_dir both exited 0 and one model was lost. The lock is held for the life of a
    process (here this test's), and a lock file left by a process that is gone is taken over."""
    common = ["--data", corpus, "--max_iters", 2, "--eval_interval", 2, "--out_dir", "out", *TINY]
    held = claim(tmp_path / "out")
    try:
        check_error(run("train.py", *common, cwd=tmp_path, check=False), "in use by another run", str(os.getpid()))
    finally:
        held.release()
    assert not (tmp_path / "out").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".lock").write_text(dead.stdout.strip())  # a run killed with SIGKILL leaves this
    p = run("train.py", *common, cwd=tmp_path)
    assert f"left by process {dead.stdout.strip()}, which is gone" in p.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt"]


@pytest.mark.slow
def test_unusable_out_dirs_fail_before_training(tmp_path, corpus):
    """QA 16/17: an out_dir that is a file, or under one, or not writable: one line, before any training."""
    (tmp_path / "afile").write_text("x")
    common = ["--data", corpus, "--max_iters", 2, *TINY]
    check_error(run("train.py", "--out_dir", "afile", *common, cwd=tmp_path, check=False), "is not a folder")
    check_error(run("train.py", "--out_dir", "afile/sub", *common, cwd=tmp_path, check=False), "cannot create")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        cmd_prefix = []
        if os.geteuid() == 0:  # root writes anyway: drop the capability that lets it (as the QA run did)
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot make a folder unwritable")
            caps = "-dac_override,-dac_read_search,-fowner"
            cmd_prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
        p = subprocess.run([*cmd_prefix, sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", "ro",
                            *map(str, common)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
        check_error(p, "cannot write in --out_dir ro", "permission denied")
        assert "train:" not in p.stderr and "global batch" not in p.stdout  # refused before any training
    finally:
        locked.chmod(0o755)


FULL_DISK = textwrap.dedent("""
    import errno, torch
    real, calls = torch.save, [0]
    def save(obj, f, *a, **k):  # the first save succeeds, then the disk is full
        calls[0] += 1
        if calls[0] > 1:
            raise {error}
        return real(obj, f, *a, **k)
    torch.save = save
""")


@pytest.mark.slow
@pytest.mark.parametrize("error", ["RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64')",
                                   "OSError(errno.ENOSPC, 'No space left on device')"])
def test_failed_save_names_the_intact_checkpoint(tmp_path, corpus, error):
    """QA 18: a full disk gave torch's 'enforce fail ... unexpected pos' traceback."""
    p = run("train.py", "--data", corpus, "--max_iters", 6, "--ckpt_interval", 2, "--eval_interval", 6,
            "--out_dir", "out", *TINY, cwd=tmp_path, check=False, prefix=[FULL_DISK.format(error=error)])
    line = check_error(p, "could not write out/ckpt.pt at iter 4", "out/ckpt.pt (iter 2) is intact", "--resume")
    assert "MiB free" in line
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter"] == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt"]  # no temp file, no lock left


@pytest.mark.slow
def test_too_little_space_is_refused_before_training(tmp_path, corpus):
    prefix = ["import shutil, collections",
              "shutil.disk_usage = lambda p: collections.namedtuple('u', 'total used free')(10**9, 10**9, 100000)"]
    p = run("train.py", "--data", corpus, "--max_iters", 2, "--out_dir", "out", *TINY, cwd=tmp_path, check=False,
            prefix=prefix)
    check_error(p, "MiB free but this run's checkpoints need")
    assert "global batch" not in p.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path, corpus):
    """QA 15: SIGKILL during a save left .ckpt.pt.tmpNNN (31 MB) for good."""
    common = ["--data", corpus, "--eval_interval", 2, "--out_dir", "out", *TINY]
    run("train.py", "--max_iters", 2, *common, cwd=tmp_path)
    (tmp_path / "out" / ".ckpt.pt.tmp12345").write_bytes(b"\0" * 1000)
    p = run("train.py", "--resume", "--max_iters", 3, *common, cwd=tmp_path)
    assert "removed out/.ckpt.pt.tmp12345" in p.stdout and "left by a save that was killed" in p.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- inputs

@pytest.mark.slow
def test_binary_data_is_refused(tmp_path):
    """QA 5: --data /bin/ls trained on the binary."""
    (tmp_path / "prog").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 50)
    p = run("train.py", "--data", "prog", "--max_iters", 2, "--out_dir", "out", *TINY, cwd=tmp_path, check=False)
    check_error(p, "looks binary")
    assert not (tmp_path / "out").exists()


def test_damaged_checkpoints(tmp_path, monkeypatch, capsys):
    """QA 7: a folder said "does not exist"; a checkpoint with the right keys but no weights gave a traceback."""
    from tinydiff.model import ModelConfig
    cfg = ModelConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=32, seq_len=32).to_dict()
    torch.save({"config": cfg, "model": {}, "kind": "mdlm", "tokenizer": {"name": "bytes"}}, tmp_path / "hollow.pt")
    monkeypatch.chdir(tmp_path)
    for ckpt, words in ((tmp_path, ["is a folder", "ckpt.pt"]), ("hollow.pt", ["do not match its config"])):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(ckpt), "--device", "cpu"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")
        assert e.value.code == 2
        error_line(capsys.readouterr().err, *words)


def test_one_loader_checks_kind_tokenizer_and_script(tmp_path):
    """load_checkpoint(path, kind=, tokenizer=, script=): every script's checks, one UserError each, naming what
    the checkpoint is, what was needed and the fix."""
    from tinydiff.common import UserError, load_checkpoint
    from tinydiff.model import ModelConfig
    cfg = ModelConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=32, seq_len=32).to_dict()
    torch.save({"config": cfg, "model": {}, "kind": "mdlm", "tokenizer": {"name": "bytes"}, "method": "sdtt"},
               tmp_path / "m.pt")
    path = str(tmp_path / "m.pt")
    assert load_checkpoint(path, kind="mdlm", tokenizer="bytes", script="distill.py")["kind"] == "mdlm"
    cases = [({"kind": "ar"}, "m.pt is an MDLM with the bytes tokenizer, not an AR model: give one trained with "
                              "train.py --model ar"),
             ({"tokenizer": "gpt2", "what": "--init x"}, "--init x is an MDLM with the bytes tokenizer, not an MDLM "
                                                        "with the gpt2 tokenizer: give one trained with train.py "
                                                        "--model mdlm --tokenizer gpt2"),
             ({"kind": "ar", "fix": "do this"}, "not an AR model: do this"),
             ({"script": "train.py"}, "m.pt was written by distill.py --method sdtt, not train.py: resume it with "
                                      "distill.py, or use another --out_dir")]
    for kw, words in cases:
        with pytest.raises(UserError) as e:
            load_checkpoint(path, **kw)
        assert words in str(e.value), str(e.value)


@pytest.mark.slow
def test_sample_steps_and_temperature_are_as_asked(tmp_path, corpus):
    """QA 21: --steps 0 silently became 32 and --temperature -1 silently meant greedy (both errors now);
    temperature 0 is greedy. With `confidence` (no Gumbel noise) the sampler is then a deterministic function
    of the model: the same samples whatever the seed. (Ancestral sampling still draws which positions a step
    reveals, so its greedy samples depend on the seed.)"""
    run("train.py", "--data", corpus, "--max_iters", 2, "--eval_interval", 2, "--out_dir", "out", *TINY, cwd=tmp_path)
    for flags, words in ((["--steps", 0], ["--steps 0"]), (["--temperature", -1], [">= 0"])):
        check_error(run("sample.py", "--ckpt", "out/ckpt.pt", *flags, cwd=tmp_path, check=False), *words)

    def samples(seed):  # the sampled text only: not the banner's timing, not the JSON line
        out = run("sample.py", "--ckpt", "out/ckpt.pt", "--steps", 4, "--sampler", "confidence", "--temperature", 0,
                  "--seed", seed, "--device", "cpu", cwd=tmp_path).stdout
        return [line for line in out.splitlines() if not line.startswith(("sampler:", "{"))]

    assert samples(0) == samples(1)
    steps = last_json(run("sample.py", "--ckpt", "out/ckpt.pt", "--steps", 4, "--device", "cpu", cwd=tmp_path))["steps"]
    assert steps == 4


# ----------------------------------------------------------------------------- the held-out bound

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_held_out_bound_is_the_same_in_train_and_eval_whatever_the_batch(tmp_path, corpus, kind):
    """QA 3: the same checkpoint on the same tokens scored 175.9 in training and 204.5 in eval.py (batch 16
    vs 4). Now the noise is drawn per window from the seed: eval.py with batch sizes 1, 3 and 16, and
    train.py's final eval (batch 4), give one number; eval.py from another folder too (QA 28)."""
    trained = last_json(run("train.py", "--model", kind, "--data", corpus, "--max_iters", 3, "--eval_interval", 3,
                            "--out_dir", "out", *TINY, "--eval_draws", 3, cwd=tmp_path))
    other = tmp_path / "elsewhere"
    other.mkdir()
    scores = {}
    for b in (1, 3, 16):
        e = last_json(run("eval.py", "--ckpt", tmp_path / "out" / "ckpt.pt", "--batch_size", b, "--num_samples", 1,
                          "--steps", 2, "--device", "cpu", cwd=other if b == 3 else tmp_path))
        scores[b] = (e["val_loss"], e["val_loss_se"])
        assert e["val_scored_tokens"] == 256 and e["val_draws"] == (3 if kind == "mdlm" else None)
    assert scores[1][0] == pytest.approx(scores[3][0], rel=1e-6, abs=0) == pytest.approx(scores[16][0], rel=1e-6)
    assert trained["val_loss"] == pytest.approx(scores[16][0], rel=1e-6)
    assert trained["val_loss_se"] == pytest.approx(scores[16][1], rel=1e-4) and 0 < scores[16][1] < scores[16][0]


# ----------------------------------------------------------------------------- a shared checkpoint runs no code

class _Plant:
    """Unpickled, it creates a file: what a malicious checkpoint would do (full pickle runs code on load)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _plant_ckpt(path, marker):
    """A checkpoint with the keys of a tinydiff checkpoint whose tokenizer field runs code when unpickled."""
    cfg = {"vocab_size": 258, "n_layer": 1, "n_head": 2, "n_embd": 16, "seq_len": 16, "causal": False}
    torch.save({"config": cfg, "model": {}, "kind": "mdlm", "tokenizer": _Plant(str(marker)), "mask_id": 257}, path)


@pytest.mark.slow
def test_a_pickled_checkpoint_runs_nothing_in_any_script(tmp_path, corpus):
    """Checkpoints load with weights_only=True: a file whose pickle would call a function is refused with one
    line by every script that reads a checkpoint, and the function never runs (the marker file is never made)."""
    marker = tmp_path / "PWNED"
    _plant_ckpt(tmp_path / "evil.pt", marker)
    (tmp_path / "resume").mkdir()
    _plant_ckpt(tmp_path / "resume" / "ckpt.pt", marker)
    uses = [("sample.py", ["--ckpt", "evil.pt"]),
            ("eval.py", ["--ckpt", "evil.pt"]),
            ("bench.py", ["--ckpt", "evil.pt", "--sections", "latency", "--size", "tiny", "--runs", "1"]),
            ("train.py", ["--init_from", "evil.pt", "--data", corpus, *TINY]),
            ("train.py", ["--resume", "--out_dir", "resume"]),
            ("distill.py", ["--method", "sdtt", "--teacher", "evil.pt"]),
            ("distill.py", ["--method", "tcs", "--teacher", "evil.pt"]),
            ("distill.py", ["--method", "sdtt", "--teacher", "lab-oracle", "--init", "evil.pt"])]
    for script, flags in uses:
        check_error(run(script, *flags, cwd=tmp_path, check=False), "weights_only")
        assert not marker.exists(), (script, flags)
    assert (tmp_path / "resume" / "ckpt.pt").exists()  # refused, not removed


def test_a_checkpoint_with_fields_of_the_wrong_type_is_one_line(tmp_path):
    """The right keys, the wrong types (a string where the tokenizer's description belongs, a list for the
    config): one error line naming the field, not a traceback."""
    cfg = {"vocab_size": 258, "n_layer": 1, "n_head": 2, "n_embd": 16, "seq_len": 16, "causal": False}
    for field, value in (("tokenizer", "bytes"), ("config", [1, 2]), ("kind", 3), ("model", "weights")):
        ckpt = {"config": cfg, "model": {}, "kind": "mdlm", "mask_id": 257,
                "tokenizer": {"name": "bytes", "vocab_size": 257, "eot_id": 256}}
        ckpt[field] = value
        torch.save(ckpt, tmp_path / "bad.pt")
        check_error(run("sample.py", "--ckpt", "bad.pt", cwd=tmp_path, check=False), "bad.pt", field)
