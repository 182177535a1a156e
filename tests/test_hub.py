"""tinydiff/hub.py: published weights -> tinydiff, checked against reference forwards. No network.

MDLM's DiT: the reference below is written from the published definition (kuleshov-group/mdlm,
models/dit.py: DDiTBlock with adaLN modulation, flash-attn rotary, DDitFinalLayer), with random
weights under the official key names, including a non-zero adaLN (the official init zeroes it,
which would hide folding mistakes). GPT-2: transformers' GPT2LMHeadModel itself, when installed.
"""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tinydiff import hub
from tinydiff.common import UserError, load_checkpoint, model_from_checkpoint, save_checkpoint
from tinydiff.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- MDLM's DiT, from its definition

def random_dit(V=11, C=16, H=2, n_blocks=2, cond=8, freq=256, prefix="backbone.", seed=0):
    """A state dict with the names and shapes of MDLM's DIT (HF wrapper prefix 'backbone.')."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s
    sd = {"vocab_embed.embedding": r(V, C, s=1.0),
          "sigma_map.mlp.0.weight": r(cond, freq, s=0.1), "sigma_map.mlp.0.bias": r(cond),
          "sigma_map.mlp.2.weight": r(cond, cond), "sigma_map.mlp.2.bias": r(cond),
          "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, C // H, 2).float() / (C // H)),
          "output_layer.norm_final.weight": 1 + r(C, s=0.1),
          "output_layer.linear.weight": r(V, C), "output_layer.linear.bias": r(V),
          "output_layer.adaLN_modulation.weight": r(2 * C, cond), "output_layer.adaLN_modulation.bias": r(2 * C)}
    for i in range(n_blocks):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(C, s=0.1), p + "norm2.weight": 1 + r(C, s=0.1),
                   p + "attn_qkv.weight": r(3 * C, C), p + "attn_out.weight": r(C, C),
                   p + "mlp.0.weight": r(4 * C, C), p + "mlp.0.bias": r(4 * C),
                   p + "mlp.2.weight": r(C, 4 * C, s=0.15), p + "mlp.2.bias": r(C),
                   p + "adaLN_modulation.weight": r(6 * C, cond), p + "adaLN_modulation.bias": r(6 * C)})
    return {prefix + k: v for k, v in sd.items()}


def reference_dit(sd, idx, n_heads, prefix="backbone."):
    """MDLM's DIT.forward(indices, sigma = 0) in fp32, from the published definition -> logits (B, L, V)."""
    w = lambda k: sd[prefix + k]
    lin = lambda x, k, bias=True: F.linear(x, w(k + ".weight"), w(k + ".bias") if bias else None)
    x = w("vocab_embed.embedding")[idx]  # (B, L, C)
    B, L, C = x.shape
    hd = C // n_heads
    # TimestepEmbedder(sigma = 0): GLIDE sinusoid [cos(t f), sin(t f)] -> Linear -> SiLU -> Linear; then SiLU
    sigma = torch.zeros(B)
    half = w("sigma_map.mlp.0.weight").shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    t_freq = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], dim=-1)  # (B, 256)
    c = F.silu(lin(F.silu(lin(t_freq, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # (B, cond)
    # Rotary: emb = cat(freqs, freqs); flash-attn non-interleaved = x * cos + rotate_half(x) * sin on q and k
    emb = torch.outer(torch.arange(L, dtype=torch.float32), w("rotary_emb.inv_freq"))
    emb = torch.cat([emb, emb], dim=-1)  # (L, hd)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # (L, 1, hd) against (B, L, H, hd)
    rotate_half = lambda t: torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], dim=-1)
    norm = lambda x, k: F.layer_norm(x, (C,)) * w(k)  # LayerNorm with weight, no bias
    modulate = lambda x, shift, scale: x * (1 + scale) + shift
    n_blocks = len([k for k in sd if k.startswith(prefix + "blocks.") and k.endswith("norm1.weight")])
    for i in range(n_blocks):
        p = f"blocks.{i}."
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            lin(c, p + "adaLN_modulation")[:, None].chunk(6, dim=2)  # (B, 1, C) each
        h = modulate(norm(x, p + "norm1.weight"), shift_msa, scale_msa)
        qkv = lin(h, p + "attn_qkv", bias=False).view(B, L, 3, n_heads, hd)  # 'b s (three h d) -> b s three h d'
        q, k, v = qkv.unbind(2)  # (B, L, H, hd) each
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)  # flash-attn default scale, not causal
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, L, C)
        x = x + gate_msa * lin(y, p + "attn_out", bias=False)
        h = modulate(norm(x, p + "norm2.weight"), shift_mlp, scale_mlp)
        x = x + gate_mlp * lin(F.gelu(lin(h, p + "mlp.0"), approximate="tanh"), p + "mlp.2")
    shift, scale = lin(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=2)
    return lin(modulate(norm(x, "output_layer.norm_final.weight"), shift, scale), "output_layer.linear")


