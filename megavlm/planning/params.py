"""Exact per-rank parameter tensors, DDP gradient buffers and optimizer shards.

For a megavlm-built decoder this module lists, per pipeline rank and model chunk, the
parameter tensors megatron-core creates -- in ``named_parameters()`` order, with their
TP/EP-local shapes -- and lays them out in megatron DDP's contiguous gradient buffers
exactly as ``megatron.core.distributed.param_and_grad_buffer._ParamAndGradBuffer`` does,
so that parameter counts, gradient-buffer sizes (including the distributed optimizer's
padding) and optimizer-state sizes are exact, not estimates.

What megavlm builds (``megavlm/models/language/{model,specs}.py``, megatron-core 0.16.1):

* Embedding ``[V/tp, h]`` on the first stage (chunk 0), output layer ``[V/tp, h]`` on the
  last stage (last chunk). The vocabulary is *not* padded: megavlm passes ``vocab_size``
  to ``GPTModel`` unchanged (megatron-core splits it with ``divide``, so V must be a
  multiple of tp). ``vocab_divisible_by=128`` models Megatron-LM's
  ``--make-vocab-size-divisible-by 128`` (pad to a multiple of 128*tp) instead.
* Tied embeddings: one tensor when pp == 1; with pp > 1 the last stage keeps its own copy
  (``output_layer.weight``), and both copies are flagged ``shared_embedding``, which
  makes DDP (with the distributed optimizer) close a bucket around them.
* Per layer: input norm ``[h]``; ``linear_proj [h, nq*d/tp]``; ``linear_qkv
  [(nq + 2*nkv)*d/tp, h]``; QK norms ``[d]`` each; pre-MLP norm ``[h]``; dense SwiGLU
  ``linear_fc1 [2f/tp, h]``, ``linear_fc2 [h, f/tp]``; or MoE: router ``[E, h]``
  (replicated, a dense parameter) and ``E/ep`` local experts with ``[2f_e/etp, h]`` and
  ``[h, f_e/etp]`` (expert-parallel parameters: their own buffer, reduced over expert DP).
  No biases. Norms are replicated.
* Layers: ``L / (pp * vpp)`` per chunk; chunk ``v`` of pipeline rank ``r`` holds layers
  starting at ``(v * pp + r) * L / (pp * vpp)`` (megatron's standard split).
* Backend "local" (CPU) has separate norm modules; backend "te" fuses the input norm into
  ``linear_qkv.layer_norm_weight`` and the dense pre-MLP norm into
  ``linear_fc1.layer_norm_weight`` (same sizes, other positions), and grouped-GEMM
  experts are ``linear_fc1.weight{i}`` then ``linear_fc2.weight{i}``. Only the local
  order is checked by tests (no GPU in CI); the two differ only in DDP padding.

A vision tower (``VisionSpec``) is added to the first stage's chunk 0, ahead of the
decoder, with the placement documented there (an estimate: no VLM exists yet).
"""

from __future__ import annotations

from megavlm.config import schema

import bisect
import math
from dataclasses import dataclass, field

