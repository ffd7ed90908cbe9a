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
}


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
                self._tb.add_scalar(f"train/{name}", value, iteration)
            self._tb.flush()

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
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
