"""The command line the scripts share: the one file under tinydiff/ that knows argparse.

    parser = ArgumentParser(description=__doc__)        # argparse's own errors on one `error:` line
    add_train_args(parser, lr=3e-3, ...)                # train.py / distill.py: shared flags, the script's recipe
    args, given = parse(parser)                         # --preset NAME, then every flag checked (RULES)
    resume_args(args, ckpt, given, path)                # --resume: the run continues as it was started
    run_main(main)                                      # UserError -> `error: ...`, status 2

RULES is the one table of what each numeric flag may be: a flag has the same name and limits in every
script. --sampler and its knobs come from the registry of tinydiff/sampling.py (add_sampler_args).
"""
import argparse
import math
import sys

from .errors import UserError, die
from .model import DROPOUT_SITES
from .presets import PRESETS
from .sampling import COMMON, SAMPLERS, knobs_of, resolve

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
        lo, hi = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
        if self.hi is None:
            return f"must be {'greater than' if self.lo_open else 'at least'} {self.lo}"
        return f"must be {'less than' if self.hi_open else 'at most'} {self.hi}" if self.lo is None else \
            f"must be in {lo}{self.lo}, {self.hi}{hi}"


POSITIVE, NON_NEGATIVE = Rule(1), Rule(0)
RULES = {
    # model shape (train.py, distill.py --init scratch)
    "n_layer": POSITIVE, "n_head": POSITIVE, "n_embd": POSITIVE, "seq_len": POSITIVE,
    "dropout": Rule(0, 1, hi_open=True, note="probability of zeroing an activation"),
    # optimisation (train.py, distill.py)
    "max_iters": Rule(1, note="optimizer steps in total"), "batch_size": POSITIVE, "grad_accum": POSITIVE,
    "lr": Rule(0, lo_open=True, note="a run with lr 0 learns nothing"), "min_lr": NON_NEGATIVE,
    "warmup": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "grad_clip": Rule(0, note="0 = off"),
    "ema": Rule(0, 1, hi_open=True, note="0 = off; 0.999 averages over ~1000 steps"),
    "eval_interval": POSITIVE, "eval_tokens": POSITIVE, "eval_draws": POSITIVE, "ckpt_interval": POSITIVE,
    "ckpt_minutes": Rule(0, note="0 = off"), "log_interval": POSITIVE,
    # SDTT / TCS (distill.py)
    "rounds": POSITIVE, "iters_per_round": POSITIVE, "teacher_steps": POSITIVE, "n_teacher_steps": POSITIVE,
    "topk": Rule(0, note="0 = all"), "window": POSITIVE, "tcs_lambda": Rule(0, 1),
    "tcs_cache_mb": Rule(0, note="0 = no cache"), "teacher_elems": Rule(0, note="0 = auto"),
    # sampling (sample.py, eval.py, bench.py): a step count of 0 would be a silent default, not a request
    "steps": Rule(1, note="diffusion sampling steps"), "num_samples": POSITIVE,
    "gen_len": Rule(2, note="the judge scores tokens 2..L"),
    # evaluation (eval.py)
    "val_tokens": Rule(0, note="0 = skip val PPL"), "val_draws": POSITIVE, "limit": POSITIVE,
    "lambada_draws": POSITIVE, "lambada_batch": POSITIVE,
    # benchmarks (bench.py, experiments/bench_tcs.py)
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
    """Check every flag that RULES names, the model's shape, and the knobs of the sampler(s) asked for."""
    for name, value in vars(args).items():
        check(name, value)
    if getattr(args, "n_head", None) and getattr(args, "n_embd", None):
        check_shape(args.n_embd, args.n_head)
    if getattr(args, "min_lr", None) and getattr(args, "lr", None) and args.min_lr > args.lr:
        raise UserError(f"--min_lr {args.min_lr} is above --lr {args.lr}: the cosine schedule decays from lr to min_lr")
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

    def __init__(self, description=None, **kw):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        die(f"{message} (python {self.prog} --help lists the flags)")


def given_flags(parser, argv=None):
    """The dests of the flags written on the command line (not defaults, not a --preset's values): parse once
    more into a namespace that already holds a marker for every dest, which argparse leaves in place unless the
    flag is given. argparse's prefix matching (--max for --max_iters) is honoured: argparse does the parsing."""
    unset = object()
    dests = vars(parser.parse_known_args([])[0])
    given, _ = parser.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(given).items() if value is not unset}


