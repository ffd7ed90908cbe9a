"""SDPAAttention and megavlm norms against megatron-core's local (reference) modules, on CPU."""

from __future__ import annotations

import copy
import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.models.language.core_attention import SDPAAttention, packed_segment_mask
from megavlm.models.norms import LayerNorm, Norm, RMSNorm

NP, NG, HN, SQ, B = 4, 2, 16, 12, 2


pytestmark = pytest.mark.usefixtures("single_rank_megatron")


def _attn_config(**overrides) -> TransformerConfig:
    kw = dict(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=NP,
        num_query_groups=NG,
        kv_channels=HN,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        masked_softmax_fusion=False,
        use_cpu_initialization=True,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def _qkv(sq=SQ, b=B, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, NP, HN, generator=g)  # [sq, b, np, hn]
    k = torch.randn(sq, b, NG, HN, generator=g)  # [sk, b, ng, hn]
    v = torch.randn(sq, b, NG, HN, generator=g)  # [sk, b, ng, hn]
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _run_with_grads(module, q, k, v, mask=None, **kw):
    out = module(q, k, v, mask, **kw)  # [sq, b, hp]
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("mask_kind", ["none", "explicit_causal", "explicit_padding"])
def test_sdpa_matches_dot_product_attention_gqa(mask_kind):
    config = _attn_config()
    mask_type = AttnMaskType.padding if mask_kind == "explicit_padding" else AttnMaskType.causal
    ref = DotProductAttention(config, 1, mask_type, "self")
    sdpa = SDPAAttention(config, 1, mask_type, "self")
    mask = None
    if mask_kind == "explicit_causal":
        mask = torch.triu(torch.ones(SQ, SQ, dtype=torch.bool), diagonal=1)[None, None]
    elif mask_kind == "explicit_padding":  # random [b, 1, sq, sk] mask, diagonal always visible
        mask = torch.rand(B, 1, SQ, SQ, generator=torch.Generator().manual_seed(3)) < 0.4
        mask &= ~torch.eye(SQ, dtype=torch.bool)

    q, k, v = _qkv()
    out_ref, grads_ref = _run_with_grads(ref, q, k, v, mask)
    out, grads = _run_with_grads(sdpa, q, k, v, mask)

    assert out.shape == (SQ, B, NP * HN)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_softmax_scale_and_layer_scaling_rejected():
    config = _attn_config()
    ref = DotProductAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.05)
    sdpa = SDPAAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.05)
    q, k, v = _qkv(requires_grad=False)
    torch.testing.assert_close(sdpa(q, k, v, None), ref(q, k, v, None), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="apply_query_key_layer_scaling"):
        SDPAAttention(
            _attn_config(apply_query_key_layer_scaling=True, fp16=True),
            1,
            AttnMaskType.causal,
            "self",
        )


def _segment_reference(sdpa, q, k, v, cu):
    return torch.cat(
        [sdpa(q[s:e], k[s:e], v[s:e], None) for s, e in zip(cu[:-1], cu[1:])], dim=0
    )  # [t, b, hp]


@pytest.mark.parametrize("b", [1, 2])
def test_packed_sbhd_segments_are_independent(b):
    sdpa = SDPAAttention(_attn_config(), 1, AttnMaskType.causal, "self")
    cu = [0, 5, 12]
    q, k, v = _qkv(b=b, requires_grad=False)
    params = PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32),
        max_seqlen_q=7,
        max_seqlen_kv=7,
    )
    out = sdpa(q, k, v, None, packed_seq_params=params)  # [12, b, hp]
    torch.testing.assert_close(out, _segment_reference(sdpa, q, k, v, cu), atol=1e-6, rtol=1e-5)
    # and the packing really matters: without it segment 2 would see segment 1
    assert not torch.allclose(out[5:], sdpa(q, k, v, None)[5:], atol=1e-3)


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_packed_runs_of_equal_length_equal_separate_calls(mask_type):
    """Consecutive samples of one length (images of one size) share one batched SDPA call;
    output and every input gradient equal attending each sample alone, bit for bit (SDPA's
    batch entries are independent), also next to samples of other lengths."""
    sdpa = SDPAAttention(_attn_config(), 1, mask_type, "self")
    cu = [0, 3, 6, 9, 14, 18, 22, 23]  # runs: 3 x 3, 1 x 5, 2 x 4, 1 x 1
    q, k, v = _qkv(sq=cu[-1], b=1)
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                             cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32))
    out, grads = _run_with_grads(sdpa, q, k, v, packed_seq_params=params)

    def separate(q, k, v, mask, **kw):
        return _segment_reference(sdpa, q, k, v, cu)

    ref, ref_grads = _run_with_grads(separate, q, k, v)
    assert torch.equal(out, ref)
    for g, g_ref in zip(grads, ref_grads):
        assert torch.equal(g, g_ref)


