r"""Train a masked diffusion LM (MDLM, default) or an autoregressive baseline on one machine.

CPU, the default (MDLM on the Python standard library with a 4096-id BPE learned from it, ~9 min on
2 cores, samples built from Python's own pieces; docs/tokenizers.md):
    python train.py
The byte-level MDLM of earlier defaults (257 ids; at the same training time its samples have Python's layout only):
    python train.py --tokenizer bytes --max_iters 1910
The AR baseline / judge of the same size on the same data (train.py prints this command at the end):
    python train.py --model ar --out_dir out-ar
GPU, MDLM small on OpenWebText-scale data (see README for presets and costs):
    python train.py --data shakespeare --tokenizer gpt2 --n_layer 12 --n_head 12 --n_embd 768 \
        --seq_len 1024 --batch_size 32 --grad_accum 16 --lr 3e-4 --warmup 2500 --ema 0.9999 --dropout 0.1
"""
import argparse

import torch
import torch.nn.functional as F

from tinydiff.checks import ArgumentParser, given_flags, run_main, validate
from tinydiff.common import UserError, emit, load_checkpoint, make_generator, model_from_checkpoint, setup_runtime
from tinydiff.data import (checkpoint_data, default_tokenizer, framed_batches, get_batch, load_meta, load_tokenizer,
                           prepare)
from tinydiff.diffusion import SCHEDULES, get_schedule, nelbo_loss, schedule_spec
from tinydiff.evaluate import heldout_windows, per_byte, val_metrics, val_window_len
from tinydiff.lab import lab_of
from tinydiff.loop import add_run_args, resume_args, train
from tinydiff.model import ModelConfig, Transformer
from tinydiff.outdir import check_space, checkpoint_bytes, claim
from tinydiff.presets import apply_preset
from tinydiff.sampling import ar_sample
from tinydiff.sampling import add_sampler_args, describe, knobs_from_args, sample

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="mdlm", choices=["mdlm", "ar"], help="masked diffusion LM or causal AR baseline")
parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n_head", type=int, default=4, help="attention heads")
parser.add_argument("--n_embd", type=int, default=128, help="model width")
parser.add_argument("--dropout", type=float, default=0.0, help="dropout (MDLM on OWT: 0.1)")
parser.add_argument("--tie_embeddings", action="store_true", help="share input embedding and output head")
parser.add_argument("--schedule", default="loglinear", choices=list(SCHEDULES),
                    help="MDLM noise schedule alpha_t (docs/mdlm.md §2): loglinear (MDLM's) or cosine; recorded in "
                         "the checkpoint, which every later script follows")
parser.add_argument("--init_from", default=None,
                    help="start from these weights (fresh optimizer): a checkpoint path, hf:kuleshov-group/mdlm-owt, "
                         "hf:jdeschena/sdtt@REVISION (MDLM), or gpt2 / gpt2-medium / gpt2-large (--model ar)")
add_run_args(parser)
add_sampler_args(parser)  # the end-of-run sample: --sampler and its knobs (AR: --temperature/--top_k/--top_p)
parser.add_argument("--vocab_size", type=int, default=4096,
                    help="--tokenizer bpe: ids learned from the training split (256 bytes + merges + end-of-text)")
# the CPU default: ~9 min on 2 cores. At 10 CPU-minutes (~5M tokens) a 4L/128d body beats train.py's earlier
# 6L/192d (2.7x fewer tokens in the same time), as compute-optimal scaling predicts; a 4096-id BPE learned from
# the corpus (3.5 bytes a token) carries ~3x the text of bytes per step (docs/tokenizers.md)
parser.set_defaults(seq_len=256, max_iters=1600, batch_size=16, lr=3e-3, warmup=100, eval_interval=800)
args = apply_preset(parser)  # --preset NAME sets defaults (printed); explicit flags still win


