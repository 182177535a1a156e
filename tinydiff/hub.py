"""Published weights -> tinydiff checkpoints: MDLM's DiT (and the SDTT students) and OpenAI's GPT-2.

    load_pretrained("hf:kuleshov-group/mdlm-owt")                   MDLM small on OpenWebText (Sahoo et al. 2024)
    load_pretrained("hf:jdeschena/sdtt@baselines_kld_step_70000")   SDTT student, KLD, round 7 (8 steps)
    load_pretrained("hf:OWNER/NAME[@REVISION]")                     any repository with the same DiT (or a GPT-2)
    load_pretrained("gpt2"), "gpt2-medium", "gpt2-large", "gpt2-xl" OpenAI GPT-2 as an AR model (teacher, judge)

Each gives a checkpoint dict in train.py's format (common.load_checkpoint dispatches here), converted exactly
(tests/test_hub.py: logits to 1e-5). Needs `pip install huggingface_hub safetensors`, imported only here.

MDLM's DiT (kuleshov-group/mdlm models/dit.py; SDTT's dit_orig.py is the same network) is pre-LN with adaLN:
    h = LN(x) * w * (1 + scale) + shift,   x = x + gate * sublayer(h),
with (shift, scale, gate) = Linear(silu(TimestepEmbedder(sigma))). MDLM feeds sigma = 0 (time_conditioning=False),
so all three are per-layer constants, folded into tinydiff's LayerNorm affine (weight = w * (1 + scale), bias =
shift) and into the linear ending each residual branch (W <- diag(gate) W, b <- gate * b). The rest maps one to
one: attn_qkv (no bias; columns (3, heads, head_dim), as tinydiff's qkv) -> qkv, attn_out (no bias) -> proj,
mlp.0 / mlp.2 -> fc / out (tanh GELU), vocab_embed.embedding -> tok_emb, output_layer (its own adaLN shift/scale,
then a Linear with bias) -> ln_f, head. Rotary: flash-attn's apply_rotary_emb_qkv_ (interleaved=False) rotates
each head's two halves (GPT-NeoX layout, base 10000), tinydiff's chunk(2). LayerNorm eps 1e-5 in both; dropout on
the residual branches only. MDLM and SDTT trained on [BOS] + 1022 tokens + [EOS] chunks (BOS = EOS = end-of-text;
mdlm dataloader.py _group_texts): the checkpoint records framing "bos_eos" (tinydiff/data.py frame).

GPT-2 (transformers' GPT2LMHeadModel): learned positions, gelu_new (= tanh GELU), LayerNorms with bias, eps 1e-5,
attention scaled by 1/sqrt(head_dim), head tied to wte. Conv1D weights are (in, out): transposed to nn.Linear's
(out, in); c_attn's outputs are q | k | v with heads contiguous inside each, tinydiff's qkv layout.
"""
import json
import re

import torch
import torch.nn.functional as F

from .errors import UserError

GPT2_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
GPT2_TOKENIZER = {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}  # tiktoken's gpt2 = HF's GPT-2 ids
SDTT_REVISIONS = ("baselines_{kld,mse,tvd}_step_{10000..70000}, scaling_400k_{sm,md,large}_step_{10000..70000}, "
                  "teacher_400k_{sm,md,large}_step_400000, teacher_1M_sm")  # jdeschena/sdtt's loaders


def _f32(t):
    """fp32 and contiguous, whatever dtype/layout the published file stored."""
    return t.to(torch.float32).contiguous()


def is_pretrained(spec):
    """True for the names load_pretrained understands (hf:..., gpt2*), not paths."""
    return isinstance(spec, str) and (spec.startswith("hf:") or spec in GPT2_REPOS)


def parse_spec(spec):
    """'hf:owner/name@rev' -> ('owner/name', 'rev'); 'gpt2-large' -> ('openai-community/gpt2-large', None)."""
    if spec in GPT2_REPOS:
        return GPT2_REPOS[spec], None
    repo, _, revision = spec[len("hf:"):].partition("@")
    if not spec.startswith("hf:") or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(f"{spec!r} is not a pretrained model name: use hf:OWNER/NAME[@REVISION] "
                        f"(e.g. hf:kuleshov-group/mdlm-owt) or one of {', '.join(GPT2_REPOS)}")
    if repo == "jdeschena/sdtt" and not revision:
        raise UserError(f"hf:jdeschena/sdtt keeps each model on its own revision: add @REVISION, one of {SDTT_REVISIONS}")
    return repo, revision or None