def run_main(main):
    """Run a script's main(): a UserError (DataError included) becomes one `error:` line and status 2; Ctrl-C
    outside a training loop (which stops cleanly itself) one line and status 130. Files are only ever replaced
    atomically, so an interrupted script leaves what was already written intact."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped; files already written are intact", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)


# ----------------------------------------------------------------------------- training flags, presets, resume

# Flags a resumed run may change (the one list; --help prints it): the schedule, intervals, batch split,
# runtime, and the sampler of the end-of-run sample. Everything else -- data, tokenizer, architecture,
# framing, seed, EMA, weight decay (kept in the optimizer state), the eval windows and draws (the history
# must compare like with like), the distillation recipe -- comes from the checkpoint.
RESUMABLE = ("max_iters", "lr", "min_lr", "lr_schedule", "warmup", "grad_clip", "batch_size", "grad_accum",
             "eval_interval", "ckpt_interval", "ckpt_minutes", "log_interval", "device", "dtype", "compile",
             "tcs_cache_mb", "teacher_elems", "sampler", *dict.fromkeys([*COMMON, *(k for s in SAMPLERS.values()
                                                                                    for k in s.knobs)]))
NOT_COMPARED = ("resume", "overwrite", "out_dir")  # where and how the run is continued, not what it is


def data_source(value):
    """--data: a lab spec is written out in full (every parameter), so checkpoints record the lab exactly."""
    if value != "lab" and not value.startswith("lab:"):
        return value
    from .lab import canonical_source  # the exact lab (tinydiff/lab/), loaded only for it
    try:
        return canonical_source(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_train_args(p, *, seq_len, max_iters, batch_size, lr, warmup, ema, eval_interval, eval_tokens, ckpt_interval):
    """The flags of every training script (one vocabulary across train.py and distill.py). The keyword
    arguments are the script's recipe: each default is set once, by the script that owns it."""
    a = p.add_argument
    a("--data", default="stdlib", type=data_source,
      help="stdlib (offline default), shakespeare, a text file/folder, owt, tinystories, or lab / "
           "lab:W=256,delta=0.02,... (the exact synthetic language, docs/lab.md)")
    a("--tokenizer", default=None, help="bpe (default: learned from the training split, --vocab_size ids), bytes "
                                        "(257 ids) or gpt2 (tiktoken); --data lab has its own (labA)")
    a("--out_dir", default="out", help="where ckpt.pt is written")
    a("--max_iters", type=int, default=max_iters, help="optimizer steps in total (default %(default)s)")
    a("--batch_size", type=int, default=batch_size, help="sequences per micro-batch (per process under torchrun; "
                                                         "default %(default)s)")
    a("--grad_accum", type=int, default=1,
      help="micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)")
    a("--seq_len", type=int, default=seq_len, help="tokens per training window (default %(default)s; None: the model's)")
    a("--framing", default=None, choices=("none", "bos_eos"),
      help="training and held-out windows: none (plain token windows) or bos_eos ([BOS] + L-2 tokens + [EOS], BOS = "
           "EOS = end-of-text, as MDLM/SDTT trained); default: the loaded checkpoint's, else none")
    a("--dropout_sites", default=None, choices=DROPOUT_SITES,
      help="where dropout applies: all (embeddings, attention probabilities, residual branches) or residual (the "
           "official DiT's); default: the loaded checkpoint's, else all")
    a("--lr", type=float, default=lr, help="peak learning rate (AdamW; default %(default)s)")
    a("--min_lr", type=float, default=0.0, help="final learning rate of the cosine schedule")
    a("--lr_schedule", default="constant", choices=["constant", "cosine"],
      help="after warm-up: constant (MDLM/SDTT) or cosine decay to --min_lr")
    a("--warmup", type=int, default=warmup, help="linear warm-up steps (default %(default)s)")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay on matrices (MDLM: 0)")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    a("--ema", type=float, default=ema, help="EMA decay of the weights used for eval/sampling (0 = off; "
                                             "default %(default)s)")
    a("--eval_interval", type=int, default=eval_interval, help="evaluate every N steps (and at the end; default "
                                                               "%(default)s)")
    a("--eval_tokens", type=int, default=eval_tokens, help="held-out tokens for the periodic eval (default %(default)s)")
    a("--eval_draws", type=int, default=2, help="t draws per held-out window for the MDLM bound")
    a("--ckpt_interval", type=int, default=ckpt_interval,
      help="write OUT_DIR/ckpt.pt every N steps (and at the end; default %(default)s)")
    a("--ckpt_minutes", type=float, default=0,
      help="also write OUT_DIR/ckpt.pt every N minutes (0 = off); SIGTERM always writes one before exit")
    a("--log_interval", type=int, default=10, help="refresh the progress bar every N steps (one host sync)")
    a("--device", default="auto", help="auto|cpu|cuda|mps")
    a("--dtype", default="auto", help="auto|float32|bfloat16 (autocast dtype; auto = bf16 on CUDA)")
    a("--compile", default="auto", help="auto|true|false (auto = on for CUDA)")
    a("--seed", type=int, default=1337, help="seed for init, data order and noise")
    a("--resume", action="store_true",
      help="continue the run in OUT_DIR/ckpt.pt exactly where it stopped: its data, tokenizer, architecture and every "
           "other flag come from the checkpoint; a flag given that contradicts it is an error, except these, which "
           f"may change on resume: --{', --'.join(RESUMABLE)}")
    a("--overwrite", action="store_true", help="start a new run in an OUT_DIR that holds a checkpoint, replacing it "
                                               "(without this flag or --resume such a folder is refused)")
    a("--preset", default=None, help=f"a paper's recipe as the defaults (given flags still win): {', '.join(PRESETS)}")


