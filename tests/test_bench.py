"""bench.py and timing.py: the crossover and roofline computations against hand-made numbers,
the timer's protocol, and the script end to end on a tiny model (its JSON last line has every field
the README and the issue promise)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tinydiff.common import save_checkpoint
from tinydiff.model import ModelConfig, Transformer
from tinydiff.sampling import ar_sample
from timing import crossover, known_gpu, make_decode, measure, roofline, weight_params

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(sampler, batch, ms, steps=None, how="eager"):
    return {"sampler": sampler, "batch": batch, "ms_median": ms, "steps": steps, "nfe": steps, "how": how}


# ---------------------------------------------------------------- crossover


def test_crossover_synthetic_rows():
    rows = [
        # batch 1: diffusion costs 2.5 ms per step; the fastest cached AR (compiled, 100 ms) is the reference
        row("ar_cache", 1, 150.0), row("ar_cache", 1, 100.0, how="compiled"), row("ar_nocache", 1, 900.0),
        *[row("diffusion", 1, 2.5 * k, k) for k in (8, 16, 32, 64)],
        row("diffusion", 1, 500.0, 16, how="compiled"),  # a slower variant of 16 steps: the fastest one counts
        # batch 8: diffusion faster at every measured count
        row("ar_cache", 8, 1000.0), *[row("diffusion", 8, 10.0 * k, k) for k in (8, 16, 32)],
        # batch 32: never faster
        row("ar_cache", 32, 10.0), *[row("diffusion", 32, 100.0 * k, k) for k in (8, 16)],
        # batch 4: noisy, not monotone: faster at 64 but not at 32; the definition takes the largest
        row("ar_cache", 4, 100.0), row("diffusion", 4, 50.0, 16), row("diffusion", 4, 120.0, 32),
        row("diffusion", 4, 90.0, 64),
        # batch 2: no AR row to compare with
        row("diffusion", 2, 10.0, 8),
    ]
    c = crossover(rows)
    assert set(c) == {"1", "2", "4", "8", "32"}  # JSON-ready string keys
    assert c["1"]["max_steps_faster"] == 32 and c["1"]["ar_ms"] == 100.0 and not c["1"]["beyond_range"]
    assert c["1"]["steps_measured"] == [8, 16, 32, 64]
    assert c["1"]["parity_nfe"] == pytest.approx(40.0)  # ms = 2.5 NFE reaches 100 ms at 40
    assert c["8"]["max_steps_faster"] == 32 and c["8"]["beyond_range"]
    assert c["8"]["parity_nfe"] == pytest.approx(100.0)
    assert c["32"]["max_steps_faster"] is None and not c["32"]["beyond_range"]
    assert c["4"]["max_steps_faster"] == 64
    assert c["2"] is None
    assert crossover([row("diffusion", 1, 5.0, 8), row("ar_cache", 1, 10.0)])["1"]["parity_nfe"] is None  # one point


# ---------------------------------------------------------------- roofline


def test_roofline_hand_numbers():
    # W = 1e9 weights, 1 layer of width 1, L = 2, bf16 (2 bytes), 1 TFLOP/s, 100 GB/s:
    # AR step p: bytes = 2e9 + 2*1*1*p*1*2 = 2e9 + 4p -> 0.02 s (FLOPs: 2e9 + 4p -> 0.002 s): memory bound
    # diffusion pass: FLOPs = 1 * 2 * (2e9 + 4*1*2*1) = 4e9 + 16 -> 0.004 s; bytes 2e9 -> 0.02 s: memory bound
    r = roofline(1e9, 1, 1, 2, 1, 1, 1e12, 1e11)
    assert r["ar_s"] == pytest.approx((2e9 + 4) / 1e11 + (2e9 + 8) / 1e11, rel=1e-12)
    assert r["diffusion_s"] == pytest.approx(0.02, rel=1e-12)
    assert r["ratio"] == pytest.approx(2.0, rel=1e-6)
    assert r["ar_bound"] == "memory" and r["diffusion_bound"] == "memory"
    # 100x the FLOP/s makes no difference to either: both bound by bytes; 1000x the bandwidth flips both
    assert roofline(1e9, 1, 1, 2, 1, 1, 1e14, 1e11)["ratio"] == pytest.approx(2.0, rel=1e-6)
    fast_mem = roofline(1e9, 1, 1, 2, 1, 1, 1e12, 1e14)
    assert fast_mem["ar_bound"] == "compute" and fast_mem["diffusion_bound"] == "compute"
    assert fast_mem["ratio"] == pytest.approx((4e9 + 12) / (4e9 + 16), rel=1e-9)  # FLOPs against FLOPs


def test_roofline_paper_setting():
    """1.3B (24L/2048, GPT-2 vocab + mask, untied), batch 8, L = 1024, 16 steps, H100 SXM."""
    n_layer, d, V, L, B, K = 24, 2048, 50258, 1024, 8, 16
    W = n_layer * (12 * d * d + 13 * d) + 2 * d + V * d  # blocks (weights + biases + 2 LayerNorms), ln_f, head
    assert weight_params(n_layer, d, V) == W
    r = roofline(W, n_layer, d, L, B, K, 989e12, 3.35e12)
    # AR is memory bound at every step: weights + the keys/values of p positions, summed over p = 1..L
    kv_bytes = 2 * n_layer * B * d * 2 * L * (L + 1) / 2
    assert r["ar_s"] == pytest.approx((L * 2 * W + kv_bytes) / 3.35e12, rel=1e-9)
    assert r["diffusion_s"] == pytest.approx(K * B * L * (2 * W + 4 * n_layer * L * d) / 989e12, rel=1e-9)
    assert (r["ar_bound"], r["diffusion_bound"]) == ("memory", "compute")
    assert 2.5 < r["ratio"] < 3.1  # ~2.8x: the ideal speed-up of 16 steps at this setting


@pytest.mark.parametrize("n_layer,d,V", [(1, 8, 5), (3, 64, 101)])
def test_weight_params_is_the_models_count(n_layer, d, V):
    model = Transformer(ModelConfig(vocab_size=V, n_layer=n_layer, n_head=2, n_embd=d, seq_len=8))
    assert weight_params(n_layer, d, V) == model.num_params(non_embedding=True)
    # ... which is what the model's FLOP estimate counts 2 FLOPs per weight for
    assert model.estimate_flops_per_token(8, backward=False) == 2 * weight_params(n_layer, d, V) + 4 * n_layer * 8 * d


def test_known_gpu():
    assert known_gpu("NVIDIA H100 80GB HBM3")["peak_flops"] == 989e12
    assert known_gpu("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
    assert known_gpu("NVIDIA A100-SXM4-40GB")["name"] == "A100 40GB"
    assert known_gpu("NVIDIA A100-SXM4-80GB")["peak_flops"] == 312e12
    assert known_gpu("Tesla T4") is None  # unknown: no guess


# ---------------------------------------------------------------- timer and AR decode step


def test_measure_protocol():
    calls = {"fn": 0, "warm": 0}

    def fn():
        calls["fn"] += 1
        return calls["fn"]

    stats, out = measure(fn, "cpu", runs=5, warmup=2, warmup_fn=lambda: calls.__setitem__("warm", calls["warm"] + 1))
    assert calls == {"fn": 5, "warm": 2} and out == 5
    assert stats["runs"] == 5 and stats["ms_min"] <= stats["ms_median"] <= stats["ms_max"]
    assert stats["peak_mem_mb"] is None  # CPU: no allocator statistics, and we do not invent them


def tiny_ar():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=32, seq_len=16, causal=True)).eval()


@pytest.mark.parametrize("prefix_only", [False, True])
def test_decode_step_with_reused_cache_gives_the_same_samples(prefix_only):
    ar = tiny_ar()
    prompt = torch.randint(0, 11, (3, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, nfe = ar_sample(ar, 3, 16, prompt, torch.Generator().manual_seed(2),
                             cache=ar.new_cache(3, 16, prefix_only=prefix_only))
        cache = ar.new_cache(3, 16, prefix_only=prefix_only)
        decode = make_decode(ar, cache)
        for _ in range(2):  # the second call decodes over the first one's stale entries: they stay hidden
            x, n = ar_sample(ar, 3, 16, prompt, torch.Generator().manual_seed(2), decode=decode, cache=cache)
            assert torch.equal(x, ref) and n == nfe


def test_prefix_only_cache_matches_full_forward():
    """The eager cache path (keys written so far, no mask for one token) computes the same logits as a
    full causal forward and as the static path, up to float rounding."""
    ar = tiny_ar()
    x = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ar(x)  # (3, 12, V)
        cache = ar.new_cache(3, 16, prefix_only=True)
        got = [ar(x[:, :5], input_pos=torch.arange(5), cache=cache),  # prefill: a (5, 5) causal mask
               ar(x[:, 5:7], input_pos=torch.arange(5, 7), cache=cache)]  # a two-token chunk: (2, 7) mask
        got += [ar(x[:, p:p + 1], input_pos=torch.tensor([p]), cache=cache) for p in range(7, 12)]  # no mask
    assert torch.allclose(torch.cat(got, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.keys(torch.tensor([4]))[0] == 5 and cache.keys(torch.tensor([4]))[1] is None
    assert ar.new_cache(3, 16).keys(torch.tensor([4]))[1].shape == (1, 16)  # static: the whole buffer, masked


# ---------------------------------------------------------------- the script


def run_bench(*argv):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_bench_end_to_end():
    L = 8
    p = run_bench("--seq_len", str(L), "--batch_sizes", "1,2", "--steps", "2,4,32", "--runs", "5", "--threads", "1",
                  "--nocache_batches", "1", "--train_batch", "2", "--train_iters", "2", "--matmul_size", "128",
                  "--device", "cpu", "--compile", "false")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("machine", "device", "dtype", "compile", "torch", "seq_len", "runs"):
        assert key in out["header"]
    assert "LATENCY" in p.stdout and "CROSSOVER" in p.stdout and "ROOFLINE" in p.stdout and "THROUGHPUT" in p.stdout
    rows = out["rows"]
    assert {(r["sampler"], r["batch"]) for r in rows} == {("diffusion", 1), ("diffusion", 2), ("ar_cache", 1),
                                                          ("ar_cache", 2), ("ar_nocache", 1)}
    for r in rows:
        for key in ("how", "steps", "nfe", "ms_median", "ms_min", "ms_max", "runs", "tokens_per_s", "ms_per_sample",
                    "peak_mem_mb", "speedup_vs_ar"):
            assert key in r, key
        assert r["runs"] == 5 and 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        if r["sampler"] == "diffusion":
            assert 1 <= r["nfe"] <= min(r["steps"], r["batch"] * L) + 1 and r["overhead"] > 0
        else:
            assert r["nfe"] == L - 1  # one start token, then L - 1 decode steps (the prefill is the first)
    assert set(out["crossover"]) == {"1", "2"}
    assert all("max_steps_faster" in c for c in out["crossover"].values())
    assert out["overhead"]["goal"] == 1.15 and out["overhead"]["max"] > 0
    paper = out["roofline"][0]
    assert paper["size"] == "1.3b" and paper["batch"] == 8 and 2.5 < paper["ratio"] < 3.1
    tp = out["throughput"][0]
    assert tp["tokens_per_s"] > 0 and 0 < tp["mfu"] < 2 and "matmul" in tp["peak_source"]


def tiny_checkpoint(path, kind):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257 + (kind == "mdlm"), n_layer=1, n_head=2, n_embd=32, seq_len=16, causal=kind == "ar")
    save_checkpoint({"kind": kind, "config": cfg.to_dict(), "model": Transformer(cfg).state_dict(), "ema": None,
                     "mask_id": 257 if kind == "mdlm" else None,
                     "tokenizer": {"name": "bytes", "vocab_size": 257, "eot_id": 256}}, path)
    return str(path)


def test_bench_quality_section(tmp_path):
    judge, mdlm = tiny_checkpoint(tmp_path / "ar.pt", "ar"), tiny_checkpoint(tmp_path / "mdlm.pt", "mdlm")
    p = run_bench("--sections", "quality", "--judge", judge, "--ckpts", f"teacher={mdlm}", f"ar={judge}",
                  "--quality_steps", "2,8", "--num_samples", "4", "--sample_batch", "2", "--seq_len", "12",
                  "--plot", str(tmp_path / "q.png"), "--device", "cpu", "--threads", "1", "--compile", "false")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    q = out["quality"]
    assert [(r["model"], r["steps"]) for r in q] == [("teacher", 2), ("teacher", 8), ("ar", None)]
    for r in q:
        assert r["samples"] == 4 and r["ms_per_sample"] > 0 and r["gen_ppl"] > 1 and r["entropy"] > 0
    if importlib.util.find_spec("matplotlib"):
        assert out["plot"] == str(tmp_path / "q.png") and os.path.exists(out["plot"])
    else:  # optional: skipped with a message
        assert out["plot"] is None and "matplotlib is not installed" in p.stdout


def test_bench_bad_input():
    p = run_bench("--sections", "latency,nonsense")
    assert p.returncode == 2 and "unknown --sections" in p.stderr and "Traceback" not in p.stderr