def tinydiff_model(config, state):
    model = Transformer(ModelConfig(**config)).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("prefix", ["", "backbone.", "backbone.backbone."])  # DIT, HF MDLM, SDTT-from-HF
def test_dit_conversion_matches_reference(prefix):
    sd = random_dit(prefix=prefix)
    sd["noise.sigma_max"] = torch.tensor(1.0)  # SDTT's files also hold the noise schedule: ignored
    config, state = hub.convert_dit(sd, n_head=2, seq_len=12)
    idx = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference_dit(sd, idx, n_heads=2, prefix=prefix)
        got = tinydiff_model(config, state)(idx)
    assert want.abs().max() > 1.0  # a non-trivial output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # shorter inputs use the start of the rotary table, as MDLM's per-length table
        torch.testing.assert_close(tinydiff_model(config, state)(idx[:, :5]),
                                   reference_dit(sd, idx[:, :5], 2, prefix), atol=1e-5, rtol=1e-5)


def test_dit_settings_and_sdtt_sample_steps():
    hf_mdlm = {"model_type": "mdlm", "n_heads": 12, "model_length": 1024, "hidden_dim": 768, "time_conditioning": False}
    assert hub._dit_settings(hf_mdlm, None) == (12, 1024, 0.1, 1024)
    sdtt = {"time_conditioning": False, "model": {"n_heads": 16, "length": 1024, "dropout": 0.1},
            "parameterization": {"orig_num_sampling_steps": 1024, "grow_dt_every": 10000, "min_num_sampling_steps": 8}}
    assert hub._dit_settings(sdtt, "baselines_kld_step_10000")[3] == 512
    assert hub._dit_settings(sdtt, "baselines_kld_step_70000")[3] == 8  # 7 rounds: 1024 / 2^7
    assert hub._dit_settings(sdtt, "scaling_400k_md_step_30000")[3] == 128
    assert hub._dit_settings(sdtt, "teacher_400k_md_step_400000")[3] == 1024  # a teacher, not 40 rounds
    with pytest.raises(UserError, match="time input"):
        hub._dit_settings(dict(hf_mdlm, time_conditioning=True), None)


# ----------------------------------------------------------------------------- end to end, hub mocked

