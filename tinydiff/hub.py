"""Published weights -> tinydiff checkpoints: MDLM's DiT (and the SDTT students) and OpenAI's GPT-2.

    load_pretrained("hf:kuleshov-group/mdlm-owt")                   MDLM small on OpenWebText (Sahoo et al. 2024)
    load_pretrained("hf:jdeschena/sdtt@baselines_kld_step_70000")   SDTT student, KLD, round 7 (8 steps)
    load_pretrained("hf:OWNER/NAME[@REVISION]")                     any repository with the same DiT (or a GPT-2)
    load_pretrained("gpt2"), "gpt2-medium", "gpt2-large", "gpt2-xl" OpenAI GPT-2 as an AR model (teacher, judge)

Published weights, said precisely: every jdeschena/sdtt revision was pushed from a training checkpoint's raw
`state_dict` (SDTT's push_to_hub.py); the EMA weights, which the paper samples and evaluates with
(`from_ema: True`), are not in the files. So an SDTT Hub student is the raw student, not the model of the
paper's tables; load_pretrained prints this note when it loads one (not for teacher_1M_sm, which has no
step in its name: push_to_hub's path for the original kuleshov-group/mdlm-owt weights). Only MDLM's DiT
converts: a revision of another model type (no time embedder, sigma_map, e.g. SDTT's non-adaptive
`ddit`) is refused with a UserError.

Framing: MDLM and SDTT trained on [BOS] + 1022 tokens + [EOS] chunks (BOS = EOS = GPT-2's end-of-text;
mdlm dataloader.py _group_texts), so a converted DiT checkpoint records framing "bos_eos" and the scripts
evaluate (val bound) and distil it on windows framed the same way (tinydiff/data.py frame). Its dropout is
the official DiT's: on the residual branches only (dropout_sites "residual", tinydiff/model.py).

Each returns a checkpoint dict in the format train.py writes (kind, config, model, tokenizer, mask_id,
sample_steps, args), so every script takes it where it takes a checkpoint path (common.load_checkpoint
dispatches here). Downloads go through huggingface_hub's cache; the optional packages are imported
only here: `pip install huggingface_hub safetensors`.

The conversions are exact (tests/test_hub.py checks logits to 1e-5 against reference forwards):

MDLM's DiT (kuleshov-group/mdlm models/dit.py; SDTT's models/dit_orig.py is the same network) is a
pre-LN transformer whose LayerNorms (weight, no bias) are followed by adaLN modulation
    h = LN(x) * w * (1 + scale) + shift,   x = x + gate * sublayer(h),
with (shift, scale, gate) = Linear(silu(TimestepEmbedder(sigma))). MDLM does not condition on time: it
feeds sigma = 0 (time_conditioning=False), so all three are per-layer constants. They fold into
tinydiff's LayerNorm affine (weight = w * (1 + scale), bias = shift) and into the output rows of the
linear that ends each residual branch (W <- diag(gate) W, b <- gate * b). The rest maps one to one:
attn_qkv (no bias; columns laid out (3, heads, head_dim), as tinydiff's qkv) -> qkv with zero bias,
attn_out (no bias) -> proj, mlp.0 / mlp.2 -> fc / out with tanh-GELU, vocab_embed.embedding -> tok_emb,
output_layer (its own adaLN shift/scale, then a Linear with bias) -> ln_f and head (head_bias). Rotary:
flash-attn's apply_rotary_emb_qkv_ with interleaved=False rotates the two halves of each head
(GPT-NeoX layout), base 10000 -- tinydiff's chunk(2) convention. LayerNorm eps is 1e-5 in both.

GPT-2 (transformers' GPT2LMHeadModel): learned absolute positions (pos_emb="learned"), gelu_new
(= tanh GELU), LayerNorms with bias, eps 1e-5, attention scaled by 1/sqrt(head_dim), head tied to wte.
Its Conv1D layers store weights as (in, out), so each becomes nn.Linear's (out, in) by a transpose;
c_attn's outputs are q | k | v with heads contiguous inside each, tinydiff's qkv layout again.
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
    """A converted tensor: fp32 and contiguous, whatever dtype/layout the published file stored."""
    return t.to(torch.float32).contiguous()


def is_pretrained(spec):
    """True for the names load_pretrained understands (hf:..., gpt2*): not paths."""
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


# ----------------------------------------------------------------------------- download

def download(repo, filename, revision=None):
    """Local path of `filename` in a Hugging Face repository (cached by huggingface_hub), or None
    when the repository has no such file. Every other failure is a UserError saying what to do."""
    try:
        import huggingface_hub  # lazy: an optional extra
    except ImportError:
        raise UserError("pretrained weights need the huggingface_hub package: pip install huggingface_hub safetensors") from None
    where = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        return huggingface_hub.hf_hub_download(repo, filename, revision=revision)
    except Exception as e:
        # classify by class name: the hierarchy moved between huggingface_hub versions
        kinds = {c.__name__ for c in type(e).__mro__}
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


# ----------------------------------------------------------------------------- MDLM's DiT

def _strip_prefix(sd, anchor):
    """Keep the keys under the prefix that `anchor` has in sd ('' for MDLM's DIT, 'backbone.' for the
    HF MDLM wrapper, 'backbone.backbone.' for SDTT students distilled from it), without that prefix."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}  # torch.compile'd modules
    hits = [k for k in sd if k == anchor or k.endswith("." + anchor)]
    if not hits:
        return None
    prefix = min(hits, key=len)[:-len(anchor)]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def dit_conditioning(sd):
    """c = silu(sigma_map(sigma = 0)): the conditioning vector MDLM feeds every adaLN, (cond_dim,) float64.
    TimestepEmbedder: sinusoidal features [cos(t f), sin(t f)] (an extra 0 when the size is odd)
    -> Linear -> SiLU -> Linear. At t = 0 the features are [1, ..., 1, 0, ..., 0]."""
    w0, b0 = sd["sigma_map.mlp.0.weight"].double(), sd["sigma_map.mlp.0.bias"].double()  # (cond, freq), (cond,)
    w2, b2 = sd["sigma_map.mlp.2.weight"].double(), sd["sigma_map.mlp.2.bias"].double()  # (cond, cond), (cond,)
    freq = w0.shape[1]
    t_freq = torch.cat([torch.ones(freq // 2), torch.zeros(freq - freq // 2)]).double()  # cos(0) = 1, sin(0) = 0
    return F.silu(w2 @ F.silu(w0 @ t_freq + b0) + b2)  # (cond,)


def convert_dit(sd, n_head, seq_len=1024, dropout=0.0):
    """MDLM DiT state dict (official key names, any wrapper prefix) -> (tinydiff config dict, state dict).
    Exact for time_conditioning=False (the caller checks): the adaLN modulation is folded, see the docstring."""
    sd = _strip_prefix(sd, "vocab_embed.embedding")
    if sd is None:
        raise UserError("these weights are not MDLM's DiT (no vocab_embed.embedding key) nor GPT-2")
    if "sigma_map.mlp.0.weight" not in sd:
        raise UserError("these DiT weights have no time embedder (no sigma_map.* keys): another model type than "
                        "MDLM's DiT (e.g. SDTT's non-adaptive `ddit`), which tinydiff does not convert; use a "
                        "revision with MDLM's DiT (model type dit / ddit-orig)")
    emb = sd["vocab_embed.embedding"]  # (V, C)
    V, C = emb.shape
    n_layer = len([k for k in sd if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k)])
    c = dit_conditioning(sd)  # (cond,)
    zeros = lambda n: torch.zeros(n, dtype=torch.float32)
    state = {"tok_emb.weight": _f32(emb)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        mod = sd[p + "adaLN_modulation.weight"].double() @ c + sd[p + "adaLN_modulation.bias"].double()  # (6C,)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6)  # (C,) each, DiT's order
        state.update({
            # modulate(LN(x) * w, shift, scale) = LN(x) * (w * (1 + scale)) + shift
            p + "ln1.weight": _f32(sd[p + "norm1.weight"].double() * (1 + scale_msa)), p + "ln1.bias": _f32(shift_msa),
            p + "attn.qkv.weight": _f32(sd[p + "attn_qkv.weight"]), p + "attn.qkv.bias": zeros(3 * C),
            # x + gate * (W a) = x + (diag(gate) W) a
            p + "attn.proj.weight": _f32(gate_msa[:, None] * sd[p + "attn_out.weight"].double()),
            p + "attn.proj.bias": zeros(C),
            p + "ln2.weight": _f32(sd[p + "norm2.weight"].double() * (1 + scale_mlp)), p + "ln2.bias": _f32(shift_mlp),
            p + "fc.weight": _f32(sd[p + "mlp.0.weight"]), p + "fc.bias": _f32(sd[p + "mlp.0.bias"]),
            p + "out.weight": _f32(gate_mlp[:, None] * sd[p + "mlp.2.weight"].double()),
            p + "out.bias": _f32(gate_mlp * sd[p + "mlp.2.bias"].double()),
        })
    mod = sd["output_layer.adaLN_modulation.weight"].double() @ c + sd["output_layer.adaLN_modulation.bias"].double()
    shift, scale = mod.chunk(2)  # (C,) each
    state.update({"ln_f.weight": _f32(sd["output_layer.norm_final.weight"].double() * (1 + scale)),
                  "ln_f.bias": _f32(shift),
                  "head.weight": _f32(sd["output_layer.linear.weight"]), "head.bias": _f32(sd["output_layer.linear.bias"])})
    config = {"vocab_size": V, "n_layer": n_layer, "n_head": n_head, "n_embd": C, "seq_len": seq_len, "causal": False,
              "dropout": dropout, "tie_embeddings": False, "rope_base": 10000.0, "pos_emb": "rope",
              "gelu_approx": "tanh", "head_bias": True, "dropout_sites": "residual"}  # the official DiT's dropout
    return config, state


def _dit_settings(config, revision):
    """(n_head, seq_len, dropout, sample_steps) from the repository's config.json: the HF MDLM config
    (n_heads, model_length, ...) or SDTT's hydra config ({"model": {"n_heads", "length"}, ...})."""
    if config.get("time_conditioning"):
        raise UserError("this DiT conditions on the time (time_conditioning=true): tinydiff's transformer has no "
                        "time input (docs/mdlm.md §3), so it cannot be converted exactly")
    m = config["model"] if isinstance(config.get("model"), dict) else config
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


# ----------------------------------------------------------------------------- GPT-2

def convert_gpt2(sd, n_head, activation="gelu_new", dropout=0.0):
    """GPT-2 state dict (transformers' names, with or without the 'transformer.' prefix) -> (config, state)."""
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
    for i in range(n_layer):
        h, p = f"h.{i}.", f"blocks.{i}."
        state.update({
            p + "ln1.weight": _f32(sd[h + "ln_1.weight"]), p + "ln1.bias": _f32(sd[h + "ln_1.bias"]),
            p + "attn.qkv.weight": _f32(sd[h + "attn.c_attn.weight"].t()),  # Conv1D (C, 3C) -> Linear (3C, C)
            p + "attn.qkv.bias": _f32(sd[h + "attn.c_attn.bias"]),
            p + "attn.proj.weight": _f32(sd[h + "attn.c_proj.weight"].t()), p + "attn.proj.bias": _f32(sd[h + "attn.c_proj.bias"]),
            p + "ln2.weight": _f32(sd[h + "ln_2.weight"]), p + "ln2.bias": _f32(sd[h + "ln_2.bias"]),
            p + "fc.weight": _f32(sd[h + "mlp.c_fc.weight"].t()), p + "fc.bias": _f32(sd[h + "mlp.c_fc.bias"]),  # (4C, C)
            p + "out.weight": _f32(sd[h + "mlp.c_proj.weight"].t()), p + "out.bias": _f32(sd[h + "mlp.c_proj.bias"]),
        })
    state.update({"ln_f.weight": _f32(sd["ln_f.weight"]), "ln_f.bias": _f32(sd["ln_f.bias"]),
                  "head.weight": state["tok_emb.weight"] if tied else _f32(head)})
    config = {"vocab_size": wte.shape[0], "n_layer": n_layer, "n_head": n_head, "n_embd": wte.shape[1],
              "seq_len": wpe.shape[0], "causal": True, "dropout": dropout, "tie_embeddings": tied,
              "rope_base": 10000.0, "pos_emb": "learned", "gelu_approx": "none" if activation == "gelu" else "tanh",
              "head_bias": False}
    return config, state


def _gpt2_settings(config):
    if abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12 or config.get("scale_attn_by_inverse_layer_idx") \
            or not config.get("scale_attn_weights", True):
        raise UserError("this GPT-2 variant (LayerNorm eps / attention scaling) differs from tinydiff's transformer")
    return config["n_head"], config.get("activation_function", "gelu_new"), float(config.get("resid_pdrop", 0.1))


# ----------------------------------------------------------------------------- the entry point

def make_checkpoint(kind, config, state, sample_steps=None, source=None):
    """A checkpoint dict in train.py's format (no optimizer / EMA: a starting point, not a run to resume)."""
    if config["vocab_size"] != GPT2_TOKENIZER["vocab_size"] + (kind == "mdlm"):
        raise UserError(f"vocabulary of {config['vocab_size']} ids: tinydiff maps only the GPT-2 tokenizer "
                        f"({GPT2_TOKENIZER['vocab_size']} ids, + [MASK] for MDLM)")
    return {"kind": kind, "config": config, "model": state, "ema": None, "tokenizer": dict(GPT2_TOKENIZER),
            "mask_id": GPT2_TOKENIZER["vocab_size"] if kind == "mdlm" else None,  # 50257, the last embedding row
            "sample_steps": sample_steps, "data_dir": None, "iter": 0, "source": source,
            # both families were trained on (Open)WebText with the GPT-2 tokenizer at 1024 tokens; MDLM/SDTT on
            # [BOS] + 1022 tokens + [EOS] chunks (module docstring), GPT-2 on plain text
            "framing": "bos_eos" if kind == "mdlm" else "none",
            "args": {"data": "owt", "tokenizer": "gpt2", "seq_len": config["seq_len"]}}


def load_pretrained(spec, device="cpu"):
    """'hf:owner/name[@rev]' or 'gpt2[-medium|-large|-xl]' -> a tinydiff checkpoint dict (tensors on device)."""
    repo, revision = parse_spec(spec)
    config_path = download(repo, "config.json", revision)
    if config_path is None:
        raise UserError(f"{spec}: the repository has no config.json, so its architecture is unknown")
    with open(config_path) as f:
        config = json.load(f)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = download(repo, filename, revision)
        if path is not None:
            break
    else:
        raise UserError(f"{spec}: the repository has neither model.safetensors nor pytorch_model.bin")
    print(f"converting {spec} ({path}) to a tinydiff checkpoint")
    sd = read_weights(path)
    if config.get("model_type") == "gpt2":
        n_head, activation, dropout = _gpt2_settings(config)
        ckpt = make_checkpoint("ar", *convert_gpt2(sd, n_head, activation, dropout), source=spec)
    else:
        n_head, seq_len, dropout, steps = _dit_settings(config, revision)
        try:
            converted = convert_dit(sd, n_head, seq_len, dropout)
        except UserError as e:
            m = config["model"] if isinstance(config.get("model"), dict) else config
            kind = m.get("type") or m.get("backbone") or config.get("model_type")
            raise UserError(f"{spec}" + (f" (model type {kind!r})" if kind else "") + f": {e}") from None
        ckpt = make_checkpoint("mdlm", *converted, sample_steps=steps, source=spec)
        if repo == "jdeschena/sdtt" and revision != "teacher_1M_sm":
            print(f"note: {spec} holds the RAW (non-EMA) weights of that training checkpoint (SDTT's push_to_hub "
                  f"stored its state_dict); the paper's numbers are for the EMA weights, which are not published")
    ckpt["model"] = {k: v.to(device) for k, v in ckpt["model"].items()}
    return ckpt

