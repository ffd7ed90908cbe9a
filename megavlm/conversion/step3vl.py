"""STEP3-VL-10B (``StepVLForConditionalGeneration``): the released HF key map as data, and its
``config.json`` reader / writer.

Released tensor names (REFERENCE 5 shapes for the 10B model)::

    vision_model.conv1.weight                              [1536, 3, 14, 14]  (no bias)
    vision_model.positional_embedding                      [2704, 1536]       (52 x 52, row-major)
    vision_model.ln_pre.{weight,bias}
    vision_model.transformer.resblocks.{i}.ln_1.{weight,bias}
    vision_model.transformer.resblocks.{i}.attn.in_proj_weight   [4608, 1536]  [q; k; v]
    vision_model.transformer.resblocks.{i}.attn.in_proj_bias     [4608]
    vision_model.transformer.resblocks.{i}.attn.out_proj.{weight,bias}
    vision_model.transformer.resblocks.{i}.ls_1.gamma      [1536]  (LayerScale, attention branch)
    vision_model.transformer.resblocks.{i}.ln_2.{weight,bias}
    vision_model.transformer.resblocks.{i}.mlp.c_fc.{weight,bias}
    vision_model.transformer.resblocks.{i}.mlp.c_proj.{weight,bias}
    vision_model.transformer.resblocks.{i}.ls_2.gamma      [1536]  (LayerScale, MLP branch)
    vision_model.vit_downsampler1.{weight,bias}            [3072, 1536, 3, 3]
    vision_model.vit_downsampler2.{weight,bias}            [6144, 3072, 3, 3]
    vit_large_projector.weight                             [4096, 6144]  (no bias)
    model.{embed_tokens,layers.{i}.*,norm}.*, lm_head.weight   (a Qwen3ForCausalLM decoder)

Sources of these names (checked, none is the checkpoint's own index, which is not reachable here):

* transformers 5.24 (installed): ``conversion_mapping.py`` entries ``"step3p7"`` (top level:
  ``^vision_model.`` -> ``model.vision_model.``, ``^vit_large_projector.`` ->
  ``model.multi_modal_projector.``) and ``"step3p5_vision"`` (inside the vision model:
  ``conv1.weight``, ``positional_embedding``, ``transformer.resblocks.``, ``ln_pre.``,
  ``vit_downsampler1.`` / ``vit_downsampler2.``, ``.ls_1.gamma`` / ``.ls_2.gamma``,
  ``.mlp.c_fc.`` / ``.mlp.c_proj.``, ``.attn.in_proj_weight`` / ``in_proj_bias`` chunked into
  q, k, v). Step-3.7-Flash shares this PE-lang G/14 tower and its names with STEP3-VL-10B.
* vLLM ``vllm/model_executor/models/step_vl.py`` (``StepVLForConditionalGeneration``, the
  STEP3-VL-10B architecture): ``PerceptionEncoder`` with ``conv1``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks.{i}.{attn,ln_1,ln_2,ls_1,ls_2,mlp}``, the downsamplers as
  ``vision_model.vit_downsampler{1,2}``; ``vit_large_projector`` at the top level; its
  ``hf_to_vllm_mapper`` maps ``model.`` / ``lm_head.`` to the Qwen3 language model, and
  ``in_proj_weight`` / ``in_proj_bias`` to a fused QKV that is chunked q, k, v.
* llama.cpp ``convert_hf_to_gguf`` (``Step3VLVisionModel`` registered for
  ``StepVLForConditionalGeneration``, text side a ``Qwen3Model``): ``vision_model.vit_downsampler(\\d+)``,
  ``vit_large_projector.weight``, ``vision_model.positional_embedding``, ``.ls_*.gamma``.

Layout rules (everything else is a rename, so a round trip is bit-exact):

* ``in_proj_weight`` / ``in_proj_bias`` rows are ``[q (all heads); k; v]``; megatron's
  ``linear_qkv`` groups them per head ``[q_h; k_h; v_h]`` (``qwen3vl._per_head``). Within a head
  the rows stay as released: PE rotates GPT-J pairs ``(2i, 2i+1)`` and megavlm's PE runs
  megatron with ``rotary_interleaved=True`` (``models/vision/pe_rope.py``). transformers'
  ``Step3p7VisionModel`` uses rotate-half instead, which is why its loader applies
  ``PermuteForRope`` to q and k; megavlm needs no such permutation.
* LayerScale ``ls_1.gamma`` / ``ls_2.gamma`` live in megavlm's bias-dropout-add slots
  (``self_attn_bda.layer_scale`` / ``mlp_bda.layer_scale``, ``models/vision/pe.py``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from megavlm.config.presets import STEP3VL_TOKEN_IDS
from megavlm.config.schema import LanguageModelConfig, ModelConfig
from megavlm.config.vision import ProjectorConfig, RopeConfig, TokenIdsConfig, VisionConfig
from megavlm.conversion.engine import KeyRule
from megavlm.conversion.qwen3 import qwen3_rules
from megavlm.conversion.qwen3vl import vit_block_rules

# PE-lang (OpenCLIP naming): in_proj is the fused [q; k; v]
STEP3VL_BLOCK = {"norm1": "ln_1", "qkv": "attn.in_proj_{param}", "proj": "attn.out_proj", "norm2": "ln_2",
                 "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}

ARCHITECTURE = "StepVLForConditionalGeneration"  # vLLM, SGLang and llama.cpp register this name
# UNVERIFIED: the released config.json's model_type (the checkpoint ships remote code). The
# reader recognizes the family by ``architectures`` first, so this only matters for export.
MODEL_TYPE = "step_vl"
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def vision_rules(model: ModelConfig) -> list[KeyRule]:
    v = model.vision
    heads, depth = v.num_attention_heads, v.num_layers
    block = "vision_model.transformer.resblocks.{i}."
    layer = "vision.encoder.decoder.layers."
    rules = [
        KeyRule(("vision_model.conv1.weight",), "vision.encoder.conv1.weight"),
        KeyRule(("vision_model.positional_embedding",), "vision.encoder.position_embeddings"),
        KeyRule((block + "ls_1.gamma",), layer + "self_attn_bda.layer_scale", layers=depth),
        KeyRule((block + "ls_2.gamma",), layer + "mlp_bda.layer_scale", layers=depth),
        KeyRule(("vit_large_projector.weight",), "vision.downsampler.proj.weight"),
    ]
    for param in ("weight", "bias"):
        rules += [
            KeyRule((f"vision_model.ln_pre.{param}",), f"vision.encoder.ln_pre.{param}"),
            *vit_block_rules(block, STEP3VL_BLOCK, param, layer=layer, heads=heads, depth=depth),
            KeyRule((f"vision_model.vit_downsampler1.{param}",), f"vision.downsampler.conv1.{param}"),
            KeyRule((f"vision_model.vit_downsampler2.{param}",), f"vision.downsampler.conv2.{param}"),
        ]
    return rules


def step3vl_rules(model: ModelConfig) -> list[KeyRule]:
    """Rules for the whole model: the Qwen3 decoder under ``model.`` (+ ``lm_head.weight`` when
    untied), then the PE tower, its downsampler and ``vit_large_projector``."""
    return qwen3_rules(model.language, hf_prefix="model.") + vision_rules(model)


def is_step3vl_config(hf: Mapping[str, Any]) -> bool:
    return ARCHITECTURE in (hf.get("architectures") or []) or hf.get("model_type") == MODEL_TYPE


class Step3VLConfigError(ValueError):
    pass


def _pick(cfg: Mapping[str, Any], where: str, *keys: str, default: Any = None):
    """The first of ``keys`` present (StepFun's PE names first, transformers' aliases second)."""
    for key in keys:
        if key in cfg:
            return cfg[key]
    if default is not None:
        return default
    raise Step3VLConfigError(f"{where}: missing key {' / '.join(repr(k) for k in keys)}")


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """``ModelConfig`` from a STEP3-VL ``config.json``.

    Vision keys are those of StepFun's PE config as read by vLLM ``step_vl.py`` and llama.cpp
    (``width``, ``layers``, ``heads``, ``patch_size``, ``image_size``, ``mlp_ratio``,
    ``ls_init_value``, ``use_ln_pre``, ``use_ln_post``, ``use_cls_token``, ``use_abs_posemb``,
    ``use_rope2d``, ``hidden_act``, ``layer_norm_eps``), with transformers' Step3p7VisionConfig
    aliases (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``layer_scale_init_value``) accepted too. The text config is a Qwen3 config.
    ``understand_projector_stride`` (top level, llama.cpp) must be 2: the two stride-2 convs.
    """
    text = _pick(hf, "config.json", "text_config")
    vision = _pick(hf, "config.json", "vision_config")
    t = lambda *keys, default=None: _pick(text, "config.json text_config", *keys, default=default)  # noqa: E731
    v = lambda *keys, default=None: _pick(vision, "config.json vision_config", *keys, default=default)  # noqa: E731
    for flag, want in (("use_cls_token", False), ("use_ln_post", False), ("use_abs_posemb", True), ("use_rope2d", True)):
        if bool(vision.get(flag, want)) != want:
            raise Step3VLConfigError(f"config.json vision_config: {flag}={vision[flag]} is not supported (PE-lang: {want})")
    stride = hf.get("understand_projector_stride", 2)
    if stride != 2:
        raise Step3VLConfigError(f"config.json: understand_projector_stride={stride}; megavlm's downsampler is stride 2")
    if hf.get("projector_bias", False):
        raise Step3VLConfigError("config.json: projector_bias=true; vit_large_projector is bias-free in STEP3-VL-10B")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise Step3VLConfigError("config.json text_config: no rope_theta")
    hidden = t("hidden_size")
    tie = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    language = LanguageModelConfig(
        num_layers=t("num_hidden_layers"), hidden_size=hidden, ffn_hidden_size=t("intermediate_size"),
        num_attention_heads=t("num_attention_heads"), num_query_groups=t("num_key_value_heads"),
        head_dim=text.get("head_dim") or hidden // t("num_attention_heads"), vocab_size=t("vocab_size"),
        rope_theta=float(theta), max_position_embeddings=t("max_position_embeddings"),
        norm_eps=text.get("rms_norm_eps", 1e-6), tie_embeddings=tie,
    )
    width = v("width", "hidden_size")
    image, patch = v("image_size"), v("patch_size")
    side = image // patch
    positions = vision.get("max_position_embeddings", side * side)
    if math.isqrt(positions) ** 2 != positions or positions != side * side:
        raise Step3VLConfigError(
            f"config.json vision_config: {positions} positions do not form the {side}x{side} grid of "
            f"image_size {image} / patch_size {patch}"
        )
    act = v("hidden_act", default="quick_gelu")
    if act not in _ACTIVATIONS:
        raise Step3VLConfigError(f"config.json vision_config: hidden_act {act!r} is not one of {', '.join(_ACTIVATIONS)}")
    # vLLM and transformers: int(width * mlp_ratio); llama.cpp rounds (same for 8960 / 1536).
    ffn = vision.get("intermediate_size") if "mlp_ratio" not in vision else None
    vision_cfg = VisionConfig(
        kind="pe", num_layers=v("layers", "num_hidden_layers"), hidden_size=width,
        ffn_hidden_size=ffn or round(width * float(v("mlp_ratio", default=8960 / 1536))),
        num_attention_heads=v("heads", "num_attention_heads"), patch_size=patch, temporal_patch_size=1,
        in_channels=vision.get("num_channels", 3), position_embedding_size=side, activation=_ACTIVATIONS[act],
        norm_eps=vision.get("layer_norm_eps", 1e-5),
        rope_theta=float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        layerscale_init=v("ls_init_value", "layer_scale_init_value", default=0.1),
        ln_pre=bool(vision.get("use_ln_pre", True)),
    )
    ids = _token_ids(hf)
    return ModelConfig(
        language=language, vision=vision_cfg, projector=ProjectorConfig(kind="conv_downsample"),
        rope=RopeConfig(kind="rope"), token_ids=ids,
    )


def _token_ids(hf: Mapping[str, Any]) -> TokenIdsConfig:
    """Placeholder ids. ``image_token_id`` (``<im_patch>``) is the key transformers' Step3p7Config
    reads (default 151679); the ``im_start_token_id`` / ``im_end_token_id`` names follow StepFun's
    Step-3.7 config (UNVERIFIED for the STEP3-VL-10B config.json): absent keys keep the
    ``step3vl-10b`` preset's ids."""
    return TokenIdsConfig(
        image_token_id=hf.get("image_token_id", STEP3VL_TOKEN_IDS.image_token_id), video_token_id=-1,
        vision_start_token_id=hf.get("im_start_token_id", STEP3VL_TOKEN_IDS.vision_start_token_id),
        vision_end_token_id=hf.get("im_end_token_id", STEP3VL_TOKEN_IDS.vision_end_token_id),
    )


