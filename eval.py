r"""Evaluate a tinydiff checkpoint (MDLM or AR): val PPL, generative perplexity under an AR judge,
unigram entropy, self-BLEU, LAMBADA (docs/evaluation.md). Prints a table; the last line is one JSON object.

CPU (train.py's default models: byte tokenizer, stdlib corpus, seq_len 256; ~30 min for both):
    python train.py --out_dir out-shared/mdlm
    python train.py --model ar --out_dir out-shared/ar
    python eval.py --ckpt out-shared/mdlm/ckpt.pt --judge out-shared/ar/ckpt.pt --steps 8,32,128,256,1024 \
        --num_samples 16 --lambada lambada_test.jsonl --limit 1000 --lambada_draws 4
    python eval.py --ckpt out-shared/ar/ckpt.pt --judge out-shared/ar/ckpt.pt \
        --num_samples 16 --lambada lambada_test.jsonl --limit 1000
CPU smoke test (minutes): add --steps 8,32 --num_samples 4 --val_tokens 2048 --limit 50.
(lambada_test.jsonl: OpenAI's LAMBADA, 5153 passages; docs/reproduce.md §0 has the download command.)
Any sampler of docs/samplers.md with its knobs, e.g. --sampler threshold --tau 0.9 (default ancestral).
A judge with another tokenizer needs --retokenize (samples are decoded and re-encoded, and the output
says so), e.g. GPT-2 large as in the papers, through tinydiff/hub.py: --judge gpt2-large --retokenize.
GPU, paper scale (GPT-2 tokenizer, L = 1024; the judge an AR model trained on the same data):
    python eval.py --ckpt out-owt/ckpt.pt --judge out-owt-ar/ckpt.pt --steps 8,16,32,64,128,256,512,1024 \
        --num_samples 256 --batch_size 32 --val_tokens 1048576 --lambada lambada_test.jsonl

What every number is:
- val PPL: AR exact, MDLM exp(NELBO bound) with --val_draws stratified t per window, seed --seed;
  both kinds score the same --val_tokens held-out tokens v_1..v_nL of val.bin (the AR windows also
  see the one token before each window: tinydiff.evaluate.heldout_windows). A checkpoint that records
  framing bos_eos (published MDLM/SDTT weights, the paper presets) is scored instead on windows
  [BOS] + L-2 tokens + [EOS], all L positions counted as in MDLM's val loss (--framing overrides).
- gen PPL: --num_samples samples of --gen_len tokens; the judge (fp32) scores tokens 2..L of each
  sample given the tokens before them (the first token is context only); per sample the mean NLL;
  gen PPL = exp(mean over samples) (--gen_ppl_protocol sdtt, the default: SDTT's run_eval.py). The same
  rule for the diffusion samples, an AR model's own samples (started from end-of-text, which the judge
  does not see) and real held-out text. --gen_ppl_protocol mdlm is MDLM's compute_generative_perplexity
  instead (decode, re-tokenise, judge-context chunks, token mean over the set, EOS after the first
  dropped: tinydiff.evaluate.corpus_nll); the table, the rows and the JSON name the protocol.
- entropy: unigram entropy (nats) of each sample, averaged; self-BLEU-4 over the sample set.
- sampling: --sampler with its knobs (default ancestral, temperature 1, no truncation: the model's own
  law), float64 draws; NFE = network calls per batch of samples.
- the exact lab (--data lab, docs/lab.md): each row also gets its TRUE cross-entropy CE = -log p(sample)/token
  beside H (the entropy of windows of gen_len tokens), the gen NLL with the true model as judge, the fraction
  of valid words and the word-histogram TV (tinydiff/lab/evaluate.py); the AR model's samples start from one
  token drawn from the language's stationary law (so a perfect model gives exact windows: CE = H), not eot.
  --oracle samples with the lab's exact denoiser instead of the network: its CE at K steps is the pure
  factorisation error of K-step sampling, e.g.
    python eval.py --ckpt runs/lab/mdlm/ckpt.pt --oracle --steps 4,8,16,32,64,128 --num_samples 256
- LAMBADA: last word with its leading space; contexts longer than the model's context are
  left-truncated (the count is printed). MDLM: one forward on context + [MASK]s; bound with
  --lambada_draws stratified t. Framing (--lambada_framing, printed and in the JSON): by default SDTT's
  protocol, [BOS] + context + [MASK]s + [EOS] with the EOS clamped ([BOS] + context for an AR model);
  none = context alone.
"""
import math
import os
import time

