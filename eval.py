r"""Evaluate a tinydiff checkpoint (MDLM or AR): val PPL, generative perplexity under an AR judge,
unigram entropy, self-BLEU, LAMBADA (design.md §8). Prints a table; the last line is one JSON object.

CPU (train.py's default models: byte tokenizer, stdlib corpus, seq_len 256; ~30 min for both):
    python train.py --out_dir out-shared/mdlm
    python train.py --model ar --out_dir out-shared/ar
    python eval.py --ckpt out-shared/mdlm/ckpt.pt --judge out-shared/ar/ckpt.pt --steps 8,32,128,256,1024 \
        --num_samples 16 --lambada ../shared/data/lambada_test.jsonl --limit 1000 --lambada_draws 4
    python eval.py --ckpt out-shared/ar/ckpt.pt --judge out-shared/ar/ckpt.pt \
        --num_samples 16 --lambada ../shared/data/lambada_test.jsonl --limit 1000
CPU smoke test (minutes): add --steps 8,32 --num_samples 4 --val_tokens 2048 --limit 50.
A judge with another tokenizer needs --retokenize (samples are decoded and re-encoded, and the output
says so), e.g. GPT-2 large as in the papers, through tinydiff/hub.py: --judge gpt2-large --retokenize.
GPU, paper scale (GPT-2 tokenizer, L = 1024; the judge an AR model trained on the same data):
    python eval.py --ckpt out-owt/ckpt.pt --judge out-owt-ar/ckpt.pt --steps 8,16,32,64,128,256,512,1024 \
        --num_samples 256 --batch_size 32 --val_tokens 1048576 --lambada ../shared/data/lambada_test.jsonl

What every number is:
- val PPL: AR exact, MDLM exp(NELBO bound) with --val_draws stratified t per window, seed --seed;
  both kinds score the same --val_tokens held-out tokens v_1..v_nL of val.bin (the AR windows also
  see the one token before each window: tinydiff.evaluate.heldout_windows).
- gen PPL: --num_samples samples of --gen_len tokens; the judge (fp32) scores tokens 2..L of each
  sample given the tokens before them (the first token is context only); per sample the mean NLL;
  gen PPL = exp(mean over samples). The same rule for the diffusion samples, an AR model's own
  samples (started from end-of-text, which the judge does not see) and real held-out text.
- entropy: unigram entropy (nats) of each sample, averaged; self-BLEU-4 over the sample set.
- sampling: float64 draws, temperature 1, no truncation; NFE = network calls per batch of samples.
- LAMBADA: last word with its leading space; contexts longer than the model's context are
  left-truncated (the count is printed). MDLM: one forward on context + [MASK]s; bound with
  --lambada_draws stratified t.
"""
import argparse
import math
import os
import time

import torch

from tinydiff.common import (UserError, autocast_ctx, die, emit, load_checkpoint, make_generator, model_from_checkpoint,
                             pick_device, pick_dtype)
from tinydiff.data import DataError, prepare_for, tokenizer_from_spec
from tinydiff.evaluate import (check_judge, heldout_windows, lambada, read_lambada, retokenize, sample_metrics,
                               val_metrics)
from tinydiff.sampler import ar_sample, diffusion_sample
from tinydiff.timing import sync

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to evaluate (MDLM or AR)")
parser.add_argument("--judge", default=None, help="AR checkpoint that scores the samples (gen PPL); none: no gen PPL")
parser.add_argument("--retokenize", action="store_true",
                    help="allow a judge with another tokenizer: decode the samples to text and re-encode them")
parser.add_argument("--steps", default=None,
                    help="comma-separated diffusion step counts, one row each (default: the checkpoint's)")
parser.add_argument("--num_samples", type=int, default=16, help="samples per row")
parser.add_argument("--batch_size", type=int, default=16, help="samples generated (and windows scored) at once")
parser.add_argument("--gen_len", type=int, default=None, help="tokens per sample (default: the model's context)")
parser.add_argument("--seed", type=int, default=0, help="seed of the samples (the same for every row) and the t draws")
parser.add_argument("--val_tokens", type=int, default=32768, help="held-out tokens scored for val PPL (0 = skip)")
parser.add_argument("--val_draws", type=int, default=4, help="stratified t draws per window for the MDLM bound")
parser.add_argument("--lambada", default=None, help="LAMBADA file, OpenAI jsonl with a \"text\" field per line")
parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N LAMBADA passages")
parser.add_argument("--lambada_draws", type=int, default=8, help="stratified t draws per passage for the MDLM bound")
parser.add_argument("--lambada_batch", type=int, default=64, help="network rows per LAMBADA forward pass")
parser.add_argument("--data", default=None, help="data source for the held-out text (default: the checkpoint's)")
parser.add_argument("--no_ema", action="store_true", help="use raw weights instead of the EMA (model and judge)")
parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
parser.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (network; draws float64, judge float32)")
args = parser.parse_args()


