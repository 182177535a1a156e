"""Distil a diffusion LM: SDTT rounds from an MDLM teacher, or TCS from an AR teacher.

--method sdtt (Self-Distillation Through Time, Deschenaux & Gulcehre 2025; docs/sdtt.md): the student
starts as a copy of the MDLM teacher: its raw weights by default, its EMA weights with --teacher_ema
(use that when the teacher you evaluate is its EMA, as sample.py/eval.py do: then round 1 distils
exactly the model of the teacher's rows). Round r trains the student to do in one step what the
teacher does in two (teacher step Δ = 1/K_r); at the end of the round the raw (non-EMA) student
becomes the teacher and K halves, while the optimizer and EMA carry on. After R rounds the student
samples with K0 / 2^R steps. Writes OUT_DIR/round{r}.pt after each round (for sampling: sample_steps
= K0 / 2^r, no optimizer) and OUT_DIR/ckpt.pt (the full state with the current teacher: --resume
continues mid-round exactly). Sample/evaluate with the EMA weights (sample.py / eval.py default).

CPU (teacher = train.py's default MDLM, 4L/128d, bytes, seq_len 256; 4 rounds, 256 -> 16 steps;
the README's run):
    python distill.py --method sdtt --teacher out/ckpt.pt --teacher_ema --out_dir out-sdtt \
        --rounds 4 --iters_per_round 300 --batch_size 8 --lr 3e-4 --warmup 20 --ema 0.99
    python sample.py --ckpt out-sdtt/round4.pt          # 16 steps, as the checkpoint records
GPU, the paper's recipe (MDLM small teacher, L = 1024: 7 rounds 1024 -> 8 steps, 10k steps a round):
    python distill.py --method sdtt --teacher out-owt/ckpt.pt --teacher_ema --out_dir out-sdtt \
        --rounds 7 --iters_per_round 10000 --teacher_steps 1024 --batch_size 128 --lr 6e-5 \
        --warmup 500 --ema 0.9999 --eval_interval 10000 --ckpt_interval 1000
(the official repository's defaults differ: lr 3e-4, 2500 warm-up; we follow the paper).

--method tcs (Target Concrete Score distillation from an AR teacher; docs/tcs.md) lives in
tinydiff/tcs.py; its flags are listed by --help. With --tcs_windows N the student trains on N fixed
windows whose targets are computed once to disk (--precompute_only computes them without training).
On the exact lab (docs/lab.md), --teacher lab-oracle makes the lab's exact denoiser the teacher of every
round (the student starts from --init, an MDLM trained on the lab): SDTT against a perfect teacher.
    python distill.py --method sdtt --teacher lab-oracle --init runs/lab/mdlm/ckpt.pt --teacher_ema ...
and with --method tcs the TCS targets are the lab's exact full conditionals p(x_i = v | x_!=i) (all |V| ids); the
student is fresh (--data lab[:spec] required; --n_layer/--n_head/--n_embd, default 4/4/128) or --init an MDLM of it:
    python distill.py --method tcs --teacher lab-oracle --data lab --seq_len 128 --tcs_lambda 1 ...

The two methods are two functions below, sdtt() and tcs(), each read top to bottom; --help shows the
defaults of the method asked for (python distill.py --method tcs --help).
"""
import argparse
import copy

import torch
from tqdm import tqdm

from tinydiff.checks import ArgumentParser, check_shape, given_flags, run_main, validate
from tinydiff.common import UserError, emit, load_checkpoint, make_generator, model_from_checkpoint, setup_runtime
from tinydiff.data import (checkpoint_data, default_tokenizer, framed_batches, get_batch, get_tokenizer, load_meta,
                           load_tokenizer, prepare_for, tokenizer_from_spec)
from tinydiff.diffusion import get_schedule, schedule_spec
from tinydiff.evaluate import heldout_windows, val_metrics
from tinydiff.lab import OracleDenoiser, parse_spec
from tinydiff.lab import lab_of
from tinydiff.loop import add_run_args, resume_args, train
from tinydiff.model import ModelConfig, Transformer
from tinydiff.outdir import check_space, checkpoint_bytes, claim
from tinydiff.presets import apply_preset
from tinydiff.sampling import add_sampler_args, describe, knobs_from_args, sample
from tinydiff.sdtt import DIVERGENCES, sdtt_loss
from tinydiff.tcs import add_tcs_args, build_tcs