import torch

from tinydiff.run import ArgumentParser, add_sampler_args, int_list, knobs_from_args, run_main, validate
from tinydiff.common import (UserError, autocast_ctx, emit, load_checkpoint, make_generator, model_from_checkpoint,
                             pick_device, pick_dtype)
from tinydiff.data import FRAMINGS, checkpoint_data, load_meta, tokenizer_from_spec
from tinydiff.diffusion import get_schedule
from tinydiff.evaluate import (GEN_PPL_PROTOCOLS, LAMBADA_FRAMINGS, check_judge, heldout_len, heldout_windows, lambada,
                               mdlm_judge_tokens, read_lambada, retokenize, sample_metrics, val_metrics)
from tinydiff.sampling import ar_sample
from tinydiff.lab import OracleDenoiser
from tinydiff.lab import heldout_gap, lab_metrics, lab_of, lab_table
from tinydiff.sampling import describe, sample

parser = ArgumentParser(description=__doc__)
parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to evaluate (MDLM or AR)")
parser.add_argument("--judge", default=None, help="AR checkpoint that scores the samples (gen PPL); none: no gen PPL")
parser.add_argument("--gen_ppl_protocol", default="sdtt", choices=GEN_PPL_PROTOCOLS,
                    help="sdtt: the judge reads the sampled ids, per-sample mean NLL averaged over samples, every EOS "
                         "counted (SDTT's run_eval.py); mdlm: decode, re-tokenise for the judge, score in "
                         "judge-context chunks, token mean over the whole set, EOS after the first dropped (MDLM's "
                         "compute_generative_perplexity, used for the MDLM-family numbers)")
parser.add_argument("--retokenize", action="store_true",
                    help="allow a judge with another tokenizer: decode the samples to text and re-encode them")
parser.add_argument("--steps", type=int_list, default=None,
                    help="comma-separated diffusion step counts, one row each (default: the checkpoint's)")
parser.add_argument("--num_samples", type=int, default=16, help="samples per row")
parser.add_argument("--batch_size", type=int, default=16, help="samples generated (and windows scored) at once")
parser.add_argument("--gen_len", type=int, default=None, help="tokens per sample (default: the model's context)")
parser.add_argument("--seed", type=int, default=0, help="seed of the samples (the same for every row) and the t draws")
parser.add_argument("--val_tokens", type=int, default=None,
                    help="held-out tokens scored for val PPL (0 = skip; default: the checkpoint's --eval_tokens, else 32768)")
parser.add_argument("--val_draws", type=int, default=None,
                    help="stratified t draws per window for the MDLM bound (default: the checkpoint's --eval_draws, "
                         "else 4): with the defaults eval.py reproduces the bound train.py reported")
parser.add_argument("--lambada", default=None, help="LAMBADA file, OpenAI jsonl with a \"text\" field per line")
parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N LAMBADA passages")
parser.add_argument("--lambada_draws", type=int, default=8, help="stratified t draws per passage for the MDLM bound")
parser.add_argument("--lambada_batch", type=int, default=64, help="network rows per LAMBADA forward pass")
parser.add_argument("--lambada_framing", default=None, choices=LAMBADA_FRAMINGS,
                    help="sdtt: [BOS] + context + [MASK]s + [EOS] (EOS clamped; AR: [BOS] + context), as SDTT "
                         "evaluates both model kinds; none: context + [MASK]s. Default: sdtt (the tokenizer's "
                         "end-of-text is BOS and EOS)")
parser.add_argument("--data", default=None, help="data source for the held-out text (default: the checkpoint's)")
parser.add_argument("--framing", default=None, choices=FRAMINGS,
                    help="held-out windows for val PPL: none, or bos_eos = [BOS] + L-2 tokens + [EOS] as MDLM/SDTT "
                         "trained (default: the checkpoint's; a published MDLM/SDTT DiT records bos_eos)")
