"""Perception Encoder (PE-lang) ViT on megatron-core blocks (REFERENCE 5).

The reference below is written from the formulas (perception_models' ``pe.py`` / ``rope.py``
semantics), not from our code: explicit per-head attention, RoPE as a complex rotation of
channel pairs, LayerScale as a plain product. Tolerance: 1e-5 max abs in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megavlm.config.vision import VisionConfig
from megavlm.models.full_tensors import gather_full_tensors, initialize_layout_invariant, load_full_tensors
from megavlm.models.vision.pe import (
    LayerScaleBiasDropoutAdd,
    PEVisionModel,
    pe_lang_g14,
    pe_num_parameters,
    pe_transformer_config,
)
from megavlm.models.vision.pe_rope import pe_rope_angles

pytestmark = pytest.mark.usefixtures("single_rank_megatron")
TOL = 1e-5


def tiny(activation: str = "gelu") -> VisionConfig:
    return VisionConfig(
        kind="pe", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        patch_size=14, temporal_patch_size=1, position_embedding_size=4, activation=activation,
        norm_eps=1e-5, layerscale_init=0.1, ln_pre=True,
    )


def build(vision: VisionConfig) -> PEVisionModel:
    return PEVisionModel(pe_transformer_config(vision), vision).eval()


# ------------------------------------------------------------------ the reference
def reference_weights(v: VisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in perception_models' naming; nothing is left at a trivial value."""
    g = torch.Generator().manual_seed(seed)
    h, f, p = v.hidden_size, v.ffn_hidden_size, v.patch_size

    def rnd(*shape, scale=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * scale + mean

    w = {
        "conv1.weight": rnd(h, 3, p, p, scale=0.05),
        "positional_embedding": rnd(v.position_embedding_size**2, h, scale=0.5),
        "ln_pre.weight": rnd(h, scale=0.1, mean=1.0),
        "ln_pre.bias": rnd(h, scale=0.1),
    }
    for i in range(v.num_layers):
        b = f"transformer.resblocks.{i}."
        w |= {
            b + "ln_1.weight": rnd(h, scale=0.1, mean=1.0), b + "ln_1.bias": rnd(h, scale=0.1),
            b + "attn.in_proj_weight": rnd(3 * h, h, scale=h**-0.5), b + "attn.in_proj_bias": rnd(3 * h, scale=0.1),
            b + "attn.out_proj.weight": rnd(h, h, scale=h**-0.5), b + "attn.out_proj.bias": rnd(h, scale=0.1),
            b + "ls_1.gamma": rnd(h, scale=0.05, mean=0.3),
            b + "ln_2.weight": rnd(h, scale=0.1, mean=1.0), b + "ln_2.bias": rnd(h, scale=0.1),
            b + "mlp.c_fc.weight": rnd(f, h, scale=h**-0.5), b + "mlp.c_fc.bias": rnd(f, scale=0.1),
            b + "mlp.c_proj.weight": rnd(h, f, scale=f**-0.5), b + "mlp.c_proj.bias": rnd(h, scale=0.1),
            b + "ls_2.gamma": rnd(h, scale=0.05, mean=0.3),
        }
    return w


def reference_rope(q: torch.Tensor, gh: int, gw: int, theta: float) -> torch.Tensor:
    """GPT-J RoPE as complex multiplication: pair (2i, 2i+1) is one complex number.

    ``q [n, heads, s, hd]``; the first hd/2 channels rotate with the column, the rest with the
    row; per axis the hd/4 frequencies are 1 / theta ** (2k / (hd/2)).
    """
    hd = q.shape[-1]
    inv = 1.0 / theta ** (torch.arange(hd // 4, dtype=torch.float32) * 2 / (hd // 2))
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    angle = torch.cat([cols.reshape(-1, 1) * inv, rows.reshape(-1, 1) * inv], dim=-1).to(q.device)  # [s, hd/2]
    pairs = torch.view_as_complex(q.float().reshape(*q.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def reference_forward(images: torch.Tensor, w: dict[str, torch.Tensor], v: VisionConfig) -> torch.Tensor:
    """PE-lang forward from the formulas: ``[n, 3, H, W] -> [n, H/p, W/p, hidden]``."""
    act = {"gelu": F.gelu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[v.activation]
    h, heads, eps, P = v.hidden_size, v.num_attention_heads, v.norm_eps, v.position_embedding_size
    hd = h // heads
    x = F.conv2d(images, w["conv1.weight"], stride=v.patch_size)  # [n, h, gh, gw]
    n, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # [n, s, h]
    table = w["positional_embedding"].reshape(1, P, P, h).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(gh, gw), mode="bilinear", align_corners=False)
    x = x + pos[0].permute(1, 2, 0).reshape(gh * gw, h)
    x = F.layer_norm(x, (h,), w["ln_pre.weight"], w["ln_pre.bias"], eps)
    for i in range(v.num_layers):
        b = f"transformer.resblocks.{i}."
        y = F.layer_norm(x, (h,), w[b + "ln_1.weight"], w[b + "ln_1.bias"], eps)
        q, k, val = (y @ w[b + "attn.in_proj_weight"].T + w[b + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, val = (t.reshape(n, -1, heads, hd).transpose(1, 2) for t in (q, k, val))  # [n, heads, s, hd]
        q, k = reference_rope(q, gh, gw, v.rope_theta), reference_rope(k, gh, gw, v.rope_theta)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ val
        attn = attn.transpose(1, 2).reshape(n, -1, h) @ w[b + "attn.out_proj.weight"].T + w[b + "attn.out_proj.bias"]
        x = x + w[b + "ls_1.gamma"] * attn
        y = F.layer_norm(x, (h,), w[b + "ln_2.weight"], w[b + "ln_2.bias"], eps)
        y = act(y @ w[b + "mlp.c_fc.weight"].T + w[b + "mlp.c_fc.bias"]) @ w[b + "mlp.c_proj.weight"].T
        x = x + w[b + "ls_2.gamma"] * (y + w[b + "mlp.c_proj.bias"])
    return x.reshape(n, gh, gw, h)


def to_sharded_keys(w: dict[str, torch.Tensor], v: VisionConfig) -> dict[str, torch.Tensor]:
    """perception_models names -> our sharded keys (layers stacked on a leading axis).

    PE's ``in_proj`` is ``[q; k; v]``; megatron's ``linear_qkv`` groups rows per head
    ``[q_h; k_h; v_h]`` (one query group per head here).
    """
    heads, hd, L = v.num_attention_heads, v.hidden_size // v.num_attention_heads, v.num_layers

    def qkv(t):
        return t.reshape(3, heads, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def stack(name, fn=lambda t: t):
        return torch.stack([fn(w[f"transformer.resblocks.{i}.{name}"]) for i in range(L)])

    d = "decoder.layers."
    return {
        "conv1.weight": w["conv1.weight"],
        "position_embeddings": w["positional_embedding"],
        "ln_pre.weight": w["ln_pre.weight"],
        "ln_pre.bias": w["ln_pre.bias"],
        d + "self_attention.linear_qkv.layer_norm_weight": stack("ln_1.weight"),
        d + "self_attention.linear_qkv.layer_norm_bias": stack("ln_1.bias"),
        d + "self_attention.linear_qkv.weight": stack("attn.in_proj_weight", qkv),
        d + "self_attention.linear_qkv.bias": stack("attn.in_proj_bias", qkv),
        d + "self_attention.linear_proj.weight": stack("attn.out_proj.weight"),
        d + "self_attention.linear_proj.bias": stack("attn.out_proj.bias"),
        d + "self_attn_bda.layer_scale": stack("ls_1.gamma"),
        d + "mlp.linear_fc1.layer_norm_weight": stack("ln_2.weight"),
        d + "mlp.linear_fc1.layer_norm_bias": stack("ln_2.bias"),
        d + "mlp.linear_fc1.weight": stack("mlp.c_fc.weight"),
        d + "mlp.linear_fc1.bias": stack("mlp.c_fc.bias"),
        d + "mlp.linear_fc2.weight": stack("mlp.c_proj.weight"),
        d + "mlp.linear_fc2.bias": stack("mlp.c_proj.bias"),
        d + "mlp_bda.layer_scale": stack("ls_2.gamma"),
    }


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_forward_matches_reference(activation):
    """Same weights in both; 4x4 grid (table used as is), 2x3 (downsampled), 5x6 (upsampled)."""
    v = tiny(activation)
    w = reference_weights(v)
    model = build(v)
    load_full_tensors([model], to_sharded_keys(w, v))
    g = torch.Generator().manual_seed(1)
    for height, width in [(56, 56), (28, 42), (70, 84)]:
        images = torch.randn(2, 3, height, width, generator=g)
        with torch.no_grad():
            out = model(images)
            ref = reference_forward(images, w, v)
        assert out.shape == (2, height // 14, width // 14, 64)
        diff = (out - ref).abs().max().item()
        assert diff < TOL, f"{activation} {height}x{width}: max abs diff {diff:.2e} (|ref| max {ref.abs().max():.1f})"


def test_rope_angles_interleaved_pairs_2x2():
    """head_dim 8: per axis d = 4, inv = [1, 10000**-0.5] = [1, 0.01], each twice; x then y."""
    a = 0.01
    expected = torch.tensor([
        # col angles (pairs)    row angles (pairs)       patch (row, col)
        [0, 0, 0, 0,            0, 0, 0, 0],            # (0, 0)
        [1, 1, a, a,            0, 0, 0, 0],            # (0, 1)
        [0, 0, 0, 0,            1, 1, a, a],            # (1, 0)
        [1, 1, a, a,            1, 1, a, a],            # (1, 1)
    ])
    torch.testing.assert_close(pe_rope_angles(2, 2, 8), expected, rtol=0, atol=1e-7)


def test_megatron_rotary_interleaved_is_gpt_j_pairs():
    """megatron's rotary_interleaved=True rotates (x[2i], x[2i+1]) by angle[2i], as PE does."""
    config = pe_transformer_config(tiny())
    assert config.rotary_interleaved
    hd, gh, gw = 16, 3, 5
    t = torch.randn(gh * gw, 2, 4, hd)  # [s, b, heads, hd]
    angles = pe_rope_angles(gh, gw, hd)[:, None, None, :]
    ours = apply_rotary_pos_emb(t, angles, config=config)
    ref = reference_rope(t.permute(1, 2, 0, 3), gh, gw, 10000.0).permute(2, 0, 1, 3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_layerscale_init_and_parameter_counts():
    model = build(tiny())
    scales = [m.layer_scale for m in model.modules() if isinstance(m, LayerScaleBiasDropoutAdd)]
    assert len(scales) == 4 and all(torch.equal(s, torch.full((64,), 0.1)) for s in scales)
    assert sum(p.numel() for p in model.parameters()) == pe_num_parameters(tiny()) == 105_984
    # STEP3-VL's PE-lang G/14, by hand (H 1536, F 8960, L 47, patch 14, 52x52 table):
    # per layer 4*H^2 + 2*H*F + 11*H + F = 9_437_184 + 27_525_120 + 16_896 + 8_960 = 36_988_160
    # total 47 * 36_988_160 + 3*14*14*1536 (conv) + 2704*1536 (table) + 2*1536 (ln_pre)
    g14 = pe_lang_g14()
    assert 47 * 36_988_160 + 903_168 + 4_153_344 + 3_072 == pe_num_parameters(g14) == 1_743_503_104
    assert (g14.hidden_size // g14.num_attention_heads, g14.layerscale_init, g14.norm_eps) == (96, 0.1, 1e-5)
    assert (g14.kind, g14.patch_size, g14.temporal_patch_size, g14.ln_pre) == ("pe", 14, 1, True)


def test_sharded_state_dict_keys_and_layout_invariant_init():
    v = tiny()
    model = build(v)
    d = "decoder.layers."
    layer_keys = [
        "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
        "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
        "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
        "self_attn_bda.layer_scale",
        "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
        "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
        "mlp_bda.layer_scale",
    ]
    expected = {"conv1.weight", "position_embeddings", "ln_pre.weight", "ln_pre.bias"} | {d + k for k in layer_keys}
    initialize_layout_invariant([model], seed=7, std=0.02, num_layers=v.num_layers, vocab_size=1)
    full = gather_full_tensors([model])
    assert set(full) == expected
    assert full[d + "self_attention.linear_qkv.weight"].shape == (2, 192, 64)
    assert torch.equal(full[d + "mlp_bda.layer_scale"], torch.full((2, 64), 0.1))  # vectors stay as built
    assert not full[d + "mlp.linear_fc1.bias"].any()
    assert 0.015 < full["position_embeddings"].std() < 0.025
    # a second model with the same seed is the same model
    other = build(v)
    initialize_layout_invariant([other], seed=7, std=0.02, num_layers=v.num_layers, vocab_size=1)
    images = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(model(images), other(images), rtol=0, atol=0)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiples of patch_size=14"):
        build(tiny())(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="model.vision.activation"):
        pe_transformer_config(tiny("relu"))
