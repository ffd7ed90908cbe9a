"""Estimate one layout, or enumerate and rank every valid layout that fits.

``estimate`` gives per-stage memory (``megavlm.planning.memory``) and the step-time model
(``megavlm.planning.flops``) of one layout; ``rank_layouts`` enumerates layouts, keeps
those megavlm accepts (``megavlm.planning.layout.check_layout``) that fit in GPU memory
with a margin, and sorts them by estimated step time. ``format_*`` render both as text,
with every assumption stated (``assumptions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

from megavlm.config.schema import LanguageModelConfig
from megavlm.planning import flops as F
from megavlm.planning.hardware import GPU, GiB, get_gpu
from megavlm.planning.layout import Layout, build_config, check_layout
from megavlm.planning.memory import StageMemory, stage_memory
from megavlm.planning.models import PlanModel, get_model
from megavlm.planning.params import RankParams, rank_params

DEFAULT_MEMORY_MARGIN = 0.10
DEFAULT_TOKENS_PER_STEP = 4 * 2**20


class LayoutError(ValueError):
    """The layout breaks a megavlm (or megatron-core) rule; ``errors`` lists which."""

    def __init__(self, layout: Layout, errors: list[str]):
        self.layout, self.errors = layout, errors
        super().__init__(f"layout {layout.label()} is not valid:\n  - " + "\n  - ".join(errors))


def default_global_batch_size(seq_length: int) -> int:
    """About 4M tokens per step, as a power of two number of sequences (at least 1)."""
    return max(1, 2 ** round(math.log2(DEFAULT_TOKENS_PER_STEP / seq_length)))


def language_config(model: PlanModel, seq_length: int = 128) -> LanguageModelConfig:
    """megavlm's LanguageModelConfig for the model (the exact one megavlm builds)."""
    return build_config(model, Layout(), seq_length=seq_length, global_batch_size=1).model.language


@dataclass
class Plan:
    model: PlanModel
    layout: Layout
    gpus: int
    gpu: GPU
    seq_length: int
    global_batch_size: int
    dtype: str
    backend: str
    fp8: bool
    memory_margin: float
    efficiency: F.Efficiency
    stages: list[StageMemory]
    time: F.TimeBreakdown

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def peak_memory(self) -> float:
        return self.peak_stage.total_bytes

    @property
    def memory_limit(self) -> float:
        return self.gpu.memory_bytes * (1 - self.memory_margin)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.memory_limit

    @property
    def notes(self) -> list[str]:
        return []  # every layout the planner ranks runs (CP and recompute included)


