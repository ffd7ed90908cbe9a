"""The Qwen3 decoder as a megatron-core ``GPTModel`` chunk: the one place that builds it."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.schema import ModelConfig
from megavlm.models.language.specs import qwen3_block_spec
from megavlm.models.rope import multimodal_rotary_embedding


class SupervisedLogitsGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` that, when training with ``labels`` and a ``loss_mask``,
    projects to the vocabulary and computes the cross entropy only at the supervised
    positions (``loss_mask`` non-zero) and returns zero loss elsewhere.

    Why: megatron computes logits for every token, though the loss multiplies most of them
    by zero in SFT and VLM training (prompts, image and video placeholders, padding). The
    vocabulary projection is a large share of a small model's FLOPs (Qwen3-VL-2B: ~18%) and
    its fp32 logits are the largest activation (8K tokens x 152K vocabulary = 5 GB per TP
    rank). The per-token loss at supervised positions and every gradient are those of the
    full computation (up to GEMM summation order).

    Tensor/sequence parallelism: the selection needs the whole sequence, so the hidden states
    are gathered first (backward: take this rank's part) and the output layer runs without
    sequence parallelism for the call (its input copy then all-reduces the gradient over TP:
    together a reduce-scatter, as the sequence-parallel layer would do). That layer keeps
    only its share of the input for backward while the selection keeps its rows whole, so a
    micro-batch supervised almost everywhere takes megatron's path (``_selection_keeps_less``).
    Inference, multi-token prediction and calls without ``loss_mask`` take megatron's path.
    """

    def _selection_keeps_less(self, kept: int, tokens: int) -> bool:
        """Whether ``kept`` of ``tokens`` rows keep fewer bytes for backward than megatron's
        path: per row, the output layer's input (``h``, or ``h / tp`` under sequence
        parallelism on megatron's path) and the cross entropy's softmax (``vocab / tp``)."""
        tp = self.output_layer.tp_group.size()
        h, vocab_share = self.config.hidden_size, self.vocab_size / tp
        h_share = h / tp if self.output_layer.sequence_parallel else h
        return kept < tokens and kept * (h + vocab_share) < tokens * (h_share + vocab_share)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None,
                     mtp_in_postprocess=None, inference_context=None, **kwargs):
        training_loss = (labels is not None and loss_mask is not None and self.post_process
                         and not mtp_in_postprocess and self.config.mtp_num_layers is None
                         and inference_context is None and kwargs.get("inference_params") is None)
        # Rows of the [s, b] hidden states to keep. A host loss mask (the data path's) costs no
        # device synchronization; a device one (a context-parallel share) one nonzero().
        positions = loss_mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1) if training_loss else None
        if positions is None or not self._selection_keeps_less(positions.numel(), loss_mask.numel()):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, loss_mask=loss_mask,
                                        mtp_in_postprocess=mtp_in_postprocess, inference_context=inference_context,
                                        **kwargs)
        positions = positions.to(hidden_states.device, non_blocking=True)
        sequence_parallel = self.output_layer.sequence_parallel
        if sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp)
        s, b = hidden_states.shape[:2]
        rows = hidden_states.reshape(s * b, -1).index_select(0, positions).unsqueeze(1)  # [n, 1, h]
        picked = labels.transpose(0, 1).reshape(-1).index_select(0, positions)[None]  # [1, n]
        self.output_layer.sequence_parallel = False
        try:
            loss = super()._postprocess(rows, input_ids, position_ids, picked, *args, loss_mask=None,
                                        mtp_in_postprocess=mtp_in_postprocess, inference_context=None, **kwargs)
        finally:
            self.output_layer.sequence_parallel = sequence_parallel
        full = loss.new_zeros(s * b).index_copy(0, positions, loss.reshape(-1))  # [1, n] -> [s * b]
        return full.view(s, b).transpose(0, 1)  # [b, s], as megatron returns it


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
    gpt = SupervisedLogitsGPTModel(
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