def fake_repo(tmp_path, monkeypatch, config, sd):
    """Serve config.json + the weights from tmp_path instead of the network (safetensors when installed)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    except ImportError:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    calls = []

    def download(repo, filename, revision=None):
        calls.append((repo, filename, revision))
        return str(tmp_path / filename) if (tmp_path / filename).exists() else None
    monkeypatch.setattr(hub, "download", download)
    return calls


def test_load_mdlm_owt_offline(tmp_path, monkeypatch):
    sd = random_dit(V=50258, C=16, H=2, n_blocks=1)
    config = {"model_type": "mdlm", "vocab_size": 50258, "model_length": 16, "hidden_dim": 16, "cond_dim": 8,
              "n_blocks": 1, "n_heads": 2, "dropout": 0.1, "time_conditioning": False}
    calls = fake_repo(tmp_path, monkeypatch, config, sd)
    ckpt = load_checkpoint("hf:kuleshov-group/mdlm-owt")  # through the path every script uses
    assert calls[0] == ("kuleshov-group/mdlm-owt", "config.json", None)
    assert (ckpt["kind"], ckpt["mask_id"], ckpt["sample_steps"]) == ("mdlm", 50257, 16)
    assert ckpt["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert ckpt["config"]["vocab_size"] == 50258 and ckpt["args"]["data"] == "owt"
    # MDLM trained on [BOS] + L-2 tokens + [EOS] chunks with residual-only dropout: recorded for later scripts
    assert ckpt["framing"] == "bos_eos" and ckpt["config"]["dropout_sites"] == "residual"
    assert model_from_checkpoint(ckpt).blocks[0].attn.dropout == 0.0 and model_from_checkpoint(ckpt).drop.p == 0.0
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")  # self-describing: loads back with no other file
    model = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"))
    idx = torch.randint(0, 50258, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_dit(sd, idx, 2), atol=1e-5, rtol=1e-5)


SDTT_CONFIG = {"time_conditioning": False, "model": {"type": "ddit-orig", "n_heads": 2, "length": 16, "dropout": 0.1},
               "parameterization": {"orig_num_sampling_steps": 1024, "grow_dt_every": 10000,
                                    "min_num_sampling_steps": 8}}


def test_sdtt_student_load_says_raw_weights(tmp_path, monkeypatch, capsys):
    """SDTT's Hub revisions hold the raw state_dict (its push_to_hub), while the paper evaluates the EMA:
    loading one says so; MDLM's own repository gets no such note."""
    fake_repo(tmp_path, monkeypatch, SDTT_CONFIG, random_dit(V=50258, C=16, H=2, n_blocks=1,
                                                             prefix="backbone.backbone."))
    ckpt = load_checkpoint("hf:jdeschena/sdtt@baselines_kld_step_70000")
    assert ckpt["sample_steps"] == 8
    out = capsys.readouterr().out
    assert "RAW (non-EMA)" in out and "EMA weights" in out
    load_checkpoint("hf:kuleshov-group/mdlm-owt")
    assert "non-EMA" not in capsys.readouterr().out


def test_dit_without_time_embedder_is_a_clear_error(tmp_path, monkeypatch):
    """A Hub revision of another model type (SDTT's non-adaptive `ddit`: no sigma_map) is refused with a
    UserError naming what is missing and the model type, not a KeyError deep in the conversion."""
    sd = {k: v for k, v in random_dit(V=50258, C=16, H=2, n_blocks=1).items() if "sigma_map" not in k}
    with pytest.raises(UserError, match="no time embedder"):
        hub.convert_dit(sd, n_head=2, seq_len=16)
    fake_repo(tmp_path, monkeypatch, dict(SDTT_CONFIG, model=dict(SDTT_CONFIG["model"], type="ddit")), sd)
    with pytest.raises(UserError, match=r"jdeschena/sdtt@some_rev \(model type 'ddit'\): .*sigma_map"):
        load_checkpoint("hf:jdeschena/sdtt@some_rev")