def main():
    # ------------------------------------------------------------------ device, model, judge
    device, why = pick_device(args.device)
    dtype, _ = pick_dtype(args.dtype, device)
    autocast = autocast_ctx(device, dtype)
    print(f"device {device} ({why}) | network dtype {dtype} | sampling draws float64 | judge float32")
    ckpt = load_checkpoint(args.ckpt)
    kind, tok = ckpt["kind"], tokenizer_from_spec(ckpt["tokenizer"])
    model = model_from_checkpoint(ckpt, device, use_ema=not args.no_ema)
    context, mask_id = model.cfg.seq_len, ckpt.get("mask_id")
    L = args.gen_len or context
    if not 2 <= L <= context:
        raise UserError(f"--gen_len {L} must be between 2 and the model's context {context}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num_samples and --batch_size must be at least 1")
    try:
        steps_list = [int(s) for s in args.steps.split(",")] if args.steps else [ckpt.get("sample_steps") or L]
    except ValueError:
        raise UserError(f"--steps {args.steps!r} is not a comma-separated list of integers, e.g. 8,32,128") from None
    if kind == "mdlm" and min(steps_list) < 1:
        raise UserError("every --steps value must be at least 1")
    if kind == "ar" and args.steps:
        print("note: --steps is ignored for an AR model (it samples one token per step: NFE = gen_len)")
    print(f"model {args.ckpt}: {kind}, {model.num_params() / 1e6:.2f}M parameters, context {context}, "
          f"tokenizer {tok.name}, {'raw' if args.no_ema else 'EMA'} weights")

    judge, judge_tok, retok = None, None, False
    if args.judge:
        try:
            jckpt = load_checkpoint(args.judge)
        except UserError as e:
            raise UserError(f"judge: {e}") from None
        retok = check_judge(jckpt, tok, args.retokenize, args.judge)
        judge_tok = tokenizer_from_spec(jckpt["tokenizer"])
        judge = model_from_checkpoint(jckpt, device, use_ema=not args.no_ema)
        if not retok and L - 1 > judge.cfg.seq_len:
            raise UserError(f"the judge's context {judge.cfg.seq_len} is too short for samples of {L} tokens "
                            f"(it reads L-1): use --gen_len {judge.cfg.seq_len + 1} or less")
        print(f"judge {args.judge}: {judge.num_params() / 1e6:.2f}M parameters, context {judge.cfg.seq_len}, "
              f"tokenizer {judge_tok.name}" + (f" -- samples are DECODED to text and RE-ENCODED with {judge_tok.name}"
                                               f" (tokenizers differ), at most {judge.cfg.seq_len + 1} tokens each"
                                               if retok else ""))
        if os.path.abspath(args.judge) == os.path.abspath(args.ckpt):
            print("note: the judge is the evaluated model itself: its gen PPL is circular (its own entropy rate)")

    # ------------------------------------------------------------------ held-out data and val PPL
    source = args.data or ckpt.get("args", {}).get("data", "stdlib")
    data_dir = prepare_for(source, tok)  # a bpe checkpoint: the data its merges came from
    record = {"ckpt": args.ckpt, "kind": kind, "tokenizer": tok.name, "data_dir": str(data_dir), "ema": not args.no_ema,
              "judge": args.judge, "judge_tokenizer": judge_tok.name if judge_tok else None, "retokenized": retok,
              "judge_dtype": "float32", "network_dtype": dtype, "sampling_dtype": "float64", "device": device,
              "seed": args.seed, "num_samples": args.num_samples, "gen_len": L, "batch_size": args.batch_size,
              "steps": steps_list if kind == "mdlm" else None, "val_ppl": None}
    if args.val_tokens > 0:
        t0 = time.time()
        val_x, n_scored = heldout_windows(data_dir, kind, context, args.val_tokens)  # (n, L) or (n, L+1)
        vm = val_metrics(model, kind, val_x.to(device), mask_id, args.val_draws, args.seed, args.batch_size, autocast)
        how = "exact NLL" if kind == "ar" else f"NELBO bound, {args.val_draws} t draws/window"
        print(f"val: {n_scored:,} held-out tokens (v_1..v_{n_scored} of {data_dir}/val.bin, windows of {context}): "
              f"loss {vm['val_loss']:.4f} nats/token, PPL {vm['val_ppl']:.3f} ({how}, {time.time() - t0:.1f}s)")
        record.update(val_loss=vm["val_loss"], val_ppl=vm["val_ppl"], val_scored_tokens=n_scored,
                      val_draws=args.val_draws if kind == "mdlm" else None, val_ppl_judge=None)
        if judge is not None and not retok and judge.cfg.seq_len >= context:  # the judge on the same tokens
            jx, _ = heldout_windows(data_dir, "ar", context, args.val_tokens)
            record["val_ppl_judge"] = val_metrics(judge, "ar", jx.to(device), batch_size=args.batch_size)["val_ppl"]
            print(f"val: the judge on the same tokens: PPL {record['val_ppl_judge']:.3f} (exact NLL)")

    # ------------------------------------------------------------------ samples: one row per step count
    def net(*a, **k):
        with autocast():
            return model(*a, **k)
    cache_dtype = torch.bfloat16 if dtype == "bfloat16" else None  # the KV cache in the compute dtype: no copies

    def judged(samples):  # the samples as the judge reads them
        if judge is None or not retok:
            return None
        return retokenize(samples, tok, judge_tok, judge.cfg.seq_len + 1)

    def generate(steps):
        """num_samples samples (n, L), mean NFE per batch, seconds. The same seed for every row."""
        gen, rows, nfes = make_generator(args.seed, device), [], []
        sync(device)
        t0 = time.time()
        for start in range(0, args.num_samples, args.batch_size):
            b = min(args.batch_size, args.num_samples - start)
            if kind == "mdlm":
                x, nfe = diffusion_sample(net, b, L, steps, mask_id, generator=gen, device=device)  # (b, L)
            else:  # start from end-of-text, L + 1 tokens in all, drop the start token
                prompt = torch.full((b, 1), tok.eot_id, dtype=torch.long, device=device)
                x, nfe = ar_sample(net, b, L + 1, prompt, gen, cache=model.new_cache(b, L + 1, cache_dtype))
                x = x[:, 1:]  # (b, L)
            rows.append(x)
            nfes.append(nfe)
        sync(device)
        return torch.cat(rows), sum(nfes) / len(nfes), time.time() - t0

    table = []
    for steps in (steps_list if kind == "mdlm" else [None]):
        x, nfe, seconds = generate(steps)
        m = sample_metrics(x, judge, judged(x), args.batch_size)
        label = str(steps) if kind == "mdlm" else "ar"
        table.append({"row": label, "steps": steps if kind == "mdlm" else L, "nfe": nfe, "seconds": seconds,
                      "tokens_per_sec": len(x) * L / seconds, **m})
        print(f"{label:>6}: {tok.decode(x[0, :120].tolist())!r}")
    real = heldout_windows(data_dir, "mdlm", L, args.num_samples * L)[0][:args.num_samples].to(device)  # (n', L)
    table.append({"row": "real", "steps": None, "nfe": None, "seconds": None, "tokens_per_sec": None,
                  **sample_metrics(real, judge, judged(real), args.batch_size), "num_samples": len(real)})

    # ------------------------------------------------------------------ LAMBADA
    lam = None
    if args.lambada:
        passages = read_lambada(args.lambada, args.limit)
        t0 = time.time()
        lam = lambada(net, kind, tok, passages, context, mask_id, args.lambada_draws, args.seed, device=device,
                      batch_size=args.lambada_batch)
        print(f"LAMBADA: {lam['n']} passages ({args.lambada}), {lam['truncated']} contexts left-truncated to fit the "
              f"context of {context} tokens, {lam['target_tokens']:.2f} target tokens/word ({time.time() - t0:.1f}s)")

    # ------------------------------------------------------------------ table and JSON
    f = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    print(f"\n{kind} {args.ckpt} | {args.num_samples} samples x {L} tokens, seed {args.seed} | judge {args.judge}"
          + (" (re-encoded)" if retok else ""))
    print(f"{'row':>6} {'steps':>6} {'NFE':>7} {'seconds':>8} {'gen PPL':>9} {'(NLL se)':>8} {'entropy':>8} "
          f"{'self-BLEU':>9}")
    for r in table:
        print(f"{r['row']:>6} {f(r['steps'], 'd'):>6} {f(r['nfe'], '.1f'):>7} {f(r['seconds'], '.2f'):>8} "
              f"{f(r.get('gen_ppl'), '.3f'):>9} {f(r.get('gen_nll_se'), '.4f'):>8} {f(r['entropy'], '.4f'):>8} "
              f"{f(r['self_bleu'], '.4f'):>9}")
    print("(real = held-out text windows of the same length; entropy = unigram entropy in nats, per sample, averaged;"
          " NLL se = standard error of the mean per-sample NLL, in nats)")
    if record["val_ppl"] is not None:
        print(f"val PPL {record['val_ppl']:.3f}" + (" (bound)" if kind == "mdlm" else " (exact)")
              + (f" | judge val PPL {record['val_ppl_judge']:.3f}" if record.get("val_ppl_judge") else ""))
    if lam:
        what = "exact" if kind == "ar" else "NELBO bound"
        print(f"LAMBADA acc {lam['acc']:.4f} | per-word NLL {lam['nll']:.3f} nats ({what}) | n {lam['n']}")

    record.update(rows=table, gen_ppl={r["row"]: r.get("gen_ppl") for r in table},
                  entropy={r["row"]: r["entropy"] for r in table}, self_bleu={r["row"]: r["self_bleu"] for r in table},
                  nfe={r["row"]: r["nfe"] for r in table}, seconds={r["row"]: r["seconds"] for r in table},
                  lambada_acc=lam and lam["acc"], lambada_nll=lam and lam["nll"], lambada_ppl=lam and lam["ppl"],
                  lambada_n=lam and lam["n"], lambada_truncated=lam and lam["truncated"], lambada_file=args.lambada,
                  lambada_limit=args.limit, lambada_draws=args.lambada_draws if lam and kind == "mdlm" else None)
    emit(record)


if __name__ == "__main__":
    try:
        main()
    except (UserError, DataError) as e:
        die(str(e))
