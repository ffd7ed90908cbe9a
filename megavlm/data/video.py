"""Video decoding and frame sampling for Qwen3-VL (REFERENCE.md section 4).

Work in progress: the timestamp helpers below are final (the chat template imports them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

TimestampStyle = Literal["seconds", "hms"]


def pair_timestamps(frame_indices: Sequence[int], fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Time (s) of each temporal patch: the mean of its first and last frame's times.

    Mirrors HF ``Qwen3VLProcessor._calculate_timestamps``, including its padding of an odd
    frame count by repeating the last index (the patch of a padded pair is the frame twice).
    """
    if fps <= 0:
        raise ValueError(f"pair_timestamps: fps must be > 0, got {fps}")
    idx = [int(i) for i in frame_indices]
    if rem := len(idx) % temporal_patch_size:
        idx.extend(idx[-1] for _ in range(temporal_patch_size - rem))
    times = [i / fps for i in idx]
    k = temporal_patch_size
    return [(times[i] + times[i + k - 1]) / 2 for i in range(0, len(times), k)]


def format_timestamp(seconds: float, style: TimestampStyle = "seconds") -> str:
    """Text placed before a temporal patch's vision block, brackets included.

    ``"seconds"``: ``<3.5 seconds>``, exactly HF's ``f"<{t:.1f} seconds>"``. ``"hms"``:
    ``<0h:1m:3s>`` (unpadded fields, seconds truncated toward zero: the form only has whole
    seconds and a pair at 2.75 s has not reached 3 s yet).
    """
    if style == "seconds":
        return f"<{seconds:.1f} seconds>"
    if style == "hms":
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"format_timestamp: seconds must be finite and >= 0, got {seconds}")
        total = int(seconds)
        return f"<{total // 3600}h:{total % 3600 // 60}m:{total % 60}s>"
    raise ValueError(f"format_timestamp: style must be 'seconds' or 'hms', got {style!r}")
