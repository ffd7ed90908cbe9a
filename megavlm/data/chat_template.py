"""Chat templates: a Sample's messages -> token ids, with labels on assistant turns only.

Qwen3-VL: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; an image becomes
``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>`` (n = tokens after the 2x2
merge); a video becomes, per temporal pair, its timestamp text (``<3.0 seconds>``) and its
own vision block (REFERENCE 1, 4). A STEP3-VL image is its crop/newline/global token
layout (REFERENCE 5) inside the same role wrapper (STEP3-VL's own conversation markers
are not in REFERENCE: UNVERIFIED, the wrapper is configurable by subclassing). The assistant's content and its closing ``<|im_end|>`` are supervised; nothing else is.
Special tokens are inserted by id, so user text can never forge one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megavlm.data.sample import Sample
from megavlm.data.tokenizer import Tokenizer
from megavlm.data.video import format_timestamp


@dataclass
class MediaLayout:
    """What a chat template needs to know of one decoded medium."""

    kind: str  # "image" | "video"
    tokens_per_block: int  # placeholders of one image, or of one video frame pair
    timestamps: list[float] = field(default_factory=list)  # video: one per frame pair
    # STEP3-VL: the image's whole token layout by name (crops, newlines, global view)
    token_names: list[str] | None = None


@dataclass
class Rendered:
    tokens: list[int]
    supervised: list[bool]  # per token: is it part of an assistant turn


class Qwen3VLChatTemplate:
    def __init__(self, tokenizer: Tokenizer, *, timestamp_style: str = "seconds"):
        self.tok = tokenizer
        self.timestamp_style = timestamp_style
        self.ids = {name: tokenizer.token_id(name) for name in (
            "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}

    def _media(self, layout: MediaLayout) -> list[int]:
        ids = self.ids
        if layout.token_names is not None:
            return [self.tok.token_id(name) for name in layout.token_names]
        if layout.kind == "image":
            return [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * layout.tokens_per_block + [ids["<|vision_end|>"]]
        out = []
        for ts in layout.timestamps:
            out += self.tok.encode(format_timestamp(ts, self.timestamp_style))
            out += [ids["<|vision_start|>"]] + [ids["<|video_pad|>"]] * layout.tokens_per_block + [ids["<|vision_end|>"]]
        return out

    def render(self, sample: Sample, media: list[MediaLayout], *, add_generation_prompt: bool = False) -> Rendered:
        tokens: list[int] = []
        supervised: list[bool] = []

        def emit(ids: list[int], sup: bool) -> None:
            tokens.extend(ids)
            supervised.extend([sup] * len(ids))

        for message in sample.messages:
            if message.role not in ("system", "user", "assistant"):
                raise ValueError(f"sample {sample.id}: unknown role {message.role!r}")
            sup = message.role == "assistant"
            emit([self.ids["<|im_start|>"]] + self.tok.encode(f"{message.role}\n"), False)
            for part in message.content:
                if part["type"] == "text":
                    emit(self.tok.encode(part["text"]), sup)
                elif part["type"] in ("image", "video"):
                    if sup:
                        raise ValueError(f"sample {sample.id}: media in an assistant turn are not supported")
                    emit(self._media(media[part["index"]]), False)
                else:
                    raise ValueError(f"sample {sample.id}: unknown content part type {part['type']!r}")
            emit([self.ids["<|im_end|>"]], sup)
            emit(self.tok.encode("\n"), False)
        if add_generation_prompt:
            emit([self.ids["<|im_start|>"]] + self.tok.encode("assistant\n"), False)
        return Rendered(tokens, supervised)