def download(repo, filename, revision=None):
    """Local path of `filename` in a Hugging Face repository (huggingface_hub's cache), or None when the
    repository has no such file. Every other failure is a UserError saying what to do."""
    try:
        import huggingface_hub  # lazy: an optional extra
    except ImportError:
        raise UserError("pretrained weights need the huggingface_hub package: pip install huggingface_hub safetensors") from None
    where = repo + (f"@{revision}" if revision else "")
    try:
        return huggingface_hub.hf_hub_download(repo, filename, revision=revision)
    except Exception as e:
        kinds = {c.__name__ for c in type(e).__mro__}  # by name: the hierarchy moved between versions
        if kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
            raise UserError(f"could not download {filename} of {where} and it is not in the local Hugging Face cache: "
                            f"this needs the network once (check your connection, proxy or HF_HUB_OFFLINE), "
                            f"then it is read from the cache") from None
        if "RevisionNotFoundError" in kinds:
            raise UserError(f"{repo} has no revision {revision!r}: check the name after '@'") from None
        if "RepositoryNotFoundError" in kinds:  # also gated/private repositories
            raise UserError(f"Hugging Face repository {repo} not found (or private/gated: log in with `hf auth login`, formerly `huggingface-cli login`)") from None
        if "EntryNotFoundError" in kinds:
            return None
        raise UserError(f"could not download {filename} of {where} ({type(e).__name__}: {e}): "
                        f"check the network connection") from None


