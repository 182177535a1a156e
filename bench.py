"""Speed, honestly: diffusion sampling vs KV-cached AR, training throughput and MFU, the roofline
prediction for the paper's setting, and quality against latency (docs/samplers.md, docs/evaluation.md §2).

Every setting is in the header (machine, device, dtype, compile, torch). Timings exclude warm-up
(compilation happens there), synchronise the device around every timed run and report the median
and min-max over --runs runs. The AR baseline is as fast as we can make it: a static KV cache reused
across calls, the prompt prefilled in one pass; eager, attention reads only the keys written so far;
compiled (when compile is on), one static shape over the whole cache, with CUDA graphs on CUDA. The
"ar_nocache" row re-runs the whole prefix per token, to show what the cache buys.

CPU, the README latency table (tiny = train.py's 4L/128d default, random weights):
    python bench.py --size tiny --seq_len 256 --batch_sizes 1,8,32 --steps 8,16,32,64,128,256 \
        --compile both --sections latency,roofline
CPU, every sampler of docs/samplers.md (ms per sample and NFE; a trained checkpoint, so that the adaptive
`threshold` sees real confidences), knobs as in sample.py:
    python bench.py --ckpt out/ckpt.pt --batch_sizes 1,8 --steps 16,64,256 --sections latency \
        --samplers ancestral,confidence,threshold,remdm,semi_ar
CPU, training throughput / MFU of the default config (eager, batch 32 x 256):
    python bench.py --size tiny --sections throughput
GPU, the paper's setting (1.3B, batch 8, L = 1024, 16 steps; the roofline prediction beside it):
    python bench.py --size 1.3b --batch_sizes 8 --steps 16,32,64 --sections latency,roofline
Quality against latency (the paper's Figure 1) from real checkpoints, judged by an AR model:
    python bench.py --sections quality --judge out-judge/ckpt.pt \
        --ckpts mdlm=out/ckpt.pt sdtt=out-sdtt/ckpt.pt ar=out-ar/ckpt.pt --quality_steps 16,64,256
"""
import math
import os
import platform
import statistics

import torch

from tinydiff.run import ArgumentParser, add_sampler_args, int_list, knobs_from_args, run_main, validate
from tinydiff.common import (UserError, autocast_ctx, emit, load_checkpoint, model_from_checkpoint, pick_device,
                             pick_dtype)
from tinydiff.data import tokenizer_from_spec
from tinydiff.diffusion import forward_mask, get_schedule, nelbo_loss, sample_times
from tinydiff.evaluate import check_judge, retokenize, sample_metrics
from tinydiff.common import EMA, make_optimizer
from tinydiff.model import ModelConfig, Transformer
from tinydiff.sampling import ar_sample
from tinydiff.sampling import describe, sample
from timing import (H100_SXM, SIZES, cpu_name, crossover, cudagraph_skips, fmt, known_gpu, make_decode,
                             matmul_flops, measure, plot_quality, print_table, roofline,
                             weight_params)

parser = ArgumentParser(description=__doc__)
parser.add_argument("--sections", default="latency,throughput,roofline",
                    help="comma list of latency, throughput, roofline, quality (quality needs --judge and --ckpts)")
parser.add_argument("--size", default="tiny", choices=list(SIZES), help="random-weight model shape (paper's + tiny)")
parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: 256 tiny, 1024 others)")
parser.add_argument("--batch_sizes", type=int_list, default=[1, 8, 32], help="comma list of batch sizes")
parser.add_argument("--steps", type=int_list, default=[8, 16, 32, 64, 128, 256], help="comma list of diffusion steps")
parser.add_argument("--samplers", type=lambda s: [v for v in s.split(",") if v], default=["ancestral"],
                    help="latency and quality: comma list of diffusion samplers (docs/samplers.md; their knobs below); "
                         "ancestral rows are labelled 'diffusion'")
parser.add_argument("--runs", type=int, default=5, help="timed runs per row (median, min-max); >= 5 for a table")
parser.add_argument("--nocache_batches", type=int_list, default=[1],
                    help="batch sizes that also get the AR-without-cache row (O(L^2) work: slow)")
