"""Named model presets with the real published shapes (and tiny ones for tests).

Shapes are those of the Hugging Face configs of the Qwen3 releases.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from megavlm.config.schema import LanguageModelConfig, ModelConfig, MoEConfig
from megavlm.config.vision import ProjectorConfig, RopeConfig, TokenIdsConfig, VisionConfig

_QWEN3_VOCAB = 151936
# The synthetic tokenizer's vocabulary and special-token ids (megavlm.data.tokenizer).
TINY_VLM_VOCAB = 512
TINY_VLM_TOKEN_IDS = TokenIdsConfig(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
# STEP3-VL: <im_patch>, <im_start>, <im_end> in the same tokenizer; no video placeholder (-1).
TINY_STEP3_TOKEN_IDS = TokenIdsConfig(image_token_id=9, video_token_id=-1, vision_start_token_id=7, vision_end_token_id=8)
# STEP3-VL-10B's released tokenizer (Qwen3's vocabulary plus StepFun's media tokens):
# <im_patch> 151679 (also transformers' Step3p7Config.image_token_id default) and <im_start>
# 151680; <im_end> 151681 is UNVERIFIED (assumed to follow <im_start>; the released
# tokenizer.json was not reachable). <patch_start> is 151689, <patch_end> / <patch_newline>
# are unverified; the model itself needs none of the three (TokenIdsConfig carries only the
# placeholder and the global view's delimiters; the data pipeline reads crops' tokens by name).
STEP3VL_TOKEN_IDS = TokenIdsConfig(
    image_token_id=151679, video_token_id=-1, vision_start_token_id=151680, vision_end_token_id=151681,
)
STEP3VL_PATCH_START_TOKEN_ID = 151689


def _qwen3(**kw) -> ModelConfig:
    base = dict(head_dim=128, vocab_size=_QWEN3_VOCAB, rope_theta=1_000_000.0, norm_eps=1e-6)
    return ModelConfig(language=LanguageModelConfig(**{**base, **kw}))


def _qwen3vl_vit(**kw) -> VisionConfig:
    base = dict(kind="qwen3vl", patch_size=16, temporal_patch_size=2, position_embedding_size=48,
                activation="gelu_tanh", norm_eps=1e-6, num_attention_heads=16)
    return VisionConfig(**{**base, **kw})


def _qwen3vl(language: ModelConfig, vision: VisionConfig) -> ModelConfig:
    """Qwen3-VL: Qwen3 decoder with interleaved MRoPE (theta 5e6, 256K positions) + ViT."""
    lm = dataclasses.replace(language.language, rope_theta=5_000_000.0, max_position_embeddings=262144)
    return dataclasses.replace(
        language, language=lm, vision=vision, projector=ProjectorConfig(kind="patch_merger"),
        rope=RopeConfig(kind="mrope_interleaved", mrope_section=[24, 20, 20]),
    )


def pe_lang_g14() -> VisionConfig:
    """PE-lang G/14 as used by STEP3-VL-10B: 1.74B parameters, 52 x 52 patches at 728 px.

    Shapes from REFERENCE 5 and perception_models' ``PE-Lang-G14-448`` (width 1536, 47 layers,
    16 heads, MLP 8960 = mlp_ratio 8960/1536, LayerScale 0.1, ln_pre on, ln_post off, no CLS).
    STEP3-VL runs it at image_size 728, so its position table is 728/14 = 52 per side (the
    448-px PE release has 32); activation quick_gelu and image_size 728 are the defaults of
    StepFun's PE vision-encoder configs (``Step3p6VisionEncoderConfig``), not read from the
    STEP3-VL-10B checkpoint itself: the importer should check both against its config.json.
    """
    return VisionConfig(
        kind="pe",
        num_layers=47,
        hidden_size=1536,
        ffn_hidden_size=8960,
        num_attention_heads=16,
        patch_size=14,
        temporal_patch_size=1,
        in_channels=3,
        position_embedding_size=52,
        activation="quick_gelu",
        norm_eps=1e-5,
        rope_theta=10000.0,
        layerscale_init=0.1,
        ln_pre=True,
    )


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "qwen3-0.6b": lambda: _qwen3(
        num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
        num_attention_heads=16, num_query_groups=8, tie_embeddings=True,
    ),
    "qwen3-1.7b": lambda: _qwen3(
        num_layers=28, hidden_size=2048, ffn_hidden_size=6144,
        num_attention_heads=16, num_query_groups=8, tie_embeddings=True,
    ),
    "qwen3-4b": lambda: _qwen3(
        num_layers=36, hidden_size=2560, ffn_hidden_size=9728,
        num_attention_heads=32, num_query_groups=8, tie_embeddings=True,
    ),
    "qwen3-8b": lambda: _qwen3(
        num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
        num_attention_heads=32, num_query_groups=8, tie_embeddings=False,
    ),
    "qwen3-30b-a3b": lambda: _qwen3(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144,
        num_attention_heads=32, num_query_groups=4, tie_embeddings=False,
        moe=MoEConfig(num_experts=128, topk=8, ffn_hidden_size=768, aux_loss_coeff=1e-3),
    ),
    # Tiny shapes for tests and the CPU demo: every parallel degree up to 4 divides them.
    "qwen3-tiny": lambda: ModelConfig(
        language=LanguageModelConfig(
            num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, head_dim=16, vocab_size=256, max_position_embeddings=4096,
            rope_theta=10000.0,
        )
    ),
    "qwen3-moe-tiny": lambda: ModelConfig(
        language=LanguageModelConfig(
            num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, head_dim=16, vocab_size=256, max_position_embeddings=4096,
            rope_theta=10000.0,
            moe=MoEConfig(num_experts=4, topk=2, ffn_hidden_size=32, aux_loss_coeff=1e-3),
        )
    ),
    # Qwen3-VL (REFERENCE 3): ViT 24 x 1024 with DeepStack [5, 11, 17] for 2B/4B; 27 x 1152
    # with [8, 16, 24] for 8B/30B-A3B.
    "qwen3vl-2b": lambda: _qwen3vl(
        get("qwen3-1.7b"),
        _qwen3vl_vit(num_layers=24, hidden_size=1024, ffn_hidden_size=4096, deepstack_layers=[5, 11, 17]),
    ),
    "qwen3vl-8b": lambda: _qwen3vl(
        get("qwen3-8b"),
        _qwen3vl_vit(num_layers=27, hidden_size=1152, ffn_hidden_size=4304, deepstack_layers=[8, 16, 24]),
    ),
    "qwen3vl-30b-a3b": lambda: _qwen3vl(
        get("qwen3-30b-a3b"),
        _qwen3vl_vit(num_layers=27, hidden_size=1152, ffn_hidden_size=4304, deepstack_layers=[8, 16, 24]),
    ),
    # STEP3-VL-10B (REFERENCE 5): PE-lang G/14 at 728 px, two stride-2 convs, Qwen3-8B decoder
    # with plain 1D RoPE, STEP3-VL's media tokens (not Qwen3-VL's). Context: 65,536 positions
    # (PaCoRe training runs at 64K, REFERENCE 5), above Qwen3-8B's 40,960; the released
    # config.json's own max_position_embeddings is UNVERIFIED (import reads it from the file).
    "step3vl-10b": lambda: dataclasses.replace(
        get("qwen3-8b"), language=dataclasses.replace(get("qwen3-8b").language, max_position_embeddings=65536),
        vision=pe_lang_g14(), projector=ProjectorConfig(kind="conv_downsample"),
        rope=RopeConfig(kind="rope"), token_ids=STEP3VL_TOKEN_IDS,
    ),
    # Tiny VLMs for tests and the CPU demo; the vocabulary and special-token ids are those of
    # the synthetic tokenizer (megavlm.data.tokenizer.synthetic_tokenizer).
    "qwen3vl-tiny": lambda: _tiny_vlm(get("qwen3-tiny")),
    "qwen3vl-moe-tiny": lambda: _tiny_vlm(get("qwen3-moe-tiny")),
    "step3vl-tiny": lambda: dataclasses.replace(
        _tiny_vlm(get("qwen3-tiny")),
        vision=dataclasses.replace(
            pe_lang_g14(), num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            position_embedding_size=8,
        ),
        projector=ProjectorConfig(kind="conv_downsample"), rope=RopeConfig(kind="rope"), token_ids=TINY_STEP3_TOKEN_IDS,
    ),
}


def _tiny_vlm(language: ModelConfig) -> ModelConfig:
    vision = VisionConfig(
        kind="qwen3vl", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        position_embedding_size=16, deepstack_layers=[1, 2, 3],
    )
    lm = dataclasses.replace(language.language, vocab_size=TINY_VLM_VOCAB)
    return dataclasses.replace(
        language, language=lm, vision=vision, projector=ProjectorConfig(kind="patch_merger"),
        rope=RopeConfig(kind="mrope_interleaved", mrope_section=[4, 2, 2]), token_ids=TINY_VLM_TOKEN_IDS,
    )


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str) -> ModelConfig:
    if name not in _PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; available: {', '.join(names())}")
    cfg = _PRESETS[name]()
    return dataclasses.replace(cfg, preset=name)
