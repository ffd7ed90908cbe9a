"""Readers for the sample formats people already have: HF chat JSONL and LLaVA JSON(L).

* HF chat: ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
  {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}`` (content
  may be a plain string; ``video`` parts work like images);
* LLaVA: ``{"id": ..., "image": "a.jpg" | [...], "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}``.

Relative media paths resolve against the input file's folder. Optional ``targets`` (exact
answers, ``box``, ``point``) are kept for verifiable rewards. A bad line is reported as
``BadRecord(file:line, reason)``, never raised, so one typo does not stop a conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megavlm.data.sample import Media, Message, Sample

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class BadRecord:
    where: str  # file:line
    reason: str  # malformed_json | invalid_utf8 | bad_record | media_mismatch | empty_conversation | missing_media
    detail: str


class MediaMismatch(ValueError):
    """Placeholders (``<image>`` tags) and media files do not pair up."""


def _media(kind: str, ref: str, root: Path) -> Media:
    path = Path(ref)
    return Media(kind, path=str(path if path.is_absolute() else root / path))


def _from_hf_chat(record: dict, sid: str, root: Path) -> Sample:
    media, messages = [], []
    for m in record["messages"]:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            if part["type"] in ("image", "video"):
                media.append(_media(part["type"], part[part["type"]], root))
                parts.append({"type": part["type"], "index": len(media) - 1})
            elif part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(f"unknown content type {part['type']!r}")
        messages.append(Message(m["role"], parts, reasoning=m.get("reasoning_content")))
    return Sample(id=sid, messages=messages, media=media, targets=record.get("targets"))


def _from_llava(record: dict, sid: str, root: Path) -> Sample:
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else list(images)
    media = [_media("image", ref, root) for ref in images]
    next_image, messages = 0, []
    for turn in record["conversations"]:
        parts = []
        pieces = turn["value"].split("<image>")
        for k, text in enumerate(pieces):
            if k > 0:  # an <image> tag stood here
                if next_image >= len(media):
                    raise MediaMismatch(f"more <image> tags than images ({len(media)})")
                parts.append({"type": "image", "index": next_image})
                next_image += 1
            if text.strip("\n"):
                parts.append({"type": "text", "text": text.strip("\n")})
        messages.append(Message(_LLAVA_ROLES[turn["from"]], parts))
    if next_image != len(media):
        raise MediaMismatch(f"{len(media)} images but {next_image} <image> tags")
    return Sample(id=sid, messages=messages, media=media, targets=record.get("targets"))


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "hf"
    if "conversations" in record:
        return "llava"
    raise ValueError("neither 'messages' (HF chat) nor 'conversations' (LLaVA)")


def read_samples(path: str | Path, fmt: str = "auto") -> Iterator[Sample | BadRecord]:
    """Samples of a JSONL file (or a LLaVA JSON list), in file order."""
    path = Path(path)
    root = path.parent
    raw = path.read_bytes()
    if path.suffix == ".json" and raw.lstrip().startswith(b"["):
        lines = [(i + 1, json.dumps(r)) for i, r in enumerate(json.loads(raw.decode("utf-8", errors="replace")))]
    else:
        lines = [(i + 1, line) for i, line in enumerate(raw.split(b"\n")) if line.strip()]
    for number, line in lines:
        where = f"{path}:{number}"
        if isinstance(line, bytes):  # per line, so one bad byte costs one record, not the file
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(where, "invalid_utf8", str(e))
                continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadRecord(where, "malformed_json", str(e))
            continue
        try:
            kind = detect_format(record) if fmt == "auto" else fmt
            reader = {"hf": _from_hf_chat, "llava": _from_llava}[kind]
            sample = reader(record, str(record.get("id", f"{path.stem}-{number}")), root)
        except MediaMismatch as e:
            yield BadRecord(where, "media_mismatch", str(e))
            continue
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            yield BadRecord(where, "bad_record", f"{type(e).__name__}: {e}")
            continue
        if not any(m.role == "assistant" and any(p.get("text") for p in m.content) for m in sample.messages):
            yield BadRecord(where, "empty_conversation", "no assistant turn with text (nothing to learn)")
            continue
        missing = [m.path for m in sample.media if not Path(m.path).is_file()]
        if missing:
            yield BadRecord(where, "missing_media", missing[0])
            continue
        yield sample