parser.add_argument("--oracle", action="store_true",
                    help="lab data only: sample with the lab's exact denoiser instead of the checkpoint's network")
parser.add_argument("--lab_draws", type=int, default=2048, help="lab: windows drawn to estimate the entropy H")
parser.add_argument("--no_ema", action="store_true", help="use raw weights instead of the EMA (model and judge)")
parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
parser.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (network; draws float64, judge float32)")
add_sampler_args(parser)  # --sampler and its knobs (diffusion rows; an AR model takes --temperature/--top_k/--top_p)
args = parser.parse_args()
GEN_PPL_ABOUT = {
    "sdtt": "the judge reads the sampled ids (or their re-encoding); per sample the mean NLL of tokens 2..L, "
            "every EOS counted; gen PPL = exp(mean over samples) (SDTT's run_eval.py)",
    "mdlm": "samples decoded and re-tokenised for the judge, padded with EOS in groups of 8, scored in chunks of "
            "the judge's context, EOS after a chunk's first dropped; gen PPL = exp(total NLL / scored tokens) "
            "(MDLM's compute_generative_perplexity)"}


def main():
    # ------------------------------------------------------------------ device, model, judge
    validate(args)
    device, why = pick_device(args.device)
    dtype, _ = pick_dtype(args.dtype, device)
    autocast = autocast_ctx(device, dtype)
    print(f"device {device} ({why}) | network dtype {dtype} | sampling draws float64 | judge float32")
    ckpt = load_checkpoint(args.ckpt)
    kind, tok = "mdlm" if args.oracle else ckpt["kind"], tokenizer_from_spec(ckpt["tokenizer"])
    model = model_from_checkpoint(ckpt, device, use_ema=not args.no_ema)
    context, mask_id = model.cfg.seq_len, tok.vocab_size if args.oracle else ckpt.get("mask_id")
    schedule = get_schedule(ckpt.get("schedule"))  # the model's alpha_t: its bound's weights, its sampler's grid
    L = args.gen_len or context
    if kind == "ar":  # one AR sampler: it takes the common knobs only
        sampler, knobs = "ar", knobs_from_args("ancestral", args)  # ancestral's knobs: the common ones
    else:
        sampler, knobs = args.sampler, knobs_from_args(args.sampler, args)
    if L < 2 or (L > context and sampler != "semi_ar"):
        raise UserError(f"--gen_len {L} must be between 2 and the model's context {context} "
                        f"(longer: --sampler semi_ar)")
    steps_list = args.steps or [ckpt.get("sample_steps") or L]
    trained = ckpt.get("args") or {}  # the held-out bound train.py reported: same tokens, draws and seed 0
    args.val_tokens = args.val_tokens if args.val_tokens is not None else trained.get("eval_tokens", 32768)
    args.val_draws = args.val_draws if args.val_draws is not None else trained.get("eval_draws", 4)
    if kind == "ar" and args.steps:
        print("note: --steps is ignored for an AR model (it samples one token per step: NFE = gen_len)")
    print(f"model {args.ckpt}: {kind}, {model.num_params() / 1e6:.2f}M parameters, context {context}, "
          f"tokenizer {tok.name}, {'raw' if args.no_ema else 'EMA'} weights")

    judge, judge_tok, retok = None, None, False
    if args.judge:
        try:
            jckpt = load_checkpoint(args.judge, kind="ar")
        except UserError as e:
            raise UserError(f"judge: {e}") from None
        mdlm_ppl = args.gen_ppl_protocol == "mdlm"  # decoding and re-encoding is part of MDLM's protocol
        retok = check_judge(jckpt, tok, args.retokenize or mdlm_ppl, args.judge)
        judge_tok = tokenizer_from_spec(jckpt["tokenizer"])
        judge = model_from_checkpoint(jckpt, device, use_ema=not args.no_ema)
        if not retok and not mdlm_ppl and L - 1 > judge.cfg.seq_len:
            raise UserError(f"the judge's context {judge.cfg.seq_len} is too short for samples of {L} tokens "
                            f"(it reads L-1): use --gen_len {judge.cfg.seq_len + 1} or less")
        print(f"judge {args.judge}: {judge.num_params() / 1e6:.2f}M parameters, context {judge.cfg.seq_len}, "
              f"tokenizer {judge_tok.name}" + (f" -- samples are DECODED to text and RE-ENCODED with {judge_tok.name}"
                                               f" (tokenizers differ), at most {judge.cfg.seq_len + 1} tokens each"
                                               if retok else ""))
        print(f"gen PPL protocol {args.gen_ppl_protocol}: " + GEN_PPL_ABOUT[args.gen_ppl_protocol])
        if os.path.abspath(args.judge) == os.path.abspath(args.ckpt):
            print("note: the judge is the evaluated model itself: its gen PPL is circular (its own entropy rate)")

    # ------------------------------------------------------------------ held-out data and val PPL
    data_dir = checkpoint_data(ckpt, args.data, what=args.ckpt)  # the folder it was trained on, unless --data
    lab = lab_of(data_dir)  # the exact lab, or None
    if args.oracle:
        if lab is None:
            raise UserError(f"--oracle needs a checkpoint trained on the lab (--data lab); {data_dir} is not the lab")
        model = OracleDenoiser(lab)
        print(f"ORACLE: sampling with the exact denoiser of {load_meta(data_dir)['source']}, not the network")
    record = {"ckpt": args.ckpt, "kind": kind, "tokenizer": tok.name, "data_dir": str(data_dir), "ema": not args.no_ema,
              "judge": args.judge, "judge_tokenizer": judge_tok.name if judge_tok else None, "retokenized": retok,
              "judge_dtype": "float32", "network_dtype": dtype, "sampling_dtype": "float64", "device": device,
              "seed": args.seed, "num_samples": args.num_samples, "gen_len": L, "batch_size": args.batch_size,
              "steps": steps_list if kind == "mdlm" else None, "val_ppl": None,
              "sampler": sampler, "sampler_knobs": knobs, "oracle": args.oracle,
              "schedule": schedule.name if kind == "mdlm" else None}
    framing = args.framing or ckpt.get("framing", "none")  # how the model's training windows were framed
    record["val_framing"] = framing
    if args.val_tokens > 0:
        t0 = time.time()
        vlen = heldout_len(data_dir, context) if framing == "none" else context  # a small file: fewer tokens
        val_x, n_scored = heldout_windows(data_dir, kind, vlen, args.val_tokens, framing)  # (n, L) or (n, L+1)
        vm = val_metrics(model, kind, val_x.to(device), mask_id, args.val_draws, args.seed, args.batch_size, autocast,
                         schedule)
        how = "exact NLL" if kind == "ar" else f"NELBO bound, {args.val_draws} t draws/window"
        where = (f"v_1..v_{n_scored} of {data_dir}/val.bin, windows of {vlen}" if framing == "none" else
                 f"{len(val_x)} windows [BOS] + {vlen - 2} tokens of {data_dir}/val.bin + [EOS], framing bos_eos"
                 f" as MDLM/SDTT trained; the two framing positions are scored, as in MDLM's val loss")
        se = f" (s.e. {vm['val_loss_se']:.4f} over {len(val_x)} windows)" if vm["val_loss_se"] is not None else ""
        print(f"val: {n_scored:,} scored positions ({where}): loss {vm['val_loss']:.4f} nats/token{se}, "
              f"PPL {vm['val_ppl']:.3f} ({how}, seed {args.seed}, {time.time() - t0:.1f}s)")
        record.update(val_loss=vm["val_loss"], val_loss_se=vm["val_loss_se"], val_ppl=vm["val_ppl"],
                      val_scored_tokens=n_scored,
                      val_draws=args.val_draws if kind == "mdlm" else None, val_ppl_judge=None)
        if lab is not None:  # paired per window against the true NLL of the same tokens (own t draws)
            g = record["val_lab"] = heldout_gap(model, kind, lab, val_x.to(device), mask_id, args.val_draws,
                                                args.seed, args.batch_size, autocast, schedule)
            print(f"val (lab): model {g['model']:.4f} - true NLL of the same tokens {g['true']:.4f} = gap "
                  f"{g['gap']:+.4f} ± {g['gap_se']:.4f} nats/token ({g['windows']} windows)")
        if judge is not None and not retok and judge.cfg.seq_len >= vlen:  # the judge on the same tokens
            jx, _ = heldout_windows(data_dir, "ar", vlen, args.val_tokens, framing)
            record["val_ppl_judge"] = val_metrics(judge, "ar", jx.to(device), batch_size=args.batch_size)["val_ppl"]
            print(f"val: the judge on the same tokens: PPL {record['val_ppl_judge']:.3f} (exact NLL)")

    # ------------------------------------------------------------------ samples: one row per step count
    def net(*a, **k):
        with autocast():
            return model(*a, **k)
    cache_dtype = torch.bfloat16 if dtype == "bfloat16" else None  # the KV cache in the compute dtype: no copies

    def judged(samples):  # the samples as the judge reads them
        if judge is not None and args.gen_ppl_protocol == "mdlm":
            return mdlm_judge_tokens(samples, tok, judge_tok, samples.shape[1])  # truncated to the sample length
        if judge is None or not retok:
            return None
        return retokenize(samples, tok, judge_tok, judge.cfg.seq_len + 1)

    def metrics(samples):
        return sample_metrics(samples, judge, judged(samples), args.batch_size, args.gen_ppl_protocol,
                              judge_tok and judge_tok.eot_id, judge and judge.cfg.seq_len)

    def generate(steps):
        """num_samples samples (n, L), mean NFE per batch, seconds. The same seed for every row."""
        gen, rows, nfes = make_generator(args.seed, device), [], []
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.time()
        for start in range(0, args.num_samples, args.batch_size):
            b = min(args.batch_size, args.num_samples - start)
            if kind == "mdlm":
                x, nfe = sample(sampler, net, (b, L), steps, mask_id, gen, context, device, schedule, **knobs)  # (b, L)
            else:  # start from end-of-text (lab: a stationary token), L + 1 tokens in all, drop the start token
                prompt = torch.full((b, 1), tok.eot_id, dtype=torch.long, device=device)
                if lab is not None:  # the lab: one token from the stationary law, so a perfect model gives exact windows
                    prompt = lab.sample(b, 1, torch.Generator().manual_seed(args.seed + start)).to(device)
                x, nfe = ar_sample(net, b, L + 1, prompt, gen, **knobs, cache=model.new_cache(b, L + 1, cache_dtype))
                x = x[:, 1:]  # (b, L)
            rows.append(x)
            nfes.append(nfe)
        torch.cuda.synchronize() if device == "cuda" else None
        return torch.cat(rows), sum(nfes) / len(nfes), time.time() - t0

    table, samples_by_row = [], []
    for steps in (steps_list if kind == "mdlm" else [None]):
        x, nfe, seconds = generate(steps)
        samples_by_row.append(x)
        m = metrics(x)
        label = str(steps) if kind == "mdlm" else "ar"
        table.append({"row": label, "steps": steps if kind == "mdlm" else L, "nfe": nfe, "seconds": seconds,
                      "tokens_per_sec": len(x) * L / seconds, **m})
        print(f"{label:>6}: {tok.decode(x[0, :120].tolist())!r}")
    real = heldout_windows(data_dir, "mdlm", L, args.num_samples * L)[0][:args.num_samples].to(device)  # (n', L)
    table.append({"row": "real", "steps": None, "nfe": None, "seconds": None, "tokens_per_sec": None,
                  **metrics(real), "num_samples": len(real)})

    lab_H = None
    if lab is not None:  # exact figures per row, against the entropy of L-windows
        lab_H = lab.entropy(L, args.lab_draws, args.seed)
        for r, x_r in zip(table, samples_by_row + [real]):
            r.update(lab_metrics(lab, x_r))

    # ------------------------------------------------------------------ LAMBADA
    lam = None
    if args.lambada:
        passages = read_lambada(args.lambada, args.limit)
        t0 = time.time()
        lam = lambada(net, kind, tok, passages, context, mask_id, args.lambada_draws, args.seed, device=device,
                      batch_size=args.lambada_batch, framing=args.lambada_framing, schedule=schedule)
        print(f"LAMBADA: {lam['n']} passages ({args.lambada}), {lam['truncated']} contexts left-truncated to fit the "
              f"context of {context} tokens, {lam['target_tokens']:.2f} target tokens/word ({time.time() - t0:.1f}s)")
        protocol = {("sdtt", "mdlm"): "[BOS] + context + [MASK] x m + [EOS], EOS clamped (SDTT's eval_lambada)",
                    ("sdtt", "ar"): "[BOS] + context + target, teacher-forced (SDTT's harness_gpt2 --add_bos)",
                    ("none", "mdlm"): "context + [MASK] x m, no BOS/EOS",
                    ("none", "ar"): "context + target, teacher-forced, no BOS"}[lam["framing"], kind]
        print(f"LAMBADA protocol: framing {lam['framing']}: {protocol}")

    # ------------------------------------------------------------------ table and JSON
    f = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    print(f"\n{kind} {args.ckpt} | sampler {describe(sampler, knobs)} | {args.num_samples} samples x {L} tokens, "
          f"seed {args.seed} | judge {args.judge}"
          + (" (re-encoded)" if retok else "") + (f" | gen PPL protocol {args.gen_ppl_protocol}" if judge else ""))
    print(f"{'row':>6} {'steps':>6} {'NFE':>7} {'seconds':>8} {'gen PPL':>9} {'(NLL se)':>8} {'entropy':>8} "
          f"{'self-BLEU':>9} {'protocol':>8}")
    for r in table:
        print(f"{r['row']:>6} {f(r['steps'], 'd'):>6} {f(r['nfe'], '.1f'):>7} {f(r['seconds'], '.2f'):>8} "
              f"{f(r.get('gen_ppl'), '.3f'):>9} {f(r.get('gen_nll_se'), '.4f'):>8} {f(r['entropy'], '.4f'):>8} "
              f"{f(r['self_bleu'], '.4f'):>9} {r.get('gen_ppl_protocol') or '-':>8}")
    print("(real = held-out text windows of the same length; entropy = unigram entropy in nats, per sample, averaged;"
          " NLL se = standard error of the gen NLL in nats: sdtt, of the mean per-sample NLL; mdlm, of the token"
          " mean, ratio estimator over samples)")
    if record["val_ppl"] is not None:
        print(f"val PPL {record['val_ppl']:.3f}" + (" (bound)" if kind == "mdlm" else " (exact)")
              + f" [windows: framing {framing}]"
              + (f" | judge val PPL {record['val_ppl_judge']:.3f}" if record.get("val_ppl_judge") else ""))
    if lab_H is not None:
        print(lab_table(table, lab_H))
    if lam:
        what = "exact" if kind == "ar" else "NELBO bound"
        print(f"LAMBADA acc {lam['acc']:.4f} | per-word NLL {lam['nll']:.3f} nats ({what}) | n {lam['n']} "
              f"| framing {lam['framing']}")

    record.update(rows=table, gen_ppl={r["row"]: r.get("gen_ppl") for r in table},
                  gen_ppl_protocol=args.gen_ppl_protocol if judge else None,
                  entropy={r["row"]: r["entropy"] for r in table}, self_bleu={r["row"]: r["self_bleu"] for r in table},
                  nfe={r["row"]: r["nfe"] for r in table}, seconds={r["row"]: r["seconds"] for r in table},
                  lambada_acc=lam and lam["acc"], lambada_nll=lam and lam["nll"], lambada_ppl=lam and lam["ppl"],
                  lambada_n=lam and lam["n"], lambada_truncated=lam and lam["truncated"], lambada_file=args.lambada,
                  lambada_framing=lam and lam["framing"], lab_H=lab_H,
                  lambada_limit=args.limit, lambada_draws=args.lambada_draws if lam and kind == "mdlm" else None)
    emit(record)


if __name__ == "__main__":
    run_main(main)