def main():
    # every flag checked, the out_dir claimed (locked, writable, not holding another run's checkpoint) and,
    # on --resume, the run's own flags restored, before any work starts
    validate(args)
    claim(args.out_dir, args.resume, args.overwrite)
    resume = init = None
    if args.resume:
        resume = load_checkpoint(f"{args.out_dir}/ckpt.pt", script="train.py")
        resume_args(args, resume, given_flags(parser), f"{args.out_dir}/ckpt.pt")
        if args.model == "mdlm" and get_schedule(resume.get("schedule")).name != args.schedule:  # an older checkpoint
            raise UserError(f"--schedule {args.schedule} contradicts {args.out_dir}/ckpt.pt (the "
                            f"{get_schedule(resume.get('schedule')).name} schedule): drop the flag")
    sampler = args.sampler if args.model == "mdlm" else "ar"  # checked now, not after training
    knobs = knobs_from_args(args.sampler if args.model == "mdlm" else "ancestral", args)
    device, dtype, use_compile, autocast = setup_runtime(args)
    torch.manual_seed(args.seed)

    # data: prepared once under data/<source>-<tokenizer>-<key>/ (keyed by content; bpe: its merges learned
    # then); a resumed run reads the folder it was trained on, even when the source was edited since
    args.tokenizer = args.tokenizer or default_tokenizer(args.data)  # bpe; the lab has its own
    data_dir = checkpoint_data(resume) if resume is not None else prepare(args.data, args.tokenizer,
                                                                          vocab_size=args.vocab_size)
    tok = load_tokenizer(data_dir)

    # model: MDLM gets one extra embedding row for [MASK] (id = tokenizer vocab size)
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
    # window framing: the flag, else the loaded checkpoint's (a published MDLM: bos_eos), else none
    args.framing = args.framing or (resume or init or {}).get("framing", "none")
    if args.seq_len > cfg.seq_len:  # a fresh model has seq_len = args.seq_len; a loaded one keeps its context
        source = "the checkpoint" if resume is not None else "--init_from"
        raise UserError(f"--seq_len {args.seq_len} is beyond {source}'s context {cfg.seq_len}: "
                        f"use --seq_len {cfg.seq_len} or less")
    model = Transformer(cfg).to(device) if init is None else model_from_checkpoint(init, device).train()
    check_space(args.out_dir, checkpoint_bytes(model, 2 + 2 * (args.ema > 0)))  # weights, AdamW moments, EMA
    mask_id = tok.vocab_size if args.model == "mdlm" else None
    print(f"{args.model}: {model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}H, "
          f"context {cfg.seq_len}, {model.estimate_flops_per_token(args.seq_len) / 1e6:.1f} MFLOP/token (train)")

    # loss and held-out evaluation (the same fixed windows at every eval)
    schedule = get_schedule(args.schedule)  # alpha_t and w(t) (tinydiff/diffusion.py); on --resume the checkpoint's
    if args.model == "mdlm":
        masked_only = device == "cpu" and not use_compile  # output head at masked positions only (nelbo_loss)

        def loss_fn(fwd, x, noise):  # noise: the step's draws (loop.Noise; rank, world: DDP)
            return nelbo_loss(fwd, x, schedule, mask_id, noise.gen, rank=noise.rank, world=noise.world,
                              masked_only=masked_only)[0], {}
    else:
        def loss_fn(fwd, x, noise):
            logits = fwd(x[:, :-1])  # (B, L, V)
            return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()), {}
    window = val_window_len(args.model, args.seq_len)
    val_x = heldout_windows(data_dir, args.model, args.seq_len, args.eval_tokens,  # (N, window)
                            args.framing)[0].to(device)
    # (AR and MDLM score exactly the same held-out tokens: see heldout_windows)

    def evaluate(m):
        return val_metrics(m, args.model, val_x, mask_id, args.eval_draws, 0, args.batch_size, autocast, schedule)

    meta = {"kind": args.model, "config": cfg.to_dict(), "mask_id": mask_id, "args": vars(args),
            "tokenizer": tok.spec(),  # bpe: with its merges, so sample/eval/distill decode without the data
            "data_dir": str(data_dir.resolve()), "data_key": load_meta(data_dir)["key"],
            "sample_steps": args.seq_len if args.model == "mdlm" else None, "framing": args.framing,
            "schedule": schedule_spec(schedule) if args.model == "mdlm" else None}

    # training batches: random windows of train.bin; bos_eos: [BOS] + window - 2 tokens + [EOS] (tinydiff/data.py)
    windows = framed_batches(tok.eot_id) if args.framing == "bos_eos" else get_batch
    if args.framing == "bos_eos":
        print(f"windows framed as [BOS] + {window - 2} tokens + [EOS] (BOS = EOS = end-of-text id {tok.eot_id})")

    def batches(n, gen, device):  # (n, window)
        return windows(data_dir, "train", n, window, gen, device)

    summary = train(model, loss_fn, evaluate, batches, window, args, device=device, autocast=autocast,
                    use_compile=use_compile, meta=meta, resume=resume)

    # show what the model learned: one sample from the weights eval/sample use (EMA when on)
    sampler_model = model_from_checkpoint(load_checkpoint(f"{args.out_dir}/ckpt.pt"), device)
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

    # the numbers in context: per byte (comparable across tokenizers) next to a unigram model of the corpus
    ctx = per_byte(data_dir, tok, args.seq_len, args.eval_tokens, summary["val_loss"]) if "val_loss" in summary else {}
    if ctx:
        what = "val bound" if args.model == "mdlm" else "val NLL"
        print(f"held-out: {ctx['heldout_tokens']:,} tokens = {ctx['heldout_bytes']:,} bytes | {what} "
              f"{ctx['val_loss_per_byte']:.3f} nats/byte | a unigram model of the training split: "
              f"{ctx['unigram_per_byte']:.3f} nats/byte")
    if args.model == "mdlm" and lab_of(data_dir) is None:  # the same flags but --model and --out_dir
        given = given_flags(parser) - {"model", "out_dir", "resume", "init_from"}  # the flags this run was given
        same = [f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items() if k in given and v is not False]
        print(f"the AR baseline of the same size: python train.py --model ar --out_dir {args.out_dir}-ar " + " ".join(same))
    emit({"model": args.model, "params": model.num_params(), **summary, **ctx, "sampler": sampler,
          "sampler_knobs": knobs})


if __name__ == "__main__":
    run_main(main)
