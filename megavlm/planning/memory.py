r"""Per-GPU memory of a layout: weights, gradients, optimizer state, activations.

Static memory (exact for megavlm-built decoders; see ``megavlm.planning.params``)
-------------------------------------------------------------------------------
* weights: the rank's parameters in the training dtype. With the distributed optimizer
  megatron DDP stores them in its padded contiguous parameter buffer, so that size is used.
* gradients: DDP's ``main_grad`` buffers, fp32 whatever the training dtype (megavlm sets
  ``grad_reduce_in_fp32=True``), padded as megatron pads them for the distributed optimizer.
* optimizer: Adam ``exp_avg`` and ``exp_avg_sq`` in fp32 (8 bytes per element) plus an
  fp32 master copy (4 bytes) when the parameters are 16-bit. With the distributed
  optimizer only the elements this DP rank owns (its slice of each padded bucket; expert
  parameters over expert DP); without it, every parameter of the rank.

Activations per micro-batch (bytes saved for backward)
------------------------------------------------------
Start from Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (2022): a GPT layer saves ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit without
recomputation -- attention 11sbh + 5as^2b (QKV input 2, Q and K 4, V 2, softmax output
2as^2b, its dropout mask as^2b, dropout output 2as^2b, projection input 2, dropout mask 1),
MLP 19sbh (fc1 input 2, GeLU input 8, fc2 input 8, dropout mask 1), two LayerNorm
inputs 4sbh. Sequence parallelism divides all of it by tp; selective recomputation (and
flash attention, which never stores the s x s matrices) removes the 5as/h term; full
recomputation keeps only the layer input, 2sbh.

Adapted to megavlm's Qwen3 decoder: no dropout (no masks), RMSNorm, flash/SDPA attention
(no s^2 term), GQA (K and V have ``nkv*d`` channels), QK-norm (every Qwen3 has it; the
formula assumes it), RoPE, SwiGLU with ``f`` channels (fc1 produces 2f), MoE. A layer
saves ``T`` times the per-token bytes below, ``T = s*b/cp`` tokens of a micro-batch on
one CP rank, counting every tensor autograd keeps once (views share storage), with
``u = 1/tp`` under sequence parallelism (else 1), ``q = nq*d/tp``, ``k = nkv*d/tp`` and
``B`` bytes per activation element (2 for bf16, 4 for fp32); statistics are fp32:

backend "te" (GPU: Transformer Engine layers, fused SwiGLU, flash attention)::

    attention  B*(2h*u + 3q + q' + 3k) + 4*(u + 2nq/tp + nkv/tp)
               norm input + fused norm-linear output (2h*u); the QKV output (q + 2k, kept
               by the V view and the K-norm input), the Q-norm input copy (q' = q when a
               rank has more than one query group -- megatron's reshape of Q out of the
               fused QKV output copies then -- else 0), the roped Q and K (q + k), the
               attention output = projection input (q); fp32 norm rstd and softmax
               statistics
    dense MLP  B*(2h*u + 3f/tp) + 4u      norm input, norm output, fc1 output (2f), fc2 input (f)

backend "local" (CPU: megatron local layers, torch RMSNorm, SDPA, unfused SwiGLU) --
what megavlm runs in CI and the tests measure::

    attention  B*(3h*u + 4q + q' + 4k) + B*(u + nq/tp + nkv/tp) + 4nq/tp
               (torch RMSNorm also keeps its normalized input, Q/K-norm keep theirs)
    dense MLP  B*(3h*u + 5f/tp) + B*u     (unfused SwiGLU keeps fc1 out, silu out, the
                                           gated input copy and fc2 input)

and for both, per layer and sequence, RoPE's cos/sin tables ``4 * (s/cp) * d * B``.

Compared with Korthikanti's GPT attention without dropout and with flash attention
(LayerNorm input, QKV input, Q, K, V, projection input: 6h elements for MHA), the "te"
formula for MHA (q = k = h/tp, tp = 1) has 9h: QK-norm keeps the Q and K parts of the
QKV output (2h) and a copy of Q (h) alive. Its MLP keeps the norm input, fc1 input, fc1
output (2f) and fc2 input (f), where GeLU's keeps fc1 input, GeLU input (4h), fc2 input (4h).

MoE layers replace the dense MLP by: pre-MLP norm (te: ``B*2h*u + 4u``; local:
``B*(3h*u + u)``, the norm output being the router input), routing metadata
``u*(28*topk + 9*E)`` bytes (top-k indices and probabilities, fp32 scores, routing map,
sort indices) and, for the ``R = topk * T * (etp/tp if SP else 1)`` expert inputs a rank
receives from the all-to-all dispatcher with balanced routing, ``B*(h + 3f_e/etp) + 4``
(te) or ``B*(h + 6f_e/etp) + 4`` (local) each.

Stage extras: the first stage keeps the token ids (8 bytes/token, +1 for the vocab-range
mask when tp > 1); the last stage the final norm (as a layer's norm), the output layer
input ``B*h*u``, the cross entropy's fp32 softmax ``4*V/tp`` plus 9 bytes of targets and
the 4-byte loss mask per token -- logits are fp32: ``s*b*V/tp*4``. A vision tower on the
first stage adds, per patch and layer, ``B*(4hv*u + 6hv/tp + 2fv/tp)`` + fp32 norm and
softmax statistics, plus its input patches and mergers (an estimate: the ViT activations
are not yet measured against the built VisionModel).

Recomputation: "selective" recomputes core attention (megatron's default module),
which with flash attention only frees the softmax statistics; "full" keeps one layer
input ``B*h*u`` per layer and token, plus one layer's activations rebuilt in backward.

Micro-batches in flight: megatron's 1F1B keeps ``pp - r`` micro-batches on pipeline rank
``r`` (``min(pp, m)`` on the first stage); the interleaved schedule keeps
``2(pp - r - 1) + (vpp - 1)*pp + 1`` chunk micro-batches, i.e. the megatron bound
``pp * (1 + (pp - 1)/(pp * vpp))`` stage micro-batches on the first stage. The planner
replays megatron's schedule order (warmup, 1F1B, cooldown) to find the peak.

Not counted: tensors alive outside autograd (the pipeline's received input and output
tensors, transient workspace, logits before the fp32 cast), the CUDA context, NCCL
buffers and fragmentation. The planner leaves a margin (10% by default) for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megavlm.config.schema import LanguageModelConfig
from megavlm.planning.layout import Layout
from megavlm.planning.models import VisionSpec
from megavlm.planning.params import (
    RankParams,
    chunk_layer_range,
    moe_layer_pattern,
    padded_vocab,
    rank_params,
)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GRAD_BYTES = 4  # grad_reduce_in_fp32=True (megavlm.training.data_parallel)
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master copy of 16-bit parameters


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ActivationInputs:
    """What activation memory depends on besides the model."""

    seq_length: int
    micro_batch_size: int
    dtype: str = "bf16"
    backend: str = "te"  # "te" (GPU) or "local" (megavlm's CPU layers)

    @property
    def B(self) -> int:
        return dtype_bytes(self.dtype)


def _tokens(layout: Layout, act: ActivationInputs) -> float:
    """Tokens of one micro-batch on one CP rank (before sequence-parallel splitting)."""
    return act.seq_length * act.micro_batch_size / layout.cp


def layer_activation_bytes(
    lm: LanguageModelConfig, layout: Layout, act: ActivationInputs, *, moe: bool, recompute: str | None = None
) -> float:
    """Bytes one decoder layer saves for backward for one micro-batch (see module doc)."""
    recompute = layout.recompute if recompute is None else recompute
    T, B, tp = _tokens(layout, act), act.B, layout.tp
    u = 1 / tp if layout.sp else 1.0
    h, d, f = lm.hidden_size, lm.head_dim, lm.ffn_hidden_size
    nq, nkv = lm.num_attention_heads / tp, lm.num_query_groups / tp
    q, k = nq * d, nkv * d
    if recompute == "full":
        return T * B * h * u
    te = act.backend == "te"
    stats = 0.0 if recompute == "selective" else 4 * nq  # softmax statistics (lse), fp32
    # megatron reshapes Q out of the fused QKV output: a copy unless one query group per rank
    q_copy = q if nkv > 1 else 0.0
    if te:
        attn = B * (2 * h * u + 3 * q + q_copy + 3 * k) + 4 * (u + nq + nkv) + stats
    else:
        attn = B * (3 * h * u + 4 * q + q_copy + 4 * k) + B * (u + nq + nkv) + stats
    rope = 4 * (act.seq_length / layout.cp) * d * B
    if not moe:
        mlp = B * (2 * h * u + 3 * f / tp) + 4 * u if te else B * (3 * h * u + 5 * f / tp) + B * u
        return T * (attn + mlp) + rope
    m = lm.moe
    etp = layout.expert_tp
    norm = B * 2 * h * u + 4 * u if te else B * (3 * h * u + u)
    routing = u * (28 * m.topk + 9 * m.num_experts)
    routed = m.topk * T * (etp / tp if layout.sp else 1.0)
    per_routed = B * (h + (3 if te else 6) * m.ffn_hidden_size / etp) + 4
    return T * (attn + norm + routing) + routed * per_routed + rope


def vision_activation_bytes(
    vision: VisionSpec, layout: Layout, act: ActivationInputs, recompute: str | None = None
) -> float:
    """Bytes the ViT saves for one micro-batch on the first stage (estimate)."""
    recompute = layout.recompute if recompute is None else recompute
    Tv = vision.patches(act.seq_length) * act.micro_batch_size / layout.cp
    B, tp = act.B, layout.tp
    u = 1 / tp if layout.sp else 1.0
    hv, fv = vision.hidden_size, vision.ffn_hidden_size
    if recompute == "full":
        per_layer = B * hv * u
    else:
        per_layer = B * (4 * hv * u + 6 * hv / tp + 2 * fv / tp) + 16 * u + 4 * vision.num_heads / tp
    mergers = (1 + vision.deepstack_mergers) * B * (2 * hv + 2 * hv / tp)
    return Tv * (B * vision.patch_dim + vision.num_layers * per_layer + mergers)


def first_stage_extra_bytes(lm: LanguageModelConfig, layout: Layout, act: ActivationInputs) -> float:
    """Token ids kept by the embedding lookup (int64) and, with tp > 1, its vocab-range mask."""
    return (8 + (1 if layout.tp > 1 else 0)) * _tokens(layout, act)


def last_stage_extra_bytes(
    lm: LanguageModelConfig, layout: Layout, act: ActivationInputs, vocab_divisible_by: int = 1
) -> float:
    T, B = _tokens(layout, act), act.B
    u = 1 / layout.tp if layout.sp else 1.0
    h = lm.hidden_size
    norm = B * h * u + 4 * u if act.backend == "te" else B * (2 * h * u + u)
    vocab = padded_vocab(lm.vocab_size, layout.tp, vocab_divisible_by) / layout.tp
    return T * (norm + B * h * u + 4 * vocab + 9 + 4)  # + fp32 loss mask (token_loss_sum)


def chunk_activation_bytes(
    lm: LanguageModelConfig,
    layout: Layout,
    act: ActivationInputs,
    pp_rank: int,
    vp_stage: int,
    *,
    vision: VisionSpec | None = None,
    vocab_divisible_by: int = 1,
) -> float:
    """Bytes one micro-batch leaves saved in one model chunk of one pipeline rank."""
    pattern = moe_layer_pattern(lm)
    per_kind = {kind: layer_activation_bytes(lm, layout, act, moe=bool(kind)) for kind in set(pattern)}
    total = sum(per_kind[pattern[i]] for i in chunk_layer_range(lm.num_layers, layout, pp_rank, vp_stage))
    if pp_rank == 0 and vp_stage == 0:
        total += first_stage_extra_bytes(lm, layout, act)
        if vision is not None:
            total += vision_activation_bytes(vision, layout, act)
    if pp_rank == layout.pp - 1 and vp_stage == layout.vpp - 1:
        total += last_stage_extra_bytes(lm, layout, act, vocab_divisible_by)
    return total


def schedule_order(pp: int, vpp: int, m: int, pp_rank: int) -> tuple[list[int], list[int], int]:
    """Chunk ids of megatron's forward and backward order on one rank, and its warmup.

    Mirrors ``megatron.core.pipeline_parallel.schedules``: no pipelining (pp == 1) runs
    forward/backward per micro-batch; 1F1B warms up with ``pp - r - 1`` forwards; the
    interleaved schedule (``get_schedule_table``, micro-batch groups of ``pp``) with
    ``2(pp - r - 1) + (vpp - 1)*pp`` forwards, and runs backward chunks in reverse.
    """
    if vpp == 1:
        order = [0] * m
        warmup = 0 if pp == 1 else min(pp - pp_rank - 1, m)
        return order, order, warmup
    table: list[int] = []
    for first in range(0, m, pp):
        group = m - first if first + pp >= m else pp
        for chunk in range(vpp):
            table += [chunk] * group
    warmup = min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp, m * vpp)
    return table, [vpp - 1 - c for c in table], warmup


def peak_inflight(pp: int, vpp: int, m: int, pp_rank: int, chunk_bytes: list[float]) -> tuple[float, list[int]]:
    """Peak of saved activation bytes on one rank over a step, and chunk counts at the peak.

    1F1B peaks at ``min(pp - r, m)`` micro-batches. The interleaved schedule is replayed;
    its steady state repeats every ``pp * vpp`` steps (micro-batch groups of pp), so two
    periods after warmup suffice.
    """
    if vpp == 1:
        n = min(pp - pp_rank, m)
        return n * chunk_bytes[0], [n]
    fwd, bwd, warmup = schedule_order(pp, vpp, m, pp_rank)
    live = [0] * vpp
    best, at_best = 0.0, list(live)

    def forward(i: int) -> None:
        nonlocal best, at_best
        live[fwd[i]] += 1
        now = sum(n * b for n, b in zip(live, chunk_bytes, strict=True))
        if now > best:
            best, at_best = now, list(live)

    for i in range(warmup):
        forward(i)
    for j in range(min(len(fwd) - warmup, 2 * pp * vpp)):
        forward(warmup + j)
        live[bwd[j]] -= 1
    return best, at_best


@dataclass
class StageMemory:
    """Memory of one GPU of pipeline stage ``pp_rank`` (the worst DP rank)."""

    pp_rank: int
    params: int  # parameter elements on this rank
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    activation_per_microbatch: list[float]  # per model chunk
    inflight: list[int]  # micro-batches per chunk alive at the activation peak
    rank_params: RankParams = field(repr=False)

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def stage_memory(
    lm: LanguageModelConfig,
    layout: Layout,
    *,
    pp_rank: int,
    gpus: int,
    seq_length: int,
    global_batch_size: int,
    dtype: str = "bf16",
    backend: str = "te",
    vision: VisionSpec | None = None,
    vocab_divisible_by: int = 1,
    rank_params_: RankParams | None = None,
) -> StageMemory:
    """Per-GPU memory on pipeline rank ``pp_rank`` (see the module doc for every term)."""
    P = dtype_bytes(dtype)
    rp = rank_params_ or rank_params(
        lm, layout, pp_rank, gpus=gpus, backend=backend, vision=vision, vocab_divisible_by=vocab_divisible_by
    )
    weights = (rp.buffer_numel if layout.distributed_optimizer else rp.param_count) * P
    grads = rp.buffer_numel * GRAD_BYTES
    per_element = ADAM_STATE_BYTES + (MASTER_BYTES if P < 4 else 0)
    optimizer = rp.optimizer_elements() * per_element
    act = ActivationInputs(
        seq_length=seq_length, micro_batch_size=layout.micro_batch_size, dtype=dtype, backend=backend
    )
    per_chunk = [
        chunk_activation_bytes(lm, layout, act, pp_rank, v, vision=vision, vocab_divisible_by=vocab_divisible_by)
        for v in range(layout.vpp)
    ]
    m = layout.num_microbatches(gpus, global_batch_size)
    activations, inflight = peak_inflight(layout.pp, layout.vpp, max(m, 1), pp_rank, per_chunk)
    if layout.recompute == "full":  # one layer rebuilt in backward, on top of the inputs
        activations += max(
            layer_activation_bytes(lm, layout, act, moe=bool(kind), recompute="none")
            for kind in set(moe_layer_pattern(lm))
        )
    return StageMemory(
        pp_rank=pp_rank,
        params=rp.param_count,
        weight_bytes=weights,
        grad_bytes=grads,
        optimizer_bytes=optimizer,
        activation_bytes=activations,
        activation_per_microbatch=per_chunk,
        inflight=inflight,
        rank_params=rp,
    )
