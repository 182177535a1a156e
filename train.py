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
import os

import torch
import torch.nn.functional as F

from tinydiff.common import UserError, die, emit, load_checkpoint, make_generator, model_from_checkpoint, setup_runtime
from tinydiff.data import DataError, load_tokenizer, prepare, tokenizer_key
from tinydiff.diffusion import LogLinearSchedule, nelbo_loss
from tinydiff.evaluate import heldout_windows, per_byte, val_metrics, val_window_len
from tinydiff.loop import add_run_args, train
from tinydiff.model import ModelConfig, Transformer
from tinydiff.presets import apply_preset
from tinydiff.sampler import ar_sample, diffusion_sample

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="mdlm", choices=["mdlm", "ar"], help="masked diffusion LM or causal AR baseline")
parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n_head", type=int, default=4, help="attention heads")
parser.add_argument("--n_embd", type=int, default=128, help="model width")
parser.add_argument("--dropout", type=float, default=0.0, help="dropout (MDLM on OWT: 0.1)")
parser.add_argument("--tie_embeddings", action="store_true", help="share input embedding and output head")
parser.add_argument("--init_from", default=None,
                    help="start from these weights (fresh optimizer): a checkpoint path, hf:kuleshov-group/mdlm-owt, "
                         "hf:jdeschena/sdtt@REVISION (MDLM), or gpt2 / gpt2-medium / gpt2-large (--model ar)")
add_run_args(parser)
parser.add_argument("--vocab_size", type=int, default=4096,
                    help="--tokenizer bpe: ids learned from the training split (256 bytes + merges + end-of-text)")
# the CPU default: ~9 min on 2 cores. At 10 CPU-minutes (~5M tokens) a 4L/128d body beats train.py's earlier
# 6L/192d (2.7x fewer tokens in the same time), as compute-optimal scaling predicts; a 4096-id BPE learned from
# the corpus (3.5 bytes a token) carries ~3x the text of bytes per step (docs/tokenizers.md)
parser.set_defaults(seq_len=256, max_iters=1600, batch_size=16, lr=3e-3, warmup=100, eval_interval=800, tokenizer="bpe")
args = apply_preset(parser)  # --preset NAME sets defaults (printed); explicit flags still win