ORACLE = "lab-oracle"  # --teacher: the exact denoiser of the lab the student was trained on
parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--method", default="sdtt", choices=["sdtt", "tcs"],
                    help="sdtt (MDLM teacher) or tcs (AR teacher); the defaults below are this method's")
parser.add_argument("--teacher", default=None,
                    help="teacher checkpoint: an MDLM (sdtt) or an AR model (tcs) from train.py; on the lab "
                         f"(docs/lab.md): {ORACLE} = the lab's exact denoiser (sdtt, student from --init) or its exact "
                         f"full conditionals (tcs, with --data lab or --init)")
# SDTT
parser.add_argument("--teacher_ema", action="store_true",
                    help="sdtt: start the student (and first teacher) from the teacher's EMA weights, "
                         "not its raw ones (use it when the teacher you evaluate is its EMA)")
parser.add_argument("--rounds", type=int, default=4,
                    help="sdtt: distillation rounds R (teacher steps halve each round)")
parser.add_argument("--iters_per_round", type=int, default=150, help="sdtt: optimizer steps per round (paper: 10k)")
parser.add_argument("--teacher_steps", type=int, default=None,
                    help="sdtt: teacher sampling steps K0 in round 1 (default: the model's seq_len; paper 1024)")
parser.add_argument("--n_teacher_steps", type=int, default=2,
                    help="sdtt: teacher steps per target (paper: 2; 4 and 8 did worse)")
parser.add_argument("--loss", default="kl_bwd", choices=DIVERGENCES,
                    help="sdtt divergence: kl_bwd = KL(student||teacher) (paper default), kl_fwd, "
                         "mse (log-probs, mean over the vocabulary: paper eq. 11), tvd (0.5 sum |p - q|)")
add_tcs_args(parser)
add_run_args(parser)
add_sampler_args(parser)  # the end-of-run sample: --sampler and its knobs
parser.set_defaults(data=None)  # the teacher's data (and tokenizer) unless given


def method_defaults(a):
    """The defaults of --method a.method, set before the final parse so that --help shows them.
    SDTT: CPU-sized (the paper's recipe: --preset sdtt-paper, lr 6e-5, batch 128, 500 warm-up, EMA 0.9999);
    its run length and intervals follow its rounds: rounds x iters_per_round steps (a smaller --max_iters
    stops early, --resume continues), an eval and a ckpt.pt per round. TCS: tinydiff/loop.py's shared ones."""
    if a.method == "tcs":
        return dict(lr=1e-3, warmup=100, ema=0.999, batch_size=32, eval_tokens=32768, max_iters=2000,
                    eval_interval=250, ckpt_interval=500)
    N = a.iters_per_round
    return dict(lr=3e-4, warmup=20, ema=0.99, batch_size=8, eval_tokens=16384, max_iters=a.rounds * N,
                eval_interval=N, ckpt_interval=N)


args = apply_preset(parser, follow=method_defaults)  # --preset sdtt-paper: the paper's recipe; given flags win