parser.add_argument("--ckpt", default=None, help="latency: time this MDLM checkpoint instead of random weights")
parser.add_argument("--ar_ckpt", default=None, help="latency: time this AR checkpoint instead of random weights")
parser.add_argument("--train_batch", type=int, default=32, help="throughput: sequences per training step")
parser.add_argument("--train_iters", type=int, default=10, help="throughput: timed training steps")
parser.add_argument("--matmul_size", type=int, default=2048, help="throughput (CPU): n of the n x n matmul peak")
parser.add_argument("--judge", default=None, help="quality: AR checkpoint that scores the samples (gen PPL)")
parser.add_argument("--ckpts", nargs="*", default=[], help="quality: LABEL=PATH (or PATH) of MDLM/SDTT/AR checkpoints")
parser.add_argument("--quality_steps", type=int_list, default=[16, 32, 64, 128, 256], help="quality: MDLM step counts")
parser.add_argument("--num_samples", type=int, default=16, help="quality: samples per point (whole batches)")
parser.add_argument("--sample_batch", type=int, default=8, help="quality: samples generated at once")
parser.add_argument("--retokenize", action="store_true", help="quality: allow a judge with another tokenizer")
parser.add_argument("--plot", default="bench_quality.png", help="quality: where the PNG goes (needs matplotlib)")
parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
parser.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (sampling: weights; training: autocast)")
parser.add_argument("--compile", default="auto", choices=["auto", "true", "false", "both"],
                    help="auto = on for CUDA only; both = time everything eager and compiled")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
parser.add_argument("--seed", type=int, default=0, help="seed for weights and sampling")
add_sampler_args(parser, choose=False)  # the knobs of --samplers
args = parser.parse_args()


def random_model(kind, seq_len):
    """Random weights of --size: the AR model gets the tokenizer vocab, the MDLM one more row for [MASK]."""
    s = SIZES[args.size]
    torch.manual_seed(args.seed)
    return Transformer(ModelConfig(vocab_size=s["vocab"] + (kind == "mdlm"), n_layer=s["n_layer"], n_head=s["n_head"],
                                   n_embd=s["n_embd"], seq_len=seq_len, causal=kind == "ar"))


def load_model(path, kind, seq_len):
    """(model on device, eval, weights in the sampling dtype; mask_id; start token; noise schedule): checkpoint
    (its own schedule) or random (log-linear)."""
    if path:
        ck = load_checkpoint(path, kind=kind)
        model, mask_id, bos = model_from_checkpoint(ck, device), ck.get("mask_id"), ck["tokenizer"]["eot_id"]
        schedule = get_schedule(ck.get("schedule"))
    else:
        vocab = SIZES[args.size]["vocab"]
        model, mask_id, bos, schedule = random_model(kind, seq_len).eval(), vocab, vocab - 1, get_schedule()
    if seq_len > model.cfg.seq_len:
        raise UserError(f"--seq_len {seq_len} is beyond the {kind} model's context {model.cfg.seq_len}")
    # bf16 weights, not autocast, for sampling: autocast re-casts every fp32 weight at every decode step,
    # which would triple the bytes a memory-bound AR step reads
    return model.to(device=device, dtype=wdtype), mask_id, bos, schedule


def gen(seed_offset=0):
    return torch.Generator(device=device).manual_seed(args.seed + seed_offset)


def compiled_decode(model, cache, compiled):
    """(decode for ar_sample, how): eager, or compiled with CUDA graphs on CUDA (plain compile elsewhere)."""
    mode = ("reduce-overhead" if device == "cuda" else "default") if compiled else None
    how = "eager" if mode is None else f"compiled ({mode})"
    return make_decode(model, cache, mode), how + (", prefix keys" if cache.prefix_only else ", static keys")


