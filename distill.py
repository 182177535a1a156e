r"""Distil a diffusion LM: SDTT rounds from an MDLM teacher, or TCS from an AR teacher. The loop is below.

--method sdtt (Self-Distillation Through Time, Deschenaux & Gulcehre 2025; docs/sdtt.md): the student
starts as a copy of the MDLM teacher: its raw weights by default, its EMA weights with --teacher_ema
(use that when the teacher you evaluate is its EMA, as sample.py/eval.py do). Round r trains the student
to do in one step what the teacher does in two (teacher step 1/K_r); at the end of the round the raw
(non-EMA) student becomes the teacher and K halves, while the optimizer and EMA carry on. After R rounds
the student samples with K0 / 2^R steps. Writes OUT_DIR/round{r}.pt after each round (for sampling:
sample_steps = K0 / 2^r, no optimizer) and OUT_DIR/ckpt.pt (the full state with the current teacher:
--resume continues mid-round exactly). Sample/evaluate with the EMA weights (sample.py / eval.py default).

CPU (teacher = train.py's default MDLM; 4 rounds, 256 -> 16 steps):
    python distill.py --method sdtt --teacher out/ckpt.pt --teacher_ema --out_dir out-sdtt \
        --rounds 4 --iters_per_round 300 --batch_size 8 --lr 3e-4 --warmup 20 --ema 0.99
    python sample.py --ckpt out-sdtt/round4.pt          # 16 steps, as the checkpoint records
GPU, the paper's recipe (the published MDLM small, L = 1024: 7 rounds 1024 -> 8 steps, 10k steps a round;
the official repository's defaults differ: lr 3e-4, 2500 warm-up; we follow the paper):
    python distill.py --preset sdtt-paper

--method tcs (Target Concrete Score distillation from an AR teacher; docs/tcs.md): the student (fresh, or
--init an MDLM) learns the teacher's full-context conditionals as soft targets (tinydiff/tcs.py) on windows
of a fixed chunk grid, so a window's targets are computed once (tinydiff/tcs_cache.py); with --tcs_windows N
it trains on N fixed windows whose targets are precomputed to disk once (--precompute_only: only that).
    python distill.py --method tcs --teacher out-ar/ckpt.pt --estimator topk --topk 16 --out_dir out-tcs

On the exact lab (docs/lab.md), --teacher lab-oracle: SDTT's teacher is the lab's exact denoiser in every
round (the student from --init, an MDLM trained on the lab); TCS's targets are the lab's exact full
conditionals (a fresh student with --data lab, or --init):
    python distill.py --method sdtt --teacher lab-oracle --init runs/lab/mdlm/ckpt.pt --teacher_ema ...
    python distill.py --method tcs --teacher lab-oracle --data lab --seq_len 128 --tcs_lambda 1 ...
"""
import copy
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from tinydiff import dist
from tinydiff.common import (EMA, StopSignals, UserError, emit, generators, load_checkpoint, lr_at, make_generator,
                             make_optimizer, model_from_checkpoint, restore_run, run_state, save_run, setup_runtime)
from tinydiff.data import (checkpoint_data, default_tokenizer, framed_batches, get_batch, get_tokenizer, load_meta,
                           load_tokenizer, prepare_for, tokenizer_from_spec)
from tinydiff.diffusion import SCHEDULES, forward_mask, get_schedule, sample_times, schedule_spec
from tinydiff.evaluate import heldout_windows, periodic_eval
from tinydiff.lab import OracleDenoiser, lab_of, oracle_targets
from tinydiff.model import ModelConfig, Transformer
from tinydiff.outdir import check_space, checkpoint_bytes, claim
from tinydiff.run import (ArgumentParser, add_sampler_args, add_train_args, check_shape, knobs_from_args, parse,
                          resume_args, run_main)
from tinydiff.sampling import describe, sample
from tinydiff.sdtt import DIVERGENCES, sdtt_loss
from tinydiff.tcs import ESTIMATORS, load_teacher, tcs_loss, tcs_targets
from tinydiff.tcs_cache import grid_batch, target_settings, target_store