def main():
    # flags checked, out_dir claimed, a resumed run's own flags restored: before any work starts
    validate(args)
    claim(args.out_dir, args.resume, args.overwrite)
    resume = None
    if args.resume:
        resume = load_checkpoint(f"{args.out_dir}/ckpt.pt", script="distill.py")
        resume_args(args, resume, given_flags(parser), f"{args.out_dir}/ckpt.pt")  # method, teacher, data, recipe
    if args.teacher is None:
        raise UserError(f"--method {args.method} needs --teacher CKPT (an "
                        f"{'MDLM' if args.method == 'sdtt' else 'AR model'} trained with train.py)")
    knobs = knobs_from_args(args.sampler, args)  # the end-of-run sample's, checked before any work
    device, dtype, use_compile, autocast = setup_runtime(args)
    torch.manual_seed(args.seed)

    # teacher checkpoint -> tokenizer and data (its own by default; --data overrides). The oracle teacher has
    # none: the student's checkpoint (--init) gives them, and the teacher is the exact denoiser of its lab
    if oracle() and args.method == "tcs" and args.init == "scratch":
        # TCS from scratch on the lab's exact targets: no checkpoint at all; the lab (--data) gives the tokenizer
        # and the data, --n_layer/--n_head/--n_embd the student (train.py's defaults, 4/4/128)
        if parse_spec(args.data or "") is None:
            raise UserError(f"--method tcs --teacher {ORACLE} from scratch needs --data lab (or lab:W=...,...): "
                            f"the lab whose exact full conditionals are the targets (or --init an MDLM trained on it)")
        tckpt = {"config": ModelConfig(n_embd=128, seq_len=args.seq_len or 128).to_dict(),
                 "args": {"data": args.data}, "tokenizer": get_tokenizer(default_tokenizer(args.data)).spec()}
    elif oracle():
        if args.init == "scratch":
            raise UserError(f"--teacher {ORACLE} needs --init CKPT: the MDLM trained on the lab that the student "
                            f"starts from")
        tckpt = load_checkpoint(args.init, kind="mdlm", what=f"--init {args.init} of --teacher {ORACLE}")
    else:
        tckpt = load_checkpoint(args.teacher, kind="mdlm" if args.method == "sdtt" else "ar",
                                what=f"--teacher {args.teacher} of --method {args.method}")
    tok = tokenizer_from_spec(tckpt["tokenizer"])  # the teacher's own (bpe: its merges)
    if args.tokenizer not in (None, tok.name):
        raise UserError(f"--tokenizer {args.tokenizer} differs from the teacher's ({tok.name}): the student shares "
                        f"the teacher's tokenizer; drop --tokenizer")
    args.tokenizer = tok.name
    if resume is not None:  # the folder this run was trained on (keyed by content), even if the source changed
        data_dir = checkpoint_data(resume)
    elif args.data is not None:
        data_dir = prepare_for(args.data, tok)  # bpe: only the data its merges were learned from
    else:  # the teacher's prepared data, as it was trained on (prepared again here when it is elsewhere)
        data_dir = checkpoint_data(tckpt, what=f"the teacher {args.teacher}")
    if load_tokenizer(data_dir).key != tok.key:
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the teacher's ({tok.key})")
    args.data = args.data or tckpt["args"]["data"]
    # window framing: the flag, else the teacher's (a published MDLM: bos_eos, the chunks it trained on), else none
    args.framing = args.framing or tckpt.get("framing", "none")

    distil = sdtt if args.method == "sdtt" else tcs
    student, schedule, summary = distil(tckpt, tok, data_dir, resume, device, autocast, use_compile)

    # one sample from the final weights at the step count the checkpoint records
    final = load_checkpoint(f"{args.out_dir}/ckpt.pt")
    gen = make_generator(args.seed, device)
    x, nfe = sample(args.sampler, model_from_checkpoint(final, device), (1, args.seq_len), final["sample_steps"],
                    final["mask_id"], gen, student.cfg.seq_len, device, schedule, **knobs)
    print("-" * 16 + f" sample: {describe(args.sampler, knobs)}, {final['sample_steps']} steps, NFE {nfe} " + "-" * 16)
    print(tok.decode(x[0].tolist()))
    print("-" * 68)
    emit({"method": args.method, "sample_steps": final["sample_steps"], "params": student.num_params(),
          **({"rounds": args.rounds, "teacher_steps": args.teacher_steps, "loss": args.loss} if args.method == "sdtt"
             else {}), **summary, "sampler": args.sampler, "sampler_knobs": knobs})