def hub_style_gpt2(V=50257, C=8, H=2, n_layer=1, P=16, seed=0):
    """GPT-2 as its hub files store it: no 'transformer.' prefix, no lm_head, causal-mask buffers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    sd = {"wte.weight": r(V, C), "wpe.weight": r(P, C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(n_layer):
        h = f"h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(C), h + "ln_1.bias": r(C), h + "ln_2.weight": 1 + r(C), h + "ln_2.bias": r(C),
                   h + "attn.c_attn.weight": r(C, 3 * C), h + "attn.c_attn.bias": r(3 * C),
                   h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C),
                   h + "mlp.c_fc.weight": r(C, 4 * C), h + "mlp.c_fc.bias": r(4 * C),
                   h + "mlp.c_proj.weight": r(4 * C, C), h + "mlp.c_proj.bias": r(C),
                   h + "attn.bias": torch.tril(torch.ones(P, P)).view(1, 1, P, P)})
    return sd


def test_load_gpt2_offline(tmp_path, monkeypatch):
    config = {"model_type": "gpt2", "n_head": 2, "n_embd": 8, "n_layer": 1, "n_positions": 16, "vocab_size": 50257,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1}
    calls = fake_repo(tmp_path, monkeypatch, config, hub_style_gpt2())
    ckpt = load_checkpoint("gpt2-large")
    assert calls[0][:2] == ("openai-community/gpt2-large", "config.json")
    assert (ckpt["kind"], ckpt["mask_id"], ckpt["sample_steps"]) == ("ar", None, None)
    c = ckpt["config"]
    assert c["causal"] and c["tie_embeddings"] and c["pos_emb"] == "learned" and c["gelu_approx"] == "tanh"
    assert ckpt["framing"] == "none" and c.get("dropout_sites", "all") == "all"  # GPT-2: plain text, all sites
    model = model_from_checkpoint(ckpt)
    assert model.head.weight is model.tok_emb.weight


def test_gpt2_matches_transformers():
    transformers = pytest.importorskip("transformers", reason="transformers not installed: pip install transformers")
    cfg = transformers.GPT2Config(vocab_size=37, n_positions=12, n_embd=16, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # the init zeroes biases and sets LayerNorms to 1: randomise everything
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.05))
    config, state = hub.convert_gpt2(ref.state_dict(), n_head=4, activation=cfg.activation_function)
    model = tinydiff_model(config, state)
    idx = torch.randint(0, 37, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
        # the hub's file layout (no prefix, no lm_head) converts to the same model
        hub_sd = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
        torch.testing.assert_close(tinydiff_model(*hub.convert_gpt2(hub_sd, 4))(idx), want, atol=1e-5, rtol=1e-5)
        # the KV-cached decode (learned positions at input_pos) gives the same next-token logits
        cache = model.new_cache(3, dtype=torch.float32)
        steps = [model(idx[:, :5], input_pos=torch.arange(5), cache=cache)[:, -1]]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache)[:, -1] for t in range(5, 12)]
        torch.testing.assert_close(torch.stack(steps, 1), want[:, 4:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors

def test_specs():
    assert hub.is_pretrained("gpt2") and hub.is_pretrained("hf:a/b") and not hub.is_pretrained("out/ckpt.pt")
    assert hub.parse_spec("hf:jdeschena/sdtt@baselines_kld_step_70000") == ("jdeschena/sdtt", "baselines_kld_step_70000")
    assert hub.parse_spec("hf:kuleshov-group/mdlm-owt") == ("kuleshov-group/mdlm-owt", None)
    with pytest.raises(UserError, match="@REVISION, one of baselines"):
        hub.parse_spec("hf:jdeschena/sdtt")
    with pytest.raises(UserError, match="hf:OWNER/NAME"):
        hub.parse_spec("hf:no-slash")


def fake_hf_hub(monkeypatch, error):
    """Stand-in huggingface_hub module whose download raises `error` (classified by class name)."""
    def hf_hub_download(repo, filename, revision=None):
        raise error
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))


def test_no_network_is_a_clear_message(monkeypatch):
    class LocalEntryNotFoundError(FileNotFoundError):  # what huggingface_hub raises offline with nothing cached
        pass
    fake_hf_hub(monkeypatch, LocalEntryNotFoundError("connection refused"))
    with pytest.raises(UserError, match="needs the network once"):
        load_checkpoint("hf:kuleshov-group/mdlm-owt")
    fake_hf_hub(monkeypatch, OSError("Network is unreachable"))
    with pytest.raises(UserError, match="check the network"):
        hub.load_pretrained("gpt2")

    class RepositoryNotFoundError(OSError):
        pass
    fake_hf_hub(monkeypatch, RepositoryNotFoundError("404"))
    with pytest.raises(UserError, match="not found"):
        hub.load_pretrained("hf:someone/nothing")


def test_missing_packages_name_the_pip_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        hub.load_pretrained("gpt2")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError, match="pip install safetensors"):
        hub.read_weights(tmp_path / "model.safetensors")