def latency(L):
    """Rows per batch size: diffusion at each --steps, AR with cache, AR without cache; plus the bare
    forward time of the diffusion model. Every call re-seeds its generator: every timed run does the same work."""
    mdlm, mask_id, _, schedule = load_model(args.ckpt, "mdlm", L)
    ar, _, bos, _ = load_model(args.ar_ckpt, "ar", L)
    rows, forward_ms = [], {}
    for B in args.batch_sizes:
        z = torch.full((B, L), mask_id, dtype=torch.long, device=device)  # (B, L); the cost does not depend on content
        for compiled in modes:
            net = torch.compile(mdlm, dynamic=False) if compiled else mdlm  # one specialised graph per batch size
            forward_ms[(B, compiled)] = measure(lambda: net(z), device, args.runs, warmup=2)[0]["ms_median"]
            for name, K in [(name, K) for name in args.samplers for K in args.steps]:
                run = lambda k=K, n=name: sample(n, net, (B, L), k, mask_id, gen(), L, device, schedule, **knobs[n])
                # warm-up with at most 8 steps: the same forward shape (so compilation is done), and cheap
                stats, (_, nfe) = measure(run, device, args.runs, warmup=1, warmup_fn=lambda: run(min(K, 8)))
                rows.append({"sampler": "diffusion" if name == "ancestral" else name, "method": name,
                             "knobs": knobs[name], "how": "compiled" if compiled else "eager", "batch": B,
                             "steps": K, "nfe": nfe, **stats,
                             "overhead": stats["ms_median"] / nfe / forward_ms[(B, compiled)]})
        prompt = torch.full((B, 1), bos, dtype=torch.long, device=device)  # (B, 1): one start token, L - 1 generated
        for compiled in modes:
            # one cache per batch size, reused by every call; eager attends over the written prefix only
            cache = ar.new_cache(B, L, dtype=wdtype, prefix_only=not compiled)
            (decode, how), skips = compiled_decode(ar, cache, compiled), cudagraph_skips()
            run = lambda: ar_sample(ar, B, L, prompt, gen(), decode=decode, cache=cache)
            try:
                stats, (_, nfe) = measure(run, device, args.runs, warmup=2)
            except Exception as e:  # CUDA graphs refused outright: fall back to plain compile, and say so
                if "reduce-overhead" not in how:
                    raise
                print(f"note: the decode step with CUDA graphs failed ({type(e).__name__}: {e}); plain compile")
                decode, how = make_decode(ar, cache, "default"), "compiled (default), static keys"
                stats, (_, nfe) = measure(run, device, args.runs, warmup=2)
            if cudagraph_skips() > skips:
                how += ", CUDA graphs skipped (see inductor's warning)"
            rows.append({"sampler": "ar_cache", "how": how, "batch": B, "steps": None, "nfe": nfe, **stats})
        if B in args.nocache_batches:  # eager only: a compiled full forward would recompile for every length
            run = lambda n=L: ar_sample(ar, B, n, prompt, gen(), use_cache=False)
            stats, (_, nfe) = measure(run, device, args.runs, warmup=1, warmup_fn=lambda: run(min(L, 16)))
            rows.append({"sampler": "ar_nocache", "how": "eager", "batch": B, "steps": None, "nfe": nfe, **stats})
    for r in rows:
        best_ar = min(a["ms_median"] for a in rows if a["batch"] == r["batch"] and a["sampler"] == "ar_cache")
        generated = L - 1 if r["sampler"].startswith("ar") else L  # AR is given its start token
        r.update(tokens_per_s=r["batch"] * generated / (r["ms_median"] / 1e3),
                 ms_per_sample=r["ms_median"] / r["batch"], speedup_vs_ar=best_ar / r["ms_median"])
    return rows, forward_ms


