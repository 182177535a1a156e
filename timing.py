"""Measuring speed honestly: the helpers of bench.py, beside it (not part of the tinydiff package).

Timings exclude warm-up (where torch.compile compiles) and synchronise the device around every run; MFU is
measured against a datasheet peak for known GPUs or a matmul measured on the CPU (an unknown GPU gets no guess).
"""
import platform
import statistics
import time

import torch
import torch.nn as nn

# The SDTT paper's model sizes (Deschenaux & Gulcehre 2025; GPT-2 tokenizer, L = 1024) and tinydiff's CPU default.
# Heads give a head dimension of 64 (the paper gives depth and width); vocab is the tokenizer's (MDLM adds [MASK]).
SIZES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, seq_len=256, vocab=257),    # train.py's default, bytes
    "small": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab=50257),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, seq_len=1024, vocab=50257),
    "large": dict(n_layer=24, n_head=24, n_embd=1536, seq_len=1024, vocab=50257),
    "1.3b": dict(n_layer=24, n_head=32, n_embd=2048, seq_len=1024, vocab=50257),
}

# Datasheet peaks, dense (no 2:4 sparsity): bf16 tensor-core FLOP/s and memory bandwidth (bytes/s). Matched
# against torch.cuda.get_device_name() in order: the first entry whose substrings all occur.
GPUS = [
    (("H100", "PCIe"), "H100 PCIe", 756e12, 2.0e12),
    (("H100", "NVL"), "H100 NVL", 835e12, 3.9e12),
    (("H100",), "H100 SXM", 989e12, 3.35e12),
    (("GH200",), "GH200", 989e12, 4.0e12),
    (("H200",), "H200", 989e12, 4.8e12),
    (("A100", "40GB"), "A100 40GB", 312e12, 1.555e12),
    (("A100",), "A100 80GB", 312e12, 2.0e12),
    (("L40S",), "L40S", 362e12, 0.864e12),
    (("L4",), "L4", 121e12, 0.3e12),
]


def known_gpu(name):
    """{"name", "peak_flops", "mem_bw"} for a CUDA device name, or None if it is not in GPUS."""
    for keys, label, flops, bw in GPUS:
        if all(k in name for k in keys):
            return {"name": label, "peak_flops": flops, "mem_bw": bw}
    return None


H100_SXM = known_gpu("H100 SXM")


def sync(device):
    """Wait for queued kernels: without it a GPU timer measures only how fast work is launched."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def measure(fn, device, runs=5, warmup=1, warmup_fn=None):
    """Time fn() `runs` times after `warmup` untimed calls of warmup_fn (default fn) -> ({"ms_median", "ms_min",
    "ms_max", "runs", "peak_mem_mb"}, fn's last output). peak_mem_mb: the CUDA allocator's peak during the timed
    runs (weights included); None off CUDA, where torch keeps no allocator statistics."""
    for _ in range(warmup):
        (warmup_fn or fn)()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "runs": runs,
            "peak_mem_mb": peak}, out


def matmul_flops(device, dtype=torch.float32, n=2048, runs=5):
    """FLOP/s of an (n, n) @ (n, n) matmul on this device (median of `runs`): the CPU's practical peak."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    stats, _ = measure(lambda: a @ b, device, runs=runs, warmup=2)
    return 2 * n ** 3 / (stats["ms_median"] / 1e3)


class CachedDecoder(nn.Module):
    """One AR decode step, (token (B, 1), input_pos (1,)) -> logits (B, 1, V), the KV cache a submodule: compiled,
    its buffers are module state at fixed addresses, so CUDA graphs ("reduce-overhead") capture the in-place
    writes; they would skip a graph whose mutated tensors are inputs, as the cache is when passed as an argument."""

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, idx, input_pos):
        return self.model(idx, input_pos=input_pos, cache=self.cache)


def make_decode(model, cache, mode=None):
    """A `decode` for sampler.ar_sample bound to `cache`: eager (mode None) or torch.compile'd with
    `mode` ("default", "reduce-overhead", ...). Compilation happens at the first calls (warm-up)."""
    step = CachedDecoder(model, cache)
    if mode is not None:
        step = torch.compile(step, mode=None if mode == "default" else mode, fullgraph=True)
    graphs = mode == "reduce-overhead" and hasattr(torch.compiler, "cudagraph_mark_step_begin")

    owned = cache

    def decode(idx, input_pos, cache=None):
        assert cache is None or cache is owned, "this decode step owns its cache"
        if graphs:  # a new step: the previous replay's output may be overwritten (we copied what we need)
            torch.compiler.cudagraph_mark_step_begin()
        return step(idx, input_pos)
    return decode


def cudagraph_skips():
    """How many times inductor has declined to use CUDA graphs so far (it warns and runs without)."""
    try:
        from torch._dynamo.utils import counters
        return counters["inductor"]["cudagraph_skips"]
    except ImportError:  # an internal module: if it moves, we just cannot tell
        return 0