# ----------------------------------------------------------------------------- flags
ORACLE = "lab-oracle"  # --teacher: the exact denoiser / full conditionals of the lab the student is trained on
parser = ArgumentParser(description=__doc__)
a = parser.add_argument
a("--method", default="sdtt", choices=["sdtt", "tcs"],
  help="sdtt (MDLM teacher) or tcs (AR teacher); the defaults below are this method's (--method tcs --help)")
a("--teacher", default=None, help="teacher checkpoint: an MDLM (sdtt) or an AR model (tcs) from train.py; on the lab: "
                                  f"{ORACLE} (docs/lab.md)")
a("--teacher_ema", action="store_true", help="sdtt: start the student (and first teacher) from the teacher's EMA "
                                             "weights, not its raw ones (use it when the teacher you evaluate is its EMA)")
a("--rounds", type=int, default=4, help="sdtt: distillation rounds R (teacher steps halve each round)")
a("--iters_per_round", type=int, default=150, help="sdtt: optimizer steps per round (paper: 10k)")
a("--teacher_steps", type=int, default=None, help="sdtt: teacher sampling steps K0 in round 1 (default: the model's "
                                                  "seq_len; paper 1024)")
a("--n_teacher_steps", type=int, default=2, help="sdtt: teacher steps per target (paper: 2; 4 and 8 did worse)")
a("--loss", default="kl_bwd", choices=DIVERGENCES, help="sdtt divergence: kl_bwd = KL(student||teacher) (paper "
  "default), kl_fwd, mse (log-probs, mean over the vocabulary: paper eq. 11), tvd (0.5 sum |p - q|)")
a("--init", default="scratch", help="tcs student: 'scratch' (fresh MDLM, size from --n_layer/--n_head/--n_embd, default "
                                    "the teacher's) or an MDLM checkpoint to fine-tune; sdtt with lab-oracle: the student")
a("--estimator", default="topk", choices=ESTIMATORS, help="tcs target estimator: exact (all L*|V| substitutions), "
  "prefix (next-token only), grad (first order), topk (exact rescoring of K candidates)")
a("--topk", type=int, default=16, help="tcs: K ids stored per position (topk: candidates rescored), plus one slot that "
  "keeps the targets unbiased (the label when it is not a candidate / one tail token with the rest of the mass); 0 = all")
a("--window", type=int, default=None, help="tcs topk: suffix tokens rescored after i (default: all)")
a("--candidates", default="prefix", choices=["prefix", "grad"], help="tcs topk: the top K of the prefix distribution "
  "p(. | x_<i) (default: independent of x_i, so exactly unbiased) or of grad (biased, measured in docs/tcs.md)")
a("--tcs_lambda", type=float, default=1.0, help="tcs weight lam: loss = (1 - lam) NELBO + lam TCS (0 = plain MDLM)")
a("--tcs_windows", type=int, default=0, help="tcs: train on N fixed windows of the chunk grid whose targets are "
  "precomputed once to disk and reused by every run with the same teacher/settings/data; 0 = the whole grid, "
  "targets cached in memory as they are met")
a("--tcs_cache_dir", default=None, help="tcs with --tcs_windows: where the precomputed targets live (default "
                                        "DATA_DIR/tcs_targets; 'none' = in memory only)")
a("--precompute_only", action="store_true", help="tcs: compute (or verify) the --tcs_windows targets, then exit")
a("--tcs_snapshots", type=int, default=0, help="tcs: every N steps also write OUT_DIR/snap-ITER.pt (a loadable MDLM "
                                               "checkpoint without optimizer) for curves evaluated afterwards (0 = off)")
a("--tcs_cache_mb", type=float, default=1024, help="tcs without a disk set: memory for targets met (MiB, 0 = none)")
a("--teacher_elems", type=int, default=0, help="tcs: teacher logits per rescoring chunk (0 = auto: 2^24 CPU, 2^27 GPU)")
for flag, what in (("--n_layer", "blocks"), ("--n_head", "heads"), ("--n_embd", "width")):
    a(flag, type=int, default=None, help=f"tcs student from scratch: {what} (default: the teacher's)")