def sdtt(tckpt, tok, data_dir, resume, device, autocast, use_compile):
    """--method sdtt (docs/sdtt.md): the student starts as the MDLM teacher; round r (iters_per_round steps)
    trains it to do in one step what the teacher does in two of size 1/K_r (tinydiff/sdtt.py); at the end
    of the round the raw student becomes the teacher and K halves. Returns (student, schedule, summary)."""
    if args.dropout_sites:  # else the teacher's (a converted DiT: the official residual-only sites)
        tckpt["config"] = dict(tckpt["config"], dropout_sites=args.dropout_sites)
    student = model_from_checkpoint(tckpt, device, use_ema=args.teacher_ema).train()
    cfg, mask_id = student.cfg, tckpt["mask_id"]
    schedule = get_schedule(tckpt.get("schedule"))  # the teacher's alpha_t: its steps, the student's loss
    args.seq_len = args.seq_len or cfg.seq_len
    K0, N, R = args.teacher_steps or args.seq_len, args.iters_per_round, args.rounds
    args.teacher_steps = K0
    if K0 < 2 ** R or K0 % 2 ** R != 0:
        raise UserError(f"--teacher_steps {K0} must be divisible by 2^rounds = {2 ** R} (each round halves it, "
                        f"the last student samples with K0 / 2^R >= 1 steps)")
    if args.max_iters > R * N:  # a smaller one stops early (continue with --resume --max_iters R*N)
        raise UserError(f"--max_iters {args.max_iters} is beyond rounds x iters_per_round = {R * N}")
    check_student(student, data_dir)
    check_space(args.out_dir, checkpoint_bytes(student, 5 + 2 * R))  # ckpt.pt (+ the teacher), the round files

    # the teacher: frozen, eval mode (no dropout), its weights replaced at each round boundary. The oracle is
    # exact at every K, so it stays the teacher in every round (round r: its two steps of size 1/K_r)
    if oracle():
        lab = lab_of(data_dir)
        if lab is None:
            raise UserError(f"--teacher {ORACLE} needs a student trained on the lab (--data lab); {data_dir} is not")
        teacher = OracleDenoiser(lab)
    else:
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
    it0 = 0
    if resume is not None:  # (resume_args: the same rounds, iters_per_round and teacher_steps)
        teacher.load_state_dict(resume["extra"]["teacher"])
        it0 = resume["iter"]
    teacher_steps = K0 // 2 ** (it0 // N)  # K of the round in progress
    teacher_fwd = torch.compile(teacher) if use_compile and not oracle() else teacher
    print(f"SDTT: {R} rounds x {N} steps, teacher steps {K0} -> student {K0 // 2 ** R}, "
          f"{args.n_teacher_steps} teacher steps per target, loss {args.loss}, "
          f"student from the {'--init' if oracle() else 'teacher'}'s {'EMA' if args.teacher_ema else 'raw'} weights"
          + ("; teacher: the lab's EXACT denoiser in every round" if oracle() else ""))

    def loss_fn(fwd, x, noise):  # noise: the step's draws (loop.Noise; rank, world: DDP)
        loss, _, _ = sdtt_loss(fwd, teacher_fwd, x, teacher_steps, args.n_teacher_steps, mask_id, schedule,
                               noise.gen, args.loss, rank=noise.rank, world=noise.world, teacher_generator=noise.own)
        return loss, {}

    # before round 1 ends the student is still the teacher: it samples with K0 steps
    meta = student_meta(tok, data_dir, cfg, schedule, sample_steps=K0 // 2 ** (it0 // N))

    def on_step(it, save):
        """After every step. At the end of round r: write round{r}.pt, then teacher <- the raw student, K halves."""
        nonlocal teacher_steps
        if it % N == 0:
            r = it // N
            meta["sample_steps"] = K0 // 2 ** r  # the student now does in K_r/2 steps what the teacher did in K_r
            save(f"{args.out_dir}/round{r}.pt", round=r, optimizer=None,
                 extra={"round": r, "teacher_steps": teacher_steps})
            tqdm.write(f"round {r}/{R} done: student samples with {meta['sample_steps']} steps -> "
                       f"{args.out_dir}/round{r}.pt")
            if r < R:
                if not oracle():
                    teacher.load_state_dict(student.state_dict())  # the raw (non-EMA) student, as in the paper
                teacher_steps //= 2
        # in every ckpt.pt: what a mid-round resume needs (the round is it // N)
        meta["extra"] = {"round": it // N, "teacher_steps": teacher_steps, "teacher": teacher.state_dict()}

    windows = framed_batches(tok.eot_id) if args.framing == "bos_eos" else get_batch  # (tinydiff/data.py)
    if args.framing == "bos_eos":
        print(f"windows framed as [BOS] + {args.seq_len - 2} tokens + [EOS] (BOS = EOS = end-of-text id {tok.eot_id})")

    def batches(n, gen, device):  # (n, seq_len) training windows, as the teacher was trained on
        return windows(data_dir, "train", n, args.seq_len, gen, device)

    summary = train(student, loss_fn, heldout_bound(data_dir, schedule, mask_id, autocast, device), batches,
                    args.seq_len, args, device=device, autocast=autocast, use_compile=use_compile, meta=meta,
                    resume=resume, on_step=on_step)
    return student, schedule, summary


def tcs(tckpt, tok, data_dir, resume, device, autocast, use_compile):
    """--method tcs (docs/tcs.md): a diffusion student (fresh, or --init MDLM) learns the AR teacher's
    full-context conditionals as soft targets on fixed chunks of the data (tinydiff/tcs.py).
    Returns (student, schedule, summary)."""
    args.seq_len = args.seq_len or tckpt["config"]["seq_len"]
    if args.init == "scratch":  # a fresh MDLM, the teacher's shape unless --n_layer/--n_head/--n_embd say otherwise
        c = dict(tckpt["config"], causal=False, vocab_size=tok.vocab_size + 1, seq_len=args.seq_len)
        for k in ("n_layer", "n_head", "n_embd"):
            c[k] = getattr(args, k) or c[k]
        check_shape(c["n_embd"], c["n_head"])
        student = Transformer(ModelConfig(**c)).to(device)
        schedule = get_schedule()  # log-linear
    else:
        ickpt = load_checkpoint(args.init, kind="mdlm", tokenizer=tok.key, what=f"--init {args.init}")
        student = model_from_checkpoint(ickpt, device, use_ema=True).train()
        schedule = get_schedule(ickpt.get("schedule"))  # the MDLM's own
    cfg, mask_id = student.cfg, tok.vocab_size
    check_student(student, data_dir)
    if args.framing == "bos_eos":
        raise UserError("--framing bos_eos is for SDTT from a model trained on framed windows; TCS uses "
                        "plain windows (drop --framing)")
    check_space(args.out_dir, checkpoint_bytes(student, 4))  # weights, EMA, AdamW's two moments

    lab = None
    if oracle():  # the targets: the lab's exact full conditionals p(x_i = v | x_!=i) (docs/lab.md §d)
        lab = lab_of(data_dir)
        if lab is None:
            raise UserError(f"--teacher {ORACLE} needs a student trained on the lab (--data lab); {data_dir} is not")
        print(f"TCS teacher: the lab's EXACT full conditionals ({lab.params.spec()}), all {lab.V} ids stored")
    # the teacher, the loss on its cached targets, and chunk-aligned batches (a window's targets are reused)
    loss_fn, batches, tcs_step, tcs_meta = build_tcs(args, student, device, data_dir, args.seq_len, schedule,
                                                     tok.spec(), lab=lab)
    meta = student_meta(tok, data_dir, cfg, schedule, sample_steps=args.seq_len, **tcs_meta)
    if args.precompute_only:  # the --tcs_windows targets are on disk now: no training
        emit({"method": "tcs", "precompute_only": True, **tcs_meta["tcs"], "tcs_cache": tcs_step(0, None)})
        raise SystemExit(0)

    def on_step(it, save):  # every checkpoint records the target cache's counters (None: no cache)
        meta["extra"] = {"tcs_cache": tcs_step(it, save)}

    summary = train(student, loss_fn, heldout_bound(data_dir, schedule, mask_id, autocast, device), batches,
                    args.seq_len, args, device=device, autocast=autocast, use_compile=use_compile, meta=meta,
                    resume=resume, on_step=on_step)
    return student, schedule, summary


def oracle():
    """--teacher lab-oracle (tinydiff/lab/language.py): SDTT's teacher is the lab's exact denoiser; TCS's targets are the
    lab's exact full conditionals."""
    return args.teacher == ORACLE


def check_student(student, data_dir):
    """The training windows must fit the student's context; print what is trained."""
    cfg = student.cfg
    if args.seq_len > cfg.seq_len:
        raise UserError(f"--seq_len {args.seq_len} is beyond the model's context {cfg.seq_len}: "
                        f"use {cfg.seq_len} or less")
    print(f"student: {student.num_params() / 1e6:.2f}M parameters, {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}H, "
          f"data {data_dir}, seq_len {args.seq_len}")


def student_meta(tok, data_dir, cfg, schedule, **more):
    """What makes a distilled checkpoint self-describing (train.py's fields, plus the method and teacher);
    the loop writes it into every checkpoint as it is at that save."""
    return {"kind": "mdlm", "method": args.method, "teacher_ckpt": args.teacher, "config": cfg.to_dict(),
            "args": vars(args), "tokenizer": tok.spec(),
            "data_dir": str(data_dir.resolve()), "data_key": load_meta(data_dir)["key"], "mask_id": tok.vocab_size,
            "framing": args.framing, "schedule": schedule_spec(schedule), **more}


def heldout_bound(data_dir, schedule, mask_id, autocast, device):
    """The periodic eval: the student's data-only NELBO bound on the held-out windows train.py uses (an SDTT
    student drifts from it: expected)."""
    val_x = heldout_windows(data_dir, "mdlm", args.seq_len, args.eval_tokens, args.framing)[0].to(device)  # (N, L)

    def evaluate(m):
        return val_metrics(m, "mdlm", val_x, mask_id, args.eval_draws, 0, args.batch_size, autocast, schedule)
    return evaluate


if __name__ == "__main__":
    run_main(main)
