"""VLMModel: encode media -> project -> scatter into the token embeddings -> Qwen3 decoder.

One pipeline chunk of the model. The first stage owns the vision encoder and projector
(and the token embedding); every stage owns its decoder layers; the last owns the output
layer and the loss. The decoder is megatron-core's ``GPTModel`` with our layer specs, fed
``decoder_input`` (embeddings with media features in place) instead of token ids. Layout
(TP/SP/PP/EP) comes from the TransformerConfig; nothing here branches on it except the
sequence-parallel scatter of the merged embeddings and DeepStack's pipeline transport.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megavlm.config.schema import ModelConfig, ParallelConfig
from megavlm.models.deepstack import DeepStackInjector, late_levels
from megavlm.models.language.model import build_language_model
from megavlm.models.vision.qwen3vl import VisionModel, build_vision_model
from megavlm.models.vision.step3 import Step3VisionModel, build_step3_vision_model
from megavlm.models.viewless import block_input
from megavlm.parallel.partition import CPPartition, split_for_cp
from megavlm.parallel.vision_split import encode_split_over_cp


class VLMModel(MegatronModule):
    """A Qwen3-VL-style model chunk for one (virtual) pipeline stage."""

    def __init__(
        self,
        model: ModelConfig,
        parallel: ParallelConfig,
        config: TransformerConfig,
        *,
        use_te: bool,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        lm = model.language
        self.model_cfg = model
        self.use_te = use_te
        self.vision_cp_split = parallel.vision_cp_split
        self.pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        self.post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        self.language = build_language_model(model, config, use_te=use_te, vp_stage=vp_stage)
        self.vision: VisionModel | Step3VisionModel | None = None
        if self.pre_process and model.vision is not None:
            if model.vision.kind == "pe":
                self.vision = build_step3_vision_model(
                    model.vision, lm.hidden_size, parallel, dtype=config.params_dtype, use_te=use_te,
                )
            else:
                self.vision = build_vision_model(
                    model.vision, model.projector, lm.hidden_size, parallel,
                    dtype=config.params_dtype, use_te=use_te,
                )
        levels = len(model.vision.deepstack_layers) if model.vision else 0
        self.deepstack = DeepStackInjector(
            self.language.decoder.layers, levels=levels,
            late=late_levels(levels=levels, num_layers=lm.num_layers, pp=parallel.pp, vpp=parallel.vpp,
                             first_stage_layers=parallel.first_stage_layers),
        )
        self._freeze(model.freeze)

    def _freeze(self, parts: list[str]) -> None:
        groups = {"language": [self.language]}
        if self.vision is not None:
            groups["vision"] = self.vision.encoder_parts()
            groups["projector"] = self.vision.projector_parts()
        for part in parts:
            for module in groups.get(part, []):
                module.requires_grad_(False)

    # megatron's finalize_model_grads all-reduces a tied embedding across the first and last
    # pipeline stages through these two names.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if tensor is not None:
            tensor = self.deepstack.split_received(tensor)
        self.language.set_input_tensor(tensor)

    def forward(
        self,
        tokens: Tensor,
        position_ids: Tensor,
        *,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        attention_mask: Tensor | None = None,
        runtime_gather_output: bool | None = None,
        inference_context=None,
        media_mask: Tensor | bool | None = None,
        cp_partition: CPPartition | None = None,
        host_tokens: Tensor | None = None,
    ) -> Tensor:
        """Per-token loss ``[b, s]`` with labels on the last stage, logits without, else hidden states.
        With ``loss_mask`` (``[b, s]``, same share as ``labels``), logits and loss are computed
        only where it is non-zero, the loss elsewhere is 0 (``SupervisedLogitsGPTModel``).

        ``tokens [b, s]``; ``position_ids [3, b, s]`` (MRoPE) or ``[b, s]``; media as flattened
        patches ``[N, C*T*P*P]`` with one ``grid_thw`` row per image / video block;
        ``attention_mask`` (bool, True = masked out) only for padded inference batches;
        ``media_mask [b, s]`` (bool) marks the placeholder tokens that take media features (default:
        every placeholder id; ``False``: none, so no scan): a generated ``<image_pad>`` is a plain
        token, not media. ``host_tokens``: the same ``tokens`` on the host (the data path's copy):
        placeholders are then counted there, with no read-back from the device.
        Context parallelism (``cp_partition``, ``megavlm.parallel.context``): ``tokens`` are the
        whole row, everything else is this CP rank's share; media features are scattered into
        the whole row, then the embeddings and DeepStack addends are split by the partition.
        """
        if self.model_cfg.vision is None and (pixel_values is not None or pixel_values_videos is not None):
            raise ValueError("the batch has image or video pixels but model.vision is not configured")
        decoder_input = None
        if self.pre_process and self.model_cfg.vision is not None:
            decoder_input = self._embed(
                tokens, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, media_mask,
                cp_partition, host_tokens,
            )
        if cp_partition is not None:
            tokens = split_for_cp(tokens, cp_partition, dim=1)
        output = self.language(
            tokens, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            loss_mask=loss_mask, packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
            inference_context=inference_context,
        )
        if not self.post_process:
            output = self.deepstack.attach_to_output(output)
        return output

    def _embed(
        self, tokens, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, media_mask, cp_partition,
        host_tokens=None,
    ) -> Tensor:
        """Token embeddings with media features at their placeholders; DeepStack addends set."""
        ids = self.model_cfg.token_ids
        embeds = self.language.embedding(input_ids=tokens, position_ids=None)  # [s, b, h]
        embeds = embeds.transpose(0, 1)  # [b, s, h]
        media = [
            (tokens == ids.image_token_id, pixel_values, image_grid_thw, "image", "<image_pad>"),
            (tokens == ids.video_token_id, pixel_values_videos, video_grid_thw, "video", "<video_pad>"),
        ]
        if media_mask is False:  # text only: no placeholder count (a host sync on GPU, every decoding step)
            for _, pixels, _, kind, _ in media:
                if pixels is not None:
                    raise ValueError(f"media_mask=False (no media tokens) but the batch has {kind} pixels")
            media = []
        elif media_mask is not None:
            media = [(mask & media_mask, *rest) for mask, *rest in media]
        # Placeholders per kind, counted on the host copy when there is one (on the device
        # the count is a host sync on a GPU); a media_mask exists on the device only.
        on_host = host_tokens is not None and media_mask is None
        counts = {
            kind: int((host_tokens == (ids.image_token_id if kind == "image" else ids.video_token_id)).sum())
            if on_host else int(mask.sum())
            for mask, _, _, kind, _ in media
        }
        encoded = self._encode_media(media, counts)
        addends = None
        for mask, pixels, grid_thw, kind, token in media:
            n_placeholders = counts[kind]
            if pixels is None:
                if n_placeholders:
                    raise ValueError(
                        f"{n_placeholders} {kind} placeholder tokens ({token}, id "
                        f"{ids.image_token_id if kind == 'image' else ids.video_token_id}) but no "
                        f"{kind} pixels in the batch; rows {_rows_with(mask)}"
                    )
                continue
            features, deepstack = encoded[kind]  # [n, h], levels x [n, h]
            if features.shape[0] != n_placeholders:
                raise ValueError(
                    f"{kind} features and placeholders differ: {features.shape[0]} features from "
                    f"grid_thw {grid_thw.tolist()} but {n_placeholders} placeholder tokens ({token}) "
                    f"in rows {_rows_with(mask)}; the sample's text and its media do not match"
                )
            mask3 = mask.unsqueeze(-1)
            embeds = embeds.masked_scatter(mask3, features.to(embeds.dtype))
            if deepstack:
                if addends is None:
                    addends = [embeds.new_zeros(embeds.shape) for _ in deepstack]
                addends = [a.masked_scatter(mask3, f.to(a.dtype)) for a, f in zip(addends, deepstack)]
        if cp_partition is not None:  # this CP rank's tokens, after the media are in place
            embeds = split_for_cp(embeds, cp_partition, dim=1)
            addends = None if addends is None else [split_for_cp(a, cp_partition, dim=1) for a in addends]
        # [s, b, h]; ``.contiguous()`` returns the view itself when b == 1 or s == 1, as in
        # every decoding step, hence block_input
        embeds = block_input(embeds.transpose(0, 1).contiguous())
        addends = [] if addends is None else [a.transpose(0, 1).contiguous() for a in addends]
        if self.config.sequence_parallel:
            embeds = tensor_parallel.scatter_to_sequence_parallel_region(embeds)
            addends = [tensor_parallel.scatter_to_sequence_parallel_region(a) for a in addends]
        self.deepstack.set_from_vision(addends)
        return embeds


    def _encode_media(self, media, counts: dict[str, int]) -> dict[str, tuple[Tensor, list[Tensor]]]:
        """Visual features (and DeepStack levels) of the micro-batch's images and videos.

        With ``parallel.vision_cp_split`` every CP rank encodes a contiguous share of all media
        blocks (images, then video blocks; balanced by patches) and one all-gather collects the
        features: a single collective per micro-batch, so its backward can never pair up with a
        different collective on another rank. Otherwise every CP rank encodes everything (no
        communication, CP times the ViT work).
        """
        present = [(kind, mask, pixels, grid) for mask, pixels, grid, kind, _ in media if pixels is not None]
        if not self.vision_cp_split or parallel_state.get_context_parallel_world_size() == 1:
            return {kind: self.vision(pixels, grid) for kind, _, pixels, grid in present}
        if not present:
            return {}
        features, deepstack = encode_split_over_cp(
            self.vision, torch.cat([p for _, _, p, _ in present]), torch.cat([g for _, _, _, g in present]),
            parallel_state.get_context_parallel_group(),
            width=self.model_cfg.language.hidden_size, levels=len(self.model_cfg.vision.deepstack_layers),
        )
        # blocks keep their order, so each kind's features are the next rows: as many as its
        # placeholders (the total is checked against the placeholders by the caller, per kind)
        out, start = {}, 0
        for i, (kind, _, _, _) in enumerate(present):
            end = features.shape[0] if i == len(present) - 1 else start + counts[kind]
            out[kind] = (features[start:end], [d[start:end] for d in deepstack])
            start = end
        return out


def _rows_with(mask: Tensor) -> list[int]:
    return mask.any(dim=-1).nonzero().flatten().tolist()


def pipeline_seq_multiplier(model: ModelConfig, parallel: ParallelConfig) -> int:
    """Factor on seq_length of the tensor sent between pipeline stages (DeepStack transport)."""
    if model.vision is None:
        return 1
    levels = len(model.vision.deepstack_layers)
    return 1 + late_levels(levels=levels, num_layers=model.language.num_layers, pp=parallel.pp, vpp=parallel.vpp,
                           first_stage_layers=parallel.first_stage_layers)
