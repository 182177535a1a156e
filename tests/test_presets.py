"""tinydiff/presets.py (applied by tinydiff/run.py parse): --preset sets defaults (printed), explicit flags win;
costs from the FLOP count."""
import re
from pathlib import Path

import pytest

from tinydiff.presets import COST_ASSUMPTION, PRESETS, preset_cost
from tinydiff.run import ArgumentParser, add_train_args, parse

ROOT = Path(__file__).resolve().parents[1]


def train_like_parser():
    """train.py's flags: its own block plus the shared run flags."""
    p = ArgumentParser(prog="train.py")
    p.add_argument("--model", default="mdlm", choices=["mdlm", "ar"])
    for flag, default in (("--n_layer", 4), ("--n_head", 4), ("--n_embd", 128)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--dropout", type=float, default=0.0)
    add_train_args(p, seq_len=256, max_iters=500, batch_size=16, lr=2e-3, warmup=50, ema=0.999, eval_interval=250,
                   eval_tokens=32768, ckpt_interval=500)
    return p


def apply_preset(parser, argv, follow=None):
    return parse(parser, argv, follow)[0]


def test_preset_sets_defaults_and_flags_win(capsys):
    args = apply_preset(train_like_parser(), ["--preset", "mdlm-owt-small", "--lr", "1e-4", "--max_iters", "7"])
    assert (args.lr, args.max_iters) == (1e-4, 7)  # given explicitly: kept
    assert (args.n_layer, args.n_embd, args.n_head, args.seq_len) == (12, 768, 12, 1024)
    assert (args.batch_size * args.grad_accum, args.warmup, args.ema, args.dropout) == (512, 2500, 0.9999, 0.1)
    assert (args.framing, args.dropout_sites) == ("bos_eos", "residual")  # MDLM's chunks and DiT dropout sites
    assert (args.data, args.tokenizer, args.dtype, args.lr_schedule) == ("owt", "gpt2", "bfloat16", "constant")
    assert args.preset == "mdlm-owt-small"
    out = capsys.readouterr().out
    assert out.startswith("preset mdlm-owt-small: ") and "--n_layer 12" in out


def test_no_preset_changes_nothing(capsys):
    args = apply_preset(train_like_parser(), [])
    assert (args.preset, args.n_layer, args.lr, args.data) == (None, 4, 2e-3, "stdlib")
    assert capsys.readouterr().out == ""


def test_wrong_or_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        apply_preset(train_like_parser(), ["--preset", "nope"])
    assert "choose one of mdlm-owt-small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        apply_preset(train_like_parser(), ["--preset", "sdtt-paper"])
    assert "is for distill.py" in capsys.readouterr().err


def test_defaults_that_follow_other_flags():
    """parse(method_defaults=): defaults computed from other flags (given or a preset's); a preset's own value and a
    given flag win over them."""
    def follow(a):
        return {"eval_interval": 10 * a.max_iters, "warmup": a.max_iters}
    args = apply_preset(train_like_parser(), ["--max_iters", "7"], follow=follow)
    assert (args.eval_interval, args.warmup) == (70, 7)
    args = apply_preset(train_like_parser(), ["--preset", "mdlm-owt-small", "--max_iters", "7"], follow=follow)
    assert (args.eval_interval, args.warmup) == (10_000, 2500)  # the preset's own values
    args = apply_preset(train_like_parser(), ["--warmup", "3"], follow=follow)
    assert (args.eval_interval, args.warmup) == (5000, 3)


def script_flags(script):
    """The --flags a script defines (its own add_argument calls, plus the shared run flags)."""
    text = (ROOT / script).read_text() + (ROOT / "tinydiff" / "run.py").read_text()
    return set(re.findall(r'(?:add_argument|a)\("--(\w+)"', text))


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_key_is_a_flag_of_its_script(name):
    p = PRESETS[name]
    assert {k for k in p if k != "script"} <= script_flags(p["script"])


def test_costs():
    small = preset_cost("mdlm-owt-small")
    assert 160e6 < small["params"] < 170e6  # MDLM counts 169M with its adaLN layers, which tinydiff folds away
    assert small["tokens"] == 1_000_000 * 512 * 1024
    assert small["flops"] > 6 * 85e6 * small["tokens"]  # at least 6 N D for the non-embedding weights
    assert 100 < small["gpu_hours"] < 1000 and small["assumption"] == COST_ASSUMPTION and "40%" in COST_ASSUMPTION
    sdtt = preset_cost("sdtt-paper")
    assert sdtt["tokens"] == 7 * 10_000 * 128 * 1024  # the paper: 70k steps x 128 x 1024
    assert sdtt["gpu_hours"] < small["gpu_hours"] / 10
    assert preset_cost("mdlm-owt-large")["params"] > preset_cost("mdlm-owt-medium")["params"] > small["params"]


def test_paper_presets_frame_like_mdlm():
    """Every preset that trains or distils on MDLM's data uses its [BOS] + 1022 + [EOS] chunks and the official
    DiT's residual-only dropout; no preset leaves them to the tinydiff defaults."""
    for name, p in PRESETS.items():
        assert (p["framing"], p["dropout_sites"]) == ("bos_eos", "residual"), name
    args = apply_preset(train_like_parser(), [])
    assert (args.framing, args.dropout_sites) == (None, None)  # no preset: the checkpoint's / tinydiff's defaults
