"""Training FLOPs and an estimated step time for a layout.

FLOP convention
---------------
A matmul ``[m, k] x [k, n]`` is ``2*m*k*n`` FLOPs. Forward FLOPs of one sequence of ``s``
tokens, per decoder layer:

* QKV projection (GQA): ``2*s*h*(nq + 2*nkv)*d``; output projection ``2*s*nq*d*h``;
* attention scores and values: ``2*2*s^2*nq*d`` for the full ``s x s`` matrices, halved
  for the causal mask (we count what flash attention computes, only the unmasked half):
  ``2*s^2*nq*d``;
* SwiGLU MLP, three ``h x f`` matmuls: ``6*s*h*f``; MoE: router ``2*s*h*E`` plus ``topk``
  experts' SwiGLU ``topk*6*s*h*f_e``;

plus the logits ``2*s*h*V`` and, for a VLM, the vision tower on its patches (patch
embedding, per layer QKV/projection/GELU MLP and bidirectional attention within images
``4*N*P*hv`` for ``N`` patches in images of ``P``, and the mergers). Norms, RoPE,
softmax and elementwise work are not counted.

Training = forward + backward = 3x forward (backward is 2x: input and weight gradients).
Full recomputation runs the layers' forward once more (4x for layers, not the logits);
selective recomputation re-runs core attention (3x + 1x attention scores/values).
*Model* FLOPs (for MFU) exclude recomputation; *hardware* FLOPs include it.

Step time
---------
Per micro-batch and pipeline stage: compute = stage FLOPs / (tp * cp) / (peak * efficiency)
-- one efficiency for GEMMs (the FP8 peak for decoder GEMMs with fp8; vision and logits
stay BF16), a lower one for flash attention's scores and values -- plus communication
that megavlm does not overlap, each over NVLink when its group fits in one node (ranks
ordered tp, cp, dp, pp as megatron does; 8 GPUs per node) and over the per-GPU InfiniBand
link otherwise, at ``comm efficiency`` of the link:

* TP (per layer, activation ``A = s*b/cp*h`` elements): with sequence parallelism 4
  all-gathers/reduce-scatters forward and 6 backward (2 re-gathers of saved inputs),
  ``(tp-1)/tp * A`` bytes each; without SP 2 all-reduces forward, 2 backward. MoE layers
  have only the attention half of these;
* EP (megatron's all-to-all dispatcher): per MoE layer 2 all-to-alls forward (dispatch,
  combine) and 2 backward of the ``topk * T/tp`` routed tokens' hidden states a rank
  sends, ``(ep-1)/ep`` of which leave it (group of etp*ep consecutive expert ranks); with
  etp > 1 the routed tokens are then all-gathered over the ETP group (and reduce-scattered
  back): 2 + 2 more collectives of ``(etp-1)/etp`` of ``etp * topk * T/tp`` tokens;
* CP: ring attention passes K/V ``(cp-1)`` times forward and K/V + their gradients
  backward; overlapped with core attention, only the excess is counted;
* PP: one activation forward and one gradient backward per micro-batch and chunk.

Step = (m + (pp-1)/vpp) x slowest stage's micro-batch time (the last term is the
pipeline bubble, fraction (pp-1)/(m*vpp)) + DP gradient reduce-scatter (fp32) and
parameter all-gather (distributed optimizer) or all-reduce (fp32), not overlapped
(megavlm runs DDP with overlap_grad_reduce=False) + the optimizer step (HBM-bound).
MFU = model FLOPs / (step time * GPUs * dense BF16 peak).
"""

from __future__ import annotations

from dataclasses import dataclass

from megavlm.config.schema import LanguageModelConfig
from megavlm.planning.hardware import GPU
from megavlm.planning.layout import Layout
from megavlm.planning.memory import dtype_bytes
from megavlm.planning.models import VisionSpec
from megavlm.planning.params import chunk_layer_range, moe_layer_pattern

DEFAULT_COMPUTE_EFFICIENCY = 0.7
DEFAULT_ATTENTION_EFFICIENCY = 0.5
DEFAULT_COMM_EFFICIENCY = 0.8
# Optimizer step per owned element: read grad, master, exp_avg, exp_avg_sq (4 each), write
# master, exp_avg, exp_avg_sq (4 each) and the 16-bit param (2), read grad for the norm (4).
OPTIMIZER_BYTES_PER_ELEMENT = 34


@dataclass(frozen=True)
class LayerFlops:
    linear: float  # QKV, projection, MLP / router + experts
    core: float  # attention scores and values


