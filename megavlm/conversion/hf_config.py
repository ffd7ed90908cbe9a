"""HF Qwen3-VL / STEP3-VL ``config.json`` <-> megavlm ``ModelConfig``.

The family is read from the file (STEP3-VL: ``architectures`` StepVLForConditionalGeneration,
see ``conversion.step3vl``) or, on export, from the model (a PE vision tower is STEP3-VL).

Accepts both generations of the config: transformers v5 ``rope_parameters`` and v4
``rope_scaling`` + ``rope_theta``; the expert count as ``num_experts`` or (5.23's save)
``num_local_experts``. Every missing key is reported by its name.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from megavlm.config.schema import LanguageModelConfig, ModelConfig, MoEConfig
from megavlm.config.vision import ProjectorConfig, RopeConfig, TokenIdsConfig, VisionConfig
from megavlm.conversion import step3vl

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")  # and STEP3-VL, recognized by conversion.step3vl
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


class HFConfigError(ValueError):
    pass


def is_step3vl_model(model: ModelConfig) -> bool:
    return model.vision is not None and model.vision.kind == "pe"


def _need(cfg: Mapping[str, Any], key: str, where: str):
    if key not in cfg:
        raise HFConfigError(f"{where}: missing key {key!r}")
    return cfg[key]


def _rope(text: Mapping[str, Any]) -> tuple[float, list[int], bool]:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise HFConfigError("config.json text_config: no rope_theta (in rope_parameters or at top level)")
    section = list(params.get("mrope_section", [24, 20, 20]))
    interleaved = params.get("mrope_interleaved", True)  # transformers >= 5 implements only this
    return float(theta), section, bool(interleaved)


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    if step3vl.is_step3vl_config(hf):
        return step3vl.model_config_from_hf(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConfigError(
            f"config.json model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"or architectures [{step3vl.ARCHITECTURE!r}] (STEP3-VL)"
        )
    text = _need(hf, "text_config", "config.json")
    vision = _need(hf, "vision_config", "config.json")
    t = lambda key: _need(text, key, "config.json text_config")  # noqa: E731
    v = lambda key: _need(vision, key, "config.json vision_config")  # noqa: E731
    theta, section, interleaved = _rope(text)
    moe = None
    if model_type == "qwen3_vl_moe":
        experts = text.get("num_experts", text.get("num_local_experts"))
        if experts is None:
            raise HFConfigError("config.json text_config: missing num_experts (or num_local_experts)")
        if text.get("mlp_only_layers") or text.get("decoder_sparse_step", 1) != 1:
            raise HFConfigError("config.json text_config: mixed dense/MoE layers (mlp_only_layers, decoder_sparse_step) are not supported")
        moe = MoEConfig(
            num_experts=experts, topk=t("num_experts_per_tok"), ffn_hidden_size=t("moe_intermediate_size"),
            aux_loss_coeff=text.get("router_aux_loss_coef", 1e-3),
        )
    head_dim = text.get("head_dim") or t("hidden_size") // t("num_attention_heads")
    language = LanguageModelConfig(
        num_layers=t("num_hidden_layers"), hidden_size=t("hidden_size"),
        ffn_hidden_size=t("intermediate_size"), num_attention_heads=t("num_attention_heads"),
        num_query_groups=t("num_key_value_heads"), head_dim=head_dim, vocab_size=t("vocab_size"),
        rope_theta=theta, max_position_embeddings=t("max_position_embeddings"),
        norm_eps=text.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)), moe=moe,
    )
    positions = v("num_position_embeddings")
    side = math.isqrt(positions)
    if side * side != positions:
        raise HFConfigError(f"config.json vision_config: num_position_embeddings {positions} is not a square grid")
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        raise HFConfigError(f"config.json vision_config: hidden_act {act!r} is not one of {', '.join(_ACTIVATIONS)}")
    if v("out_hidden_size") != language.hidden_size:
        raise HFConfigError(
            f"config.json: vision_config.out_hidden_size {v('out_hidden_size')} != text_config.hidden_size {language.hidden_size}"
        )
    vision_cfg = VisionConfig(
        kind="qwen3vl", num_layers=v("depth"), hidden_size=v("hidden_size"),
        ffn_hidden_size=v("intermediate_size"), num_attention_heads=v("num_heads"),
        patch_size=v("patch_size"), temporal_patch_size=v("temporal_patch_size"),
        in_channels=vision.get("in_channels", 3), position_embedding_size=side, activation=_ACTIVATIONS[act],
        deepstack_layers=list(vision.get("deepstack_visual_indexes", [])),
    )
    token_ids = TokenIdsConfig(**{k: hf[k] for k in (
        "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id") if k in hf})
    return ModelConfig(
        language=language, vision=vision_cfg,
        projector=ProjectorConfig(kind="patch_merger", spatial_merge_size=v("spatial_merge_size")),
        rope=RopeConfig(kind="mrope_interleaved" if interleaved else "mrope_chunked", mrope_section=section),
        token_ids=token_ids,
    )


def hf_config_from_model(model: ModelConfig) -> dict[str, Any]:
    """The config.json of ``model`` as the installed transformers reads it (v5 names); for a
    STEP3-VL model (PE tower) the released STEP3-VL layout."""
    if is_step3vl_model(model):
        return step3vl.hf_config_from_model(model)
    lm, v = model.language, model.vision
    text = {
        "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size, "intermediate_size": lm.ffn_hidden_size,
        "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_attention_heads,
        "num_key_value_heads": lm.num_query_groups, "head_dim": lm.head_dim, "hidden_act": "silu",
        "max_position_embeddings": lm.max_position_embeddings, "rms_norm_eps": lm.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta,
                            "mrope_section": list(model.rope.mrope_section),
                            "mrope_interleaved": model.rope.kind == "mrope_interleaved"},
        "attention_bias": False, "tie_word_embeddings": lm.tie_embeddings,
    }
    if lm.moe is not None:
        text.update(num_experts=lm.moe.num_experts, num_experts_per_tok=lm.moe.topk,
                    moe_intermediate_size=lm.moe.ffn_hidden_size, router_aux_loss_coef=lm.moe.aux_loss_coeff,
                    decoder_sparse_step=1, mlp_only_layers=[])
    vision = {
        "depth": v.num_layers, "hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size,
        "num_heads": v.num_attention_heads, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "in_channels": v.in_channels, "spatial_merge_size": model.projector.spatial_merge_size,
        "out_hidden_size": lm.hidden_size, "num_position_embeddings": v.position_embedding_size ** 2,
        "deepstack_visual_indexes": list(v.deepstack_layers),
        "hidden_act": {b: a for a, b in _ACTIVATIONS.items()}[v.activation],
    }
    moe = lm.moe is not None
    ids = model.token_ids
    return {
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "tie_word_embeddings": lm.tie_embeddings,
        "image_token_id": ids.image_token_id, "video_token_id": ids.video_token_id,
        "vision_start_token_id": ids.vision_start_token_id, "vision_end_token_id": ids.vision_end_token_id,
    }