def read_weights(path):
    """A state dict from a .safetensors file (needs safetensors) or a torch .bin file."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("this checkpoint is a .safetensors file: pip install safetensors") from None
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _strip_prefix(sd, anchor):
    """The keys under the shortest prefix that `anchor` has in sd, without it ('' for MDLM's DIT, 'backbone.'
    for the HF MDLM wrapper, 'backbone.backbone.' for SDTT students); None when anchor is absent."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}  # torch.compile'd modules
    prefix = min((k[:-len(anchor)] for k in sd if k == anchor or k.endswith("." + anchor)), key=len, default=None)
    return None if prefix is None else {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def convert_dit(sd, n_head, seq_len=1024, dropout=0.0):
    """MDLM DiT state dict (official names, any wrapper prefix) -> (config, state), adaLN folded in float64."""
    sd = _strip_prefix(sd, "vocab_embed.embedding")
    if sd is None:
        raise UserError("these weights are not MDLM's DiT (no vocab_embed.embedding key) nor GPT-2")
    if "sigma_map.mlp.0.weight" not in sd:
        raise UserError("these DiT weights have no time embedder (no sigma_map.* keys): another model type than "
                        "MDLM's DiT (e.g. SDTT's non-adaptive `ddit`), which tinydiff does not convert; use a "
                        "revision with MDLM's DiT (model type dit / ddit-orig)")
    w = lambda k: sd[k].double()
    lin = lambda k, x: w(k + ".weight") @ x + w(k + ".bias")  # a Linear in float64
    emb = sd["vocab_embed.embedding"]  # (V, C)
    V, C = emb.shape
    n_layer = len([k for k in sd if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k)])
    # the conditioning every adaLN gets, c = silu(sigma_map(0)); TimestepEmbedder's features [cos(t f), sin(t f)]
    # (+ a 0 when odd) are [1, ..., 1, 0, ..., 0] at t = 0, then Linear -> SiLU -> Linear
    freq = sd["sigma_map.mlp.0.weight"].shape[1]
    t_freq = torch.cat([torch.ones(freq // 2), torch.zeros(freq - freq // 2)]).double()  # (freq,)
    c = F.silu(lin("sigma_map.mlp.2", F.silu(lin("sigma_map.mlp.0", t_freq))))  # (cond,)
    zeros = lambda n: torch.zeros(n, dtype=torch.float32)
    state = {"tok_emb.weight": _f32(emb)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = lin(p + "adaLN_modulation", c).chunk(6)
        state.update({
            p + "ln1.weight": _f32(w(p + "norm1.weight") * (1 + scale_msa)), p + "ln1.bias": _f32(shift_msa),
            p + "attn.qkv.weight": _f32(sd[p + "attn_qkv.weight"]), p + "attn.qkv.bias": zeros(3 * C),
            p + "attn.proj.weight": _f32(gate_msa[:, None] * w(p + "attn_out.weight")), p + "attn.proj.bias": zeros(C),
            p + "ln2.weight": _f32(w(p + "norm2.weight") * (1 + scale_mlp)), p + "ln2.bias": _f32(shift_mlp),
            p + "fc.weight": _f32(sd[p + "mlp.0.weight"]), p + "fc.bias": _f32(sd[p + "mlp.0.bias"]),
            p + "out.weight": _f32(gate_mlp[:, None] * w(p + "mlp.2.weight")), p + "out.bias": _f32(gate_mlp * w(p + "mlp.2.bias")),
        })
    shift, scale = lin("output_layer.adaLN_modulation", c).chunk(2)  # (C,) each
    state.update({"ln_f.weight": _f32(w("output_layer.norm_final.weight") * (1 + scale)), "ln_f.bias": _f32(shift),
                  "head.weight": _f32(sd["output_layer.linear.weight"]), "head.bias": _f32(sd["output_layer.linear.bias"])})
    config = {"vocab_size": V, "n_layer": n_layer, "n_head": n_head, "n_embd": C, "seq_len": seq_len, "causal": False,
              "dropout": dropout, "tie_embeddings": False, "rope_base": 10000.0, "pos_emb": "rope",
              "gelu_approx": "tanh", "head_bias": True, "dropout_sites": "residual"}
    return config, state


def _dit_settings(config, revision):
    """(n_head, seq_len, dropout, sample_steps) from the repository's config.json (HF MDLM's or SDTT's)."""
    if config.get("time_conditioning"):
        raise UserError("this DiT conditions on the time (time_conditioning=true): tinydiff's transformer has no "
                        "time input (docs/mdlm.md §3), so it cannot be converted exactly")
    m = config["model"] if isinstance(config.get("model"), dict) else config  # SDTT's hydra nests it
    if not m.get("n_heads"):
        raise UserError("config.json has no n_heads: not an MDLM DiT repository")
    seq_len = int(m.get("length") or m.get("model_length") or 1024)
    # SDTT students: round r = step / grow_dt_every halves the teacher's steps r times (jdeschena/sdtt's
    # multi-round-sdtt config: 1024 steps, halved every 10k, at least 8); its teachers keep 1024
    p = config.get("parameterization") if isinstance(config.get("parameterization"), dict) else {}
    steps = int(p.get("orig_num_sampling_steps", seq_len))
    step = re.search(r"_step_(\d+)$", revision or "")
    if step and p.get("grow_dt_every") and not revision.startswith("teacher"):
        steps = max(int(p.get("min_num_sampling_steps", 1)), steps >> (int(step.group(1)) // int(p["grow_dt_every"])))
    return int(m["n_heads"]), seq_len, float(m.get("dropout", 0.1)), steps


def convert_gpt2(sd, n_head, activation="gelu_new", dropout=0.0):
    """GPT-2 state dict (transformers' names, with or without 'transformer.') -> (config, state)."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    if "wte.weight" not in sd:
        raise UserError("these weights are not GPT-2 (no wte.weight key)")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise UserError(f"GPT-2 activation {activation!r} is not supported (gelu_new or gelu)")
    wte, wpe = sd["wte.weight"], sd["wpe.weight"]  # (V, C), (P, C)
    n_layer = len([k for k in sd if re.fullmatch(r"h\.\d+\.ln_1\.weight", k)])
    head = sd.get("lm_head.weight", wte)  # the hub files omit it: tied to wte
    tied = head is wte or torch.equal(head, wte)
    state = {"tok_emb.weight": _f32(wte), "pos_emb.weight": _f32(wpe)}
    names = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2",
             "fc": "mlp.c_fc", "out": "mlp.c_proj"}  # tinydiff's -> GPT-2's
    for i in range(n_layer):
        for ours, theirs in names.items():
            weight = sd[f"h.{i}.{theirs}.weight"]
            state[f"blocks.{i}.{ours}.weight"] = _f32(weight if "ln" in ours else weight.t())  # Conv1D: (in, out)
            state[f"blocks.{i}.{ours}.bias"] = _f32(sd[f"h.{i}.{theirs}.bias"])
    state.update({"ln_f.weight": _f32(sd["ln_f.weight"]), "ln_f.bias": _f32(sd["ln_f.bias"]),
                  "head.weight": state["tok_emb.weight"] if tied else _f32(head)})
    config = {"vocab_size": wte.shape[0], "n_layer": n_layer, "n_head": n_head, "n_embd": wte.shape[1],
              "seq_len": wpe.shape[0], "causal": True, "dropout": dropout, "tie_embeddings": tied,
              "rope_base": 10000.0, "pos_emb": "learned", "gelu_approx": "none" if activation == "gelu" else "tanh",
              "head_bias": False}
    return config, state


def make_checkpoint(kind, config, state, sample_steps=None, source=None):
    """A checkpoint dict in train.py's format (no optimizer / EMA: a starting point, not a run to resume)."""
    if config["vocab_size"] != GPT2_TOKENIZER["vocab_size"] + (kind == "mdlm"):
        raise UserError(f"vocabulary of {config['vocab_size']} ids: tinydiff maps only the GPT-2 tokenizer "
                        f"({GPT2_TOKENIZER['vocab_size']} ids, + [MASK] for MDLM)")
    return {"kind": kind, "config": config, "model": state, "ema": None, "tokenizer": dict(GPT2_TOKENIZER),
            "mask_id": GPT2_TOKENIZER["vocab_size"] if kind == "mdlm" else None,  # 50257, the last embedding row
            "sample_steps": sample_steps, "data_dir": None, "iter": 0, "source": source,
            "framing": "bos_eos" if kind == "mdlm" else "none",  # GPT-2 trained on plain text
            "args": {"data": "owt", "tokenizer": "gpt2", "seq_len": config["seq_len"]}}


def load_pretrained(spec, device="cpu"):
    """'hf:owner/name[@rev]' or 'gpt2[-medium|-large|-xl]' -> a tinydiff checkpoint dict (tensors on device)."""
    repo, revision = parse_spec(spec)
    config_path = download(repo, "config.json", revision)
    if config_path is None:
        raise UserError(f"{spec}: the repository has no config.json, so its architecture is unknown")
    with open(config_path) as f:
        config = json.load(f)
    path = download(repo, "model.safetensors", revision) or download(repo, "pytorch_model.bin", revision)
    if path is None:
        raise UserError(f"{spec}: the repository has neither model.safetensors nor pytorch_model.bin")
    print(f"converting {spec} ({path}) to a tinydiff checkpoint")
    sd = read_weights(path)
    if config.get("model_type") == "gpt2":
        if abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12 or config.get("scale_attn_by_inverse_layer_idx") \
                or not config.get("scale_attn_weights", True):
            raise UserError("this GPT-2 variant (LayerNorm eps / attention scaling) differs from tinydiff's transformer")
        converted = convert_gpt2(sd, config["n_head"], config.get("activation_function", "gelu_new"),
                                 float(config.get("resid_pdrop", 0.1)))
        ckpt = make_checkpoint("ar", *converted, source=spec)
    else:
        n_head, seq_len, dropout, steps = _dit_settings(config, revision)
        try:
            converted = convert_dit(sd, n_head, seq_len, dropout)
        except UserError as e:
            m = config["model"] if isinstance(config.get("model"), dict) else config  # SDTT's hydra nests it
            kind = m.get("type") or m.get("backbone") or config.get("model_type")
            raise UserError(f"{spec}" + (f" (model type {kind!r})" if kind else "") + f": {e}") from None
        ckpt = make_checkpoint("mdlm", *converted, sample_steps=steps, source=spec)
        if repo == "jdeschena/sdtt" and revision != "teacher_1M_sm":  # that one: the original MDLM weights
            print(f"note: {spec} holds the RAW (non-EMA) weights of that training checkpoint (SDTT's push_to_hub "
                  f"stored its state_dict); the paper's numbers are for the EMA weights, which are not published")
    ckpt["model"] = {k: v.to(device) for k, v in ckpt["model"].items()}
    return ckpt
