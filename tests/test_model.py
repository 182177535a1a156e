"""The transformer (tinydiff/model.py): shapes, attention direction, context limit, FLOPs, tying."""
import pytest
import torch

from tinydiff.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("single_thread")


def make(causal, tie=False, V=13, L=16, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, seq_len=L, causal=causal, tie_embeddings=tie)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("causal", [False, True])
def test_shapes(causal):
    model = make(causal)
    for T in (1, 7, 16):
        logits = model(torch.randint(0, 13, (3, T)))
        assert logits.shape == (3, T, 13) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    embeds = model.tok_emb(torch.randint(0, 13, (2, 5)))  # the embeds= entry point (used by TCS)
    assert model(embeds=embeds).shape == (2, 5, 13)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_direction(causal):
    """Changing the token at position j changes the outputs at positions < j only for the
    bidirectional (diffusion) model; a causal model's earlier outputs are untouched."""
    model = make(causal)
    x = torch.randint(0, 13, (2, 10), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % 13
    with torch.no_grad():
        before, after = model(x), model(y)
    earlier = (after[:, :6] - before[:, :6]).abs().max().item()
    if causal:
        assert earlier <= 1e-6
    else:
        assert earlier > 1e-4
    assert (after[:, 6:] - before[:, 6:]).abs().max().item() > 1e-4  # later outputs see it in both


def test_longer_than_context_raises():
    model = make(False, L=8)
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token(tie):
    model = make(True, tie=tie, V=101, L=16)
    c = model.cfg
    # counted by hand: per block qkv 3d^2+3d, proj d^2+d, MLP 4d^2+4d and 4d^2+d, two LayerNorms 4d;
    # the final LayerNorm 2d; the output head V*d (no bias), a matmul even when tied to the embedding
    d = c.n_embd
    matmul_weights = c.n_layer * (12 * d * d + 13 * d) + 2 * d + c.vocab_size * d
    fwd = model.estimate_flops_per_token(backward=False)
    assert fwd == 2 * matmul_weights + 4 * c.n_layer * c.seq_len * c.n_embd  # weights + attention
    assert model.estimate_flops_per_token() == 3 * fwd  # backward = 2 x forward
    # Kaplan et al.: training costs ~6 FLOPs per parameter per token, plus the attention term
    ratio = model.estimate_flops_per_token() / (6 * matmul_weights)
    assert 1 < ratio < 1.1
    assert model.estimate_flops_per_token(seq_len=4) < model.estimate_flops_per_token(seq_len=16)


def test_tie_embeddings_shares_weights():
    tied, untied = make(False, tie=True), make(False, tie=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    c = tied.cfg
    assert untied.num_params() - tied.num_params() == c.vocab_size * c.n_embd
    # behaviour, not identity: on inputs without token 3, embedding row 3 reaches the output only through
    # the head, so editing it changes logit 3 alone, and the head's gradient lands on that row
    x = torch.randint(4, 13, (2, 5))  # (B, T), token 3 absent
    before = tied(x).detach()  # (B, T, V)
    tied(x).sum().backward()
    assert tied.tok_emb.weight.grad[3].abs().sum() > 0
    with torch.no_grad():
        tied.tok_emb.weight[3].add_(1.0)
    after = tied(x).detach()
    others = torch.arange(13) != 3
    assert torch.equal(before[..., others], after[..., others])
    assert not torch.allclose(before[..., 3], after[..., 3])


def test_config_round_trip():
    model = make(True)
    assert ModelConfig(**model.cfg.to_dict()) == model.cfg


def test_dropout_sites():
    """dropout_sites="residual" (the official DiT: bias_dropout_add_scale only) leaves the input embeddings and
    the attention probabilities alone and still drops the residual branches; "all" (tinydiff's default,
    GPT-2's sites) drops all three. Eval mode drops nothing in either."""
    import tinydiff.model as model_module
    idx = torch.randint(0, 17, (2, 9), generator=torch.Generator().manual_seed(0))

    def build(sites, n_layer):
        torch.manual_seed(0)
        return Transformer(ModelConfig(vocab_size=17, n_layer=n_layer, n_head=2, n_embd=16, seq_len=9, dropout=0.5,
                                       dropout_sites=sites))

    # no blocks: only the embedding dropout can act
    for sites, changes in (("residual", False), ("all", True)):
        m = build(sites, 0)
        with torch.no_grad():
            ref = m.eval()(idx)
            assert (not torch.allclose(m.train()(idx), ref)) == changes, sites
    # the attention-probability dropout handed to SDPA
    seen, sdpa = [], model_module.F.scaled_dot_product_attention

    def spy(*a, dropout_p=0.0, **k):
        seen.append(dropout_p)
        return sdpa(*a, dropout_p=dropout_p, **k)
    for sites, p in (("residual", 0.0), ("all", 0.5)):
        m = build(sites, 1).train()
        seen.clear()
        model_module.F.scaled_dot_product_attention = spy
        try:
            with torch.no_grad():
                out = m(idx)
        finally:
            model_module.F.scaled_dot_product_attention = sdpa
        assert seen == [p], sites
        with torch.no_grad():  # the residual branches still drop out in training, and nothing in eval mode
            assert not torch.allclose(out, m.eval()(idx))
            assert torch.equal(m(idx), m(idx))
    with pytest.raises(AssertionError, match="dropout_sites"):
        Transformer(ModelConfig(vocab_size=17, n_layer=1, n_head=2, n_embd=16, seq_len=9, dropout_sites="attn"))