def test_packed_thd_and_padded():
    sdpa = SDPAAttention(_attn_config(), 1, AttnMaskType.padding_causal, "self")
    q, k, v = _qkv(b=1, requires_grad=False)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    out = sdpa(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=thd)  # [t, hp]
    assert out.shape == (SQ, NP * HN)
    torch.testing.assert_close(
        out, _segment_reference(sdpa, q, k, v, [0, 5, 12])[:, 0], atol=1e-6, rtol=1e-5
    )

    # real lengths 4 and 6 laid out in padded slots of 5 and 7 (TE's *_padded convention)
    real, padded = torch.tensor([0, 4, 10]), torch.tensor([0, 5, 12])
    pad = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=real,
        cu_seqlens_kv=real,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
    )
    out = sdpa(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=pad)
    seg0 = sdpa(q[0:4], k[0:4], v[0:4], None)[:, 0]
    seg1 = sdpa(q[5:11], k[5:11], v[5:11], None)[:, 0]
    torch.testing.assert_close(out[0:4], seg0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[5:11], seg1, atol=1e-6, rtol=1e-5)
    assert out[4].abs().max() == 0 and out[11].abs().max() == 0  # padding slots attend nothing

    keep = packed_segment_mask(torch.tensor([0, 2, 3]), 4)
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(keep, expected)

    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_kv"):
        other_kv = torch.tensor([0, 6, 12])
        other = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=other_kv)
        sdpa(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=other)


