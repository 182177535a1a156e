r"""Train a masked diffusion LM (MDLM, default) or an autoregressive baseline. The loop is below, top to bottom.

CPU, the default (MDLM on the Python standard library with a 4096-id BPE learned from it, ~9 min on
2 cores, samples built from Python's own pieces; docs/tokenizers.md):
    python train.py
The byte-level MDLM of earlier defaults (257 ids; at the same training time its samples have Python's layout only):
    python train.py --tokenizer bytes --max_iters 1910
The AR baseline / judge of the same size on the same data (train.py prints this command at the end):
    python train.py --model ar --out_dir out-ar
GPU, MDLM small's shape on a GPT-2 vocabulary (the paper's full recipe: --preset mdlm-owt-small; README):
    python train.py --data shakespeare --tokenizer gpt2 --n_layer 12 --n_head 12 --n_embd 768 \
        --seq_len 1024 --batch_size 32 --grad_accum 16 --lr 3e-4 --warmup 2500 --ema 0.9999 --dropout 0.1
Several GPUs: torchrun --standalone --nproc_per_node 8 train.py ... (every rank draws the same global batch
and noise and keeps its rows, so N processes compute what one process with the global batch computes).
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from tinydiff import dist
from tinydiff.common import (EMA, StopSignals, UserError, emit, generators, load_checkpoint, lr_at, make_generator,
                             make_optimizer, model_from_checkpoint, restore_run, run_state, save_run, setup_runtime)
from tinydiff.data import (VocabTooLarge, checkpoint_data, default_tokenizer, framed_batches, get_batch, load_meta,
                           load_tokenizer, prepare)
from tinydiff.diffusion import SCHEDULES, forward_mask, get_schedule, nelbo_loss, sample_times, schedule_spec
from tinydiff.evaluate import heldout_len, heldout_windows, per_byte, periodic_eval, val_window_len
from tinydiff.model import ModelConfig, Transformer
from tinydiff.outdir import check_space, checkpoint_bytes, claim
from tinydiff.run import ArgumentParser, add_sampler_args, add_train_args, knobs_from_args, parse, resume_args, run_main
from tinydiff.sampling import ar_sample, describe, sample

# ----------------------------------------------------------------------------- flags
parser = ArgumentParser(description=__doc__)
parser.add_argument("--model", default="mdlm", choices=["mdlm", "ar"], help="masked diffusion LM or causal AR baseline")
parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n_head", type=int, default=4, help="attention heads")
parser.add_argument("--n_embd", type=int, default=128, help="model width")
parser.add_argument("--dropout", type=float, default=0.0, help="dropout (MDLM on OWT: 0.1)")
parser.add_argument("--tie_embeddings", action="store_true", help="share input embedding and output head")
parser.add_argument("--schedule", default="loglinear", choices=list(SCHEDULES),
                    help=f"MDLM noise schedule alpha_t (docs/mdlm.md §2): {', '.join(SCHEDULES)} (loglinear: MDLM's); "
                         "recorded in the checkpoint, which every later script follows")
parser.add_argument("--init_from", default=None,
                    help="start from these weights (fresh optimizer): a checkpoint path, hf:kuleshov-group/mdlm-owt, "
                         "hf:jdeschena/sdtt@REVISION (MDLM), or gpt2 / gpt2-medium / gpt2-large (--model ar)")
parser.add_argument("--vocab_size", type=int, default=4096,
                    help="--tokenizer bpe: ids learned from the training split (256 bytes + merges + end-of-text)")
# the CPU default, ~9 min on 2 cores: at ~5M tokens a 4L/128d body beats a wider, deeper one (compute-optimal
# scaling), and a 4096-id BPE (3.5 bytes a token) carries ~3x the text of bytes per step (docs/tokenizers.md)
add_train_args(parser, seq_len=256, max_iters=1600, batch_size=16, lr=3e-3, warmup=100, ema=0.999, eval_interval=800,
               eval_tokens=32768, ckpt_interval=500)
add_sampler_args(parser)  # the end-of-run sample: --sampler and its knobs (AR: --temperature/--top_k/--top_p)
args, given = parse(parser)  # --preset NAME sets the defaults (printed); flags given still win


def main():
    # ------------------------------------------------------------------ the run: out_dir, resume, device
    claim(args.out_dir, args.resume, args.overwrite)  # locked, writable, not another run's checkpoint
    resume = init = None
    if args.resume:  # the run continues as it was started: its own flags, data and state
        resume = load_checkpoint(f"{args.out_dir}/ckpt.pt", script="train.py")
        resume_args(args, resume, given, f"{args.out_dir}/ckpt.pt")
        if args.model == "mdlm" and get_schedule(resume.get("schedule")).name != args.schedule:
            raise UserError(f"--schedule {args.schedule} contradicts {args.out_dir}/ckpt.pt (the "
                            f"{get_schedule(resume.get('schedule')).name} schedule): drop the flag")
    sampler = args.sampler if args.model == "mdlm" else "ar"
    knobs = knobs_from_args(args.sampler if args.model == "mdlm" else "ancestral", args)  # checked now, not at the end
    device, dtype, use_compile, autocast = setup_runtime(args.device, args.dtype, args.compile)
    rank, world = dist.rank_world()
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------ data: prepared once, keyed by content
    args.tokenizer = args.tokenizer or default_tokenizer(args.data)  # bpe; the lab has its own
    try:
        data_dir = checkpoint_data(resume) if resume else prepare(args.data, args.tokenizer, vocab_size=args.vocab_size)
    except VocabTooLarge as e:  # a small file and the default --vocab_size: the largest vocabulary it allows
        if "vocab_size" in given:
            raise
        print(f"note: {args.data} allows only {e.allowed} bpe ids (every pair of tokens merged): using --vocab_size "
              f"{e.allowed}")
        args.vocab_size = e.allowed  # recorded in the checkpoint's args (and its tokenizer)
        data_dir = prepare(args.data, args.tokenizer, vocab_size=e.allowed)
    tok = load_tokenizer(data_dir)
    fit = load_meta(data_dir)["train_tokens"] - 1 - (args.model == "ar")  # the longest training window it holds
    if args.seq_len > fit and not (resume or args.init_from or "seq_len" in given):
        print(f"note: the training split holds {fit + 1 + (args.model == 'ar')} tokens: using --seq_len {fit}")
        args.seq_len = fit

    # ------------------------------------------------------------------ model: MDLM's [MASK] is one more id
    if resume is not None:
        cfg = ModelConfig(**resume["config"])
    elif args.init_from:
        init = load_checkpoint(args.init_from, kind=args.model, tokenizer=tok.key, what=f"--init_from {args.init_from}",
                               fix="give the --model, --tokenizer (bpe: --vocab_size, --data) it was trained with")
        init["config"] = dict(init["config"], dropout=args.dropout)  # the architecture is the checkpoint's
        if args.dropout_sites:  # else the checkpoint's (a converted DiT: the official residual-only sites)
            init["config"]["dropout_sites"] = args.dropout_sites
        cfg = ModelConfig(**init["config"])
    else:
        cfg = ModelConfig(vocab_size=tok.vocab_size + (args.model == "mdlm"), n_layer=args.n_layer, n_head=args.n_head,
                          n_embd=args.n_embd, seq_len=args.seq_len, causal=args.model == "ar", dropout=args.dropout,
                          tie_embeddings=args.tie_embeddings, dropout_sites=args.dropout_sites or "all")
    args.framing = args.framing or (resume or init or {}).get("framing", "none")  # a published MDLM's: bos_eos
    if args.seq_len > cfg.seq_len:
        raise UserError(f"--seq_len {args.seq_len} is beyond {'the checkpoint' if resume else '--init_from'}'s context "
                        f"{cfg.seq_len}: use --seq_len {cfg.seq_len} or less")
    model = Transformer(cfg).to(device) if init is None else model_from_checkpoint(init, device).train()
    check_space(args.out_dir, checkpoint_bytes(model, 2 + 2 * (args.ema > 0)))  # weights, AdamW moments, EMA
    mask_id = tok.vocab_size if args.model == "mdlm" else None
    schedule = get_schedule(args.schedule)  # alpha_t and its NELBO weight w(t) (tinydiff/diffusion.py)
    print(f"{args.model}: {model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}H, "
          f"context {cfg.seq_len}, {model.estimate_flops_per_token(args.seq_len) / 1e6:.1f} MFLOP/token (train)")
    # what makes every checkpoint self-describing: any script loads it with no other file
    meta = {"kind": args.model, "config": cfg.to_dict(), "mask_id": mask_id, "args": vars(args), "tokenizer": tok.spec(),
            "data_dir": str(data_dir.resolve()), "data_key": load_meta(data_dir)["key"], "framing": args.framing,
            "sample_steps": args.seq_len if args.model == "mdlm" else None,
            "schedule": schedule_spec(schedule) if args.model == "mdlm" else None}

    # training windows (an AR model reads one token more: it predicts tokens 2..W) and the fixed held-out ones,
    # on which AR and MDLM score exactly the same tokens (heldout_windows)
    window = val_window_len(args.model, args.seq_len)
    batches = framed_batches(tok.eot_id) if args.framing == "bos_eos" else get_batch  # bos_eos: [BOS] + .. + [EOS]
    if args.framing == "bos_eos":
        print(f"windows framed as [BOS] + {window - 2} tokens + [EOS] (BOS = EOS = end-of-text id {tok.eot_id})")
    eval_len = heldout_len(data_dir, args.seq_len)  # a small file's val split may hold less than one window
    if eval_len < args.seq_len:
        print(f"note: the held-out split holds {eval_len + 1} tokens only: the bound rests on {eval_len} tokens")
    val_x = heldout_windows(data_dir, args.model, eval_len, args.eval_tokens, args.framing)[0].to(device)

    # ------------------------------------------------------------------ optimizer, EMA, random streams, resume
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    gens = generators(args.seed, device)  # "data" draws the windows, "noise" the times and masks
    it, history = restore_run(resume, model, opt, ema, gens) if resume else (0, [])
    # DDP: every rank draws the global batch and its noise (the generators stay equal on all ranks) and keeps its
    # rows; dropout, the one per-rank randomness, is reseeded from (seed, step, rank) each step
    net = DDP(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None) if world > 1 else model
    fwd = torch.compile(net) if use_compile else net
    masked_only = args.model == "mdlm" and device == "cpu" and not use_compile  # the head at masked positions only

    # ------------------------------------------------------------------ the loop
    signals = StopSignals()  # SIGTERM / Ctrl-C: finish the step, write ckpt.pt, exit 143 / 130
    tokens_per_step = args.batch_size * args.grad_accum * world * window
    print(f"global batch: {args.batch_size} x {args.grad_accum} (accumulation) x {world} (processes) = "
          f"{args.batch_size * args.grad_accum * world} sequences, {tokens_per_step} tokens per step")
    bar = tqdm(total=args.max_iters, initial=it, desc="train", dynamic_ncols=True, disable=rank != 0)
    t0, it0, eval_seconds, last_save, saved = time.time(), it, 0.0, time.time(), (resume or {}).get("iter")
    train_loss = float("nan")
    model.train()
    while it < args.max_iters:
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args.lr, args.warmup, args.max_iters, args.lr_schedule, args.min_lr)
        if world > 1:
            torch.manual_seed(args.seed + 1_000_003 * (it * world + rank + 1))
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            x = batches(data_dir, "train", args.batch_size * world, window, gens["data"], device)  # (world*B, W)
            if args.model == "mdlm":  # noise the global batch: t (stratified), then z_t ~ q(z_t | x) (MDLM eq. 2)
                t = sample_times(len(x), gens["noise"], device)  # (world*B,)
                z = forward_mask(x, t, schedule, mask_id, gens["noise"])  # (world*B, W)
                x, t, z = x[rank::world], t[rank::world], z[rank::world]  # this rank's rows (one process: all)
            else:
                x = x[rank::world]
            with dist.no_sync(net, micro < args.grad_accum - 1):  # DDP all-reduces in the last backward only
                with autocast():
                    if args.model == "mdlm":
                        loss = nelbo_loss(fwd, x, z, t, schedule, mask_id, masked_only)  # the NELBO, MDLM eq. 10
                    else:
                        logits = fwd(x[:, :-1])  # (B, W-1, V): next-token prediction
                        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        it += 1
        bar.update(1)

        stop = signals.requested()
        if it % args.log_interval == 0 or it == args.max_iters:  # the one host sync, every log_interval steps
            train_loss = dist.mean(loss_sum).item()
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                            tok_s=f"{(it - it0) * tokens_per_step / (time.time() - t0 - eval_seconds):.0f}")
        if rank == 0 and (it % args.eval_interval == 0 or it == args.max_iters):  # the EMA weights, fixed windows
            row, seconds = periodic_eval(ema.model if ema else model, it, args.model, val_x, mask_id, args.eval_draws,
                                         args.batch_size, autocast, schedule)
            history.append(row)
            eval_seconds += seconds
        due = args.ckpt_minutes > 0 and time.time() - last_save >= 60 * args.ckpt_minutes
        if it % args.ckpt_interval == 0 or it == args.max_iters or stop or due:
            intact = (f"{args.out_dir}/ckpt.pt", saved) if saved else None  # named if this save fails
            save_run(run_state(meta, model, opt, ema, gens, it, history), f"{args.out_dir}/ckpt.pt", intact)
            last_save, saved = time.time(), it
        if stop and it < args.max_iters:
            bar.close()
            signals.stop(it, args.max_iters, args.out_dir)
    bar.close()
    signals.restore()
    dist.barrier()  # the final ckpt.pt is on disk before any rank reads it
    elapsed = time.time() - t0 - eval_seconds  # training time only
    summary = {"iter": it, "train_loss": train_loss, **{k: v for k, v in (history[-1] if history else {}).items()
                                                         if k != "iter"},
               "tokens_per_sec": (it - it0) * tokens_per_step / max(elapsed, 1e-9), "train_seconds": elapsed,
               "eval_seconds": eval_seconds, "out_dir": args.out_dir}

    # ------------------------------------------------------------------ the end: a sample, the numbers in context
    sampler_model = model_from_checkpoint(load_checkpoint(f"{args.out_dir}/ckpt.pt"), device)  # EMA weights when on
    gen = make_generator(args.seed, device)
    if args.model == "mdlm":
        x, nfe = sample(sampler, sampler_model, (1, args.seq_len), args.seq_len, mask_id, gen, cfg.seq_len, device,
                        schedule, **knobs)
    else:
        x, nfe = ar_sample(sampler_model, 1, args.seq_len, torch.full((1, 1), tok.eot_id, device=device), gen, **knobs)
        x = x[:, 1:]
    print("-" * 20 + f" sample: {describe(sampler, knobs)}, {args.seq_len} steps, NFE {nfe} " + "-" * 20)
    print(tok.decode(x[0].tolist()))
    print("-" * 68)
    # per byte (comparable across tokenizers) next to a unigram model of the corpus
    ctx = per_byte(data_dir, tok, eval_len, args.eval_tokens, summary["val_loss"]) if "val_loss" in summary else {}
    if ctx:
        print(f"held-out: {ctx['heldout_tokens']:,} tokens = {ctx['heldout_bytes']:,} bytes | "
              f"{'val bound' if args.model == 'mdlm' else 'val NLL'} {ctx['val_loss_per_byte']:.3f} nats/byte | "
              f"a unigram model of the training split: {ctx['unigram_per_byte']:.3f} nats/byte")
    if args.model == "mdlm" and "lab" not in load_meta(data_dir):  # the same flags but --model and --out_dir
        same = [f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items()
                if k in given - {"model", "out_dir", "resume", "init_from"} and v is not False]
        print(f"the AR baseline of the same size: python train.py --model ar --out_dir {args.out_dir}-ar " + " ".join(same))
    emit({"model": args.model, "params": model.num_params(), **summary, **ctx, "sampler": sampler,
          "sampler_knobs": knobs})


if __name__ == "__main__":
    run_main(main)
