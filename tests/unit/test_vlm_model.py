"""VLMModel building blocks that need no HF reference: freezing, validation, DeepStack layout."""

from __future__ import annotations

import pytest
from megatron.core.utils import unwrap_model

from megavlm.config import ConfigError, load_config, validate
from megavlm.models.deepstack import late_levels
from megavlm.models.vlm import pipeline_seq_multiplier
from megavlm.models.build import build_model_chunks


@pytest.mark.usefixtures("single_rank_megatron")
def test_stage0_freezing_trains_only_the_projector():
    """Qwen3-VL stage 0: ViT and decoder frozen, the mergers (main and DeepStack) train."""
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "model.freeze=[vision, language]"])
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"merger", "deepstack_mergers"}
    assert all(not p.requires_grad for p in model.language.parameters())


@pytest.mark.parametrize("override, message", [
    ("model.rope.mrope_section=[4,2,1]", "must sum to model.language.head_dim / 2 (8)"),
    ("model.vision.deepstack_layers=[1,2,9]", "deepstack_layers [9] are not ViT blocks 0..3"),
    ("model.freeze=[vision, decoder]", "model.freeze: 'decoder' is not one of vision, projector, language"),
    ("model.vision.num_attention_heads=3", "model.vision.num_attention_heads (3) must be a multiple of parallel.tp (2)"),
])
def test_vlm_config_errors_name_the_key(override, message):
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "parallel.tp=2", override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world_size=2)


def test_deepstack_levels_travel_only_when_a_target_layer_is_past_the_first_stage():
    assert late_levels(levels=3, num_layers=36, pp=4, vpp=None) == 0  # 9 layers on stage 0
    assert late_levels(levels=3, num_layers=4, pp=2, vpp=None) == 1  # layer 2 is on stage 1
    assert late_levels(levels=3, num_layers=8, pp=2, vpp=4) == 2  # one layer per virtual chunk
    cfg = load_config(None, ["model.preset=qwen3vl-tiny", "parallel.pp=2"])
    assert pipeline_seq_multiplier(cfg.model, cfg.parallel) == 2


@pytest.mark.usefixtures("single_rank_megatron")
def test_step3vl_views_reach_their_placeholders():
    """STEP3-VL: PE + conv downsampler, 1D RoPE. Two views (8x8 and 4x4 patches) give 4 + 1
    tokens in placeholder order; each view's pixels change only the logits after its tokens."""
    import torch

    cfg = load_config(None, ["model.preset=step3vl-tiny"])
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk).eval()
    img = cfg.model.token_ids.image_token_id
    tokens = torch.tensor([[27, 28] + [img] * 4 + [29, 30] + [img] + [31, 32]])
    positions = torch.arange(tokens.shape[1])[None]
    grid = torch.tensor([[1, 8, 8], [1, 4, 4]])
    pixels = torch.randn(64 + 16, 3 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(tokens, positions, pixel_values=pixels, image_grid_thw=grid)
        changed = pixels.clone()
        changed[64:] += 1.0  # the second view only
        other = model(tokens, positions, pixel_values=changed, image_grid_thw=grid)
    diff = (base - other).abs().amax(dim=-1)[0]
    assert diff[:8].max() == 0 and diff[8:].min() > 0
    with pytest.raises(ValueError, match="image features and placeholders differ: 5 features"):
        model(tokens[:, :-3], positions[:, :-3], pixel_values=pixels, image_grid_thw=grid)
    # With the data path's host copy the placeholders are counted there (no device read):
    # the same tokens give the same output, a copy that disagrees is what gets counted.
    with torch.no_grad():
        hosted = model(tokens, positions, pixel_values=pixels, image_grid_thw=grid, host_tokens=tokens.clone())
    assert torch.equal(hosted, base)
    lying = tokens.clone()
    lying[0, 2] = 27
    with pytest.raises(ValueError, match="image features and placeholders differ: 5 features .* but 4 placeholder"):
        model(tokens, positions, pixel_values=pixels, image_grid_thw=grid, host_tokens=lying)


@pytest.mark.usefixtures("single_rank_megatron")
def test_local_vit_packs_as_sbhd_and_equals_megatrons_thd_path():
    """On the local backend the ViT packs its images as 'sbhd' with host-side boundaries
    (RoPE one-to-one, no read-back per image); megatron's own 'thd' path (per-sample RoPE
    offsets read with .item()) must give the same features and gradients."""
    import torch

    cfg = load_config(None, ["model.preset=qwen3vl-tiny"])
    (chunk,), _ = build_model_chunks(cfg)
    vision = unwrap_model(chunk).vision
    assert vision.packed_format == "sbhd"
    seen = []
    vision.encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["packed_seq_params"]), with_kwargs=True)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4], [1, 8, 4]])  # an image, a 2-slice video, another image
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    v = cfg.model.vision
    pixels = torch.randn(n, v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                         generator=torch.Generator().manual_seed(0))

    def run(fmt):
        vision.packed_format = fmt
        vision.zero_grad(set_to_none=True)
        merged, deepstack = vision(pixels, grid)
        (merged.square().sum() + sum(d.sum() for d in deepstack)).backward()
        return [merged.detach(), *(d.detach() for d in deepstack)], {k: p.grad.clone() for k, p in vision.named_parameters()}

    out, grads = run("sbhd")
    assert seen[-1].qkv_format == "sbhd" and seen[-1].cu_seqlens_q.device.type == "cpu"
    ref_out, ref_grads = run("thd")
    assert seen[-1].qkv_format == "thd"
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for k, g in grads.items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)