def throughput(L):
    """Tokens/s and MFU of train.py's MDLM step: NELBO forward + backward, clip, AdamW, EMA."""
    model = random_model("mdlm", L).to(device).train()  # fp32 weights, bf16 autocast on CUDA: train.py's policy
    opt, ema = make_optimizer(model, 1e-4, 0.0, device), EMA(model, 0.999)
    x = torch.randint(0, SIZES[args.size]["vocab"], (args.train_batch, L), device=device)  # (B, L): any text will do
    flops_per_token = model.estimate_flops_per_token(L)
    if device == "cuda":  # the datasheet peak of a known GPU in bf16; otherwise no MFU rather than a guess
        gpu = known_gpu(torch.cuda.get_device_name()) if dtype == "bfloat16" else None
        peak, peak_src = (gpu["peak_flops"], f"{gpu['name']} datasheet, bf16 dense") if gpu else \
            (None, f"no known peak for {torch.cuda.get_device_name()} in {dtype}: MFU not reported")
    else:
        peak = matmul_flops(device, wdtype, args.matmul_size)
        peak_src = f"{args.matmul_size}x{args.matmul_size} {dtype} matmul measured in this run"
    rows = []
    for compiled in modes:
        fwd, noise = torch.compile(model) if compiled else model, gen(1)

        def step():
            schedule, mask_id = get_schedule(), model.cfg.vocab_size - 1
            t = sample_times(len(x), noise, device)  # (B,)
            z = forward_mask(x, t, schedule, mask_id, noise)  # (B, L)
            with autocast():
                loss = nelbo_loss(fwd, x, z, t, schedule, mask_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
        stats, _ = measure(step, device, args.train_iters, warmup=2)
        flops = args.train_batch * L / (stats["ms_median"] / 1e3) * flops_per_token  # achieved FLOP/s
        rows.append({"how": "compiled" if compiled else "eager", "batch": args.train_batch, "seq_len": L, **stats,
                     "tokens_per_s": args.train_batch * L / (stats["ms_median"] / 1e3),
                     "flops_per_token": flops_per_token, "gflops": flops / 1e9, "peak_gflops": peak and peak / 1e9,
                     "peak_source": peak_src, "mfu": peak and flops / peak})
    return rows


def roofline_rows(L, lat_rows):
    """The prediction for the paper's setting on an H100 (and, on a known GPU, for every measured
    diffusion row of this run), with the measured speed-up beside it when this run measured that setting."""
    gpu = known_gpu(torch.cuda.get_device_name()) if device == "cuda" else None
    settings = [("paper: 1.3b on H100 SXM", "1.3b", 1024, 8, 16, H100_SXM)]
    if gpu and not args.ckpt:
        settings += [(f"this run: {args.size} on {gpu['name']}", args.size, L, r["batch"], r["steps"], gpu)
                     for r in lat_rows if r["sampler"] == "diffusion" and r["how"] == "compiled"]
    out = []
    for label, size, seq, B, K, hw in settings:
        s = SIZES[size]
        weights = weight_params(s["n_layer"], s["n_embd"], s["vocab"] + 1)  # the MDLM's vocab: tokenizer + [MASK]
        pred = roofline(weights, s["n_layer"], s["n_embd"], seq, B, K, hw["peak_flops"], hw["mem_bw"])
        here = gpu and gpu["name"] == hw["name"] and args.size == size and L == seq and not args.ckpt
        measured = [r["speedup_vs_ar"] for r in lat_rows if here and r["sampler"] == "diffusion"
                    and r["batch"] == B and r["steps"] == K]
        out.append({"setting": label, "size": size, "seq_len": seq, "batch": B, "steps": K, "weight_params": weights,
                    **pred, "ar_ms": pred["ar_s"] * 1e3, "diffusion_ms": pred["diffusion_s"] * 1e3,
                    "measured_speedup": max(measured) if measured else None})
    return out


def quality():
    """Gen PPL and entropy against latency per sample: each checkpoint, at each step count (MDLM)."""
    if not args.judge or not args.ckpts:
        raise UserError("the quality section needs --judge JUDGE.pt and --ckpts LABEL=PATH ...")
    jck = load_checkpoint(args.judge, kind="ar", what=f"--judge {args.judge}")
    judge, judge_tok = model_from_checkpoint(jck, device), tokenizer_from_spec(jck["tokenizer"])  # fp32 judge
    n_batches, rows = math.ceil(args.num_samples / args.sample_batch), []
    for spec in args.ckpts:
        label, path = spec.split("=", 1) if "=" in spec else (os.path.basename(os.path.dirname(spec)) or spec, spec)
        ck = load_checkpoint(path)
        tok = tokenizer_from_spec(ck["tokenizer"])
        retok = check_judge(jck, tok, args.retokenize, args.judge)
        model = model_from_checkpoint(ck, device).to(wdtype)  # the sampling dtype, as in the latency rows
        L, b, bos = min(args.seq_len or 10**9, model.cfg.seq_len), args.sample_batch, ck["tokenizer"]["eot_id"]
        if not retok and L - 1 > judge.cfg.seq_len:
            raise UserError(f"{L}-token samples exceed the judge's context {judge.cfg.seq_len}: lower --seq_len")
        if ck["kind"] == "ar":  # the same fast path as the latency rows; L tokens after the start token, as eval.py
            cache = model.new_cache(b, L + 1, dtype=wdtype, prefix_only=not modes[-1])
            decode = compiled_decode(model, cache, modes[-1])[0]
            start = torch.full((b, 1), bos, dtype=torch.long, device=device)  # (b, 1)
            generate = lambda n, K, seed: ar_sample(model, b, L + 1, start, gen(seed), decode=decode, cache=cache)
        else:
            net = torch.compile(model, dynamic=False) if modes[-1] else model
            schedule = get_schedule(ck.get("schedule"))  # the checkpoint's alpha_t: its reveal probabilities
            generate = lambda n, K, seed: sample(n, net, (b, L), K, ck["mask_id"], gen(seed), L, device, schedule,
                                                 **knobs[n])
        points = [("ar", None)] if ck["kind"] == "ar" else [(n, K) for n in args.samplers for K in args.quality_steps]
        for name, K in points:
            generate(name, K, 999)  # warm-up
            stats, outs = measure(lambda: [generate(name, K, i) for i in range(n_batches)], device, runs=1, warmup=0)
            samples = torch.cat([x[:, 1:] if ck["kind"] == "ar" else x for x, _ in outs])  # (n, L); AR: no start token
            judge_tokens = retokenize(samples, tok, judge_tok, judge.cfg.seq_len + 1) if retok else None  # it reads L-1
            m = sample_metrics(samples, judge, judge_tokens)
            rows.append({"model": label if name in ("ar", "ancestral") else f"{label}:{name}", "kind": ck["kind"],
                         "sampler": name, "knobs": knobs.get(name), "steps": K, "nfe": outs[0][1],
                         "samples": len(samples),
                         "ms_per_sample": stats["ms_median"] / len(samples), "gen_ppl": m["gen_ppl"],
                         "entropy": m["entropy"], "self_bleu": m["self_bleu"]})
    return rows


def report_latency(rows, forward_ms, L):
    print(f"\nLATENCY: one batch of {L}-token sequences; ms: median [min-max] of {args.runs} runs; AR generates L-1 "
          f"tokens after a start token; vs AR = fastest cached AR / row; step/fwd = (ms / NFE) / bare forward ms")
    print("samplers: " + "; ".join(describe(n, k) + (" (rows 'diffusion')" if n == "ancestral" else "")
                                   for n, k in knobs.items()) + "; NFE: network calls actually made")
    shown = [{**r, "ms": f"{r['ms_median']:.1f} [{r['ms_min']:.1f}-{r['ms_max']:.1f}]"} for r in rows]
    print_table(shown, [("sampler", "sampler", ""), ("how", "how", ""), ("batch", "batch", "d"),
                        ("steps", "steps", "d"), ("NFE", "nfe", "d"), ("ms/batch", "ms", ""),
                        ("ms/sample", "ms_per_sample", ".2f"), ("tok/s", "tokens_per_s", ".0f"),
                        ("peak MB", "peak_mem_mb", ".0f"), ("vs AR", "speedup_vs_ar", ".2f"),
                        ("step/fwd", "overhead", ".3f")])
    cross = crossover(rows)
    print("\nCROSSOVER: the largest measured step count at which diffusion is faster than the cached AR")
    for b, c in cross.items():
        k = c and c["max_steps_faster"]
        print(f"  batch {b:>3}: {'-' if not c else 'never' if k is None else k}"
              f"{' (faster at every measured count)' if c and c['beyond_range'] else ''}"
              + (f"; AR {c['ar_ms']:.1f} ms; a line through ms(NFE) reaches it at NFE ~ {fmt(c['parity_nfe'], '.0f')}"
                 if c else ""))
    within = [r["overhead"] for r in rows if r["sampler"] == "diffusion" and r["steps"] <= L]
    overhead = within and {"median": statistics.median(within), "max": max(within), "goal": 1.15}
    if overhead:
        print(f"\nSAMPLER OVERHEAD (steps <= L): step/fwd median {overhead['median']:.3f}, max {overhead['max']:.3f}; "
              f"goal <= 1.15: {'met' if overhead['max'] <= 1.15 else 'NOT met'}")
    return {"rows": rows, "crossover": cross, "overhead": overhead or None,
            "forward_ms": {f"{b}/{'compiled' if c else 'eager'}": v for (b, c), v in forward_ms.items()}}


def main():
    global device, dtype, modes, wdtype, autocast, knobs
    validate(args)
    knobs = {n: knobs_from_args(n, args) for n in args.samplers}  # checked before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    device, _ = pick_device(args.device)
    dtype, _ = pick_dtype(args.dtype, device)
    wdtype, autocast = getattr(torch, dtype), autocast_ctx(device, dtype)
    modes = {"auto": [device == "cuda"], "true": [True], "false": [False], "both": [False, True]}[args.compile]
    if (sections := set(args.sections.split(","))) - {"latency", "throughput", "roofline", "quality"}:
        raise UserError(f"unknown --sections {args.sections}: choose from latency, throughput, roofline, quality")
    if args.runs < 5:
        print(f"warning: --runs {args.runs} < 5: fine for a smoke test, not for a table")
    L = args.seq_len or SIZES[args.size]["seq_len"]
    header = {"machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cpus",
              "device": f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else cpu_name()})",
              "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
              "dtype": f"{dtype} (sampling: {dtype} weights, fp32 logits, fp64 draws; training: "
                       f"{'bf16 autocast' if dtype == 'bfloat16' else 'fp32'})",
              "compile": f"{args.compile}: " + " and ".join("compiled" if m else "eager" for m in modes)
                         + ("; AR decode step with CUDA graphs" if device == "cuda" and modes[-1] else ""),
              "model": f"checkpoints {args.ckpt} / {args.ar_ckpt}" if args.ckpt or args.ar_ckpt else
                       f"{args.size}: " + ", ".join(f"{k} {v}" for k, v in SIZES[args.size].items() if k != "seq_len"),
              "seq_len": L, "runs": args.runs}
    print("=" * 100)
    for k, v in header.items():
        print(f"{k:>8}: {v}")
    print("=" * 100)
    result = {"header": header}
    with torch.no_grad():
        if "latency" in sections:
            result.update(report_latency(*latency(L), L))
        if "roofline" in sections:
            result["roofline"] = roof = roofline_rows(L, result.get("rows", []))
            print("\nROOFLINE (ideal, 100% of peak, bf16: AR reads all weights and its KV cache once per token; "
                  "diffusion does the FLOPs of K full passes)")
            print_table(roof, [("setting", "setting", ""), ("batch", "batch", "d"), ("L", "seq_len", "d"),
                               ("steps", "steps", "d"), ("AR ms", "ar_ms", ".1f"), ("AR bound", "ar_bound", ""),
                               ("diffusion ms", "diffusion_ms", ".1f"), ("bound", "diffusion_bound", ""),
                               ("predicted speed-up", "ratio", ".2f"), ("measured", "measured_speedup", ".2f")])
    if "throughput" in sections:
        result["throughput"] = tp = throughput(L)
        print(f"\nTHROUGHPUT: MDLM training step (forward, backward, clip, AdamW, EMA), batch {args.train_batch} x {L}")
        print_table(tp, [("how", "how", ""), ("ms/step", "ms_median", ".1f"), ("tok/s", "tokens_per_s", ".0f"),
                         ("GFLOP/s", "gflops", ".1f"), ("peak GFLOP/s", "peak_gflops", ".1f"), ("MFU", "mfu", ".1%")])
        print(f"  peak: {tp[0]['peak_source']}" + ("; goal, default CPU config: MFU >= 50%" if device == "cpu" else ""))
    if "quality" in sections:
        with torch.no_grad():
            result["quality"] = q = quality()
        print(f"\nQUALITY vs LATENCY ({len(q) and q[0]['samples']} samples per point, batch {args.sample_batch}; "
              f"MDLM samplers: {'; '.join(describe(n, k) for n, k in knobs.items())})")
        print_table(q, [("model", "model", ""), ("steps", "steps", "d"), ("NFE", "nfe", "d"),
                        ("ms/sample", "ms_per_sample", ".1f"), ("gen PPL", "gen_ppl", ".2f"),
                        ("entropy", "entropy", ".3f"), ("self-BLEU", "self_bleu", ".3f")])
        result["plot"] = plot_quality(q, args.plot, f"latency per sample (ms, batch {args.sample_batch}, {device})")
    emit(result)


if __name__ == "__main__":
    run_main(main)