def parse(parser, argv=None, method_defaults=None):
    """Parse argv (default sys.argv[1:]); returns (args, given: the flags written on the command line).
    A flag not given takes, in order: the --preset's value (tinydiff/presets.py; printed), then
    method_defaults(args)'s (distill.py: per --method), then the parser's default. They are set as the parser's
    defaults before the final parse, so --help shows them. Every flag is then checked (RULES)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    first = [a for a in argv if a not in ("-h", "--help")]  # read --preset / --method without printing the help
    known, _ = parser.parse_known_args(first)
    values = {}
    if getattr(known, "preset", None) is not None:
        if known.preset not in PRESETS:
            parser.error(f"unknown --preset {known.preset!r}: choose one of {', '.join(PRESETS)}")
        values = {k: v for k, v in PRESETS[known.preset].items() if k != "script"}
        missing = sorted(k for k in values if not hasattr(known, k))
        if missing:
            parser.error(f"--preset {known.preset} is for {PRESETS[known.preset]['script']} "
                         f"(this script has no --{', --'.join(missing)})")
        parser.set_defaults(**values)
        print(f"preset {known.preset}: " + " ".join(f"--{k} {v}" for k, v in values.items()), flush=True)
    if method_defaults is not None:
        follow = method_defaults(parser.parse_known_args(first)[0])
        parser.set_defaults(**{k: v for k, v in follow.items() if k not in values})
    args = parser.parse_args(argv)
    try:
        validate(args)
    except UserError as e:
        die(str(e))
    return args, given_flags(parser, argv)


def resume_args(args, ckpt, given, path):
    """Continue the run a checkpoint holds: every flag not given takes the checkpoint's value; a given flag
    must equal it unless it is RESUMABLE. given: the flags written on the command line (parse). Also refuses
    a --max_iters below the checkpoint's iteration."""
    for name, value in (ckpt.get("args") or {}).items():
        if name in NOT_COMPARED or not hasattr(args, name):
            continue
        if name not in given:
            setattr(args, name, value)
        elif name not in RESUMABLE and getattr(args, name) != value:
            raise UserError(f"--{name} {getattr(args, name)} contradicts {path}, which holds --{name} {value}: a "
                            f"resumed run keeps its data, tokenizer, architecture and recipe; drop the flag, or start "
                            f"a new run in another --out_dir (--resume may change: --{', --'.join(RESUMABLE)})")
    if args.max_iters < ckpt["iter"]:
        raise UserError(f"--max_iters {args.max_iters} is below the iteration of {path} ({ckpt['iter']}): "
                        f"give --max_iters {ckpt['iter']} or more")


# ----------------------------------------------------------------------------- sampler flags

def add_sampler_args(parser, choose=True):
    """--sampler NAME (when choose) and every registered knob as a flag (one namespace: a knob name means the
    same thing for every sampler that takes it; tinydiff/sampling.py)."""
    if choose:
        parser.add_argument("--sampler", default="ancestral", choices=list(SAMPLERS),
                            help="diffusion sampler (docs/samplers.md): " + ", ".join(SAMPLERS))
    seen = dict(COMMON)
    for s in SAMPLERS.values():
        seen.update(s.knobs)
    for k, knob in seen.items():
        parser.add_argument(f"--{k}", type=knob.type, default=knob.default, choices=knob.choices,
                            help=f"{knob.help} (default {knob.default})")


def knobs_from_args(name, args):
    """The resolved knobs of sampler `name` from parsed flags (add_sampler_args)."""
    return resolve(name, {k: getattr(args, k) for k in knobs_of(name, getattr(args, "inner", None))})