def hf_config_from_model(model: ModelConfig) -> dict[str, Any]:
    """A STEP3-VL ``config.json``: StepFun's PE vision keys and a Qwen3 text config."""
    lm, v = model.language, model.vision
    text = {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size, "intermediate_size": lm.ffn_hidden_size,
        "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_attention_heads,
        "num_key_value_heads": lm.num_query_groups, "head_dim": lm.head_dim, "hidden_act": "silu",
        "max_position_embeddings": lm.max_position_embeddings, "rms_norm_eps": lm.norm_eps,
        "rope_theta": lm.rope_theta, "attention_bias": False, "tie_word_embeddings": lm.tie_embeddings,
    }
    vision = {
        "width": v.hidden_size, "layers": v.num_layers, "heads": v.num_attention_heads,
        "num_channels": v.in_channels, "patch_size": v.patch_size, "image_size": v.patch_size * v.position_embedding_size,
        "mlp_ratio": v.ffn_hidden_size / v.hidden_size, "hidden_act": {b: a for a, b in _ACTIVATIONS.items()}[v.activation],
        "layer_norm_eps": v.norm_eps, "ls_init_value": v.layerscale_init, "use_ln_pre": v.ln_pre, "use_ln_post": False,
        "use_cls_token": False, "use_abs_posemb": True, "use_rope2d": True,
    }
    ids = model.token_ids
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
        "text_config": text, "vision_config": vision, "tie_word_embeddings": lm.tie_embeddings,
        "understand_projector_stride": 2, "projector_bias": False,
        "image_token_id": ids.image_token_id, "im_start_token_id": ids.vision_start_token_id,
        "im_end_token_id": ids.vision_end_token_id,
    }


def check_model(model: ModelConfig) -> None:
    """What the released layout can express: a PE tower, the conv downsampler, a dense decoder."""
    if model.vision is None or model.vision.kind != "pe" or model.projector.kind != "conv_downsample":
        raise Step3VLConfigError("STEP3-VL export needs model.vision.kind=pe and model.projector.kind=conv_downsample")
    if model.language.moe is not None:
        raise Step3VLConfigError("STEP3-VL's decoder is dense Qwen3; model.language.moe must be unset")
    if model.vision.layerscale_init is None:
        raise Step3VLConfigError("STEP3-VL's PE tower has LayerScale (ls_1 / ls_2); model.vision.layerscale_init is unset")
    if not model.vision.ln_pre:
        raise Step3VLConfigError("STEP3-VL's PE tower has ln_pre; model.vision.ln_pre is false")


__all__ = [
    "ARCHITECTURE", "MODEL_TYPE", "Step3VLConfigError", "check_model", "hf_config_from_model",
    "is_step3vl_config", "model_config_from_hf", "step3vl_rules", "vision_rules",
]
