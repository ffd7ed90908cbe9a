"""Training progress reporting: JSON lines, TensorBoard and a console line per log call.

Only one rank should report; the caller decides which and passes ``enabled``.  A
disabled logger touches neither the filesystem nor stdout, and never converts the
metric values (which may be device tensors whose ``float()`` would force a sync).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

# Console label and format of the well-known metrics, in display order; other keys follow.
_CONSOLE_FORMATS = {
    "loss": ("loss", ".4f"),
    "lr": ("lr", ".2e"),
    "grad_norm": ("grad_norm", ".3f"),
    "tokens_per_sec": ("tokens/s", ",.0f"),
    "tokens_per_sec_per_gpu": ("tokens/s/GPU", ",.0f"),
    "tflops_per_gpu": ("TFLOP/s/GPU", ".3g"),
    "peak_mem_gib": ("peak mem GiB", ".2f"),
    "data_wait_sec": ("data wait s", ".3f"),
}


def _tag(name: str) -> str:
    """TensorBoard / W&B tag: ``eval_loss`` -> ``eval/loss``, others under ``train/``."""
    return f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"


def _hms(seconds: float) -> str:
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _drop_from(path: Path, first_iteration: int) -> None:
    """Atomically rewrite ``path`` without lines at or after ``first_iteration``.

    A resumed run re-logs the iterations after its checkpoint; dropping them keeps the
    file free of duplicates.  Unparseable lines (a write cut off by a kill) go too.
    """
    kept = []
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            it = record.get("iteration") if isinstance(record, dict) else None
            if isinstance(it, int) and it < first_iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class MetricsLogger:
    """Write each ``log()`` call to ``<log_dir>/metrics.jsonl``, TensorBoard and stdout.

    Files are opened on the first ``log()`` call, because that call's iteration is
    what tells a resumed run where to cut: jsonl lines and TensorBoard events
    (``purge_step``) at or after it are dropped.  ``elapsed`` counts from construction;
    the ETA uses only the time and iterations since the first ``log()`` call, so
    startup cost does not skew it.
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        total_iters: int,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.total_iters = total_iters
        self.enabled = enabled
        self.tensorboard = tensorboard
        self._clock = clock
        self._t_created = clock()
        self._first: tuple[int, float] | None = None  # (iteration, time) of the first log call
        self._jsonl: IO[str] | None = None
        self._tb: Any = None  # torch.utils.tensorboard.SummaryWriter
        self.wandb_project = wandb_project
        self._wandb: Any = None  # a wandb Run (optional; GPU clusters usually have it)

    @property
    def jsonl_path(self) -> Path:
        return self.log_dir / "metrics.jsonl"

    def _open(self, iteration: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.jsonl_path.exists():
            _drop_from(self.jsonl_path, iteration)
        self._jsonl = self.jsonl_path.open("a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=iteration)
        if self.wandb_project:
            import wandb  # checked at config validation; not a dependency otherwise

            self._wandb = wandb.init(project=self.wandb_project, dir=str(self.log_dir), name=self.log_dir.name)

    def log(self, iteration: int, metrics: Mapping[str, float]) -> str:
        """Record ``metrics`` for ``iteration``; returns the console line ("" if disabled)."""
        if not self.enabled:
            return ""
        if "iteration" in metrics:
            raise ValueError("'iteration' is reserved; pass it as the iteration argument")
        values = {name: float(value) for name, value in metrics.items()}
        now = self._clock()
        if self._first is None:
            self._open(iteration)
            self._first = (iteration, now)

        self._jsonl.write(json.dumps({"iteration": iteration, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(_tag(name), value, iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({_tag(name): value for name, value in values.items()}, step=iteration)

        line = self._console_line(iteration, values, now)
        print(line, flush=True)
        return line

    def _console_line(self, iteration: int, values: dict[str, float], now: float) -> str:
        parts = [f"iter {iteration:>6}/{self.total_iters}"]
        parts += [f"{label} {values[k]:{fmt}}" for k, (label, fmt) in _CONSOLE_FORMATS.items() if k in values]
        parts += [f"{k} {v:.4g}" for k, v in values.items() if k not in _CONSOLE_FORMATS]
        parts.append(f"elapsed {_hms(now - self._t_created)}")
        first_iteration, first_time = self._first
        done = iteration - first_iteration
        if done > 0:
            eta = (now - first_time) / done * max(self.total_iters - iteration, 0)
            parts.append(f"eta {_hms(eta)}")
        else:
            parts.append("eta -:--:--")
        return " | ".join(parts)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- throughput, MFU, memory, data wait -------------------------------------------------

# torch.cuda.get_device_name() substrings -> megavlm.planning.hardware names (first match wins)
_DEVICE_NAMES = (("H800", "h800-80gb"), ("H200", "h200"), ("H100", "h100-80gb"), ("A100", "a100-80gb"))


def gpu_peak_flops(device_name: str) -> float | None:
    """Dense BF16 peak FLOP/s of a CUDA device by its name (the planner's table), None if unknown.

    MFU is reported against the BF16 peak also for FP8 runs, the planner's convention."""
    from megavlm.planning.hardware import get_gpu

    for key, name in _DEVICE_NAMES:
        if key in device_name:
            return get_gpu(name).peak_flops()
    return None


def model_flops_per_step(cfg, *, vision_patches: int = 0, vision_images: int = 0) -> float:
    """Model FLOPs (forward + backward, no recomputation) of one global batch, by the
    planner's formulas (``megavlm.planning.flops``): ``global_batch_size`` sequences of
    ``data.seq_length`` tokens (packed rows counted as full causal sequences, as the planner
    does), plus, for a Qwen3-VL vision tower, the ViT on the step's ``vision_patches`` in
    ``vision_images`` images (these counts are of this rank's data-parallel share x DP)."""
    from megavlm.planning.flops import training_flops_per_sequence, vision_forward_flops
    from megavlm.planning.models import VisionSpec

    lm, s = cfg.model.language, cfg.data.seq_length
    flops = cfg.train.global_batch_size * training_flops_per_sequence(lm, s)[0]
    v = cfg.model.vision
    if v is not None and vision_patches and v.kind == "qwen3vl":
        spec = VisionSpec(num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
                          num_heads=v.num_attention_heads, out_hidden_size=lm.hidden_size, patch_size=v.patch_size,
                          temporal_patch_size=v.temporal_patch_size, in_channels=v.in_channels,
                          spatial_merge_size=cfg.model.projector.spatial_merge_size,
                          deepstack_mergers=len(v.deepstack_layers), patches_per_sample=vision_patches,
                          patches_per_image=max(vision_patches // max(vision_images, 1), 1))
        f = vision_forward_flops(spec, s)
        flops += 3 * (f.linear + f.core)
    return flops


def peak_memory_gib() -> float:
    """Peak memory of this rank: CUDA allocator peak on a GPU, else the process's peak RSS."""
    import torch

    from megavlm.platform import device

    if device.has_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class ThroughputMeter:
    """Per-step throughput metrics: model TFLOP/s and tokens/s per GPU, MFU (GPU only),
    peak memory and the time the step waited for its data.

    ``timed(iterator)`` wraps the data iterator to time the waits and count image
    patches (for the vision FLOPs); ``metrics(step_seconds)`` closes a step.
    """

    def __init__(self, cfg, world_size: int, dp_size: int, device_name: str | None = None):
        self.cfg, self.world_size, self.dp_size = cfg, world_size, dp_size
        self.peak = gpu_peak_flops(device_name) if device_name else None
        self.data_wait = 0.0
        self.patches = 0
        self.images = 0

    def timed(self, iterator):
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - start
            for grid in (getattr(batch, "image_grid_thw", None), getattr(batch, "video_grid_thw", None)):
                if grid is not None:
                    self.patches += int(grid.prod(dim=-1).sum())
                    self.images += int(grid.shape[0])
            yield batch

    def metrics(self, step_seconds: float) -> dict[str, float]:
        flops = model_flops_per_step(self.cfg, vision_patches=self.patches * self.dp_size,
                                     vision_images=self.images * self.dp_size)
        per_gpu = flops / step_seconds / self.world_size
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_length
        out = {
            "tokens_per_sec": tokens / step_seconds,
            "tokens_per_sec_per_gpu": tokens / step_seconds / self.world_size,
            "tflops_per_gpu": per_gpu / 1e12,
            "peak_mem_gib": peak_memory_gib(),
            "data_wait_sec": self.data_wait,
        }
        if self.peak is not None:
            out["mfu"] = per_gpu / self.peak
        self.data_wait, self.patches, self.images = 0.0, 0, 0
        return out