def estimate(
    model: PlanModel | str,
    layout: Layout,
    *,
    gpus: int,
    gpu: GPU | str,
    seq_length: int,
    global_batch_size: int | None = None,
    dtype: str = "bf16",
    backend: str = "te",
    fp8: bool = False,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
    efficiency: F.Efficiency | None = None,
    vocab_divisible_by: int = 1,
    check: bool = True,
    _lm: LanguageModelConfig | None = None,
    _params: dict | None = None,
) -> Plan:
    """Memory per stage, step time and MFU of one layout (raises LayoutError if invalid)."""
    model = get_model(model) if isinstance(model, str) else model
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    gbs = global_batch_size or default_global_batch_size(seq_length)
    efficiency = efficiency or F.Efficiency()
    if check:
        errors = check_layout(model, layout, gpus=gpus, seq_length=seq_length, global_batch_size=gbs)
        if errors:
            raise LayoutError(layout, errors)
    lm = _lm or language_config(model)
    vision = model.vision
    stages, times = [], []
    for r in range(layout.pp):
        key = (
            layout.tp,
            layout.pp,
            layout.vpp,
            layout.ep,
            layout.expert_tp,
            layout.dp(gpus) * layout.cp,
            layout.distributed_optimizer,
            r,
        )
        rp: RankParams | None = None if _params is None else _params.get(key)
        if rp is None:
            rp = rank_params(
                lm, layout, r, gpus=gpus, backend=backend, vision=vision, vocab_divisible_by=vocab_divisible_by
            )
            if _params is not None:
                _params[key] = rp
        stages.append(
            stage_memory(
                lm,
                layout,
                pp_rank=r,
                gpus=gpus,
                seq_length=seq_length,
                global_batch_size=gbs,
                dtype=dtype,
                backend=backend,
                vision=vision,
                vocab_divisible_by=vocab_divisible_by,
                rank_params_=rp,
            )
        )
        times.append(
            F.stage_time(
                lm,
                layout,
                gpu,
                pp_rank=r,
                gpus=gpus,
                seq_length=seq_length,
                dtype=dtype,
                fp8=fp8,
                vision=vision,
                eff=efficiency,
            )
        )
    m = layout.num_microbatches(gpus, gbs)
    slowest = max(t.total for t in times)
    bubble = (layout.pp - 1) / layout.vpp * slowest
    dp = max(
        F.dp_time(
            sum(b.numel for b in s.rank_params.dense_buffers),
            sum(b.numel for b in s.rank_params.expert_buffers),
            layout,
            gpu,
            gpus=gpus,
            dtype=dtype,
            eff=efficiency,
        )
        for s in stages
    )
    opt = max(F.optimizer_time(s.rank_params.optimizer_elements(), s.rank_params.buffer_numel, gpu) for s in stages)
    step = m * slowest + bubble + dp + opt
    model_per_seq, hw_per_seq = F.training_flops_per_sequence(lm, seq_length, vision, layout.recompute)
    model_flops, hw_flops = model_per_seq * gbs, hw_per_seq * gbs
    time = F.TimeBreakdown(
        num_microbatches=m,
        stages=times,
        bubble=bubble,
        dp_comm=dp,
        optimizer=opt,
        model_flops=model_flops,
        hardware_flops=hw_flops,
        step_time=step,
        mfu=model_flops / (step * gpus * gpu.peak_flops(False)),
        tokens_per_s_per_gpu=gbs * seq_length / (step * gpus),
    )
    return Plan(
        model=model,
        layout=layout,
        gpus=gpus,
        gpu=gpu,
        seq_length=seq_length,
        global_batch_size=gbs,
        dtype=dtype,
        backend=backend,
        fp8=fp8,
        memory_margin=memory_margin,
        efficiency=efficiency,
        stages=stages,
        time=time,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _stage_splits(num_layers: int, pp: int, vpp: int, fixed: dict) -> list[tuple[int | None, int | None]]:
    """(first_stage_layers, last_stage_layers) to try: the even split and, with pp > 1 and no
    interleaving, the first stage one step lighter (it also runs the vision encoder and the
    embedding): the most layers below the even share that leave the other stages an even
    split. Pinned by ``fixed``."""
    if "first_stage_layers" in fixed or "last_stage_layers" in fixed:
        return [(fixed.get("first_stage_layers"), fixed.get("last_stage_layers"))]
    splits: list[tuple[int | None, int | None]] = [(None, None)]
    if pp > 1 and vpp == 1:
        lighter = [f for f in range(1, num_layers // pp) if (num_layers - f) % (pp - 1) == 0]
        if lighter:
            splits.append((max(lighter), None))
    return splits


def candidate_layouts(lm: LanguageModelConfig, gpu: GPU, gpus: int, fixed: dict) -> Iterator[Layout]:
    """Every combination of degrees the search tries (before any validity rule).

    tp in {1, 2, 4, 8} within a node; pp a divisor of the layer count and vpp in {1..4}
    with pp * vpp dividing it; cp a power of two; ep a power-of-two divisor of the expert
    count and etp in {tp, 1}; micro-batch size in {1, 2, 4}; recompute in {none, selective, full}
    (selective only when asked: with flash attention it saves next to nothing). Keys in
    ``fixed`` (Layout field names) pin a value; uneven stages as ``_stage_splits``. Only combinations where tp*pp*cp divides
    the GPUs are yielded (DP must be a whole number); every other rule is megavlm's.
    """

    def choices(name: str, default: list) -> list:
        return [fixed[name]] if name in fixed else default

    pow2 = [2**i for i in range(0, int(math.log2(gpus)) + 1)]
    experts = lm.moe.num_experts if lm.moe else 1
    for tp in choices("tp", [t for t in (1, 2, 4, 8) if t <= min(gpu.gpus_per_node, gpus)]):
        for pp in choices("pp", [p for p in _divisors(lm.num_layers) if p <= gpus]):
            vpps = [v for v in (1, 2, 3, 4) if lm.num_layers % (pp * v) == 0]
            for vpp, (first, last) in (
                (v, split) for v in choices("vpp", [1] if pp == 1 else vpps)
                for split in _stage_splits(lm.num_layers, pp, v, fixed)
            ):
                for cp in choices("cp", pow2):
                    if gpus % (tp * pp * cp):
                        continue
                    for ep in choices("ep", [e for e in pow2 if experts % e == 0] if lm.moe else [1]):
                        for etp in choices("etp", [None, 1] if lm.moe and tp > 1 else [None]):
                            for mbs in choices("micro_batch_size", [1, 2, 4]):
                                for rc in choices("recompute", ["none", "selective", "full"]):
                                    yield Layout(
                                        tp=tp,
                                        pp=pp,
                                        vpp=vpp,
                                        cp=cp,
                                        ep=ep,
                                        etp=etp,
                                        micro_batch_size=mbs,
                                        distributed_optimizer=fixed.get("distributed_optimizer", True),
                                        sequence_parallel=fixed.get("sequence_parallel"),
                                        recompute=rc,
                                        first_stage_layers=first,
                                        last_stage_layers=last,
                                    )


@dataclass
class Ranking:
    plans: list[Plan]  # fitting, fastest first
    considered: int = 0
    valid: int = 0
    fitting: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)  # first broken rule -> layouts
    global_batch_size: int = 0
    memory_limit: float = 0.0
    smallest: Plan | None = None  # the valid layout needing the least memory (fitting or not)
    equivalents: list[int] = field(default_factory=list)  # per plan: as fast layouts needing more memory


def rank_layouts(
    model: PlanModel | str,
    *,
    gpus: int,
    gpu: GPU | str,
    seq_length: int,
    global_batch_size: int | None = None,
    fixed: dict | None = None,
    top: int | None = 10,
    dtype: str = "bf16",
    backend: str = "te",
    fp8: bool = False,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
    efficiency: F.Efficiency | None = None,
    vocab_divisible_by: int = 1,
) -> Ranking:
    """Valid layouts that fit in memory, fastest (estimated step time) first."""
    model = get_model(model) if isinstance(model, str) else model
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    gbs = global_batch_size or default_global_batch_size(seq_length)
    lm = language_config(model)
    result = Ranking(plans=[], global_batch_size=gbs, memory_limit=gpu.memory_bytes * (1 - memory_margin))
    validity: dict[Layout, list[str]] = {}
    params: dict = {}
    for layout in candidate_layouts(lm, gpu, gpus, fixed or {}):
        result.considered += 1
        # recompute matters to validity too (full recompute is refused with DeepStack)
        key = layout
        if key not in validity:
            validity[key] = check_layout(model, key, gpus=gpus, seq_length=seq_length, global_batch_size=gbs)
        if validity[key]:
            first = validity[key][0].split(";")[0]
            result.invalid_reasons[first] = result.invalid_reasons.get(first, 0) + 1
            continue
        result.valid += 1
        plan = estimate(
            model,
            layout,
            gpus=gpus,
            gpu=gpu,
            seq_length=seq_length,
            global_batch_size=gbs,
            dtype=dtype,
            backend=backend,
            fp8=fp8,
            memory_margin=memory_margin,
            efficiency=efficiency,
            vocab_divisible_by=vocab_divisible_by,
            check=False,
            _lm=lm,
            _params=params,
        )
        if plan.fits:
            result.plans.append(plan)
        if result.smallest is None or plan.peak_memory < result.smallest.peak_memory:
            result.smallest = plan
    result.fitting = len(result.plans)
    # Fastest first. Layouts with the same estimated step time (e.g. micro-batch 2 at cp=8 and
    # micro-batch 1 at cp=4 put the same tokens on each GPU) differ only in memory: keep the
    # one needing least, count the others.
    result.plans.sort(
        key=lambda p: (
            p.time.step_time,
            p.peak_memory,
            p.layout.cp,
            p.layout.micro_batch_size,
            p.layout.vpp,
            p.layout.pp,
            p.layout.tp,
        )
    )
    kept: list[Plan] = []
    for plan in result.plans:
        if kept and math.isclose(plan.time.step_time, kept[-1].time.step_time, rel_tol=1e-9):
            result.equivalents[-1] += 1
            continue
        kept.append(plan)
        result.equivalents.append(0)
    result.plans = kept if top is None else kept[:top]
    result.equivalents = result.equivalents[: len(result.plans)]
    return result


# ----------------------------------------------------------------------------- text output


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def assumptions(
    plan_or_model: Plan | PlanModel,
    *,
    efficiency: F.Efficiency | None = None,
    backend: str | None = None,
    memory_margin: float | None = None,
    gbs_given: bool = True,
    seq_length: int | None = None,
) -> list[str]:
    p = plan_or_model if isinstance(plan_or_model, Plan) else None
    model = p.model if p else plan_or_model
    eff = p.efficiency if p else efficiency or F.Efficiency()
    backend = p.backend if p else backend or "te"
    margin = p.memory_margin if p else (DEFAULT_MEMORY_MARGIN if memory_margin is None else memory_margin)
    out = [
        f"compute: GEMMs at {eff.compute:.0%} and flash attention at {eff.attention:.0%} of the dense BF16 peak (FP8 "
        "peak for decoder GEMMs with --fp8), whatever their size; norms/RoPE/elementwise work not counted",
        "FLOPs: 2 per multiply-add; causal attention counted as half of s^2 (what flash attention computes); "
        "training = 3x forward, +1x layer forward with full recompute; MFU uses model FLOPs (no recompute) vs "
        "dense BF16 peak",
        f"communication at {eff.comm:.0%} of link bandwidth: NVLink within a node of 8 GPUs, the per-GPU InfiniBand "
        "link across nodes (rank order tp, cp, dp, pp); TP/EP/PP/DP not overlapped with compute, CP ring overlapped "
        "with attention (only the excess counts)",
        "DP: fp32 gradient reduce-scatter + parameter all-gather (distributed optimizer) or fp32 all-reduce after the "
        "pipeline flush (megavlm: overlap_grad_reduce=False); pipeline bubble (pp-1)/vpp micro-batch times",
        f"memory: exact parameters, fp32 gradient buffers and Adam state (+fp32 master for 16-bit) as megatron pads "
        f"them; activations from the '{backend}' kernel formula (megavlm.planning.memory) times the micro-batches "
        f"megatron's schedule keeps in flight; {margin:.0%} of GPU memory left for CUDA context, NCCL, "
        "fragmentation and transient buffers",
        "sequence parallelism on whenever tp > 1; vocabulary not padded (megavlm builds it unpadded); MoE routing "
        "assumed balanced",
        "validity: megavlm.config.validate with cp folded into a smaller world (the GPU's TE rules, checked on any "
        "machine), plus CP sequence divisibility (2*cp*tp) and megatron's interleaved-schedule rule (m % pp == 0)",
    ]
    if model.vision is not None:
        v = model.vision
        s = p.seq_length if p else seq_length
        patches = f"{v.patches(s):,} patches per sample" if s else "patches per sample from the visual-token fraction"
        out.append(
            f"vision tower: {v.num_layers}x{v.hidden_size} ViT on the "
            f"first stage, TP-split like the decoder, {patches} ({v.visual_token_fraction:.0%} of the sequence as "
            f"visual tokens unless --vision-patches), images of {v.patches_per_image} patches, split over CP ranks"
        )
    if p is not None and not gbs_given:
        out.append(f"global batch {p.global_batch_size} sequences (~4M tokens per step; set --global-batch-size)")
    return out


def format_table(ranking: Ranking, *, gpus: int, gpu: GPU, seq_length: int, model: PlanModel, dtype: str) -> str:
    gbs = ranking.global_batch_size
    head = (
        f"{model.name} on {gpus} x {gpu.name}, seq {seq_length:,}, global batch {gbs} "
        f"({gbs * seq_length / 2**20:.1f}M tokens), {dtype}: {ranking.considered} layouts considered, "
        f"{ranking.valid} valid, {ranking.fitting} fit in {_gib(ranking.memory_limit)} GiB"
    )
    lines = [head, ""]
    if not ranking.plans:
        lines.append("No valid layout fits in memory.")
        if ranking.smallest is not None:
            p = ranking.smallest
            lines.append(
                f"The smallest, {p.layout.label()} (micro-batch {p.layout.micro_batch_size}, recompute "
                f"{p.layout.recompute}), needs {_gib(p.peak_memory)} GiB on pp{p.peak_stage.pp_rank}."
            )
        if ranking.invalid_reasons:
            lines.append("Most common reasons layouts were invalid:")
            for reason, n in sorted(ranking.invalid_reasons.items(), key=lambda kv: -kv[1])[:5]:
                lines.append(f"  {n:5d} x {reason}")
            if any("max_position_embeddings" in r for r in ranking.invalid_reasons):
                lines.append("(longer context: --language max_position_embeddings=N, as RoPE scaling would)")
        return "\n".join(lines)
    cols = [
        "#",
        "layout",
        "dp",
        "mbs",
        "m",
        "recompute",
        "mem GiB",
        "(stage)",
        "step",
        "bubble",
        "MFU",
        "tok/s/GPU",
        "notes",
    ]
    rows = []
    for i, p in enumerate(ranking.plans, 1):
        L, t = p.layout, p.time
        rows.append(
            [
                str(i),
                L.label(),
                str(L.dp(p.gpus)),
                str(L.micro_batch_size),
                str(t.num_microbatches),
                L.recompute,
                _gib(p.peak_memory),
                f"pp{p.peak_stage.pp_rank}",
                _s(t.step_time),
                f"{t.bubble / t.step_time:.0%}",
                f"{t.mfu:.1%}",
                f"{t.tokens_per_s_per_gpu:,.0f}",
                ", ".join(p.notes + ([f"+{n} as fast, more memory"] if (n := ranking.equivalents[i - 1]) else [])),
            ]
        )
    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            x.ljust(w) if j in (1, 5, 12) else x.rjust(w) for j, (x, w) in enumerate(zip(r, widths, strict=True))
        )

    lines += [fmt(cols).rstrip(), *(fmt(r).rstrip() for r in rows)]
    return "\n".join(lines)


def format_breakdown(plan: Plan) -> str:
    L, t, g = plan.layout, plan.time, plan.gpu
    lines = [
        f"{plan.model.name} on {plan.gpus} x {g.name}, seq {plan.seq_length:,}, global batch {plan.global_batch_size}, "
        f"{plan.dtype}{' + fp8 GEMMs' if plan.fp8 else ''}",
        f"layout {L.label()}: dp {L.dp(plan.gpus)}, "
        + (
            f"etp {L.expert_tp}, expert dp {L.expert_dp(plan.gpus)}, "
            if plan.stages[0].rank_params.expert_buffers
            else ""
        )
        + f"sequence parallel {'on' if L.sp else 'off'}, "
        f"{'distributed' if L.distributed_optimizer else 'replicated'} optimizer, micro-batch {L.micro_batch_size}, "
        f"{t.num_microbatches} micro-batches, recompute {L.recompute}",
        "",
        "memory per GPU (GiB) by pipeline stage (worst DP rank):",
    ]
    cols = ["stage", "params", "weights", "grads", "optimizer", "act/microbatch", "in flight", "activations", "total"]
    rows = []
    for s in plan.stages:
        inflight = "+".join(str(n) for n in s.inflight) if len(s.inflight) > 1 else str(s.inflight[0])
        rows.append(
            [
                f"pp{s.pp_rank}",
                _count(s.params),
                _gib(s.weight_bytes),
                _gib(s.grad_bytes),
                _gib(s.optimizer_bytes),
                "/".join(_gib(a) for a in s.activation_per_microbatch),
                inflight,
                _gib(s.activation_bytes),
                _gib(s.total_bytes),
            ]
        )
    if len(rows) > 6:  # the first two and the last two stages bound the others
        rows = rows[:2] + [["..."] + [""] * (len(cols) - 1)] + rows[-2:]
    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  " + "  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in rows]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"peak {_gib(plan.peak_memory)} GiB on pp{plan.peak_stage.pp_rank} of {_gib(g.memory_bytes)} GiB "
        f"(limit {_gib(plan.memory_limit)} GiB with {plan.memory_margin:.0%} margin): {verdict}",
        "",
        "time per step:",
    ]
    slow = t.slowest
    idx = t.stages.index(slow)
    lines += [
        f"  per micro-batch on the slowest stage (pp{idx}): {_s(slow.total)} = compute {_s(slow.compute)} + TP "
        f"{_s(slow.tp_comm)} + CP exposed {_s(slow.cp_comm)} + EP {_s(slow.ep_comm)} + PP p2p {_s(slow.pp_comm)}",
        f"  pipeline {t.num_microbatches} x {_s(slow.total)} + bubble {_s(t.bubble)} "
        f"({t.bubble / t.step_time:.1%} of the step)",
        f"  DP gradient/parameter sync {_s(t.dp_comm)}, optimizer {_s(t.optimizer)}",
        f"  step {_s(t.step_time)}; {t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU",
        f"FLOPs per step: model {t.model_flops / 1e15:,.1f} PFLOP, hardware {t.hardware_flops / 1e15:,.1f} PFLOP; "
        f"MFU {t.mfu:.1%}",
    ]
    if plan.notes:
        lines += ["", "notes: " + "; ".join(plan.notes)]
    return "\n".join(lines)