from megavlm.config.schema import LanguageModelConfig
from megavlm.planning.layout import Layout
from megavlm.planning.models import VisionSpec


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]
    expert: bool = False  # megatron's allreduce=False: expert-parallel buffer
    shared_embedding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def padded_vocab(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def moe_layer_pattern(lm: LanguageModelConfig) -> list[int]:
    """1 for a MoE layer, 0 for a dense one."""
    return schema.moe_layer_pattern(lm.num_layers, lm.moe.layer_freq if lm.moe else None)


def chunk_layer_range(num_layers: int, layout: Layout, pp_rank: int, vp_stage: int) -> range:
    if layout.first_stage_layers is not None or layout.last_stage_layers is not None:
        sizes = layout.stage_layers(num_layers)  # uneven: vpp = 1
        start = sum(sizes[:pp_rank])
        return range(start, start + sizes[pp_rank])
    per_chunk = num_layers // (layout.pp * layout.vpp)
    start = (vp_stage * layout.pp + pp_rank) * per_chunk
    return range(start, start + per_chunk)


def _layer_params(lm: LanguageModelConfig, layout: Layout, prefix: str, moe: bool, backend: str) -> list[ParamTensor]:
    tp, h, d = layout.tp, lm.hidden_size, lm.head_dim
    nq, nkv = lm.num_attention_heads, lm.num_query_groups
    te = backend == "te"
    out = []
    if not te:
        out.append(ParamTensor(f"{prefix}input_layernorm.weight", (h,)))
    out.append(ParamTensor(f"{prefix}self_attention.linear_proj.weight", (h, nq * d // tp)))
    if te:
        out.append(ParamTensor(f"{prefix}self_attention.linear_qkv.layer_norm_weight", (h,)))
    out.append(ParamTensor(f"{prefix}self_attention.linear_qkv.weight", ((nq + 2 * nkv) * d // tp, h)))
    if lm.qk_norm:
        out.append(ParamTensor(f"{prefix}self_attention.q_layernorm.weight", (d,)))
        out.append(ParamTensor(f"{prefix}self_attention.k_layernorm.weight", (d,)))
    if not moe:
        f = lm.ffn_hidden_size
        if te:
            out.append(ParamTensor(f"{prefix}mlp.linear_fc1.layer_norm_weight", (h,)))
        else:
            out.append(ParamTensor(f"{prefix}pre_mlp_layernorm.weight", (h,)))
        out.append(ParamTensor(f"{prefix}mlp.linear_fc1.weight", (2 * f // tp, h)))
        out.append(ParamTensor(f"{prefix}mlp.linear_fc2.weight", (h, f // tp)))
        return out
    m = lm.moe
    etp, fe = layout.expert_tp, m.ffn_hidden_size
    local = m.num_experts // layout.ep
    out.append(ParamTensor(f"{prefix}pre_mlp_layernorm.weight", (h,)))
    out.append(ParamTensor(f"{prefix}mlp.router.weight", (m.num_experts, h)))
    if te and m.grouped_gemm:
        out += [
            ParamTensor(f"{prefix}mlp.experts.linear_fc1.weight{j}", (2 * fe // etp, h), expert=True)
            for j in range(local)
        ]
        out += [
            ParamTensor(f"{prefix}mlp.experts.linear_fc2.weight{j}", (h, fe // etp), expert=True) for j in range(local)
        ]
    else:
        for j in range(local):
            e = f"{prefix}mlp.experts.local_experts.{j}."
            out.append(ParamTensor(f"{e}linear_fc1.weight", (2 * fe // etp, h), expert=True))
            out.append(ParamTensor(f"{e}linear_fc2.weight", (h, fe // etp), expert=True))
    return out


def vision_params(vision: VisionSpec, tp: int) -> list[ParamTensor]:
    """The ViT of ``VisionSpec`` on one TP rank (estimate; see VisionSpec)."""
    hv, fv = vision.hidden_size, vision.ffn_hidden_size
    out = [
        ParamTensor("vision.patch_embed.proj.weight", (hv, vision.patch_dim)),
        ParamTensor("vision.patch_embed.proj.bias", (hv,)),
        ParamTensor("vision.pos_embed.weight", (vision.num_position_embeddings, hv)),
    ]
    for i in range(vision.num_layers):
        p = f"vision.blocks.{i}."
        out += [
            ParamTensor(f"{p}norm1.weight", (hv,)),
            ParamTensor(f"{p}norm1.bias", (hv,)),
            ParamTensor(f"{p}attn.qkv.weight", (3 * hv // tp, hv)),
            ParamTensor(f"{p}attn.qkv.bias", (3 * hv // tp,)),
            ParamTensor(f"{p}attn.proj.weight", (hv, hv // tp)),
            ParamTensor(f"{p}attn.proj.bias", (hv,)),
            ParamTensor(f"{p}norm2.weight", (hv,)),
            ParamTensor(f"{p}norm2.bias", (hv,)),
            ParamTensor(f"{p}mlp.linear_fc1.weight", (fv // tp, hv)),
            ParamTensor(f"{p}mlp.linear_fc1.bias", (fv // tp,)),
            ParamTensor(f"{p}mlp.linear_fc2.weight", (hv, fv // tp)),
            ParamTensor(f"{p}mlp.linear_fc2.bias", (hv,)),
        ]
    wide = hv * vision.merge
    for k in range(1 + vision.deepstack_mergers):
        p = "vision.merger." if k == 0 else f"vision.deepstack_merger_list.{k - 1}."
        norm = hv if k == 0 else wide
        out += [
            ParamTensor(f"{p}norm.weight", (norm,)),
            ParamTensor(f"{p}norm.bias", (norm,)),
            ParamTensor(f"{p}linear_fc1.weight", (wide // tp, wide)),
            ParamTensor(f"{p}linear_fc1.bias", (wide // tp,)),
            ParamTensor(f"{p}linear_fc2.weight", (vision.out_hidden_size, wide // tp)),
            ParamTensor(f"{p}linear_fc2.bias", (vision.out_hidden_size,)),
        ]
    return out


def _first_stage_params(
    lm: LanguageModelConfig, layout: Layout, vision: VisionSpec | None, vocab_divisible_by: int
) -> list[ParamTensor]:
    vocab = padded_vocab(lm.vocab_size, layout.tp, vocab_divisible_by)
    shared = lm.tie_embeddings and layout.pp > 1
    out = vision_params(vision, layout.tp) if vision is not None else []
    out.append(
        ParamTensor("embedding.word_embeddings.weight", (vocab // layout.tp, lm.hidden_size), shared_embedding=shared)
    )
    return out


def _last_stage_params(lm: LanguageModelConfig, layout: Layout, vocab_divisible_by: int) -> list[ParamTensor]:
    out = [ParamTensor("decoder.final_layernorm.weight", (lm.hidden_size,))]
    if not lm.tie_embeddings or layout.pp > 1:
        vocab = padded_vocab(lm.vocab_size, layout.tp, vocab_divisible_by)
        shared = lm.tie_embeddings and layout.pp > 1
        out.append(ParamTensor("output_layer.weight", (vocab // layout.tp, lm.hidden_size), shared_embedding=shared))
    return out


def _is_first(layout: Layout, pp_rank: int, vp_stage: int) -> bool:
    return pp_rank == 0 and vp_stage == 0


def _is_last(layout: Layout, pp_rank: int, vp_stage: int) -> bool:
    return pp_rank == layout.pp - 1 and vp_stage == layout.vpp - 1


def chunk_params(
    lm: LanguageModelConfig,
    layout: Layout,
    pp_rank: int,
    vp_stage: int = 0,
    *,
    backend: str = "local",
    vision: VisionSpec | None = None,
    vocab_divisible_by: int = 1,
) -> list[ParamTensor]:
    """The parameters of one model chunk on one rank, in ``named_parameters()`` order."""
    out: list[ParamTensor] = []
    if _is_first(layout, pp_rank, vp_stage):
        out += _first_stage_params(lm, layout, vision, vocab_divisible_by)
    pattern = moe_layer_pattern(lm)
    for i in chunk_layer_range(lm.num_layers, layout, pp_rank, vp_stage):
        out += _layer_params(lm, layout, f"decoder.layers.{i}.", bool(pattern[i]), backend)
    if _is_last(layout, pp_rank, vp_stage):
        out += _last_stage_params(lm, layout, vocab_divisible_by)
    return out


Item = tuple[int, bool]  # (elements, shared_embedding): a parameter or a padding-free run


def _merge(items: list[tuple[int, bool]]) -> list[Item]:
    """Merge neighbours that are multiples of 64 elements and not shared embeddings.

    With the distributed optimizer DDP pads each parameter's start to 64 elements, so a
    run of such parameters is laid out exactly like one parameter of their total size (in
    any order); without it nothing is padded. Merging keeps the layout exact and makes
    real models (whose tensors are all multiples of 64) a handful of items per chunk.
    """
    out: list[Item] = []
    for n, shared in items:
        if out and not shared and n % 64 == 0 and not out[-1][1] and out[-1][0] % 64 == 0:
            out[-1] = (out[-1][0] + n, False)
        else:
            out.append((n, shared))
    return out


_LAYER_ITEMS: dict[tuple, tuple[list[Item], list[Item]]] = {}


def _layer_items(lm: LanguageModelConfig, layout: Layout, moe: bool, backend: str) -> tuple[list[Item], list[Item]]:
    """(dense, expert) items of one decoder layer, cached by shape and layout."""
    m = lm.moe
    key = (
        lm.hidden_size,
        lm.head_dim,
        lm.num_attention_heads,
        lm.num_query_groups,
        lm.ffn_hidden_size,
        lm.qk_norm,
        moe,
        m and (m.num_experts, m.ffn_hidden_size, m.grouped_gemm),
        layout.tp,
        layout.ep,
        layout.expert_tp,
        backend,
    )
    if key not in _LAYER_ITEMS:
        params = _layer_params(lm, layout, "", moe, backend)
        _LAYER_ITEMS[key] = (
            _merge([(p.numel, False) for p in params if not p.expert]),
            _merge([(p.numel, False) for p in params if p.expert]),
        )
    return _LAYER_ITEMS[key]


def chunk_items(
    lm: LanguageModelConfig,
    layout: Layout,
    pp_rank: int,
    vp_stage: int = 0,
    *,
    backend: str = "local",
    vision: VisionSpec | None = None,
    vocab_divisible_by: int = 1,
) -> tuple[list[Item], list[Item]]:
    """``chunk_params`` as (dense, expert) items in the same order, for the buffer layout."""
    dense: list[Item] = []
    expert: list[Item] = []
    if _is_first(layout, pp_rank, vp_stage):
        dense += [(p.numel, p.shared_embedding) for p in _first_stage_params(lm, layout, vision, vocab_divisible_by)]
    pattern = moe_layer_pattern(lm)
    for i in chunk_layer_range(lm.num_layers, layout, pp_rank, vp_stage):
        d, e = _layer_items(lm, layout, bool(pattern[i]), backend)
        dense += d
        expert += e
    if _is_last(layout, pp_rank, vp_stage):
        dense += [(p.numel, p.shared_embedding) for p in _last_stage_params(lm, layout, vocab_divisible_by)]
    return _merge(dense), _merge(expert)


@dataclass
class GradBuffer:
    """One of megatron DDP's contiguous gradient buffers (one bucket group, no overlap).

    megavlm runs DDP with ``overlap_grad_reduce=False``, so there is one bucket per buffer
    unless a ``shared_embedding`` parameter (tied embeddings, pp > 1) forces its own bucket.
    With the distributed optimizer every parameter starts at a multiple of 64 elements and
    every bucket ends at a multiple of lcm(group size, 128); the optimizer of DP rank r owns
    the r-th of ``group size`` equal slices of each bucket.
    """

    group_size: int
    distributed_optimizer: bool
    numel: int = 0  # padded: what is allocated
    buckets: list[tuple[int, int]] = field(default_factory=list)
    # (start, end, bucket) of each parameter, or of each padding-free run of parameters
    param_ranges: list[tuple[int, int, int]] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list, repr=False)
    _before: list[int] = field(default_factory=list, repr=False)
    _max_owned: int | None = field(default=None, repr=False)

    @property
    def numel_params(self) -> int:
        return sum(e - s for s, e, _ in self.param_ranges)

    def _covered(self, x: int) -> int:
        """Parameter elements below buffer position ``x`` (ranges ascend)."""
        i = bisect.bisect_right(self._starts, x)
        if i == 0:
            return 0
        start, end, _ = self.param_ranges[i - 1]
        return self._before[i - 1] + min(end, x) - start

    def owned_elements(self, dp_rank: int) -> int:
        """Parameter elements whose optimizer state DP rank ``dp_rank`` holds."""
        if not self.distributed_optimizer:
            return self.numel_params
        if len(self._starts) != len(self.param_ranges):
            self._starts = [s for s, _, _ in self.param_ranges]
            self._before = [0]
            for s, e, _ in self.param_ranges[:-1]:
                self._before.append(self._before[-1] + e - s)
        owned = 0
        for start, end in self.buckets:
            shard = (end - start) // self.group_size
            lo = start + dp_rank * shard
            hi = start + min(end - start, (dp_rank + 1) * shard)
            owned += self._covered(hi) - self._covered(lo)
        return owned

    def max_owned_elements(self) -> int:
        if not self.distributed_optimizer:
            return self.numel_params
        if self._max_owned is None:
            self._max_owned = max(self.owned_elements(r) for r in range(self.group_size))
        return self._max_owned


def grad_buffer(params: list[ParamTensor] | list[Item], group_size: int, distributed_optimizer: bool) -> GradBuffer:
    """Lay parameters out as ``_ParamAndGradBuffer`` does (bucket_size=None).

    ``params`` in ``named_parameters()`` order: ParamTensors or (elements, shared) items.
    """
    buf = GradBuffer(group_size=group_size, distributed_optimizer=distributed_optimizer)
    items = [(p.numel, p.shared_embedding) if isinstance(p, ParamTensor) else p for p in params]
    if not items:
        return buf

    def pad(n: int, k: int) -> int:
        return -(-n // k) * k

    divisor = math.lcm(group_size, 128)
    bucket_start, start, end, in_bucket = 0, 0, 0, 0

    def close(param_end: int) -> int:
        nonlocal bucket_start, in_bucket
        bucket_end = pad(param_end, divisor) if distributed_optimizer else param_end
        buf.buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for numel, shared in reversed(items):  # megatron walks params in reverse (backprop order)
        if distributed_optimizer:
            start = pad(start, 64)
        own_bucket = shared and distributed_optimizer
        if own_bucket and in_bucket:
            start = close(start)
        end = start + numel
        buf.param_ranges.append((start, end, len(buf.buckets)))
        in_bucket += 1
        start = close(end) if own_bucket else end
    if in_bucket:
        close(end)
    buf.numel = buf.buckets[-1][1]
    return buf


@dataclass
class RankParams:
    """The parameters of one pipeline rank (any TP/EP/DP rank) and their DDP buffers."""

    param_count: int  # elements on this rank
    expert_param_count: int
    dense_buffers: list[GradBuffer]  # one per model chunk
    expert_buffers: list[GradBuffer]  # one per model chunk with experts

    @property
    def buffer_numel(self) -> int:
        """Allocated gradient (and, with the distributed optimizer, parameter) buffer elements."""
        return sum(b.numel for b in self.dense_buffers + self.expert_buffers)

    def optimizer_elements(self, dp_rank: int | None = None, expert_dp_rank: int | None = None) -> int:
        """Parameter elements this rank's optimizer updates (max over DP ranks if None)."""
        dense = sum(
            b.max_owned_elements() if dp_rank is None else b.owned_elements(dp_rank) for b in self.dense_buffers
        )
        expert = sum(
            b.max_owned_elements() if expert_dp_rank is None else b.owned_elements(expert_dp_rank)
            for b in self.expert_buffers
        )
        return dense + expert


def rank_params(
    lm: LanguageModelConfig,
    layout: Layout,
    pp_rank: int,
    *,
    gpus: int,
    backend: str = "local",
    vision: VisionSpec | None = None,
    vocab_divisible_by: int = 1,
) -> RankParams:
    """Every chunk of pipeline rank ``pp_rank``, with DDP's buffers for it.

    Dense parameters are reduced over DP x CP ranks, expert parameters over expert DP
    (``gpus / (pp * etp * ep)``), as megatron's DDP groups them.
    """
    dense_group = layout.dp(gpus) * layout.cp
    expert_group = layout.expert_dp(gpus)
    dense, expert, count, expert_count = [], [], 0, 0
    for v in range(layout.vpp):
        d, e = chunk_items(
            lm, layout, pp_rank, v, backend=backend, vision=vision, vocab_divisible_by=vocab_divisible_by
        )
        dense.append(grad_buffer(d, dense_group, layout.distributed_optimizer))
        if e:
            expert.append(grad_buffer(e, expert_group, layout.distributed_optimizer))
        count += sum(n for n, _ in d) + sum(n for n, _ in e)
        expert_count += sum(n for n, _ in e)
    return RankParams(param_count=count, expert_param_count=expert_count, dense_buffers=dense, expert_buffers=expert)


def total_params(lm: LanguageModelConfig, vision: VisionSpec | None = None) -> int:
    """Parameters of the whole model (one copy of tied embeddings)."""
    return sum(p.numel for p in chunk_params(lm, Layout(), 0, vision=vision))