a("--schedule", default="loglinear", choices=list(SCHEDULES), help="tcs student from scratch: its noise schedule "
  "(docs/mdlm.md §2); an SDTT or --init student keeps its checkpoint's")
# SDTT's CPU-sized recipe (the paper's: --preset sdtt-paper); its run length and intervals follow its rounds
add_train_args(parser, seq_len=None, max_iters=None, batch_size=8, lr=3e-4, warmup=20, ema=0.99, eval_interval=None,
               eval_tokens=16384, ckpt_interval=None)
add_sampler_args(parser)  # the end-of-run sample: --sampler and its knobs
parser.set_defaults(data=None)  # the teacher's data (and tokenizer) unless given


def method_defaults(known):
    """The defaults that depend on --method (and for SDTT on its rounds: an eval and a ckpt.pt per round)."""
    if known.method == "tcs":
        return dict(lr=1e-3, warmup=100, ema=0.999, batch_size=32, eval_tokens=32768, max_iters=2000,
                    eval_interval=250, ckpt_interval=500)
    N = known.iters_per_round
    return dict(max_iters=known.rounds * N, eval_interval=N, ckpt_interval=N)


args, given = parse(parser, method_defaults=method_defaults)


def main():
    # ------------------------------------------------------------------ the run: out_dir, resume, device
    claim(args.out_dir, args.resume, args.overwrite)
    resume = None
    if args.resume:  # method, teacher, data and recipe come from the checkpoint
        resume = load_checkpoint(f"{args.out_dir}/ckpt.pt", script="distill.py")
        resume_args(args, resume, given, f"{args.out_dir}/ckpt.pt")
    if args.teacher is None:
        raise UserError(f"--method {args.method} needs --teacher CKPT (an "
                        f"{'MDLM' if args.method == 'sdtt' else 'AR model'} trained with train.py)")
    sdtt, oracle = args.method == "sdtt", args.teacher == ORACLE
    knobs = knobs_from_args(args.sampler, args)  # the end-of-run sample's, checked before any work
    device, dtype, use_compile, autocast = setup_runtime(args.device, args.dtype, args.compile)
    rank, world = dist.rank_world()
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------ the teacher's checkpoint: tokenizer, data
    if oracle and not sdtt and args.init == "scratch":  # TCS from scratch on the lab's exact targets: no checkpoint
        if not str(args.data or "").startswith("lab"):
            raise UserError(f"--method tcs --teacher {ORACLE} from scratch needs --data lab (or lab:W=...,...): the lab "
                            f"whose exact full conditionals are the targets (or --init an MDLM trained on it)")
        tckpt = {"config": ModelConfig(n_embd=128, seq_len=args.seq_len or 128).to_dict(), "args": {"data": args.data},
                 "tokenizer": get_tokenizer(default_tokenizer(args.data)).spec()}
    elif oracle:  # the oracle has no checkpoint: the student's (--init) gives the tokenizer and the data
        if args.init == "scratch":
            raise UserError(f"--teacher {ORACLE} needs --init CKPT: the MDLM trained on the lab that the student "
                            f"starts from")
        tckpt = load_checkpoint(args.init, kind="mdlm", what=f"--init {args.init} of --teacher {ORACLE}")
    else:
        tckpt = load_checkpoint(args.teacher, kind="mdlm" if sdtt else "ar",
                                what=f"--teacher {args.teacher} of --method {args.method}")
    args.seq_len = args.seq_len or tckpt["config"]["seq_len"]  # the teacher's context
    tok = tokenizer_from_spec(tckpt["tokenizer"])  # the student shares the teacher's tokenizer (bpe: its merges)
    if args.tokenizer not in (None, tok.name):
        raise UserError(f"--tokenizer {args.tokenizer} differs from the teacher's ({tok.name}): the student shares "
                        f"the teacher's tokenizer; drop --tokenizer")
    args.tokenizer = tok.name
    if resume is not None:  # the folder this run was trained on (keyed by content), even if the source changed
        data_dir = checkpoint_data(resume)
    elif args.data is not None:
        data_dir = prepare_for(args.data, tok)  # bpe: only the data its merges were learned from
    else:  # the teacher's prepared data, as it was trained on
        data_dir = checkpoint_data(tckpt, what=f"the teacher {args.teacher}")
    if load_tokenizer(data_dir).key != tok.key:
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the teacher's ({tok.key})")
    args.data = args.data or tckpt["args"]["data"]
    args.framing = args.framing or tckpt.get("framing", "none")  # a published MDLM's: bos_eos
    lab = None
    if oracle:
        lab = lab_of(data_dir)  # the exact lab (tinydiff/lab/)
        if lab is None:
            raise UserError(f"--teacher {ORACLE} needs a student trained on the lab (--data lab); {data_dir} is not")

    # ------------------------------------------------------------------ the student
    if sdtt or args.init != "scratch":  # SDTT: a copy of the teacher; TCS --init: that MDLM (EMA weights)
        ckpt = tckpt if sdtt else load_checkpoint(args.init, kind="mdlm", tokenizer=tok.key, what=f"--init {args.init}")
        if sdtt and args.dropout_sites:  # else the teacher's (a converted DiT: the official residual-only sites)
            ckpt["config"] = dict(ckpt["config"], dropout_sites=args.dropout_sites)
        student = model_from_checkpoint(ckpt, device, use_ema=args.teacher_ema or not sdtt).train()
        schedule = get_schedule(ckpt.get("schedule"))  # the teacher's / the MDLM's own alpha_t
    else:  # TCS from scratch: a fresh MDLM of the teacher's shape unless --n_layer/--n_head/--n_embd say otherwise
        c = dict(tckpt["config"], causal=False, vocab_size=tok.vocab_size + 1, seq_len=args.seq_len)
        c.update({k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)})
        check_shape(c["n_embd"], c["n_head"])
        student = Transformer(ModelConfig(**c)).to(device)
        schedule = get_schedule(args.schedule)
    cfg, mask_id = student.cfg, tok.vocab_size
    if args.seq_len > cfg.seq_len:
        raise UserError(f"--seq_len {args.seq_len} is beyond the model's context {cfg.seq_len}: use {cfg.seq_len} or less")
    print(f"student: {student.num_params() / 1e6:.2f}M parameters, {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}H, "
          f"data {data_dir}, seq_len {args.seq_len}")

    # ------------------------------------------------------------------ SDTT: the teacher and its rounds
    R, N = (args.rounds, args.iters_per_round) if sdtt else (1, args.max_iters)  # TCS: one "round"
    if sdtt:
        K0 = args.teacher_steps = args.teacher_steps or args.seq_len
        if K0 < 2 ** R or K0 % 2 ** R != 0:
            raise UserError(f"--teacher_steps {K0} must be divisible by 2^rounds = {2 ** R} (each round halves it, "
                            f"the last student samples with K0 / 2^R >= 1 steps)")
        if args.max_iters > R * N:  # a smaller one stops early (continue with --resume --max_iters R*N)
            raise UserError(f"--max_iters {args.max_iters} is beyond rounds x iters_per_round = {R * N}")
        # frozen, eval mode (no dropout); the exact denoiser stays the teacher of every round (it is exact at any K)
        teacher = OracleDenoiser(lab) if oracle else copy.deepcopy(student).eval().requires_grad_(False)
        if resume is not None:
            teacher.load_state_dict(resume["extra"]["teacher"])
        teacher_fwd = torch.compile(teacher) if use_compile and not oracle else teacher
        print(f"SDTT: {R} rounds x {N} steps, teacher steps {K0} -> student {K0 // 2 ** R}, {args.n_teacher_steps} "
              f"teacher steps per target, loss {args.loss}, student from the {'--init' if oracle else 'teacher'}'s "
              f"{'EMA' if args.teacher_ema else 'raw'} weights"
              + ("; teacher: the lab's EXACT denoiser in every round" if oracle else ""))
        check_space(args.out_dir, checkpoint_bytes(student, 5 + 2 * R))  # ckpt.pt (+ the teacher), the round files

    # ------------------------------------------------------------------ TCS: the teacher's targets, cached
    else:
        if args.framing == "bos_eos":
            raise UserError("--framing bos_eos is for SDTT from a model trained on framed windows; TCS uses plain "
                            "windows (drop --framing)")
        in_memory = str(args.tcs_cache_dir or "").lower() == "none"
        if args.precompute_only and (args.tcs_windows <= 0 or in_memory or oracle):
            raise UserError("--precompute_only computes the targets of a fixed training set to disk: give --tcs_windows "
                            "N (and a --tcs_cache_dir other than none; the lab oracle's exact targets are not stored)")
        check_space(args.out_dir, checkpoint_bytes(student, 4))  # weights, EMA, AdamW's two moments
        settings, tcs_meta = None, {"teacher": args.teacher, "teacher_config": None, "bos_id": None,
                                    "estimator": args.estimator, "topk": args.topk, "window": args.window,
                                    "candidates": args.candidates, "lambda": args.tcs_lambda, "chunk_grid": args.seq_len,
                                    "fixed_windows": args.tcs_windows, "targets_dir": None}
        if oracle:  # the exact pi_i = p(x_i | x_!=i), all |V| ids: cheap, not cached (docs/lab.md §d)
            if lab.V + 1 != cfg.vocab_size:
                raise UserError(f"the student has {cfg.vocab_size - 1} ids + [MASK], the lab {lab.V}: train it on the "
                                f"same lab")
            print(f"TCS teacher: the lab's EXACT full conditionals ({lab.params.spec()}), all {lab.V} ids stored")
            compute, tcs_meta["estimator"] = (lambda x: oracle_targets(lab, x)), ORACLE
        else:
            teacher, ackpt = load_teacher(args.teacher, tok.spec(), cfg.vocab_size, args.seq_len, device)
            bos_id, V = ackpt["tokenizer"]["eot_id"], ackpt["config"]["vocab_size"]
            max_elems = args.teacher_elems or (2 ** 27 if device == "cuda" else 2 ** 24)
            if args.estimator == "exact" and args.seq_len * V > 1e5:
                print(f"warning: exact TCS targets rescore {args.seq_len} x {V} sequences per window: use --estimator "
                      f"topk for anything but tiny settings")

            def compute(x):  # (B, L) -> (ids, logp) (B, L, K') each: the teacher's targets, fp32 (tinydiff/tcs.py)
                return tcs_targets(teacher, x.to(device), bos_id, args.estimator, args.topk, args.window,
                                   args.candidates, max_elems)
            settings = target_settings(teacher, ackpt["config"], bos_id, args.estimator, args.topk, args.window,
                                       args.candidates)
            tcs_meta.update(teacher_config=ackpt["config"], bos_id=bos_id)
        if args.tcs_lambda == 0 and not args.precompute_only:  # plain MDLM through the same path: pi = onehot(x)
            compute, settings = (lambda x: (x[..., None], torch.zeros(*x.shape, 1, device=x.device))), None
        targets, chunks = target_store(compute, data_dir, args.seq_len, args.tcs_windows, args.tcs_cache_dir,
                                       0 if oracle or settings is None else args.tcs_cache_mb, args.batch_size, settings)
        tcs_meta["targets_dir"] = str(targets.dir) if hasattr(targets, "dir") else None
        if args.precompute_only:  # the --tcs_windows targets are on disk now: no training
            emit({"method": "tcs", "precompute_only": True, **tcs_meta, "tcs_cache": targets.stats()})
            return

    # ------------------------------------------------------------------ checkpoint description, windows
    meta = {"kind": "mdlm", "method": args.method, "teacher_ckpt": args.teacher, "config": cfg.to_dict(),
            "args": vars(args), "tokenizer": tok.spec(), "data_dir": str(data_dir.resolve()),
            "data_key": load_meta(data_dir)["key"], "mask_id": mask_id, "framing": args.framing,
            "schedule": schedule_spec(schedule), "sample_steps": args.seq_len, **({} if sdtt else {"tcs": tcs_meta})}
    if sdtt:  # SDTT: the teacher's windows (framed as it was trained); TCS: on the chunk grid, so targets are reused
        windows = framed_batches(tok.eot_id) if args.framing == "bos_eos" else get_batch
        if args.framing == "bos_eos":
            print(f"windows framed as [BOS] + {args.seq_len - 2} tokens + [EOS] (BOS = EOS = end-of-text id "
                  f"{tok.eot_id})")
        batches = lambda n, gen: windows(data_dir, "train", n, args.seq_len, gen, device)  # noqa: E731
    else:
        batches = lambda n, gen: grid_batch(data_dir, "train", n, args.seq_len, gen, device, chunks)  # noqa: E731
    # the periodic eval: the student's data-only NELBO bound on train.py's held-out windows
    val_x = heldout_windows(data_dir, "mdlm", args.seq_len, args.eval_tokens, args.framing)[0].to(device)

    # ------------------------------------------------------------------ optimizer, EMA, random streams, resume
    opt = make_optimizer(student, args.lr, args.weight_decay, device)
    ema = EMA(student, args.ema) if args.ema > 0 else None
    gens = generators(args.seed, device)
    it, history = restore_run(resume, student, opt, ema, gens) if resume else (0, [])
    net = DDP(student, device_ids=[torch.cuda.current_device()] if device == "cuda" else None) if world > 1 else student
    fwd = torch.compile(net) if use_compile else net
    rank_gen = torch.Generator(device=device) if world > 1 else gens["noise"]  # SDTT's teacher steps: per rank

    # ------------------------------------------------------------------ the loop: rounds of steps
    signals = StopSignals()
    tokens_per_step = args.batch_size * args.grad_accum * world * args.seq_len
    print(f"global batch: {args.batch_size} x {args.grad_accum} (accumulation) x {world} (processes) = "
          f"{args.batch_size * args.grad_accum * world} sequences, {tokens_per_step} tokens per step")
    bar = tqdm(total=args.max_iters, initial=it, desc=args.method, dynamic_ncols=True, disable=rank != 0)
    t0, it0, eval_seconds, last_save, saved = time.time(), it, 0.0, time.time(), (resume or {}).get("iter")
    train_loss, shown = float("nan"), {}
    student.train()
    for r in range(it // N, R):  # SDTT round r + 1 (TCS: one round of max_iters steps)
        K = K0 // 2 ** r if sdtt else None  # round r + 1's teacher takes K steps; its student learns to take K / 2
        meta["sample_steps"] = K if sdtt else args.seq_len  # before its round ends, the student samples like its teacher
        while it < min((r + 1) * N, args.max_iters):
            for group in opt.param_groups:
                group["lr"] = lr_at(it, args.lr, args.warmup, args.max_iters, args.lr_schedule, args.min_lr)
            if world > 1:  # dropout and the teacher's draws: per rank, from (seed, step, rank)
                torch.manual_seed(args.seed + 1_000_003 * (it * world + rank + 1))
                rank_gen.manual_seed(args.seed + 1_000_003 * (it * world + rank + 1))
            loss_sum, logs_sum = 0.0, {}
            for micro in range(args.grad_accum):
                x = batches(args.batch_size * world, gens["data"])  # (world*B, L) the global batch
                t = sample_times(len(x), gens["noise"], device)  # (world*B,) noised as for MDLM training
                z = forward_mask(x, t, schedule, mask_id, gens["noise"])  # (world*B, L)
                x, t, z = x[rank::world], t[rank::world], z[rank::world]  # this rank's rows (one process: all)
                logs = {}
                with dist.no_sync(net, micro < args.grad_accum - 1):
                    with autocast():
                        if sdtt:  # the student's one step against the teacher's two (paper Algorithm 1)
                            loss = sdtt_loss(fwd, teacher_fwd, z, t, K, args.n_teacher_steps, mask_id, schedule,
                                             rank_gen, args.loss)
                        else:  # soft targets: (1 - lam) onehot(x) + lam pi (tinydiff/tcs.py)
                            ids, logp = targets(x)  # (B, L, K') each: compute(x), once per window (a cache)
                            loss, logs = tcs_loss(fwd, x, z, t, ids, logp, mask_id, args.tcs_lambda, schedule)
                    (loss / args.grad_accum).backward()
                loss_sum = loss_sum + loss.detach() / args.grad_accum
                logs_sum = {k: logs_sum.get(k, 0.0) + v / args.grad_accum for k, v in logs.items()}
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(student)
            it += 1
            bar.update(1)

            if sdtt and it == (r + 1) * N:  # the round ends: its student does in K/2 steps what the teacher did in K
                meta["sample_steps"] = K // 2
                save_run({**run_state(meta, student, opt, ema, gens, it, history), "round": r + 1, "optimizer": None,
                          "extra": {"round": r + 1, "teacher_steps": K}}, f"{args.out_dir}/round{r + 1}.pt")
                tqdm.write(f"round {r + 1}/{R} done: student samples with {K // 2} steps -> "
                           f"{args.out_dir}/round{r + 1}.pt")
                if r + 1 < R and not oracle:
                    teacher.load_state_dict(student.state_dict())  # the raw (non-EMA) student, as in the paper
            if sdtt:  # in every ckpt.pt: what a mid-round resume needs
                meta["extra"] = {"round": it // N, "teacher_steps": K0 // 2 ** min(it // N, R - 1),
                                 "teacher": teacher.state_dict()}
            elif args.tcs_snapshots > 0 and it % args.tcs_snapshots == 0:  # the EMA weights, for curves afterwards
                save_run({**run_state(meta, student, opt, ema, gens, it, history), "optimizer": None},
                         os.path.join(args.out_dir, f"snap-{it:06d}.pt"))
            if not sdtt:
                meta["extra"] = {"tcs_cache": targets.stats() if hasattr(targets, "stats") else None}

            stop = signals.requested()
            if it % args.log_interval == 0 or it == args.max_iters:  # the one host sync, every log_interval steps
                train_loss = dist.mean(loss_sum).item()
                shown = {k: f"{dist.mean(v).item():.4f}" for k, v in logs_sum.items()}
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", **shown,
                                tok_s=f"{(it - it0) * tokens_per_step / (time.time() - t0 - eval_seconds):.0f}")
            if rank == 0 and (it % args.eval_interval == 0 or it == args.max_iters):  # the EMA weights, fixed windows
                row, seconds = periodic_eval(ema.model if ema else student, it, "mdlm", val_x, mask_id, args.eval_draws,
                                             args.batch_size, autocast, schedule)
                history.append(row)
                eval_seconds += seconds
            due = args.ckpt_minutes > 0 and time.time() - last_save >= 60 * args.ckpt_minutes
            if it % args.ckpt_interval == 0 or it == args.max_iters or stop or due:
                intact = (f"{args.out_dir}/ckpt.pt", saved) if saved else None  # named if this save fails
                save_run(run_state(meta, student, opt, ema, gens, it, history), f"{args.out_dir}/ckpt.pt", intact)
                last_save, saved = time.time(), it
            if stop and it < args.max_iters:
                bar.close()
                signals.stop(it, args.max_iters, args.out_dir)
    bar.close()
    signals.restore()
    dist.barrier()  # the final ckpt.pt is on disk before any rank reads it
    elapsed = time.time() - t0 - eval_seconds

    # ------------------------------------------------------------------ the end: one sample at the recorded steps
    final = load_checkpoint(f"{args.out_dir}/ckpt.pt")
    x, nfe = sample(args.sampler, model_from_checkpoint(final, device), (1, args.seq_len), final["sample_steps"],
                    mask_id, make_generator(args.seed, device), cfg.seq_len, device, schedule, **knobs)
    print("-" * 16 + f" sample: {describe(args.sampler, knobs)}, {final['sample_steps']} steps, NFE {nfe} " + "-" * 16)
    print(tok.decode(x[0].tolist()))
    print("-" * 68)
    emit({"method": args.method, "sample_steps": final["sample_steps"], "params": student.num_params(),
          **({"rounds": R, "teacher_steps": K0, "loss": args.loss} if sdtt else {}),
          "iter": it, "train_loss": train_loss, **{k: v for k, v in (history[-1] if history else {}).items() if k != "iter"},
          "tokens_per_sec": (it - it0) * tokens_per_step / max(elapsed, 1e-9), "train_seconds": elapsed,
          "eval_seconds": eval_seconds, "out_dir": args.out_dir, "sampler": args.sampler, "sampler_knobs": knobs})


if __name__ == "__main__":
    run_main(main)