def test_sliding_window_matches_dot_product_attention():
    config = _attn_config(window_size=(3, 0))
    q, k, v = _qkv(requires_grad=False)
    ref = DotProductAttention(config, 1, AttnMaskType.causal, "self")(q, k, v, None)
    out = SDPAAttention(config, 1, AttnMaskType.causal, "self")(q, k, v, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_dropout_uses_model_parallel_rng_tracker():
    sdpa = SDPAAttention(_attn_config(attention_dropout=0.5), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(requires_grad=False)
    sdpa.eval()
    clean = sdpa(q, k, v, None)
    sdpa.train()
    model_parallel_cuda_manual_seed(7)
    drop1 = sdpa(q, k, v, None)
    model_parallel_cuda_manual_seed(7)
    torch.manual_seed(12345)  # the default stream must not matter: dropout draws from the fork
    drop2 = sdpa(q, k, v, None)
    model_parallel_cuda_manual_seed(1)
    assert not torch.allclose(drop1, clean)
    torch.testing.assert_close(drop1, drop2)


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_norm_numerics_and_sequence_parallel_attr(cls):
    config = _attn_config()
    norm = cls(config, 64, eps=1e-6)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(5, 2, 64)
    if cls is RMSNorm:
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    else:
        ref = F.layer_norm(x, (64,), norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)
    assert all(p.sequence_parallel is False for p in norm.parameters())

    # TransformerConfig refuses sequence_parallel with TP=1, so flip it after construction
    sp_config = _attn_config()
    sp_config.sequence_parallel = True
    sp_norm = cls(sp_config, HN)  # QK-norm size
    assert sp_norm.weight.shape == (HN,)
    assert all(p.sequence_parallel is True for p in sp_norm.parameters())


def test_norm_dispatch_and_errors():
    assert isinstance(Norm(_attn_config(normalization="RMSNorm"), 64), RMSNorm)
    assert isinstance(Norm(_attn_config(normalization="LayerNorm"), 64), LayerNorm)
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        Norm(_attn_config(layernorm_zero_centered_gamma=True), 64)
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        RMSNorm(_attn_config(), 64, zero_centered_gamma=True)
    with pytest.raises(ValueError, match="normalization"):
        Norm(_attn_config(normalization="L2Norm"), 64)


# --------------------------------------------------------------------------- full model

GPT_CONFIG = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    kv_channels=16,
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    qk_layernorm=True,
    use_cpu_initialization=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    masked_softmax_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
)
VOCAB, SEQ = 128, 16


def _megavlm_block_spec(config: TransformerConfig) -> TransformerBlockSubmodules:
    """The local GPT layer spec with our norms + SDPA, and our final norm.

    A plain layer ModuleSpec makes TransformerBlock pick its final norm from the module-level
    ``LayerNormImpl`` (TENorm / FusedLayerNorm / WrappedTorchNorm by what is installed); the
    only way to choose it is to pass TransformerBlockSubmodules with ``layer_norm`` set.
    """
    layer = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"))
    layer.submodules.input_layernorm = Norm
    layer.submodules.pre_mlp_layernorm = Norm
    attn = layer.submodules.self_attention.submodules
    attn.q_layernorm = Norm
    attn.k_layernorm = Norm
    attn.core_attention = SDPAAttention
    return TransformerBlockSubmodules(
        layer_specs=[layer] * config.num_layers, layer_norm=Norm
    )


def _loss_and_grads(spec, config):
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    position_ids = torch.arange(SEQ)[None].expand(2, -1)
    loss = model(tokens, position_ids, None, labels=labels).mean()  # per-token loss [b, s]
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_gpt_model_with_megavlm_modules_matches_local_spec():
    config = TransformerConfig(**GPT_CONFIG)
    _, ref_loss, ref_grads = _loss_and_grads(
        get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"), config
    )
    model, loss, grads = _loss_and_grads(_megavlm_block_spec(config), config)

    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, RMSNorm)
    assert isinstance(layer.pre_mlp_layernorm, RMSNorm)
    assert isinstance(layer.self_attention.q_layernorm, RMSNorm)
    assert layer.self_attention.q_layernorm.weight.shape == (16,)
    assert isinstance(layer.self_attention.core_attention, SDPAAttention)
    assert isinstance(model.decoder.final_layernorm, RMSNorm)
    assert all(
        getattr(p, "sequence_parallel", None) is False
        for n, p in model.named_parameters()
        if "layernorm" in n
    )

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()  # identical parameter names -> same checkpoints
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gpt_model_packed_thd_equals_separate_samples():
    """End to end through SelfAttention's THD path (per-segment RoPE via cu_seqlens)."""
    config = TransformerConfig(**GPT_CONFIG)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_megavlm_block_spec(config),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=g)
    labels = torch.randint(0, VOCAB, (1, 12), generator=g)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7
    )
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(tokens, positions, None, labels=labels, packed_seq_params=params)
        first = model(tokens[:, :5], torch.arange(5)[None], None, labels=labels[:, :5])
        second = model(tokens[:, 5:], torch.arange(7)[None], None, labels=labels[:, 5:])
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-5)


def test_packed_rows_reach_thd_kernels_as_thd():
    """The ViT's packed sbhd row [t, 1, h, d] reaches a thd-only core attention (TE's, on GPU)
    as [t, h, d] with the boundaries tagged thd, and comes back as the [t, 1, h * d] that
    megatron expects from sbhd; the result equals attending each sample on its own."""
    from megavlm.models.vision.packed_attention import thd_kernels_for_packed_rows

    received = []

    class ThdOnly(SDPAAttention):  # stands in for TEDotProductAttention: records what it gets
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            received.append((packed_seq_params.qkv_format, query.dim()))
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)

    module = thd_kernels_for_packed_rows(ThdOnly)(_attn_config(), 1, AttnMaskType.padding, "self")
    assert thd_kernels_for_packed_rows(ThdOnly) is type(module)  # one class per base
    bounds = [0, 5, 12, 20]
    q, k, v = _qkv(sq=20, b=1)
    cu = torch.tensor(bounds, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    out = module(q, k, v, None, packed_seq_params=params)
    assert received == [("thd", 3)] and out.shape == (20, 1, NP * HN)
    plain = SDPAAttention(_attn_config(), 1, AttnMaskType.padding, "self")
    for a, e in zip(bounds[:-1], bounds[1:]):
        ref = plain(q[a:e], k[a:e], v[a:e], None)
        torch.testing.assert_close(out[a:e], ref, rtol=1e-6, atol=1e-6)
    # megatron's own thd call (already [t, h, d]) passes through untouched
    received.clear()
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    assert module(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=thd).shape == (20, NP * HN)
    assert received == [("thd", 3)]
