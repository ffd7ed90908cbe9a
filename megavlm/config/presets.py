"""Named model presets with the real published shapes (and tiny ones for tests).

Shapes are those of the Hugging Face configs of the Qwen3 releases.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from megavlm.config.schema import LanguageModelConfig, ModelConfig, MoEConfig

_QWEN3_VOCAB = 151936


def _qwen3(**kw) -> ModelConfig:
    base = dict(head_dim=128, vocab_size=_QWEN3_VOCAB, rope_theta=1_000_000.0, norm_eps=1e-6)
    return ModelConfig(language=LanguageModelConfig(**{**base, **kw}))


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
}


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str) -> ModelConfig:
    if name not in _PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; available: {', '.join(names())}")
    cfg = _PRESETS[name]()
    return dataclasses.replace(cfg, preset=name)
