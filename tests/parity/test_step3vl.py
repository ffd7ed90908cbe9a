"""megavlm's STEP3-VL equals the released model as transformers and the released ops compute it
(fp32, CPU), and the released HF layout round-trips bit-exactly.

The weights are random and written in the *released* naming (``conversion.step3vl``). The
reference side never sees megavlm's map:

* vision: transformers' ``Step3p7VisionModel`` (StepFun's PE-lang tower, with the two
  ``vit_downsampler`` convs) loaded by ``from_pretrained`` from a directory holding the
  ``vision_model.*`` tensors with the prefix stripped, so transformers' own checkpoint
  conversion (``conversion_mapping["step3p5_vision"]``: renames, q/k/v chunking, rotate-half
  permutation) reads the released names; then ``vit_large_projector`` applied as released
  (``F.linear``, no bias). transformers' ``Step3p7Model`` wraps a Step-3.7 MoE decoder, not
  STEP3-VL's Qwen3, so only its vision tower is used.
* decoder: transformers' ``Qwen3ForCausalLM`` loaded from the ``model.*`` / ``lm_head.weight``
  tensors, as vLLM's ``StepVLForConditionalGeneration`` maps them.
* end to end: megavlm's VLM logits on a prompt with an image equal Qwen3ForCausalLM's on the
  same embeddings with the image placeholders replaced by the reference vision features.

Tolerance 1e-4 max abs (vision tokens and logits).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from megatron.core.utils import unwrap_model
from safetensors.torch import load_file, save_file

from megavlm.config import load_config
from megavlm.conversion.engine import hf_to_megavlm, megavlm_to_hf
from megavlm.conversion.hf_checkpoint import load_hf_model_dir, save_hf_model_dir
from megavlm.conversion.hf_config import hf_config_from_model, model_config_from_hf
from megavlm.conversion.step3vl import step3vl_rules
from megavlm.models.build import build_model_chunks
from megavlm.models.full_tensors import gather_full_tensors, load_full_tensors

pytestmark = pytest.mark.usefixtures("single_rank_megatron")
TOL = 1e-4
# (height, width) in pixels: the native 8x8 grid of step3vl-tiny (position table used as is),
# and a non-square 7x11 grid (table resampled; odd sides, so the stride-2 convs pad).
IMAGES = {"square": (112, 112), "non_square": (98, 154)}


def _config(tie: bool):
    return load_config(None, ["model.preset=step3vl-tiny", f"model.language.tie_embeddings={str(tie).lower()}"])


def _released_weights(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every released key of ``cfg`` (names and shapes from the map; values
    drawn per key, norms near 1, LayerScale near its 0.1 init)."""
    (chunk,), _ = build_model_chunks(cfg)
    shapes = {k: v.shape for k, v in gather_full_tensors([unwrap_model(chunk)]).items()}
    rules = step3vl_rules(cfg.model)
    template = megavlm_to_hf({k: torch.zeros(s) for k, s in shapes.items()}, rules, num_layers=cfg.model.language.num_layers)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(template):
        shape = template[key].shape
        if "norm" in key or key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight")):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("gamma"):
            out[key] = 0.1 + 0.05 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=g)
    return out


def _megavlm(cfg, released):
    (chunk,), _ = build_model_chunks(cfg)
    model = unwrap_model(chunk).eval()
    load_full_tensors([model], hf_to_megavlm(released, step3vl_rules(cfg.model), num_layers=cfg.model.language.num_layers))
    return model


