"""The Qwen3 decoder as a megatron-core ``GPTModel`` chunk: the one place that builds it."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.schema import ModelConfig
from megavlm.models.language.specs import qwen3_block_spec
from megavlm.models.rope import multimodal_rotary_embedding


def build_language_model(
    model: ModelConfig, tconfig: TransformerConfig, *, use_te: bool, vp_stage: int | None = None
) -> GPTModel:
    """The decoder chunk for this pipeline (and virtual pipeline) stage.

    MRoPE models get megavlm's rotary module (megatron-core has only the chunked layout).
    A VLM feeds ``decoder_input`` with media features in place and scatters it for sequence
    parallelism itself; a text-only model keeps megatron's own embedding path.
    """
    lm = model.language
    mrope = model.rope.kind.startswith("mrope")
    if mrope:
        tconfig.mrope_section = list(model.rope.mrope_section)
    gpt = GPTModel(
        config=tconfig,
        transformer_layer_spec=qwen3_block_spec(tconfig, use_te=use_te, vp_stage=vp_stage),
        vocab_size=lm.vocab_size,
        max_sequence_length=lm.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=lm.tie_embeddings,
        position_embedding_type="mrope" if mrope else "rope",
        rotary_base=int(lm.rope_theta),
        scatter_embedding_sequence_parallel=model.vision is None,
        vp_stage=vp_stage,
    )
    if mrope:
        gpt.rotary_pos_emb = multimodal_rotary_embedding(
            model.rope.kind, kv_channels=lm.head_dim, rotary_base=lm.rope_theta,
        )
    return gpt
