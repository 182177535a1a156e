"""Distil a diffusion LM: SDTT rounds from an MDLM teacher, or TCS from an AR teacher.

--method sdtt (Self-Distillation Through Time, Deschenaux & Gulcehre 2025; design.md §6): the student
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

--method tcs (Target Concrete Score distillation from an AR teacher; design.md §7) lives in
tinydiff/tcs.py; its flags are listed by --help.
"""
import argparse
import copy
import os

import torch
from tqdm import tqdm

from tinydiff.common import UserError, die, emit, load_checkpoint, make_generator, model_from_checkpoint, setup_runtime
from tinydiff.data import DataError, load_tokenizer, prepare_for, tokenizer_from_spec, tokenizer_key
from tinydiff.diffusion import LogLinearSchedule
from tinydiff.evaluate import heldout_windows, val_metrics
from tinydiff.loop import add_run_args, train
from tinydiff.model import ModelConfig, Transformer
from tinydiff.presets import apply_preset
from tinydiff.sampler import diffusion_sample
from tinydiff.sdtt import DIVERGENCES, sdtt_loss
from tinydiff.tcs import add_tcs_args, build_tcs

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--method", default="sdtt", choices=["sdtt", "tcs"], help="sdtt (MDLM teacher) or tcs (AR teacher)")
parser.add_argument("--teacher", default=None,
                    help="teacher checkpoint: an MDLM (sdtt) or an AR model (tcs) from train.py")
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
                    help="sdtt divergence: kl_bwd = KL(student||teacher) (paper default), kl_fwd, mse (log-probs), "
                         "tvd (0.5 sum |p - q|)")
add_tcs_args(parser)
add_run_args(parser)
# flags left unset get defaults that depend on --method (fill below); data/tokenizer: the teacher's
parser.set_defaults(data=None, tokenizer=None, max_iters=None, lr=None, warmup=None, ema=None, batch_size=None,
                    eval_interval=None, ckpt_interval=None, eval_tokens=None)
args = apply_preset(parser)  # --preset sdtt-paper sets the paper's recipe; explicit flags still win


