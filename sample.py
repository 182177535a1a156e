"""Generate text from any tinydiff checkpoint (MDLM or AR).

    python sample.py --ckpt out/ckpt.pt                          # MDLM, steps = the checkpoint's default
    python sample.py --ckpt out/ckpt.pt --steps 64 --prompt "def " --num_samples 4
    python sample.py --ckpt out-ar/ckpt.pt --top_p 0.95 --out samples.jsonl
    python sample.py --ckpt out/ckpt.pt --sampler threshold --tau 0.9         # any sampler of docs/samplers.md
    python sample.py --ckpt out/ckpt.pt --sampler semi_ar --seq_len 1024 --block_len 64   # past the context

MDLM samples with --sampler (default ancestral; float64 draws, a prompt is a clamped prefix); AR with its
static KV cache (an unconditional sample starts from the end-of-text token; --temperature/--top_k/--top_p
apply, the other knobs do not).
"""
import json
import time
from pathlib import Path

import torch

from tinydiff.run import ArgumentParser, add_sampler_args, knobs_from_args, run_main, validate
from tinydiff.common import (UserError, autocast_ctx, commit_files, emit, load_checkpoint, make_generator,
                             model_from_checkpoint, pick_device, pick_dtype, write_error)
from tinydiff.data import tokenizer_from_spec
from tinydiff.diffusion import get_schedule
from tinydiff.outdir import check_writable
from tinydiff.sampling import ar_sample
from tinydiff.sampling import describe, sample

parser = ArgumentParser(description=__doc__)
parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py or distill.py")
parser.add_argument("--steps", type=int, default=None, help="diffusion sampling steps (default: what the checkpoint records)")
parser.add_argument("--num_samples", type=int, default=2, help="how many samples")
parser.add_argument("--batch_size", type=int, default=8, help="samples generated at once")
parser.add_argument("--seq_len", type=int, default=None, help="tokens per sample, prompt included (default: model context)")
parser.add_argument("--prompt", default="", help="text the sample starts with (clamped prefix for MDLM)")
parser.add_argument("--seed", type=int, default=0, help="same seed + same device = same samples")
parser.add_argument("--out", default=None, help="also write the samples to this .jsonl file")
parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
parser.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (network only; draws are float64)")
add_sampler_args(parser)  # --sampler and its knobs (--temperature, --top_k, --top_p for every sampler)
args = parser.parse_args()


def main():
    validate(args)
    if args.out:
        check_writable(args.out)  # before sampling, not after
    device, _ = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    tok = tokenizer_from_spec(ckpt["tokenizer"])  # the checkpoint's own (bpe: its merges)
    model = model_from_checkpoint(ckpt, device, use_ema=not args.no_ema)
    context = model.cfg.seq_len
    seq_len = args.seq_len or context
    if ckpt["kind"] == "ar":  # one AR sampler: it takes the common knobs only
        name, knobs = "ar", knobs_from_args("ancestral", args)  # ancestral's knobs: the common ones
    else:
        name, knobs = args.sampler, knobs_from_args(args.sampler, args)
    if seq_len > context and name != "semi_ar":
        raise UserError(f"--seq_len {seq_len} is beyond the model's context {context}: use --seq_len {context} or less "
                        f"(or --sampler semi_ar)")
    dtype, _ = pick_dtype(args.dtype, device)
    autocast = autocast_ctx(device, dtype)

    def net(*a, **k):
        with autocast():
            return model(*a, **k)
    cache_dtype = torch.bfloat16 if dtype == "bfloat16" else None  # KV cache in the compute dtype

    prompt = tok.encode(args.prompt)
    if ckpt["kind"] == "ar" and not prompt:
        prompt = [tok.eot_id]  # unconditional: start from end-of-text, as GPT-2 samples do
    if len(prompt) >= seq_len:
        raise UserError(f"the prompt is {len(prompt)} tokens, not shorter than --seq_len {seq_len}: shorten it")
    steps = args.steps if args.steps is not None else ckpt.get("sample_steps") or seq_len
    schedule = get_schedule(ckpt.get("schedule"))  # the alpha_t the model was trained with: its reveal probabilities
    gen = make_generator(args.seed, device)
    texts, nfe_total, t0 = [], 0, time.time()
    for start in range(0, args.num_samples, args.batch_size):
        b = min(args.batch_size, args.num_samples - start)
        p = torch.tensor(prompt, dtype=torch.long, device=device).expand(b, -1)  # (b, P)
        if ckpt["kind"] == "ar":
            x, nfe = ar_sample(net, b, seq_len, p, gen, **knobs, cache=model.new_cache(b, seq_len, cache_dtype))
            x = x[:, 1:] if not args.prompt else x  # drop the end-of-text start token
        else:
            init = torch.full((b, seq_len), ckpt["mask_id"], dtype=torch.long, device=device)
            init[:, :len(prompt)] = p  # clamped prefix
            x, nfe = sample(name, net, init, steps, ckpt["mask_id"], gen, context, schedule=schedule, **knobs)
        nfe_total += nfe
        texts += [tok.decode(row.tolist()) for row in x]
    seconds = time.time() - t0
    print(f"sampler: {describe(name, knobs)}" + (f", steps {steps}" if name != "ar" else "")
          + f" | NFE {nfe_total} | {seconds:.2f}s")
    for i, text in enumerate(texts):
        print(f"{'=' * 30} sample {i} {'=' * 30}\n{text}")
    if args.out:
        lines = [json.dumps({"text": text, "steps": steps, "ckpt": args.ckpt, "sampler": name,
                             "sampler_knobs": knobs}) + "\n" for text in texts]
        try:
            commit_files({Path(args.out): "".join(lines).encode()})
        except OSError as e:
            raise UserError(f"could not write --out {args.out} ({write_error(e, args.out)})") from None
    emit({"num_samples": len(texts), "steps": steps if ckpt["kind"] == "mdlm" else None, "nfe": nfe_total,
          "seconds": seconds, "tokens_per_sec": len(texts) * seq_len / seconds, "kind": ckpt["kind"],
          "sampler": name, "sampler_knobs": knobs})


if __name__ == "__main__":
    run_main(main)
