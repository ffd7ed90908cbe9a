"""The format-independent sample: a conversation whose messages reference media.

Every reader (HF chat, LLaVA, shards, the synthetic set) produces ``Sample``; the chat
template and the encoder consume it. Media are referenced by index so one image can be
decoded once however often it is mentioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Media:
    """One image or video: a file, encoded bytes, or decoded pixels (exactly one is set)."""

    kind: str  # "image" | "video"
    path: str | None = None
    data: bytes | None = None
    array: np.ndarray | None = None  # image [H, W, 3] uint8; video [T, H, W, 3] uint8
    fps: float | None = None  # video only: frame rate of ``array`` / the file


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    # parts: {"type": "text", "text": str} | {"type": "image" | "video", "index": int}
    content: list[dict]
    # Assistant turns of thinking models: the reasoning, HF's ``reasoning_content`` (None: taken
    # from a ``<think>...</think>`` prefix of the text, as the Qwen3-VL Thinking template does).
    reasoning: str | None = None


@dataclass
class Sample:
    id: str
    messages: list[Message]
    media: list[Media] = field(default_factory=list)
    # Exact answers for verifiable rewards: e.g. {"answer": "3"}, {"box": [x0, y0, x1, y1]}
    # (integers 0..1000, Qwen-style), {"point": [x, y]}.
    targets: dict | None = None