def layer_forward_flops(lm: LanguageModelConfig, seq_length: int, *, moe: bool) -> LayerFlops:
    """Forward FLOPs of one decoder layer for one sequence (module doc convention)."""
    s, h, d = seq_length, lm.hidden_size, lm.head_dim
    nq, nkv = lm.num_attention_heads, lm.num_query_groups
    attn_linear = 2 * s * h * (nq + 2 * nkv) * d + 2 * s * nq * d * h
    core = 2 * 2 * s * s * nq * d / 2  # causal: half of QK^T and PV
    if moe:
        m = lm.moe
        mlp = 2 * s * h * m.num_experts + m.topk * 6 * s * h * m.ffn_hidden_size
    else:
        mlp = 6 * s * h * lm.ffn_hidden_size
    return LayerFlops(linear=attn_linear + mlp, core=core)


def logits_forward_flops(lm: LanguageModelConfig, seq_length: int) -> float:
    return 2 * seq_length * lm.hidden_size * lm.vocab_size


def vision_forward_flops(vision: VisionSpec, seq_length: int) -> LayerFlops:
    """Forward FLOPs of the ViT for one sample's patches."""
    n = vision.patches(seq_length)
    hv, fv = vision.hidden_size, vision.ffn_hidden_size
    per_layer = 2 * n * hv * 3 * hv + 2 * n * hv * hv + 4 * n * hv * fv
    wide = hv * vision.merge
    mergers = (
        (1 + vision.deepstack_mergers) * (n / vision.merge) * (2 * wide * wide + 2 * wide * vision.out_hidden_size)
    )
    linear = 2 * n * vision.patch_dim * hv + vision.num_layers * per_layer + mergers
    core = vision.num_layers * 4 * n * min(vision.patches_per_image, n) * hv
    return LayerFlops(linear=linear, core=core)


