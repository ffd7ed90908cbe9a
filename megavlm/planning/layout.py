"""A parallel layout, and whether megavlm accepts it.

Validity is megavlm's own: the layout becomes a ``Config`` through
``megavlm.config.load_config`` and is checked by ``megavlm.config.validate``; the planner
re-implements none of those rules. Two things are added, each documented below:

* Context parallelism. Without Transformer Engine (a planning machine, usually)
  ``validate`` accepts ``parallel.cp > 1`` only for what megavlm's own ring attention runs
  (MRoPE models, p2p); the planner plans for GPUs with TE, so it validates the layout with
  CP folded away -- ``parallel.cp=1`` on ``world_size / cp`` ranks, which keeps DP (and so
  the batch rules) unchanged -- and checks the CP-specific rules itself: ``cp`` divides the
  GPUs, and ``seq_length`` is a multiple of ``2 * cp`` (two chunks per CP rank) and, with
  sequence parallelism, of ``2 * cp * tp``. One megavlm rule gets stricter this way: MoE's
  "world size is a multiple of etp x ep x pp" is checked on world/cp.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megavlm.config import Config, ConfigError, ParallelConfig, load_config, validate
from megavlm.config.schema import RecomputeConfig
from megavlm.planning.models import PlanModel

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """Parallel degrees and batch settings of one run; DP is what the GPUs leave over."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert TP; megatron's default is tp
    micro_batch_size: int = 1
    sequence_parallel: bool | None = None  # None: on whenever tp > 1
    distributed_optimizer: bool = True
    recompute: str = "none"  # train.recompute: none, selective, or full (every layer)
    # Uneven pipeline split (parallel.first_stage_layers / last_stage_layers); None: even.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers per pipeline rank (vpp = 1 when uneven; megatron-core's split)."""
        fixed = {0: self.first_stage_layers, self.pp - 1: self.last_stage_layers}
        fixed = {r: n for r, n in fixed.items() if n is not None}
        if not fixed:
            return [num_layers // self.pp] * self.pp
        rest = (num_layers - sum(fixed.values())) // max(self.pp - len(fixed), 1)
        return [fixed.get(r, rest) for r in range(self.pp)]

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def dp(self, gpus: int) -> int:
        return gpus // (self.tp * self.pp * self.cp)

    def expert_dp(self, gpus: int) -> int:
        """Expert data parallelism: the ranks of one stage left over by etp x ep."""
        return gpus // (self.pp * self.expert_tp * self.ep)

    def num_microbatches(self, gpus: int, global_batch_size: int) -> int:
        return global_batch_size // (self.micro_batch_size * self.dp(gpus))

    def label(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp is not None and self.etp != self.tp:
            parts.append(f"etp{self.etp}")
        if self.first_stage_layers is not None:
            parts.append(f"first{self.first_stage_layers}")
        if self.last_stage_layers is not None:
            parts.append(f"last{self.last_stage_layers}")
        return " ".join(parts)

    def overrides(self) -> list[str]:
        """The megavlm config keys of this layout (cp as given)."""
        out = [
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.cp={self.cp}",
            f"parallel.ep={self.ep}",
            f"parallel.sequence_parallel={str(self.sp).lower()}",
            f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}",
            f"train.micro_batch_size={self.micro_batch_size}",
        ]
        if self.vpp > 1:
            out.append(f"parallel.vpp={self.vpp}")
        if self.recompute != "none":
            out.append(f"train.recompute.granularity={self.recompute}")
            if self.recompute == "full":  # the planner's model: every layer recomputed
                out += ["train.recompute.method=uniform", "train.recompute.num_layers=1"]
        if self.etp is not None:
            out.append(f"parallel.etp={self.etp}")
        if self.first_stage_layers is not None:
            out.append(f"parallel.first_stage_layers={self.first_stage_layers}")
        if self.last_stage_layers is not None:
            out.append(f"parallel.last_stage_layers={self.last_stage_layers}")
        return out

    @staticmethod
    def from_config(cfg: Config, recompute: str = "none") -> "Layout":
        p = cfg.parallel
        return Layout(
            tp=p.tp,
            pp=p.pp,
            vpp=p.vpp or 1,
            cp=p.cp,
            ep=p.ep,
            etp=p.etp,
            micro_batch_size=cfg.train.micro_batch_size,
            sequence_parallel=p.sequence_parallel,
            distributed_optimizer=p.distributed_optimizer,
            recompute=recompute,
            first_stage_layers=p.first_stage_layers,
            last_stage_layers=p.last_stage_layers,
        )


def build_config(model: PlanModel, layout: Layout, *, seq_length: int, global_batch_size: int) -> Config:
    """The megavlm config of this model and layout, from ``load_config`` and dotted keys."""
    return load_config(
        None,
        [
            *model.config_overrides(),
            *layout.overrides(),
            f"data.seq_length={seq_length}",
            f"train.global_batch_size={global_batch_size}",
        ],
    )


_MODEL_CONFIGS: dict[tuple, Config] = {}


def _fast_config(model: PlanModel, layout: Layout, *, seq_length: int, global_batch_size: int) -> Config:
    """``build_config``'s result without re-parsing the model keys for every layout.

    The model part comes from ``load_config`` once per model; the layout fields are set on
    copies of its typed sections (``parallel``, ``train``, ``data``) -- the same values
    ``build_config`` would parse from ``Layout.overrides()``. Ranking validates thousands
    of layouts, and parsing dominates otherwise.
    """
    key = (model.preset, model.language_overrides)
    if key not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[key] = load_config(None, model.config_overrides())
    base = _MODEL_CONFIGS[key]
    parallel = ParallelConfig(
        tp=layout.tp,
        pp=layout.pp,
        vpp=layout.vpp if layout.vpp > 1 else None,
        cp=layout.cp,
        ep=layout.ep,
        etp=layout.etp,
        sequence_parallel=layout.sp,
        distributed_optimizer=layout.distributed_optimizer,
        first_stage_layers=layout.first_stage_layers,
        last_stage_layers=layout.last_stage_layers,
    )
    return replace(
        base,
        parallel=parallel,
        data=replace(base.data, seq_length=seq_length),
        train=replace(base.train, micro_batch_size=layout.micro_batch_size, global_batch_size=global_batch_size,
                      recompute=_recompute_config(layout.recompute)),
    )


def _recompute_config(recompute: str) -> RecomputeConfig:
    """``train.recompute`` of a planner recompute choice (as ``Layout.overrides`` writes it)."""
    if recompute == "none":
        return RecomputeConfig()
    return RecomputeConfig(granularity=recompute, method="uniform", num_layers=1)


def check_layout(model: PlanModel, layout: Layout, *, gpus: int, seq_length: int, global_batch_size: int) -> list[str]:
    """Why megavlm would reject this layout (empty when it is valid); see the module doc."""
    errors: list[str] = []
    if layout.recompute not in RECOMPUTE:
        errors.append(f"recompute: {layout.recompute!r} is not one of {', '.join(RECOMPUTE)}")
    if layout.vpp < 1 or layout.cp < 1:
        return errors + [f"vpp and cp must be >= 1, got vpp={layout.vpp}, cp={layout.cp}"]
    if gpus % layout.cp:
        return errors + [f"cp={layout.cp} must divide the number of GPUs ({gpus})"]
    folded = replace(layout, cp=1)
    try:
        cfg = _fast_config(model, folded, seq_length=seq_length, global_batch_size=global_batch_size)
        validate(cfg, gpus // layout.cp)
    except ConfigError as e:
        return errors + [line.strip().removeprefix("- ") for line in str(e).splitlines()[1:] or [str(e)]]
    if layout.cp > 1:
        need = 2 * layout.cp * (layout.tp if layout.sp else 1)
        if seq_length % need:
            what = "2 x cp x tp (sequence parallel)" if layout.sp else "2 x cp"
            errors.append(
                f"data.seq_length ({seq_length}) must be a multiple of {what} = {need} with context parallelism"
            )
    if model.vision is not None and model.vision.num_heads % layout.tp:
        errors.append(f"vision num_heads ({model.vision.num_heads}) must be a multiple of tp ({layout.tp})")
    return errors