def weight_params(n_layer, n_embd, vocab_size):
    """Parameters a forward pass reads (the embedding lookup excluded), without building a model: equals
    Transformer.num_params(non_embedding=True), what estimate_flops_per_token counts (tested)."""
    d = n_embd  # per block: qkv, proj, fc, out (12 d^2 + 9 d) and two LayerNorms (4 d); final LayerNorm; head
    return n_layer * (12 * d * d + 13 * d) + 2 * d + vocab_size * d


def roofline(weight_params, n_layer, n_embd, seq_len, batch, steps, peak_flops, mem_bw, bytes_per_el=2):
    """Ideal time (every unit at its peak) to sample a batch of seq_len-token sequences, AR vs diffusion; each
    step takes max(FLOPs / peak, bytes / bandwidth). AR with a KV cache reads the weights once per token, so at
    small batch it is memory bound; a diffusion pass reads them once for batch * L tokens: compute bound.
    weight_params: what a forward pass reads (see weight_params). Returns both times, ratio = ar_s / diffusion_s
    and each side's bound."""
    W, d, b = weight_params, n_embd, bytes_per_el
    ar_s, ar_memory_steps = 0.0, 0
    for p in range(1, seq_len + 1):  # p keys in the cache, this token's included
        t_flops = batch * (2 * W + 4 * n_layer * p * d) / peak_flops  # 2 per weight; attention scores + values
        t_bytes = (W * b + 2 * n_layer * batch * p * d * b) / mem_bw  # weights once, keys and values of p positions
        ar_s += max(t_flops, t_bytes)
        ar_memory_steps += t_bytes >= t_flops
    pass_flops = batch * seq_len * (2 * W + 4 * n_layer * seq_len * d)
    t_flops, t_bytes = pass_flops / peak_flops, W * b / mem_bw  # activations are small next to the weights
    diffusion_s = steps * max(t_flops, t_bytes)
    return {"ar_s": ar_s, "diffusion_s": diffusion_s, "ratio": ar_s / diffusion_s,
            "ar_bound": "memory" if ar_memory_steps > seq_len / 2 else "compute",
            "diffusion_bound": "compute" if t_flops >= t_bytes else "memory",
            "ar_ms_per_token": ar_s / seq_len * 1e3, "diffusion_ms_per_pass": diffusion_s / steps * 1e3}


def crossover(rows):
    """Where diffusion stops being faster than the cached AR sampler, per batch size.

    rows: dicts with "sampler" ("diffusion", "ar_cache", ...), "batch", "steps", "nfe", "ms_median". Per batch
    size the reference ar_ms is the fastest "ar_cache" row (eager or compiled), and each diffusion step count its
    fastest row. Returns {str(batch) (for JSON): None (nothing to compare) or {"max_steps_faster" (None: never),
    "ar_ms", "steps_measured", "beyond_range" (faster even at the most steps measured), "parity_nfe" (where a
    least-squares line ms = a + b * NFE through the diffusion rows reaches ar_ms; None: < 2 distinct NFE)}}."""
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        ar = [r["ms_median"] for r in rows if r["batch"] == batch and r["sampler"] == "ar_cache"]
        best = {}  # steps -> the fastest diffusion row
        for r in (r for r in rows if r["batch"] == batch and r["sampler"] == "diffusion"):
            if r["steps"] not in best or r["ms_median"] < best[r["steps"]]["ms_median"]:
                best[r["steps"]] = r
        if not ar or not best:
            out[str(batch)] = None
            continue
        ar_ms = min(ar)
        faster = [k for k, r in best.items() if r["ms_median"] < ar_ms]
        out[str(batch)] = {"max_steps_faster": max(faster) if faster else None, "ar_ms": ar_ms,
                           "steps_measured": sorted(best), "beyond_range": bool(faster) and max(faster) == max(best),
                           "parity_nfe": _parity(list(best.values()), ar_ms)}
    return out


def _parity(rows, target_ms):
    """NFE where the least-squares line ms = a + b * nfe through rows reaches target_ms."""
    xs, ys = [r["nfe"] for r in rows], [r["ms_median"] for r in rows]
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return None
    return (target_ms - (my - slope * mx)) / slope


# ----------------------------------------------------------------------------- report

def cpu_name():
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, cols):
    """Print rows (dicts) as one right-aligned text table; cols: (header, key, format spec); None -> '-'."""
    cells = [[h for h, _, _ in cols]] + [[fmt(r.get(k), spec) for _, k, spec in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def plot_quality(rows, path, xlabel):
    """Gen PPL and entropy against latency per sample (the SDTT paper's Figure 1), one line per model,
    each point labelled with its step count. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): skipped the quality-vs-latency plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in zip(axes, ("gen_ppl", "entropy"), ("gen PPL (judge)", "unigram entropy (nats)")):
        for label in dict.fromkeys(r["model"] for r in rows):  # models in order of appearance
            pts = [r for r in rows if r["model"] == label]
            ax.plot([r["ms_per_sample"] for r in pts], [r[key] for r in pts], "o-", label=label)
            for r in pts:
                ax.annotate(label if r["steps"] is None else str(r["steps"]), (r["ms_per_sample"], r[key]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle("quality vs latency (point labels: sampling steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path