def training_flops_per_sequence(
    lm: LanguageModelConfig, seq_length: int, vision: VisionSpec | None = None, recompute: str = "none"
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training sequence (forward + backward)."""
    pattern = moe_layer_pattern(lm)
    layers = [layer_forward_flops(lm, seq_length, moe=bool(p)) for p in pattern]
    if vision is not None:
        layers.append(vision_forward_flops(vision, seq_length))
    linear = sum(f.linear for f in layers)
    core = sum(f.core for f in layers)
    logits = logits_forward_flops(lm, seq_length)
    model = 3 * (linear + core + logits)
    extra = {"none": 0.0, "selective": core, "full": linear + core}[recompute]
    return model, model + extra


@dataclass(frozen=True)
class Efficiency:
    compute: float = DEFAULT_COMPUTE_EFFICIENCY  # achieved fraction of dense peak in GEMMs
    attention: float = DEFAULT_ATTENTION_EFFICIENCY  # ... in flash attention (fwd + bwd)
    comm: float = DEFAULT_COMM_EFFICIENCY  # achieved fraction of link bandwidth in collectives


@dataclass
class StageTime:
    compute: float
    tp_comm: float
    cp_comm: float
    ep_comm: float
    pp_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.cp_comm + self.ep_comm + self.pp_comm


@dataclass
class TimeBreakdown:
    num_microbatches: int
    stages: list[StageTime]  # per micro-batch, per pipeline stage
    bubble: float
    dp_comm: float
    optimizer: float
    model_flops: float  # per step, all GPUs
    hardware_flops: float
    step_time: float
    mfu: float
    tokens_per_s_per_gpu: float

    @property
    def slowest(self) -> StageTime:
        return max(self.stages, key=lambda t: t.total)

    @property
    def pipeline(self) -> float:
        return self.num_microbatches * self.slowest.total + self.bubble


def _bandwidth(gpu: GPU, span: int, eff: Efficiency) -> float:
    """Link bandwidth of a group whose ranks span ``span`` consecutive ranks."""
    return (gpu.nvlink_bytes_per_s if span <= gpu.gpus_per_node else gpu.ib_bytes_per_s) * eff.comm


def stage_time(
    lm: LanguageModelConfig,
    layout: Layout,
    gpu: GPU,
    *,
    pp_rank: int,
    gpus: int,
    seq_length: int,
    dtype: str = "bf16",
    fp8: bool = False,
    vision: VisionSpec | None = None,
    eff: Efficiency = Efficiency(),
) -> StageTime:
    """Time of one micro-batch (forward + backward, all chunks) on pipeline rank ``pp_rank``."""
    B = dtype_bytes(dtype)
    b, tp, cp, ep, etp = layout.micro_batch_size, layout.tp, layout.cp, layout.ep, layout.expert_tp
    dp = layout.dp(gpus)
    passes = 4 if layout.recompute == "full" else 3  # forward passes' worth of work
    core_passes = 4 if layout.recompute in ("selective", "full") else 3
    linear_peak = gpu.peak_flops(fp8) * eff.compute
    bf16_peak = gpu.peak_flops(False) * eff.compute
    core_peak = gpu.peak_flops(False) * eff.attention
    pattern = moe_layer_pattern(lm)
    layers = [i for v in range(layout.vpp) for i in chunk_layer_range(lm.num_layers, layout, pp_rank, v)]

    compute = tp_comm = cp_comm = ep_comm = 0.0
    tokens = seq_length * b / cp
    act = tokens * lm.hidden_size * B  # one full-sequence activation on a CP rank
    tp_bw = _bandwidth(gpu, tp, eff)
    if tp > 1:
        half = (5 if layout.sp else 4) * act * (tp - 1) / tp  # per attention or MLP half
        # full recompute repeats the forward collectives: 2 per half (SP) or 1 all-reduce
        half_recompute = 2 * act * (tp - 1) / tp if layout.recompute == "full" else 0.0
    per_kind = {kind: layer_forward_flops(lm, seq_length, moe=bool(kind)) for kind in set(pattern)}
    for i in layers:
        f = per_kind[pattern[i]]
        core_time = core_passes * b * f.core / (tp * cp) / core_peak
        compute += passes * b * f.linear / (tp * cp) / linear_peak + core_time
        if tp > 1:
            halves = 1 if pattern[i] else 2
            tp_comm += halves * (half + half_recompute) / tp_bw
        if cp > 1:
            kv = 2 * tokens * lm.num_query_groups * lm.head_dim / tp * B
            ring = (3 + (1 if layout.recompute == "full" else 0)) * (cp - 1) * kv / _bandwidth(gpu, tp * cp, eff)
            cp_comm += max(0.0, ring - core_time)
        if pattern[i]:
            sent = lm.moe.topk * tokens / (tp if layout.sp else 1)  # routed tokens a rank sends
            n = 6 if layout.recompute == "full" else 4
            if ep > 1:
                ep_comm += n * sent * lm.hidden_size * B * (ep - 1) / ep / _bandwidth(gpu, etp * ep, eff)
            if etp > 1:
                tp_comm += n * sent * lm.hidden_size * B * (etp - 1) / _bandwidth(gpu, etp, eff)
    if pp_rank == 0 and vision is not None:
        v = vision_forward_flops(vision, seq_length)
        compute += (passes * b * v.linear / bf16_peak + core_passes * b * v.core / core_peak) / (tp * cp)
        if tp > 1:
            vact = vision.patches(seq_length) * b / cp * vision.hidden_size * B
            tp_comm += vision.num_layers * 2 * (5 if layout.sp else 4) * vact * (tp - 1) / tp / tp_bw
    if pp_rank == layout.pp - 1:
        compute += 3 * b * logits_forward_flops(lm, seq_length) / (tp * cp) / bf16_peak
    pp_comm = 0.0
    if layout.pp > 1:
        u = 1 / tp if layout.sp else 1.0
        pp_comm = 2 * layout.vpp * act * u / _bandwidth(gpu, tp * cp * dp * layout.pp, eff)
    return StageTime(compute=compute, tp_comm=tp_comm, cp_comm=cp_comm, ep_comm=ep_comm, pp_comm=pp_comm)


def dp_time(
    dense_numel: int,
    expert_numel: int,
    layout: Layout,
    gpu: GPU,
    *,
    gpus: int,
    dtype: str = "bf16",
    eff: Efficiency = Efficiency(),
) -> float:
    """Gradient reduction (+ parameter all-gather) after the pipeline, not overlapped."""
    B = dtype_bytes(dtype)
    bw = _bandwidth(gpu, layout.tp * layout.cp * layout.dp(gpus), eff)
    total = 0.0
    for numel, group in ((dense_numel, layout.dp(gpus) * layout.cp), (expert_numel, layout.expert_dp(gpus))):
        if group <= 1 or numel == 0:
            continue
        frac = (group - 1) / group
        if layout.distributed_optimizer:
            total += frac * numel * (4 + B) / bw  # fp32 grad reduce-scatter + param all-gather
        else:
            total += 2 * frac * numel * 4 / bw  # fp32 grad all-reduce
    return total


def optimizer_time(owned_elements: int, buffer_numel: int, gpu: GPU) -> float:
    """Adam update of owned elements plus zeroing the grad buffer, at HBM bandwidth."""
    return (owned_elements * OPTIMIZER_BYTES_PER_ELEMENT + buffer_numel * 4) / gpu.hbm_bytes_per_s
