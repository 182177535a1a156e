"""One transformer for both model kinds.

causal=False: the bidirectional denoiser of a masked diffusion LM (MDLM). It does not take the
time t as input: MDLM zeroes its DiT's time conditioning (docs/mdlm.md §3; MDLM Table 10), so the network sees only
the noised tokens z_t and the mask tells it how noisy they are.
causal=True: the autoregressive (AR) baseline, with a static KV cache for decoding.

Pre-LayerNorm blocks, rotary position embeddings, F.scaled_dot_product_attention, 4x GELU MLP,
untied output head by default (MDLM small is untied). Three options exist only so that published
weights load exactly (tinydiff/hub.py); their defaults change nothing: pos_emb="learned" (GPT-2's
absolute position table instead of rotary), gelu_approx="tanh" (GPT-2's gelu_new and MDLM's DiT MLP)
and head_bias (MDLM's DiT output layer has a bias). A fourth matches how the official DiT trains:
dropout_sites="residual" drops out only the two residual branches of each block (MDLM's
bias_dropout_add_scale; its attention has dropout 0 and its embeddings none), where tinydiff's default
"all" also drops attention probabilities and the input embeddings (GPT-2's sites). Inference is the same.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


DROPOUT_SITES = ("all", "residual")


@dataclass
class ModelConfig:
    vocab_size: int = 258      # embedding rows: tokenizer vocab (+1 for [MASK] in MDLM, which is the last id)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    seq_len: int = 256         # the longest context the model supports (rotary table size)
    causal: bool = False       # False: MDLM denoiser; True: AR model
    dropout: float = 0.0
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    pos_emb: str = "rope"      # "rope" (rotary) or "learned" (GPT-2: absolute table added to the embeddings)
    gelu_approx: str = "none"  # F.gelu's approximate=: "none" (erf) or "tanh" (GPT-2's gelu_new, MDLM's DiT)
    head_bias: bool = False    # bias on the output head (MDLM's DiT final linear has one)
    dropout_sites: str = "all"  # "all": embeddings, attention probabilities, residual branches; "residual": those only

    def to_dict(self):
        return asdict(self)


def rotary_table(seq_len, head_dim, base):
    """cos/sin tables for rotary embeddings (Su et al. 2021), shape (seq_len, head_dim/2) each."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x1, x2) of the head dimension. x: (B, H, T, hd); cos/sin: (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, hd/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class KVCache(nn.Module):
    """Static, pre-allocated keys/values for causal decoding: written in place, never reallocated.

    By default attention reads the whole buffer (B, H, max_len, hd) with a mask that hides positions
    not yet written, so the decode step has one static shape (what torch.compile / CUDA graphs need).
    prefix_only=True is for eager decoding: attention reads only the keys written so far, with no mask
    for a one-token step. It does less work (on 2 CPU cores a batch-32 step costs ~half), but sums in
    another order, so logits can differ in the last bits from the static path (same law of samples).
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, dtype, device, prefix_only=False):
        super().__init__()
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # key positions 0..max_len-1, made once: the decode step builds its mask from them without allocating
        self.register_buffer("positions", torch.arange(max_len, device=device), persistent=False)
        self.max_len, self.prefix_only = max_len, prefix_only

    def keys(self, input_pos):
        """(n, mask) for a chunk written at input_pos (T,): attention reads keys 0..n-1, and key j is
        visible to the query at input_pos[i] iff j <= input_pos[i] (causal; it also hides the unwritten
        tail and any stale entries of an earlier sequence). mask (T, n) bool, or None: all visible."""
        if not self.prefix_only:
            return self.max_len, self.positions[None, :] <= input_pos[:, None]
        n = int(input_pos[-1]) + 1  # a host sync on GPU, once per forward: this path is for eager decoding
        return n, None if len(input_pos) == 1 else self.positions[None, :n] <= input_pos[:, None]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.causal = cfg.causal
        self.dropout = cfg.dropout if cfg.dropout_sites == "all" else 0.0  # on attention probabilities

    def forward(self, x, cos, sin, layer, cache=None, input_pos=None, keys=None, prefix=None):
        *lead, T, C = x.shape  # lead: (B,), or (b, K) for prefix attention
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_head, self.head_dim)).movedim(-3, 0).transpose(-2, -3)
        # 3 x (*lead, H, T, hd)
        if cos is not None:  # None: learned absolute positions, already added to the input
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if prefix is not None:
            # attend to the given keys/values kp, vp (b, 1, H, n, hd) of a prefix, shared by the K rows of each of
            # b sequences through broadcasting (never copied), and causally to x itself: one softmax over both
            kp, vp = prefix
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
            scale = self.head_dim ** -0.5
            att = torch.cat([q @ kp.to(q.dtype).transpose(-1, -2) * scale,  # (b, K, H, T, n)
                             (q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))], -1).softmax(-1)
            n = kp.shape[-2]
            y = att[..., :n] @ vp.to(q.dtype) + att[..., n:] @ v  # (b, K, H, T, hd)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)  # (B, H, T, hd)
        else:
            # write this chunk at input_pos, then attend over keys 0..n-1 through the mask
            # (Transformer.forward makes (n, mask) once for all layers; see KVCache.keys). Keep the
            # cache in the compute dtype (new_cache(dtype=...)): else .to() copies all of it each step
            cache.k[layer].index_copy_(2, input_pos, k.to(cache.k.dtype))
            cache.v[layer].index_copy_(2, input_pos, v.to(cache.v.dtype))
            n, mask = keys  # from cache.keys(input_pos), made once per forward; mask: (T, n) or None
            y = F.scaled_dot_product_attention(q, cache.k[layer, :, :, :n].to(q.dtype),
                                               cache.v[layer, :, :, :n].to(q.dtype), attn_mask=mask)  # (B, H, T, hd)
        return self.proj(y.transpose(-2, -3).reshape(*lead, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.gelu_approx = cfg.gelu_approx

    def forward(self, x, cos, sin, layer, cache=None, input_pos=None, keys=None, prefix=None):
        x = x + self.drop(self.attn(self.ln1(x), cos, sin, layer, cache, input_pos, keys, prefix))
        x = x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)), approximate=self.gelu_approx)))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and (cfg.n_embd // cfg.n_head) % 2 == 0, "head dim must be even"
        assert cfg.pos_emb in ("rope", "learned") and cfg.gelu_approx in ("none", "tanh"), "unknown pos_emb/gelu_approx"
        assert cfg.dropout_sites in DROPOUT_SITES, f"dropout_sites must be one of {DROPOUT_SITES}"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout if cfg.dropout_sites == "all" else 0.0)  # on the input embeddings
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        cos, sin = rotary_table(cfg.seq_len, cfg.n_embd // cfg.n_head, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx=None, input_pos=None, cache=None, embeds=None, select=None, prefix=None):
        """idx: (B, T) token ids -> logits (B, T, vocab_size) in float32.

        input_pos: (T,) positions of idx when decoding with `cache` (a KVCache); None = 0..T-1.
        embeds: (B, T, n_embd) input embeddings instead of idx (TCS's gradient estimator
        differentiates the AR teacher's log-likelihood with respect to them).
        select: (B, T) bool: the logits of these positions only, (N, vocab_size) in row-major order. The
        MDLM loss needs them only at masked positions; skipping the others saves their share of the output
        head and of the softmax (with 4096 ids, most of a small model's step). Data-dependent shapes: eager only.
        prefix: (cache, rows, n): idx (b, K, T) at input_pos also attends to the first n cached keys/values of
        rows (a slice of b sequences) of a KVCache, each shared by its K rows without a copy (causal models, eval):
        TCS rescoring runs K substitutions of a token after one shared prefix this way (tinydiff/tcs.py).
        """
        x = self.tok_emb(idx) if embeds is None else embeds  # (B, T, C)
        T = x.shape[-2]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of length {T} is longer than the model's context {self.cfg.seq_len}")
        if self.cfg.pos_emb == "learned":
            x = x + self.pos_emb(torch.arange(T, device=x.device) if input_pos is None else input_pos)  # (B, T, C)
            cos = sin = None
        elif input_pos is None:
            cos, sin = self.cos[:T], self.sin[:T]  # (T, hd/2)
        else:
            cos, sin = self.cos[input_pos], self.sin[input_pos]
        x = self.drop(x)
        keys = cache.keys(input_pos) if cache is not None else None  # (n, mask), shared by all layers
        for layer, block in enumerate(self.blocks):
            kv = None if prefix is None else tuple(c[layer, prefix[1], None, :, :prefix[2]]  # (b, 1, H, n, hd)
                                                   for c in (prefix[0].k, prefix[0].v))
            x = block(x, cos, sin, layer, cache, input_pos, keys, kv)
        if select is not None:
            x = x[select]  # (N, C)
        return self.head(self.ln_f(x)).float()  # (B, T, V), or (N, V) with select

    def new_cache(self, batch_size, max_len=None, dtype=None, prefix_only=False):
        """A fresh static KV cache for causal decoding of up to max_len (default seq_len) tokens
        (prefix_only: see KVCache)."""
        assert self.cfg.causal, "the KV cache is for causal (AR) models"
        p = self.head.weight
        return KVCache(self.cfg.n_layer, batch_size, self.cfg.n_head, max_len or self.cfg.seq_len,
                       self.cfg.n_embd // self.cfg.n_head, dtype or p.dtype, p.device, prefix_only)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.cfg.pos_emb == "learned" else 0)
        return n

    def estimate_flops_per_token(self, seq_len=None, backward=True):
        """Matmul FLOPs per token (Kaplan et al. 2020 / PaLM appendix B): 2 per weight in the forward
        pass (embedding lookup excluded, output head included) plus attention scores and values,
        2 * 2 * n_layer * L * d; the backward pass costs twice the forward."""
        c, L = self.cfg, seq_len or self.cfg.seq_len
        weights = self.num_params(non_embedding=True) + (self.head.weight.numel() if c.tie_embeddings else 0)
        forward = 2 * weights + 4 * c.n_layer * L * c.n_embd
        return 3 * forward if backward else forward
