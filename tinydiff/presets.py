"""Named recipes from the papers. `--preset NAME` makes a preset's values the script's defaults (printed when
applied); flags given on the command line still override them. What each costs (tokens, estimated GPU hours
from the FLOP count): `python -m tinydiff.presets`.

    python train.py --preset mdlm-owt-small --max_iters 100000   # MDLM small on OpenWebText, shorter
    python distill.py --preset sdtt-paper                        # SDTT from the published MDLM, 7 rounds

Sources: MDLM (Sahoo et al. 2024) section 4 / appendix and its repository (configs/config.yaml, model/small.yaml,
medium.yaml): AdamW lr 3e-4 (betas 0.9/0.999, no weight decay), 2.5k linear warm-up then constant, global batch
512 x 1024 tokens, 1M steps, bf16, grad clip 1, EMA 0.9999, dropout 0.1. -medium (24/1024/16) is MDLM's medium
config, -large (24/1536/16) SDTT's large scaling model; SDTT's scaling teachers trained 400k steps, as these two
do. SDTT (Deschenaux & Gulcehre 2025) section 4: 7 rounds x 10k steps, batch 128, lr 6e-5, 500 warm-up, teacher
1024 steps, EMA 0.9999. The global batch is micro-batch x accumulation; sizes are set for one 80 GB GPU.
"""
import torch

_OWT = dict(data="owt", tokenizer="gpt2", seq_len=1024, dtype="bfloat16", weight_decay=0.0, grad_clip=1.0,
            lr_schedule="constant", ema=0.9999)
# MDLM's data and network, not only its optimiser: [BOS] + 1022 tokens + [EOS] windows (mdlm _group_texts) and
# dropout on the residual branches only (its DiT's and AR baseline's bias_dropout_add_scale)
_MDLM_RECIPE = dict(_OWT, lr=3e-4, warmup=2500, dropout=0.1, max_iters=1_000_000, eval_interval=10_000,
                    eval_tokens=262_144, ckpt_interval=5_000, framing="bos_eos", dropout_sites="residual")

PRESETS = {
    "mdlm-owt-small": dict(_MDLM_RECIPE, script="train.py", model="mdlm", n_layer=12, n_embd=768, n_head=12,
                           batch_size=32, grad_accum=16, out_dir="out-mdlm-owt-small"),  # 169M in MDLM's count
    "mdlm-owt-medium": dict(_MDLM_RECIPE, script="train.py", model="mdlm", n_layer=24, n_embd=1024, n_head=16,
                            batch_size=16, grad_accum=32, max_iters=400_000, out_dir="out-mdlm-owt-medium"),
    "mdlm-owt-large": dict(_MDLM_RECIPE, script="train.py", model="mdlm", n_layer=24, n_embd=1536, n_head=16,
                           batch_size=8, grad_accum=64, max_iters=400_000, out_dir="out-mdlm-owt-large"),
    # MDLM's AR baseline: the same transformer (causal) and recipe
    "ar-owt-small": dict(_MDLM_RECIPE, script="train.py", model="ar", n_layer=12, n_embd=768, n_head=12,
                         batch_size=32, grad_accum=16, out_dir="out-ar-owt-small"),
    # starts from the published MDLM small (tinydiff/hub.py); round r's student samples with 1024 / 2^r steps
    "sdtt-paper": dict(_OWT, script="distill.py", method="sdtt", teacher="hf:kuleshov-group/mdlm-owt", rounds=7,
                       iters_per_round=10_000, teacher_steps=1024, n_teacher_steps=2, loss="kl_bwd", lr=6e-5,
                       warmup=500, batch_size=32, grad_accum=4, eval_interval=10_000, eval_tokens=262_144,
                       ckpt_interval=1_000, out_dir="out-sdtt-paper",
                       # the teacher's chunks and the official DiT's dropout sites (its 0.1 comes with the weights)
                       framing="bos_eos", dropout_sites="residual"),
}

# The cost assumption, stated once: one H100 SXM, dense bf16 peak 989 TFLOP/s, at 40% model FLOP
# utilisation (well-tuned GPT training reaches 40-50%; short sequences and the 50k-way softmax cost more).
H100_BF16_PEAK = 989e12
MFU = 0.40
COST_ASSUMPTION = f"one H100 SXM at {MFU:.0%} of its {H100_BF16_PEAK / 1e12:.0f} TFLOP/s dense bf16 peak"


def preset_model(name):
    """The transformer a preset trains (sdtt-paper: MDLM small), on the meta device: no memory allocated."""
    from .model import ModelConfig, Transformer
    p = PRESETS[name]
    if p["script"] == "distill.py":
        p = PRESETS["mdlm-owt-small"]
    cfg = ModelConfig(vocab_size=50257 + (p["model"] == "mdlm"), n_layer=p["n_layer"], n_head=p["n_head"],
                      n_embd=p["n_embd"], seq_len=p["seq_len"], causal=p["model"] == "ar")
    with torch.device("meta"):
        return Transformer(cfg)


def preset_cost(name):
    """Tokens processed and estimated GPU hours of a preset under COST_ASSUMPTION, from the matmul FLOPs
    (estimate_flops_per_token: forward + backward = 3 forwards; SDTT adds the teacher's n_teacher_steps forwards)."""
    p, model = PRESETS[name], preset_model(name)
    if p["script"] == "distill.py":
        steps = p["rounds"] * p["iters_per_round"]
        per_token = (3 + p["n_teacher_steps"]) * model.estimate_flops_per_token(p["seq_len"], backward=False)
    else:
        steps = p["max_iters"]
        per_token = model.estimate_flops_per_token(p["seq_len"])
    tokens = steps * p["batch_size"] * p["grad_accum"] * p["seq_len"]
    flops = per_token * tokens
    return {"preset": name, "params": model.num_params(), "steps": steps, "tokens": tokens, "flops": flops,
            "gpu_hours": flops / (H100_BF16_PEAK * MFU) / 3600, "assumption": COST_ASSUMPTION}


if __name__ == "__main__":
    print(f"| preset | script | params | steps | tokens | FLOPs | H100 hours ({COST_ASSUMPTION}) |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        c = preset_cost(name)
        print(f"| {name} | {PRESETS[name]['script']} | {c['params'] / 1e6:.0f}M | {c['steps']:,} | "
              f"{c['tokens'] / 1e9:.1f}B | {c['flops']:.2e} | {c['gpu_hours']:,.0f} |")