def fill(**defaults):
    """Give each flag the user left unset its default for this method."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def main():
    if args.teacher is None:
        raise UserError(f"--method {args.method} needs --teacher CKPT (an "
                        f"{'MDLM' if args.method == 'sdtt' else 'AR model'} trained with train.py)")
    device, dtype, use_compile, autocast = setup_runtime(args)
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)

    # teacher checkpoint -> tokenizer and data (its own by default; --data overrides)
    tckpt = load_checkpoint(args.teacher)
    want, name = ("mdlm", "an MDLM") if args.method == "sdtt" else ("ar", "an AR")
    if tckpt["kind"] != want:
        raise UserError(f"--teacher {args.teacher} is a {tckpt['kind']} checkpoint; --method {args.method} needs "
                        f"{name} teacher (train.py --model {want})")
    tok = tokenizer_from_spec(tckpt["tokenizer"])  # the teacher's own (bpe: its merges)
    if args.tokenizer not in (None, tok.name):
        raise UserError(f"--tokenizer {args.tokenizer} differs from the teacher's ({tok.name}): the student shares "
                        f"the teacher's tokenizer; drop --tokenizer")
    args.tokenizer = tok.name
    if args.data is not None:
        data_dir = prepare_for(args.data, tok)
    elif os.path.isfile(os.path.join(tckpt.get("data_dir") or "", "meta.json")):
        data_dir = tckpt["data_dir"]  # the teacher's prepared data, as it was trained on
    else:  # prepared elsewhere (another working directory): prepare the same source here
        data_dir = prepare_for(tckpt["args"]["data"], tok)
    if load_tokenizer(data_dir).key != tok.key:
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the teacher's ({tok.key})")
    args.data = args.data or tckpt["args"]["data"]

    resume = load_checkpoint(f"{args.out_dir}/ckpt.pt") if args.resume else None
    if resume is not None and resume.get("method") != args.method:
        raise UserError(f"{args.out_dir}/ckpt.pt was not written by distill.py --method {args.method}: "
                        f"use another --out_dir or the same --method")
    schedule = LogLinearSchedule()
    meta = {"kind": "mdlm", "method": args.method, "teacher_ckpt": args.teacher,
            "tokenizer": tok.spec(),
            "data_dir": str(data_dir), "mask_id": tok.vocab_size}
    hooks = []

    if args.method == "sdtt":
        # ------------------------------------------------------------------ SDTT: student = copy of the teacher
        student = model_from_checkpoint(tckpt, device, use_ema=args.teacher_ema).train()
        cfg, mask_id = student.cfg, tckpt["mask_id"]
        args.seq_len = args.seq_len or cfg.seq_len
        K0, N, R = args.teacher_steps or args.seq_len, args.iters_per_round, args.rounds
        args.teacher_steps = K0
        if min(R, N, args.n_teacher_steps) < 1 or K0 < 2 ** R or K0 % 2 ** R != 0:
            raise UserError(f"--teacher_steps {K0} must be divisible by 2^rounds = {2 ** R} (each round halves it, "
                            f"the last student samples with K0 / 2^R >= 1 steps); --rounds, --iters_per_round and "
                            f"--n_teacher_steps must be >= 1")
        # CPU-sized defaults; the paper: lr 6e-5, batch 128, 500 warm-up, EMA 0.9999 (10k steps a round)
        fill(lr=3e-4, warmup=20, ema=0.99, batch_size=8, eval_tokens=16384,
             max_iters=R * N, eval_interval=N, ckpt_interval=N)  # a smaller --max_iters stops early (--resume later)
        if args.max_iters > R * N:
            raise UserError(f"--max_iters {args.max_iters} is beyond rounds x iters_per_round = {R * N}")
        # the teacher: frozen, eval mode (no dropout), weights replaced at each round boundary
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        it0 = 0
        if resume is not None:
            old = resume["args"]
            if (old["iters_per_round"], old["teacher_steps"]) != (N, K0):
                raise UserError(f"{args.out_dir}/ckpt.pt ran with --iters_per_round {old['iters_per_round']} "
                                f"--teacher_steps {old['teacher_steps']}: resume with the same values")
            teacher.load_state_dict(resume["extra"]["teacher"])
            it0 = resume["iter"]
        cur = {"teacher_steps": K0 // 2 ** (it0 // N)}  # K of the round in progress
        teacher_fwd = torch.compile(teacher) if use_compile else teacher

        def loss_fn(fwd, x, gen):
            loss, _, _ = sdtt_loss(fwd, teacher_fwd, x, cur["teacher_steps"], args.n_teacher_steps, mask_id, schedule,
                                   gen, args.loss)
            return loss, {}

        def round_hook(it, state):
            """After each step; at the end of round r: write round{r}.pt, then teacher <- raw student."""
            if it % N == 0:
                r = it // N
                meta["sample_steps"] = K0 // 2 ** r  # the student now does in K_r/2 steps what the teacher did in K_r
                state["checkpoint"](f"{args.out_dir}/round{r}.pt", round=r, optimizer=None,
                                    extra={"round": r, "teacher_steps": cur["teacher_steps"]})
                tqdm.write(f"round {r}/{R} done: student samples with {meta['sample_steps']} steps -> "
                           f"{args.out_dir}/round{r}.pt")
                if r < R:
                    teacher.load_state_dict(student.state_dict())  # the raw (non-EMA) student, as in the paper
                    cur["teacher_steps"] //= 2
            # in every ckpt.pt: what a mid-round resume needs (the round is it // N)
            return {"round": it // N, "teacher_steps": cur["teacher_steps"], "teacher": teacher.state_dict()}

        hooks.append(round_hook)
        meta["sample_steps"] = K0 // 2 ** (it0 // N)  # before round 1 ends the student is still the teacher
        print(f"SDTT: {R} rounds x {N} steps, teacher steps {K0} -> student {K0 // 2 ** R}, "
              f"{args.n_teacher_steps} teacher steps per target, loss {args.loss}, "
              f"student from the teacher's {'EMA' if args.teacher_ema else 'raw'} weights")
    else:
        # ------------------------------------------------------------------ TCS: plugged in from tinydiff/tcs.py
        args.seq_len = args.seq_len or tckpt["config"]["seq_len"]
        fill(lr=1e-3, warmup=100, ema=0.999, batch_size=32, eval_tokens=32768,  # train.py's defaults
             max_iters=2000, eval_interval=250, ckpt_interval=500)
        init = args.init
        if init == "scratch":  # a fresh MDLM, the teacher's shape unless --n_layer/--n_head/--n_embd say otherwise
            c = dict(tckpt["config"], causal=False, vocab_size=tok.vocab_size + 1, seq_len=args.seq_len)
            for k in ("n_layer", "n_head", "n_embd"):
                c[k] = getattr(args, k) or c[k]
            student = Transformer(ModelConfig(**c)).to(device)
        else:
            ickpt = load_checkpoint(init)
            if ickpt["kind"] != "mdlm" or tokenizer_key(ickpt["tokenizer"]) != tok.key:
                raise UserError(f"--init {init} must be an MDLM checkpoint with the teacher's tokenizer ({tok.key})")
            student = model_from_checkpoint(ickpt, device, use_ema=True).train()
        cfg, mask_id = student.cfg, tok.vocab_size
        meta["sample_steps"] = args.seq_len

    if args.seq_len > cfg.seq_len:
        raise UserError(f"--seq_len {args.seq_len} is beyond the model's context {cfg.seq_len}: "
                        f"use {cfg.seq_len} or less")
    print(f"student: {student.num_params() / 1e6:.2f}M parameters, {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}H, "
          f"data {data_dir}, seq_len {args.seq_len}")
    val_x = heldout_windows(data_dir, "mdlm", args.seq_len, args.eval_tokens)[0].to(device)  # (N, L) same as train.py

    def evaluate(m):  # the data-only NELBO bound of the student (SDTT students drift from it: expected)
        return val_metrics(m, "mdlm", val_x, mask_id, args.eval_draws, 0, args.batch_size, autocast)

    meta.update(config=cfg.to_dict(), args=vars(args))
    run = {"device": device, "autocast": autocast, "compile": use_compile, "data_dir": data_dir, "window": args.seq_len,
           "tokenizer": tok.spec()}
    if args.method == "tcs":  # the teacher, its loss and target cache; sets run["get_batch"] to the chunk-grid batcher
        loss_fn, tcs_hooks, meta_extra = build_tcs(args, student, device, run)
        hooks += list(tcs_hooks)
        meta.update(meta_extra)
    summary = train(student, loss_fn, evaluate, args, run, meta, resume, hooks)

    # one sample from the final weights at the step count the checkpoint records
    final = load_checkpoint(f"{args.out_dir}/ckpt.pt")
    gen = make_generator(args.seed, device)
    x, _ = diffusion_sample(model_from_checkpoint(final, device), 1, args.seq_len, final["sample_steps"], mask_id,
                            generator=gen, device=device)
    print("-" * 24 + f" sample ({final['sample_steps']} steps) " + "-" * 24)
    print(tok.decode(x[0].tolist()))
    print("-" * 68)
    emit({"method": args.method, "sample_steps": final["sample_steps"], "params": student.num_params(),
          **({"rounds": args.rounds, "teacher_steps": args.teacher_steps, "loss": args.loss} if args.method == "sdtt"
             else {}), **summary})


if __name__ == "__main__":
    try:
        main()
    except (UserError, DataError) as e:
        die(str(e))
