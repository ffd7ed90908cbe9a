"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

Why: megatron-core's local ``DotProductAttention`` (the ``core_attention`` of
``get_gpt_layer_local_spec``) materializes the full ``[b, np, sq, sk]`` score matrix with
``baddbmm`` and a masked softmax, and keeps it (plus the dropout mask and probabilities) for
backward. SDPA dispatches to fused kernels (flash / memory-efficient on CPU and GPU) that never
store the score matrix, so memory is linear instead of quadratic in sequence length and the
kernels are faster. It also supports GQA natively, which avoids DotProductAttention's
``repeat_interleave`` copies of K/V.

:class:`SDPAAttention` is a drop-in for the ``core_attention`` slot of megatron's
``SelfAttentionSubmodules`` / ``CrossAttentionSubmodules``: same constructor and forward
contract as ``megatron.core.transformer.dot_product_attention.DotProductAttention`` (0.16.1).

Packed sequences (``packed_seq_params``): supported by masking, not by variable-length
kernels. The segments given by ``cu_seqlens`` become a block-diagonal (causal) boolean mask,
so no token attends across a sample boundary; the compute is still that of one long sequence.
Real varlen kernels (cuDNN / flash-attn with ``cu_seqlens``) are the GPU path through
Transformer Engine's ``TEDotProductAttention``; this module is for the CPU (local-spec) path
and for tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from megavlm.parallel.ring_attention import ring_attention

__all__ = ["SDPAAttention", "packed_segment_mask"]

_CAUSAL_TYPES = (
    AttnMaskType.causal,
    AttnMaskType.padding_causal,
    AttnMaskType.causal_bottom_right,
)