def main():
    device, dtype, use_compile, autocast = setup_runtime(args)
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)

    # data: prepared once under data/<source>-<tokenizer>/ (bpe: its merges learned then), reused afterwards
    data_dir = prepare(args.data, args.tokenizer, vocab_size=args.vocab_size)
    tok = load_tokenizer(data_dir)

    # model: MDLM gets one extra embedding row for [MASK] (id = tokenizer vocab size)
    resume = init = None
    if args.resume:
        resume = load_checkpoint(f"{args.out_dir}/ckpt.pt")
        if resume["kind"] != args.model or tokenizer_key(resume["tokenizer"]) != tok.key:
            raise UserError(f"{args.out_dir}/ckpt.pt is a {resume['kind']} model with the "
                            f"{tokenizer_key(resume['tokenizer'])} tokenizer, not {tok.key}: resume with the same "
                            f"--model, --tokenizer (--vocab_size) and --data, or use another --out_dir")
        cfg = ModelConfig(**resume["config"])
    elif args.init_from:
        init = load_checkpoint(args.init_from)  # a path, or a published model converted by tinydiff/hub.py
        if init["kind"] != args.model or tokenizer_key(init["tokenizer"]) != tok.key:
            raise UserError(f"--init_from {args.init_from} is a {init['kind']} model with the "
                            f"{tokenizer_key(init['tokenizer'])} tokenizer, not {tok.key}: use --model {init['kind']} "
                            f"--tokenizer {init['tokenizer']['name']} (a bpe model: its --vocab_size and --data)")
        init["config"] = dict(init["config"], dropout=args.dropout)  # the architecture is the checkpoint's
        cfg = ModelConfig(**init["config"])
    else:
        cfg = ModelConfig(vocab_size=tok.vocab_size + (args.model == "mdlm"), n_layer=args.n_layer, n_head=args.n_head,
                          n_embd=args.n_embd, seq_len=args.seq_len, causal=args.model == "ar", dropout=args.dropout,
                          tie_embeddings=args.tie_embeddings)
    if args.seq_len > cfg.seq_len:  # a fresh model has seq_len = args.seq_len; a loaded one keeps its context
        source = "the checkpoint" if resume is not None else "--init_from"
        raise UserError(f"--seq_len {args.seq_len} is beyond {source}'s context {cfg.seq_len}: "
                        f"use --seq_len {cfg.seq_len} or less")
    model = Transformer(cfg).to(device) if init is None else model_from_checkpoint(init, device).train()
    mask_id = tok.vocab_size if args.model == "mdlm" else None
    print(f"{args.model}: {model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}H, "
          f"context {cfg.seq_len}, {model.estimate_flops_per_token(args.seq_len) / 1e6:.1f} MFLOP/token (train)")

    # loss and held-out evaluation (the same fixed windows at every eval)
    schedule = LogLinearSchedule()
    if args.model == "mdlm":
        masked_only = device == "cpu" and not use_compile  # output head at masked positions only (nelbo_loss)

        def loss_fn(fwd, x, gen):
            return nelbo_loss(fwd, x, schedule, mask_id, gen, masked_only=masked_only)[0], {}
    else:
        def loss_fn(fwd, x, gen):
            logits = fwd(x[:, :-1])  # (B, L, V)
            return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()), {}
    window = val_window_len(args.model, args.seq_len)
    val_x = heldout_windows(data_dir, args.model, args.seq_len, args.eval_tokens)[0].to(device)  # (N, window)
    # (AR and MDLM score exactly the same held-out tokens: see heldout_windows)

    def evaluate(m):
        return val_metrics(m, args.model, val_x, mask_id, args.eval_draws, 0, args.batch_size, autocast)

    meta = {"kind": args.model, "config": cfg.to_dict(), "mask_id": mask_id, "args": vars(args),
            "tokenizer": tok.spec(),  # bpe: with its merges, so sample/eval/distill decode without the data
            "data_dir": str(data_dir), "sample_steps": args.seq_len if args.model == "mdlm" else None}
    run = {"device": device, "autocast": autocast, "compile": use_compile, "data_dir": data_dir, "window": window}
    summary = train(model, loss_fn, evaluate, args, run, meta, resume)

    # show what the model learned: one sample from the weights eval/sample use (EMA when on)
    sampler_model = model_from_checkpoint(load_checkpoint(f"{args.out_dir}/ckpt.pt"), device)
    gen = make_generator(args.seed, device)
    if args.model == "mdlm":
        x, _ = diffusion_sample(sampler_model, 1, args.seq_len, args.seq_len, mask_id, generator=gen, device=device)
    else:
        x, _ = ar_sample(sampler_model, 1, args.seq_len, torch.full((1, 1), tok.eot_id, device=device), generator=gen)
        x = x[:, 1:]
    print("-" * 30 + " sample " + "-" * 30)
    print(tok.decode(x[0].tolist()))
    print("-" * 68)

    # the numbers in context: per byte (comparable across tokenizers) next to a unigram model of the corpus
    ctx = per_byte(data_dir, tok, args.seq_len, args.eval_tokens, summary["val_loss"]) if "val_loss" in summary else {}
    if ctx:
        what = "val bound" if args.model == "mdlm" else "val NLL"
        print(f"held-out: {ctx['heldout_tokens']:,} tokens = {ctx['heldout_bytes']:,} bytes | {what} "
              f"{ctx['val_loss_per_byte']:.3f} nats/byte | a unigram model of the training split: "
              f"{ctx['unigram_per_byte']:.3f} nats/byte")
    if args.model == "mdlm":  # the same flags but --model and --out_dir
        same = [f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items()
                if k not in ("model", "out_dir", "resume", "init_from") and v != parser.get_default(k)]
        print(f"the AR baseline of the same size: python train.py --model ar --out_dir {args.out_dir}-ar " + " ".join(same))
    emit({"model": args.model, "params": model.num_params(), **summary, **ctx})


if __name__ == "__main__":
    try:
        main()
    except (UserError, DataError) as e:
        die(str(e))
