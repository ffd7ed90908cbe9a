"""Perception Encoder (PE-lang) ViT, the STEP3-VL vision encoder, on megatron-core blocks.

Architecture (REFERENCE 5; facebookresearch/perception_models ``core/vision_encoder/pe.py``):
Conv2d patch embedding without bias -> + learned absolute position embedding (a square table
bilinearly resampled, ``align_corners=False``, to the patch grid) -> LayerNorm ``ln_pre`` ->
pre-norm blocks ``x + ls_1 * attn(ln_1(x))``, ``x + ls_2 * mlp(ln_2(x))`` with 2D RoPE in
GPT-J pair layout (``pe_rope``), full bidirectional attention within each image -> patch grid
features (no CLS token, no ``ln_post``, no pooling).

The blocks are megatron's ``TransformerBlock`` / ``TransformerLayer`` with the same backend
specs as the decoder (``LocalBackend`` on CPU, Transformer Engine on GPU), so tensor and
sequence parallelism, activation recompute and ``sharded_state_dict`` come from megatron.
The one addition is LayerScale, see :class:`LayerScaleBiasDropoutAdd`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megavlm.config.schema import ParallelConfig
from megavlm.config.presets import pe_lang_g14
from megavlm.config.vision import VisionConfig
from megavlm.models.language.specs import backend_provider, prenorm_layer_spec
from megavlm.models.norms import Norm
from megavlm.models.vision.pe_rope import pe_rope_angles
from megavlm.models.vision.qwen3vl import ACTIVATIONS, vision_transformer_config
from megavlm.platform.distributed import without_context_parallel

__all__ = [
    "LayerScaleBiasDropoutAdd",
    "PEVisionModel",
    "pe_lang_g14",
    "pe_layer_spec",
    "pe_num_parameters",
    "pe_transformer_config",
]


def pe_num_parameters(vision: VisionConfig) -> int:
    """Parameter count of :class:`PEVisionModel` from the config alone (no model is built).

    Per layer: LayerNorms 2 x 2H, QKV 3H^2 + 3H, output proj H^2 + H, fc1 HF + F, fc2 FH + H,
    LayerScale 2 x H (if on). Outside the layers: patch conv C p^2 H (no bias), position table
    P^2 H, ln_pre 2H (if on).
    """
    h, f = vision.hidden_size, vision.ffn_hidden_size
    per_layer = 4 * h * h + 2 * h * f + 9 * h + f
    if vision.layerscale_init is not None:
        per_layer += 2 * h
    embed = vision.in_channels * vision.patch_size**2 * h + vision.position_embedding_size**2 * h
    return vision.num_layers * per_layer + embed + (2 * h if vision.ln_pre else 0)


def pe_transformer_config(
    vision: VisionConfig,
    parallel: ParallelConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    init_std: float = 0.02,
) -> TransformerConfig:
    """The ViT TransformerConfig shared with Qwen3-VL, with the three settings PE depends on.

    - ``rotary_interleaved=True``: PE's GPT-J rotary pairs (see ``pe_rope``).
    - ``bias_activation_fusion=False``: megatron's fused bias+GELU is the tanh approximation
      whatever ``activation_func`` says (``fusions/fused_bias_gelu.py``), which would silently
      replace PE's exact GELU; it also refuses quick_gelu without GLU.
    - ``sequence_parallel`` follows ``parallel``: one image is a full ``[s, n, h]`` sequence, so
      the blocks can split it like the decoder does (see ``PEVisionModel.forward``).
    """
    if vision.activation not in ACTIVATIONS:
        raise ValueError(f"model.vision.activation={vision.activation!r} is not one of {sorted(ACTIVATIONS)}")
    parallel = parallel or ParallelConfig()
    base = vision_transformer_config(vision, parallel, dtype=dtype, use_te=use_te, init_std=init_std)
    return dataclasses.replace(
        base, rotary_interleaved=True, bias_activation_fusion=False, sequence_parallel=parallel.sequence_parallel
    )


class LayerScaleBiasDropoutAdd(torch.nn.Module):
    """The ``self_attn_bda`` / ``mlp_bda`` slot of a TransformerLayer, with LayerScale.

    Why here: megatron's TransformerLayer has no LayerScale, and the bias-dropout-add is the
    one place where a branch output (``(out, bias)``, the bias still unapplied) meets the
    residual: ``residual + dropout(gamma * (out + bias))``. Filling that slot through the spec
    gives PE's ``x + ls(branch(x))`` with no TransformerLayer subclass and no copy of its
    forward. The layer calls ``bda(training, fused)(x_with_bias, residual, p)``; ``forward``
    returns that callable, scaling ``out`` and ``bias`` by gamma (same sum) before megatron's
    own (fused or unfused) bias-dropout-add.

    Under sequence parallelism each TP rank applies gamma to a different slice of the
    sequence, so its gradient is a partial sum across TP: the parameter carries the
    ``sequence_parallel`` mark that megatron's ``finalize_model_grads`` all-reduces by (as our
    norms do, see ``models/norms.py``).
    """

    def __init__(self, config: TransformerConfig, init_value: float):
        super().__init__()
        self.layer_scale = torch.nn.Parameter(
            torch.full((config.hidden_size,), float(init_value), dtype=config.params_dtype)
        )
        self.layer_scale.sequence_parallel = config.sequence_parallel

    def forward(self, training: bool, fused: bool) -> Callable:
        bda = get_bias_dropout_add(training, fused)
        gamma = self.layer_scale

        def scaled_bda(x_with_bias: tuple[Tensor, Tensor | None], residual: Tensor, prob: float) -> Tensor:
            out, bias = x_with_bias  # [s, b, h], [h] or None
            return bda((out * gamma, None if bias is None else bias * gamma), residual, prob)

        return scaled_bda


def pe_layer_spec(config: TransformerConfig, *, layerscale_init: float | None, use_te: bool) -> ModuleSpec:
    """One PE block: the shared pre-LayerNorm layer (biased QKV and MLP, TE-compatible keys)
    with full attention (every patch sees its whole image) and LayerScale in the bda slots."""
    spec = prenorm_layer_spec(
        backend_provider(use_te=use_te), rms_norm=False, qk_norm=False, attn_mask_type=AttnMaskType.no_mask
    )
    if layerscale_init is None:
        return spec
    bda = ModuleSpec(module=LayerScaleBiasDropoutAdd, params={"config": config, "init_value": layerscale_init})
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attn_bda=bda, mlp_bda=bda))


class PEVisionModel(MegatronModule):
    """PE ViT: images ``[n, 3, H, W]`` -> patch features ``[n, H/p, W/p, hidden]``.

    All images of one call share one size (STEP3-VL encodes its 728 px global views together
    and its 504 px crops together), so they form one ``[s, n, h]`` batch with a single RoPE
    table and no attention mask. Parameters: ``conv1`` (patch embedding), ``position_embeddings``
    (``[P*P, hidden]``, row-major grid), ``ln_pre``, ``decoder`` (megatron TransformerBlock).
    """

    def __init__(self, config: TransformerConfig, vision: VisionConfig, *, use_te: bool = False):
        super().__init__(config=config)
        if vision.kind != "pe":
            raise ValueError(f"PEVisionModel needs model.vision.kind='pe', got {vision.kind!r}")
        if vision.temporal_patch_size != 1:
            raise ValueError(
                f"PE embeds single frames: model.vision.temporal_patch_size must be 1, got {vision.temporal_patch_size}"
            )
        if config.inference_fuse_tp_communication:
            raise ValueError(
                "inference_fuse_tp_communication skips the layers' bias-dropout-add, where PE's "
                "LayerScale lives; leave it off for the PE encoder"
            )
        hidden = config.hidden_size
        self.patch_size = vision.patch_size
        self.grid = vision.position_embedding_size
        self.rope_theta = vision.rope_theta
        self.conv1 = torch.nn.Conv2d(
            vision.in_channels, hidden, kernel_size=vision.patch_size, stride=vision.patch_size,
            bias=False, dtype=config.params_dtype,
        )
        self.position_embeddings = torch.nn.Parameter(
            config.init_method(torch.empty(self.grid * self.grid, hidden, dtype=config.params_dtype))
        )
        self.ln_pre = Norm(config, hidden, eps=config.layernorm_epsilon) if vision.ln_pre else None
        spec = pe_layer_spec(config, layerscale_init=vision.layerscale_init, use_te=use_te)
        self.decoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers, layer_norm=None),
            post_layer_norm=False,  # PE-lang: no ln_post
            pre_process=True,
            post_process=False,
            pg_collection=without_context_parallel(),
        )

    def set_input_tensor(self, input_tensor: Tensor) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def _position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """``[grid_h * grid_w, hidden]``: the table, bilinearly resampled (half-pixel centers)."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.position_embeddings
        table = self.position_embeddings.view(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # [1, hidden, P, P]
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return table[0].permute(1, 2, 0).reshape(grid_h * grid_w, -1)

    def forward(self, images: Tensor) -> Tensor:
        """``images [n, C, H, W]`` (H, W multiples of the patch) -> ``[n, H/p, W/p, hidden]``."""
        n, _, height, width = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"PE needs image sides that are multiples of patch_size={p}, got {height}x{width}")
        gh, gw = height // p, width // p
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [n, hidden, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [n, s, hidden], s = gh * gw row-major
        x = x + self._position_embeddings(gh, gw)
        x = x.transpose(0, 1).contiguous()  # [s, n, hidden]
        if self.config.sequence_parallel:
            if (gh * gw) % self.config.tensor_model_parallel_size:
                raise ValueError(
                    f"sequence parallelism splits the {gh}x{gw} patches of an image over "
                    f"parallel.tp={self.config.tensor_model_parallel_size} ranks: use image sizes whose "
                    "patch count is a multiple of parallel.tp, or set parallel.sequence_parallel=false"
                )
            # Before ln_pre: its parameters carry the sequence-parallel mark (models/norms.py),
            # so it must see only this rank's slice, like every norm inside the blocks.
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)  # [s/tp, n, hidden]
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        rope = pe_rope_angles(gh, gw, self.config.kv_channels, theta=self.rope_theta, device=x.device)
        rope = rope[:, None, None, :]  # [s, 1, 1, head_dim], shared by the n images
        x = self.decoder(x, attention_mask=None, rotary_pos_emb=rope)  # [s(/tp), n, hidden]
        if self.config.sequence_parallel:
            # Whatever consumes the features (projector, decoder input) runs replicated on
            # every TP rank and sends back identical gradients: backward keeps this rank's
            # slice rather than summing the TP copies.
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return x.transpose(0, 1).reshape(n, gh, gw, -1)  # [n, gh, gw, hidden]