def packed_segment_mask(
    cu_seqlens: Tensor,
    total_len: int,
    cu_seqlens_padded: Optional[Tensor] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Block-diagonal "may attend" mask for sequences packed along one dimension.

    Args:
        cu_seqlens: ``[n + 1]`` cumulative real lengths of the n packed samples.
        total_len: length of the packed dimension (may exceed the packed tokens; the tail is
            padding).
        cu_seqlens_padded: optional ``[n + 1]`` cumulative *padded* lengths: when given, sample
            i occupies ``[padded[i], padded[i+1])`` and only its first
            ``cu_seqlens[i+1] - cu_seqlens[i]`` positions are real (megatron/TE convention).

    Returns:
        ``[total_len, total_len]`` bool, True where query i may attend key j: same sample and
        both real tokens. Padding tokens attend nothing and are attended by nothing.
        Causality is applied separately.
    """
    device = device if device is not None else cu_seqlens.device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    layout = cu if cu_seqlens_padded is None else cu_seqlens_padded.to(device, torch.long)
    if cu.dim() != 1 or cu.numel() < 2 or layout.shape != cu.shape:
        raise ValueError(f"bad cu_seqlens {tuple(cu.shape)} / padded {tuple(layout.shape)}")
    if int(layout[-1]) > total_len:
        raise ValueError(
            f"cu_seqlens describe {int(layout[-1])} tokens but the packed dim has {total_len}"
        )
    lengths = cu[1:] - cu[:-1]  # [n]
    if bool((lengths > layout[1:] - layout[:-1]).any()):
        raise ValueError("cu_seqlens lengths exceed cu_seqlens_padded lengths")
    num_segments = cu.numel() - 1
    pos = torch.arange(total_len, device=device)  # [s]
    # segment index of each position; == num_segments past the last boundary (tail padding)
    seg = torch.bucketize(pos, layout[1:], right=True)  # [s]
    seg_c = seg.clamp(max=num_segments - 1)
    real = (seg < num_segments) & (pos - layout[seg_c] < lengths[seg_c])  # [s]
    return (seg[:, None] == seg[None, :]) & real[:, None] & real[None, :]  # [s, s]


def _check_context_parallel(config: TransformerConfig, cp_comm_type: Optional[str], dropout) -> None:
    """What the CPU ring supports; TEDotProductAttention is the GPU path for the rest."""
    if cp_comm_type not in (None, "p2p"):
        raise ValueError(
            f"parallel.cp_comm_type={cp_comm_type!r}: megavlm's ring attention (no Transformer "
            "Engine) exchanges K/V point to point only; use p2p, or TE attention on GPU"
        )
    if float(config.attention_dropout if dropout is None else dropout) > 0:
        raise ValueError("context parallelism without Transformer Engine needs attention_dropout=0")
    if config.window_size is not None:
        raise ValueError("context parallelism without Transformer Engine has no sliding window")


class SDPAAttention(MegatronModule):
    """Megatron core attention computed with ``F.scaled_dot_product_attention``.

    Same constructor as megatron's ``DotProductAttention``; see the module docstring for why.
    Not supported (clear errors at construction): ``apply_query_key_layer_scaling`` (it only
    exists to keep fp16 scores in range in the unfused softmax, which SDPA never materializes),
    non-vanilla ``softmax_type`` (off-by-one / learnable sink), ``qk_clip``
    (needs the max logit, which SDPA does not expose).

    Masking semantics (the "may attend" sets are intersected):
      * causal mask types (``causal``, ``padding_causal``: top-left aligned, which requires
        ``sq == sk`` unless ``sq == 1`` — single-token decode, where megatron also drops the
        mask; ``causal_bottom_right``: aligned to the last key);
      * sliding window when ``config.window_size`` applies to this layer (as
        DotProductAttention, ``(left, right)`` relative to the aligned diagonal; ``-1`` means
        unbounded, as in TE);
      * ``attention_mask``: boolean, megatron convention True = masked out, broadcastable to
        ``[b, np, sq, sk]``. DotProductAttention uses a given mask *instead of* the causal
        mask; here it is applied *in addition* to it, which is identical for megatron's usual
        causal/padding masks and never lets a causal layer see the future;
      * packed segments from ``packed_seq_params``.
    A query row with no visible key yields zeros (SDPA's behavior) where megatron's
    ``-10000`` fill yields an average of V; such rows are padding whose output is discarded.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config

        self.cp_size = config.context_parallel_size
        if self.cp_size > 1:
            _check_context_parallel(config, cp_comm_type, attention_dropout)
        if config.apply_query_key_layer_scaling:
            raise ValueError(
                "SDPAAttention does not support apply_query_key_layer_scaling: it rescales fp16 "
                "scores inside megatron's unfused softmax, which SDPA never materializes. "
                "Set apply_query_key_layer_scaling=False (pass softmax_scale if you need a "
                "different scale)."
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPAAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}"
            )
        if getattr(config, "qk_clip", False):
            raise ValueError(
                "SDPAAttention does not expose max attention logits (qk_clip)"
            )

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in DotProductAttention

        required = ["tp", "cp"] if self.cp_size > 1 else ["tp"]
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=required)
        elif not all(hasattr(pg_collection, name) for name in required):
            raise ValueError(f"SDPAAttention pg_collection must have the {required} process groups")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp if self.cp_size > 1 else None

        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)

        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head)
            if softmax_scale is None
            else softmax_scale
        )
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            self.window_size = tuple(config.window_size)
        else:
            self.window_size = None
        self.attention_dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    # ------------------------------------------------------------------ masks
    def _keep_mask(
        self,
        sq: int,
        sk: int,
        device: torch.device,
        mask_type: AttnMaskType,
        attention_mask: Optional[Tensor],
        packed_seq_params: Optional[PackedSeqParams],
    ) -> tuple[Optional[Tensor], bool]:
        """Returns (keep, is_causal): a bool "may attend" mask or None, and whether SDPA's
        built-in causal flag can be used instead of materializing the causal mask."""
        causal = mask_type in _CAUSAL_TYPES
        offset = 0  # diagonal alignment: key index j aligned to query i is i + offset
        if mask_type == AttnMaskType.causal_bottom_right or self.window_size is not None:
            # bottom-right; also megatron's get_sliding_window_causal_mask alignment
            offset = sk - sq
        elif causal and sq != sk:
            if sq == 1:
                causal = False  # single-token decode against a KV cache (as megatron)
            else:
                raise ValueError(
                    f"top-left causal attention needs sq == sk (got {sq}, {sk}); "
                    "use AttnMaskType.causal_bottom_right for queries at the end of the keys"
                )

        if (
            causal
            and offset == 0
            and attention_mask is None
            and packed_seq_params is None
            and self.window_size is None
        ):
            return None, True  # fast path: SDPA's own causal mask, nothing materialized

        keep: Optional[Tensor] = None

        def _and(m: Tensor) -> None:
            nonlocal keep
            keep = m if keep is None else keep & m

        if causal or self.window_size is not None:
            rel = (
                torch.arange(sk, device=device)[None, :]
                - torch.arange(sq, device=device)[:, None]
                - offset
            )  # [sq, sk]: key index minus aligned query index
            if causal:
                _and(rel <= 0)
            if self.window_size is not None:
                left, right = self.window_size
                if left is not None and left >= 0:
                    _and(rel >= -left)
                if right is not None and right >= 0:
                    _and(rel <= right)

        if packed_seq_params is not None:
            _and(self._packed_keep_mask(packed_seq_params, sq, sk, device))  # [sq, sk]

        if attention_mask is not None:
            if attention_mask.dtype.is_floating_point:
                raise TypeError(
                    "SDPAAttention expects a boolean attention_mask (True = masked out); "
                    "additive float masks are not supported"
                )
            _and(~attention_mask.to(device=device, dtype=torch.bool))  # [b|1, np|1, sq, sk]
        return keep, False

    def _segments(
        self, params: Optional[PackedSeqParams], sq: int, sk: int, mask_type: AttnMaskType,
        attention_mask: Optional[Tensor],
    ) -> Optional[list[tuple[int, int]]]:
        """(start, end) of each packed sample when per-sample SDPA calls are exact, else None."""
        if (
            params is None
            or attention_mask is not None
            or self.window_size is not None
            or sq != sk
            or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding)
            or params.cu_seqlens_q is None
            or params.cu_seqlens_q_padded is not None
            or (params.cu_seqlens_kv is not None and params.cu_seqlens_kv is not params.cu_seqlens_q
                and not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv))
        ):
            return None
        bounds = params.cu_seqlens_q.tolist()
        if bounds[0] != 0 or bounds[-1] != sq:
            return None
        return [(a, e) for a, e in zip(bounds[:-1], bounds[1:]) if e > a]

    @staticmethod
    def _packed_keep_mask(
        params: PackedSeqParams, sq: int, sk: int, device: torch.device
    ) -> Tensor:
        if params.qkv_format not in ("sbhd", "thd"):
            raise ValueError(
                f"SDPAAttention supports packed qkv_format 'sbhd'/'thd', got {params.qkv_format!r}"
            )
        if params.cu_seqlens_q is None:
            raise ValueError("packed_seq_params.cu_seqlens_q is required")
        cu_kv = params.cu_seqlens_kv if params.cu_seqlens_kv is not None else params.cu_seqlens_q
        pad_q, pad_kv = params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded
        same = torch.equal(params.cu_seqlens_q.cpu(), cu_kv.cpu()) and (
            (pad_q is None and pad_kv is None)
            or (pad_q is not None and pad_kv is not None and torch.equal(pad_q.cpu(), pad_kv.cpu()))
        )
        if sq != sk or not same:
            raise ValueError(
                "SDPAAttention supports packed sequences only for self-attention with "
                "cu_seqlens_q == cu_seqlens_kv; use TEDotProductAttention for varlen cross-attn"
            )
        return packed_segment_mask(params.cu_seqlens_q, sq, pad_q, device=device)

    # ------------------------------------------------------- context parallel
    def _ring(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
        mask_type: AttnMaskType, params: Optional[PackedSeqParams],
    ) -> Tensor:
        """Ring attention over the CP group (``megavlm.parallel.ring_attention``): the local
        queries (this rank's zigzag share, ``megavlm.parallel.context``) against every
        rank's keys and values, which travel the ring; ``[sq, b, np * hn]``."""
        if attention_mask is not None:
            raise ValueError(
                "context parallelism takes no attention_mask (padded inference batches run with cp=1)"
            )
        if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding):
            raise ValueError(f"ring attention supports causal or no_mask attention, got {mask_type}")
        cu = cu_padded = None
        if params is not None:
            if params.cu_seqlens_q_padded is None:
                raise ValueError(
                    "packed input under context parallelism needs cu_seqlens_q_padded (every sample "
                    "padded to a multiple of 2 x cp); megavlm.parallel.context.shard_for_cp sets it"
                )
            cu, cu_padded = params.cu_seqlens_q, params.cu_seqlens_q_padded
        sq, b, np_, hn = query.shape
        context = ring_attention(
            query, key, value, self.cp_group, causal=mask_type == AttnMaskType.causal,
            scale=self.softmax_scale, cu_seqlens=cu, cu_seqlens_padded=cu_padded, layout="sbhd",
        )  # [sq, b, np, hn]
        return context.reshape(sq, b, np_ * hn)

    # ------------------------------------------------------------------ SDPA
    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], is_causal: bool,
              dropout_p: float) -> Tensor:
        """``[b, np, sq, hn]`` from ``[b, np|ng, s, hn]``; ``keep``: bool, True = may attend."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask_type: AttnMaskType, attention_mask: Optional[Tensor],
        params: Optional[PackedSeqParams], dropout_p: float,
    ) -> Tensor:
        """Attention with the masks of the class docstring."""
        keep, is_causal = self._keep_mask(q.shape[2], k.shape[2], q.device, mask_type, attention_mask, params)
        return self._sdpa(q, k, v, keep, is_causal, dropout_p)

    @torch.compiler.disable(reason="the per-sample split reads the packed boundaries as Python ints")
    def _attend_packed(
        self, q: Tensor, k: Tensor, v: Tensor, mask_type: AttnMaskType, attention_mask: Optional[Tensor],
        params: PackedSeqParams, dropout_p: float,
    ) -> Tensor:
        """Packed samples attend only within themselves: one SDPA call per sample (its own
        causal flag, no mask) does the work of the block-diagonal mask without the
        cross-sample FLOPs, which dominate for many short samples or images. Where that is
        not exact (padded boundaries, windows, extra masks) the block-diagonal mask is used.

        Eager under ``train.compile``: the split needs the boundaries as Python ints, a
        data-dependent graph break, so the compiled layer runs as two graphs around this call
        instead of breaking inside it (and the boundaries are never guarded on)."""
        segments = self._segments(params, q.shape[2], k.shape[2], mask_type, attention_mask)
        if segments is None:
            return self._attend(q, k, v, mask_type, attention_mask, params, dropout_p)
        is_causal = mask_type == AttnMaskType.causal
        runs = _equal_length_runs([e - a for a, e in segments], batchable=q.shape[0] == 1 and dropout_p == 0.0)
        # One split (its backward is one cat) instead of a slice per sample (whose backward
        # zero-fills a full-size gradient for each and sums them).
        parts = zip(*(x.split([n * length for n, length in runs], dim=2) for x in (q, k, v)))
        return torch.cat([
            self._sdpa(*part, None, is_causal, dropout_p) if n == 1 else self._attend_run(*part, n, is_causal)
            for (n, _), part in zip(runs, parts)
        ], dim=2)  # [b, np, sq, hn]

    def _attend_run(self, q: Tensor, k: Tensor, v: Tensor, n: int, is_causal: bool) -> Tensor:
        """``n`` consecutive samples of one length (images of one size, say) as one SDPA call
        with the samples in the batch dimension; ``[1, np, n * L, hn]`` in and out. SDPA
        treats batch entries independently, so this equals ``n`` calls (tested bit for bit)."""
        def batched(x: Tensor) -> Tensor:  # [1, h, n * L, d] -> [n, h, L, d], a view
            _, h, t, d = x.shape
            return x[0].reshape(h, n, t // n, d).transpose(0, 1)

        out = self._sdpa(batched(q), batched(k), batched(v), None, is_causal, 0.0)  # [n, np, L, hn]
        return out.transpose(0, 1).reshape(1, out.shape[1], -1, out.shape[3])

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attention over TP-local heads.

        Args:
            query: ``[sq, b, np, hn]`` (``[t, np, hn]`` for packed 'thd', where megatron's
                SelfAttention has already squeezed the dummy batch dim).
            key, value: ``[sk, b, ng, hn]`` with ``ng = num_query_groups_per_partition``
                dividing ``np`` (GQA); ``[t, ng, hn]`` for 'thd'.
            attention_mask: optional bool mask, True = masked out.
            attn_mask_type: overrides the constructor's mask type when given (as TE does).
            attention_bias: not supported (as in DotProductAttention).
            packed_seq_params: packed-sequence boundaries (see module docstring).

        Returns:
            ``[sq, b, hp]`` with ``hp = np * hn`` (``[t, hp]`` for 'thd').
        """
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAAttention")

        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            # [t, np, hn] -> [t, 1, np, hn]: the packed tokens as one sequence of batch 1
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)

        sq, b, np_, hn = query.shape  # [sq, b, np, hn]
        ng = key.shape[2]  # key/value: [sk, b, ng, hn]
        if np_ % ng != 0:
            raise ValueError(f"query heads ({np_}) must be a multiple of key/value heads ({ng})")

        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if self.cp_size > 1:
            context = self._ring(query, key, value, attention_mask, mask_type, packed_seq_params)
            return context.squeeze(1) if thd else context
        # SDPA layout: [sq, b, np, hn] -> [b, np, sq, hn]; [sk, b, ng, hn] -> [b, ng, sk, hn]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        dropout_p = self.attention_dropout_p if self.training else 0.0
        args = (q, k, v, mask_type, attention_mask, packed_seq_params, dropout_p)
        attend = self._attend if packed_seq_params is None else self._attend_packed

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Heads are TP-local, so the dropout pattern must differ across TP ranks: use the
            # model-parallel RNG stream. Under sequence parallelism TransformerBlock already
            # runs every layer inside this fork, and nesting it would replay random numbers
            # (the same rule as DotProductAttention).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend(*args)
        else:
            context = attend(*args)

        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, hp]
        context = context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        if thd:
            context = context.squeeze(1)  # [t, hp]
        return context


def _equal_length_runs(lengths: list[int], *, batchable: bool) -> list[tuple[int, int]]:
    """``(count, length)`` of each run of consecutive equal ``lengths`` (every run of count 1
    unless ``batchable``): the packed samples that can share one SDPA call."""
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if batchable and runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0] + 1, length)
        else:
            runs.append((1, length))
    return runs