def _hf_vision(cfg, released, tmp_path) -> transformers.Step3p7VisionModel:
    v = cfg.model.vision
    config = transformers.Step3p7VisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
        num_channels=v.in_channels, image_size=v.patch_size * v.position_embedding_size, patch_size=v.patch_size,
        mlp_ratio=v.ffn_hidden_size / v.hidden_size, hidden_act=v.activation, layer_norm_eps=v.norm_eps,
        layer_scale_init_value=v.layerscale_init,
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    assert config.intermediate_size == v.ffn_hidden_size
    config.save_pretrained(tmp_path)
    tower = {k.removeprefix("vision_model."): t for k, t in released.items() if k.startswith("vision_model.")}
    save_file(tower, str(tmp_path / "model.safetensors"))
    model, info = transformers.Step3p7VisionModel.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager",
    )
    # every released vision tensor is consumed and every HF parameter comes from one of them
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _hf_decoder(cfg, released) -> transformers.Qwen3ForCausalLM:
    lm = cfg.model.language
    config = transformers.Qwen3Config(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups, head_dim=lm.head_dim, rms_norm_eps=lm.norm_eps,
        rope_theta=lm.rope_theta, max_position_embeddings=lm.max_position_embeddings,
        tie_word_embeddings=lm.tie_embeddings, attention_bias=False, attn_implementation="eager",
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    text = {k: t for k, t in released.items() if k.startswith(("model.", "lm_head."))}
    missing, unexpected = model.load_state_dict(text, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if lm.tie_embeddings else set()), (missing, unexpected)
    return model


def _patches(image: torch.Tensor, p: int) -> torch.Tensor:
    """``[C, H, W]`` -> megavlm's ``[h * w, C * p * p]`` (row-major patches, each ``[C, p, p]``)."""
    c, height, width = image.shape
    h, w = height // p, width // p
    return image.reshape(c, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, c * p * p)


def _reference_tokens(hf_vision, projector: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        features = hf_vision(images).last_hidden_state  # [n, h/4 * w/4, 4C] after vit_downsampler1/2
        return F.linear(features, projector).reshape(-1, projector.shape[0])  # vit_large_projector


def _megavlm_tokens(model, images: torch.Tensor, p: int) -> torch.Tensor:
    n, _, height, width = images.shape
    pixels = torch.cat([_patches(im, p) for im in images])
    grid = torch.tensor([[1, height // p, width // p]] * n)
    with torch.no_grad():
        tokens, deepstack = model.vision(pixels, grid)
    assert deepstack == []
    return tokens


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path_factory):
    cfg = _config(request.param)
    released = _released_weights(cfg)
    return cfg, released, _megavlm(cfg, released)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_vision_tower_downsampler_projector_match_hf(setup, image, tmp_path):
    cfg, released, model = setup
    hf_vision = _hf_vision(cfg, released, tmp_path)
    height, width = IMAGES[image]
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    ref = _reference_tokens(hf_vision, released["vit_large_projector.weight"], images)
    ours = _megavlm_tokens(model, images, cfg.model.vision.patch_size)
    gh, gw = -(-height // 14 // 4), -(-width // 14 // 4)
    assert ours.shape == ref.shape == (2 * gh * gw, cfg.model.language.hidden_size)
    diff = (ours - ref).abs().max().item()
    print(f"vision {image} {height}x{width}: max abs diff {diff:.3e}")
    assert diff <= TOL


def test_decoder_logits_match_hf_qwen3(setup):
    cfg, released, model = setup
    hf = _hf_decoder(cfg, released)
    lm = cfg.model.language
    assert sum(p.numel() for p in model.language.parameters()) == sum(p.numel() for p in hf.parameters())
    tokens = torch.randint(10, lm.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ours = model(tokens, positions)[..., : lm.vocab_size]
        ref = hf(input_ids=tokens).logits
    diff = (ours - ref).abs().max().item()
    print(f"decoder logits: max abs diff {diff:.3e}")
    assert diff <= TOL


def test_vlm_logits_with_an_image_match_hf(setup, tmp_path):
    """End to end: the image's tokens replace its ``<im_patch>`` placeholders in the decoder input."""
    cfg, released, model = setup
    ids, p = cfg.model.token_ids, cfg.model.vision.patch_size
    hf_vision, hf = _hf_vision(cfg, released, tmp_path), _hf_decoder(cfg, released)
    image = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    features = _reference_tokens(hf_vision, released["vit_large_projector.weight"], image)  # [4, hidden]
    g = torch.Generator().manual_seed(5)
    text = lambda n: torch.randint(20, cfg.model.language.vocab_size, (n,), generator=g)  # noqa: E731
    placeholder = torch.full((features.shape[0],), ids.image_token_id)
    seq = torch.cat([text(5), torch.tensor([ids.vision_start_token_id]), placeholder,
                     torch.tensor([ids.vision_end_token_id]), text(6)])[None]
    positions = torch.arange(seq.shape[1])[None]
    with torch.no_grad():
        ours = model(seq, positions, pixel_values=_patches(image[0], p), image_grid_thw=torch.tensor([[1, 8, 8]]))
        embeds = hf.model.embed_tokens(seq).clone()
        embeds[seq == ids.image_token_id] = features
        ref = hf(inputs_embeds=embeds).logits
    diff = (ours[..., : cfg.model.language.vocab_size] - ref).abs().max().item()
    print(f"VLM logits with an image: max abs diff {diff:.3e}")
    assert diff <= TOL


def test_released_layout_round_trips_bit_exactly(setup, tmp_path):
    cfg, released, model = setup
    rules, layers = step3vl_rules(cfg.model), cfg.model.language.num_layers
    # in memory: HF -> megavlm -> HF
    full = hf_to_megavlm(released, rules, num_layers=layers)
    back = megavlm_to_hf(full, rules, num_layers=layers)
    assert back.keys() == released.keys()
    assert all(torch.equal(back[k], v) for k, v in released.items())
    assert ("lm_head.weight" in released) is (not cfg.model.language.tie_embeddings)
    # through the model and the directory format: gather from megavlm, write, read, compare
    gathered = {k: v for k, v in gather_full_tensors([model]).items() if k in full}
    assert gathered.keys() == full.keys()
    save_hf_model_dir(tmp_path, cfg.model, gathered)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert on_disk.keys() == released.keys()
    assert all(torch.equal(on_disk[k], v) for k, v in released.items())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["StepVLForConditionalGeneration"]
    model_cfg, reread = load_hf_model_dir(tmp_path)
    assert model_cfg.language == cfg.model.language and model_cfg.vision == cfg.model.vision
    assert model_cfg.projector == cfg.model.projector and model_cfg.rope == cfg.model.rope
    assert model_cfg.token_ids == cfg.model.token_ids
    assert reread.keys() == full.keys() and all(torch.equal(reread[k], full[k]) for k in full)


def test_config_of_the_released_layout():
    """The 10B preset's config.json names its shapes the way vLLM / llama.cpp read them, and
    reads back to the same model."""
    model = load_config(None, ["model.preset=step3vl-10b"]).model
    config = hf_config_from_model(model)
    v = config["vision_config"]
    assert (v["width"], v["layers"], v["heads"], v["image_size"], v["patch_size"]) == (1536, 47, 16, 728, 14)
    assert round(v["width"] * v["mlp_ratio"]) == 8960 and v["hidden_act"] == "quick_gelu"
    assert config["understand_projector_stride"] == 2 and config["image_token_id"] == 151679
    back = model_config_from_hf(config)
    assert back.language == model.language and back.vision == model.vision and back.token_ids == model.token_ids
    assert back.language.max_position_embeddings >= 65536
    # transformers' Step3p7VisionConfig reads StepFun's legacy names (width / layers / heads)
    legacy = ("width", "layers", "heads", "image_size", "patch_size", "mlp_ratio")
    hf = transformers.Step3p7VisionConfig(**{k: v[k] for k in legacy})
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size) == (1536, 47, 16, 8960)
