"""The Qwen3-VL vision encoder on megatron-core blocks, with its mergers (REFERENCE 3).

Many images and video frame groups of different sizes arrive packed as one sequence of
patches; attention is variable-length over each temporal slice, not padded. The 2D RoPE
angles are given per packed patch and apply one-to-one. The packed row is tagged ``sbhd``
with the boundaries in ``cu_seqlens``, so megatron applies RoPE one-to-one on ``[t, 1, h, d]``
(tagged ``thd``, its RoPE reads every boundary back with ``.item()``, two host reads per image
per layer, and breaks ``torch.compile``'s graph). ``SDPAAttention`` splits the samples at
boundaries kept on the host, so the local encoder never waits on the device; Transformer
Engine's kernels get the row as ``thd`` through ``packed_attention``.
The encoder is a megatron ``TransformerBlock`` built from the same
pre-norm layer spec as the decoder (LayerNorm, biases, GELU-tanh, no causal mask), so TP
splits it and TE/FP8 apply on GPU; it has no pipeline stages of its own (it lives on the
first decoder stage) and no sequence parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megavlm.config.schema import ParallelConfig
from megavlm.config.vision import ProjectorConfig, VisionConfig
from megavlm.models.transformer_config import precision_and_kernels
from megavlm.models.language.specs import backend_provider, prenorm_layer_spec
from megavlm.models.projector import PatchMerger
from megavlm.models.vision.packed_attention import thd_kernels_for_packed_rows
from megavlm.models.vision.embeddings import PatchEmbed, PositionEmbedding, rope_2d, vision_cu_seqlens
from megavlm.platform import device
from megavlm.platform.distributed import without_context_parallel

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def vision_transformer_config(
    vision: VisionConfig, parallel: ParallelConfig, *, dtype: torch.dtype, use_te: bool, init_std: float = 0.02
) -> TransformerConfig:
    head_dim = vision.hidden_size // vision.num_attention_heads
    return TransformerConfig(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.ffn_hidden_size,
        num_attention_heads=vision.num_attention_heads,
        num_query_groups=vision.num_attention_heads,
        kv_channels=head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=vision.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=ACTIVATIONS[vision.activation],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=1,  # the whole encoder sits on the first decoder stage
        sequence_parallel=False,
        # megatron's fused bias+GELU is the tanh approximation whatever activation_func says
        **{**precision_and_kernels(dtype, use_te=use_te), "bias_activation_fusion": False},
    )


class VisionModel(MegatronModule):
    """Patches of packed images/videos -> merged embeddings and DeepStack features."""

    def __init__(self, vision: VisionConfig, projector: ProjectorConfig, llm_hidden_size: int,
                 config: TransformerConfig, *, use_te: bool):
        super().__init__(config=config)
        self.vision = vision
        self.merge = projector.spatial_merge_size
        self.packed_format = "sbhd"  # the packed row's tag (module docstring); "thd" is megatron's own path
        self.boundaries_on_device = use_te  # TE's kernels read them there
        self.patch_embed = PatchEmbed(vision)
        self.pos_embed = PositionEmbedding(vision, self.merge)
        backend = backend_provider(use_te=use_te)
        layer = prenorm_layer_spec(
            backend, rms_norm=False, qk_norm=False, attn_mask_type=AttnMaskType.padding,
            core_attention=thd_kernels_for_packed_rows(backend.core_attention()) if use_te else None,
        )
        self.encoder = TransformerBlock(
            config, TransformerBlockSubmodules(layer_specs=[layer] * vision.num_layers, layer_norm=None),
            post_layer_norm=False, pg_collection=without_context_parallel(),
        )
        merger = dict(vit_hidden=vision.hidden_size, out_hidden=llm_hidden_size, merge=self.merge, eps=projector.norm_eps)
        self.merger = PatchMerger(config, norm_after_merge=False, **merger)
        self.deepstack_mergers = torch.nn.ModuleList(
            PatchMerger(config, norm_after_merge=True, **merger) for _ in vision.deepstack_layers
        )
        self._captured: dict[int, Tensor] = {}
        for index in vision.deepstack_layers:
            self.encoder.layers[index].register_forward_hook(self._capture(index))

    def _capture(self, index: int):
        def hook(module, args, output):
            self._captured[index] = output[0]

        return hook

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # megatron's default recursion treats a plain ModuleList as replicated, which would
        # lose the TP split of the DeepStack mergers' linears; describe each merger itself.
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for k, merger in enumerate(self.deepstack_mergers):
            sd.update(merger.sharded_state_dict(f"{prefix}deepstack_mergers.{k}.", sharded_offsets, metadata))
        return sd

    def encoder_parts(self) -> list[torch.nn.Module]:
        return [self.patch_embed, self.pos_embed, self.encoder]

    def projector_parts(self) -> list[torch.nn.Module]:
        return [self.merger, self.deepstack_mergers]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``[N, C*T*P*P]`` patches + ``[n, 3]`` grids -> ``[N/4, llm]`` and one ``[N/4, llm]``
        per DeepStack level, in input order."""
        # Positions, RoPE angles and segment lengths depend on the grids only: computed on
        # the CPU (training passes the grids there, see training.step) and copied over, so
        # the forward never waits for the device to read a value back.
        grid_thw = grid_thw.cpu().long()
        x = self.patch_embed(pixel_values) + self.pos_embed(grid_thw).to(pixel_values.device)  # [N, H]
        head_dim = self.vision.hidden_size // self.vision.num_attention_heads
        rope = rope_2d(grid_thw, head_dim=head_dim, theta=self.vision.rope_theta, merge=self.merge).to(x.device)
        cu = vision_cu_seqlens(grid_thw)
        longest = int((cu[1:] - cu[:-1]).max())
        if self.boundaries_on_device or self.packed_format == "thd":
            cu = cu.to(x.device)
        packed = PackedSeqParams(qkv_format=self.packed_format, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        self._captured = {}
        hidden = self.encoder(x[:, None, :], attention_mask=None, rotary_pos_emb=rope, packed_seq_params=packed)
        merged = self.merger(hidden[:, 0])
        deepstack = [
            m(self._captured[i][:, 0]) for m, i in zip(self.deepstack_mergers, self.vision.deepstack_layers)
        ]
        return merged, deepstack


def build_vision_model(vision: VisionConfig, projector: ProjectorConfig, llm_hidden_size: int,
                       parallel: ParallelConfig, *, dtype: torch.dtype, use_te: bool) -> VisionModel:
    config = vision_transformer_config(vision, parallel, dtype=dtype, use_te=use_te)
    return VisionModel(vision, projector, llm_hidden_size, config, use_te=use_te).to(device.device())
