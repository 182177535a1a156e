"""Command-line checks shared by every script: each numeric flag is validated before any work starts,
and every problem is one `error:` line (exit status 2), never a traceback.

    parser = ArgumentParser(...)   # argparse's own errors (unknown flag, 'abc' for an int) on one line
    args = parser.parse_args()
    validate(args)                 # every flag named in RULES, whatever script defines it

RULES is the one table of what each numeric flag may be: a flag has the same name and the same
limits in train.py, distill.py, sample.py, eval.py, bench.py and bench_tcs.py. Flags left at None
("default: the checkpoint's") are not checked; list flags (--steps 8,32) are checked element by element.
run_main() is the scripts' entry point: UserError -> one `error:` line and status 2; Ctrl-C outside the
training loop (which stops cleanly itself, tinydiff/loop.py) -> one line and status 130.
"""
import argparse
import math
import sys

from .common import UserError, die

INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as a shell reports it


class Rule:
    """lo <= value <= hi (an open end excludes it); `note` says what the flag means when that helps."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False, note=""):
        self.lo, self.hi, self.lo_open, self.hi_open, self.note = lo, hi, lo_open, hi_open, note

    def ok(self, v):
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def says(self):
        if self.hi is None:
            return f"must be {'greater than' if self.lo_open else 'at least'} {self.lo}"
        if self.lo is None:
            return f"must be {'less than' if self.hi_open else 'at most'} {self.hi}"
        return f"must be in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE, FRACTION = Rule(1), Rule(0), Rule(0, 1, hi_open=True)

RULES = {
    # model shape (train.py, distill.py --init scratch)
    "n_layer": POSITIVE, "n_head": POSITIVE, "n_embd": POSITIVE, "seq_len": POSITIVE,
    "dropout": Rule(0, 1, hi_open=True, note="probability of zeroing an activation"),
    # optimisation (tinydiff/loop.py: train.py, distill.py)
    "max_iters": Rule(1, note="optimizer steps in total"), "batch_size": POSITIVE, "grad_accum": POSITIVE,
    "lr": Rule(0, lo_open=True, note="a run with lr 0 learns nothing"), "min_lr": NON_NEGATIVE,
    "warmup": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "grad_clip": Rule(0, note="0 = off"),
    "ema": Rule(0, 1, hi_open=True, note="0 = off; 0.999 averages over ~1000 steps"),
    "eval_interval": POSITIVE, "eval_tokens": POSITIVE, "eval_draws": POSITIVE, "ckpt_interval": POSITIVE,
    "ckpt_minutes": Rule(0, note="0 = off"), "log_interval": POSITIVE,
    # SDTT / TCS (distill.py)
    "rounds": POSITIVE, "iters_per_round": POSITIVE, "teacher_steps": POSITIVE, "n_teacher_steps": POSITIVE,
    "topk": Rule(0, note="0 = all"), "window": POSITIVE, "tcs_lambda": Rule(0, 1), "tcs_cache_mb": Rule(0, note="0 = no cache"),
    "teacher_elems": Rule(0, note="0 = auto"),
    # sampling (sample.py, eval.py, bench.py): a step count of 0 would be a silent default, not a request.
    # The samplers' knobs (--temperature, --top_k, --top_p, --tau, ...) are checked by tinydiff/sampling.py
    "steps": Rule(1, note="diffusion sampling steps"), "num_samples": POSITIVE,
    "gen_len": Rule(2, note="the judge scores tokens 2..L"),
    # evaluation (eval.py)
    "val_tokens": Rule(0, note="0 = skip val PPL"), "val_draws": POSITIVE, "limit": POSITIVE,
    "lambada_draws": POSITIVE, "lambada_batch": POSITIVE,
    # benchmarks (bench.py, bench_tcs.py)
    "batch_sizes": POSITIVE, "runs": POSITIVE, "nocache_batches": POSITIVE, "train_batch": POSITIVE,
    "train_iters": POSITIVE, "matmul_size": POSITIVE, "sample_batch": POSITIVE, "quality_steps": POSITIVE,
    "threads": Rule(0, note="0 = torch's default"), "n_seq": POSITIVE, "ks": POSITIVE, "prefix_k": POSITIVE,
}


def check(name, value):
    """Raise UserError when --name's value (a number, or a list of numbers) breaks its rule."""
    rule = RULES.get(name)
    if rule is None or value is None or isinstance(value, (bool, str)):
        return
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if not rule.ok(v):
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise UserError(f"--{name} {shown}: {rule.says()}" + (f" ({rule.note})" if rule.note else ""))


def validate(args):
    """Check every flag of a parsed namespace that RULES names, the shape rules of the model, and the knobs
    of the sampler(s) asked for (tinydiff/sampling.py)."""
    for name, value in vars(args).items():
        check(name, value)
    if getattr(args, "n_head", None) and getattr(args, "n_embd", None):
        check_shape(args.n_embd, args.n_head)
    if getattr(args, "min_lr", None) and getattr(args, "lr", None) and args.min_lr > args.lr:
        raise UserError(f"--min_lr {args.min_lr} is above --lr {args.lr}: the cosine schedule decays from lr to min_lr")
    from .sampling import knobs_from_args  # the samplers' knobs have their rules there
    for name in [args.sampler] if hasattr(args, "sampler") else getattr(args, "samplers", None) or []:
        knobs_from_args(name, args)


def check_shape(n_embd, n_head):
    """Each head gets n_embd / n_head dimensions, rotated in pairs by the rotary embeddings."""
    if n_embd % n_head:
        raise UserError(f"--n_embd {n_embd} is not divisible by --n_head {n_head}: every head gets n_embd / n_head "
                        f"dimensions; choose an n_head that divides {n_embd}")
    if (n_embd // n_head) % 2:
        raise UserError(f"--n_embd {n_embd} / --n_head {n_head} = head dim {n_embd // n_head}, which is odd: rotary "
                        f"position embeddings rotate pairs of dimensions, so the head dim must be even")


def int_list(text):
    """argparse type for comma-separated integers ('8,32,128' -> [8, 32, 128])."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 8,32,128") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one `error:` line (status 2) like every other bad input."""

    def error(self, message):
        die(f"{message} (python {self.prog} --help lists the flags)")


def given_flags(parser, argv=None):
    """The dests of the flags written on the command line (not defaults, not a --preset's values): parse
    once more into a namespace that already holds a marker for every dest, which argparse leaves in place
    unless the flag is given (it only fills in defaults that are missing). argparse's prefix matching
    (--max for --max_iters) is honoured because argparse itself does the parsing."""
    unset = object()
    dests = vars(parser.parse_known_args([])[0])  # every dest the parser knows
    given, _ = parser.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(given).items() if value is not unset}


def run_main(main):
    """Run a script's main(): a UserError (DataError included) becomes one `error:` line and status 2;
    Ctrl-C (KeyboardInterrupt) one line and status 130. Files are only ever replaced atomically, so an
    interrupted script leaves what was already written intact."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped; files already written are intact", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)
