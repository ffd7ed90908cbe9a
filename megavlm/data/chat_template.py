"""Chat templates: a Sample's messages -> token ids, with labels on assistant turns only.

Qwen3-VL renders what HF's ``apply_chat_template`` renders from the released templates
followed by the processor's placeholder expansion (tested byte for byte against both
templates, checked in under tests/unit/assets/): ``mode="instruct"`` is the template of
Qwen3-VL-*-Instruct, ``mode="thinking"`` that of Qwen3-VL-*-Thinking (assistant turns after
the last user turn carry ``<think>\\n{reasoning}\\n</think>\\n\\n``, the final one always;
earlier turns lose their reasoning; the generation prompt ends ``<think>\\n``). Tools and
tool turns are not supported.

``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; an image becomes
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


MODES = ("instruct", "thinking")


class Qwen3VLChatTemplate:
    """``mode``: "instruct" or "thinking" (the Qwen3-VL release whose template to follow)."""

    def __init__(self, tokenizer: Tokenizer, *, timestamp_style: str = "seconds", mode: str = "instruct"):
        if mode not in MODES:
            raise ValueError(f"chat template mode {mode!r} is not one of {MODES}")
        self.tok = tokenizer
        self.timestamp_style = timestamp_style
        self.mode = mode
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

    @staticmethod
    def _last_query(messages) -> int:
        """The template's ``ns.last_query_index``: the last user turn that is not a tool response."""
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if m.role == "user":
                text = "".join(p["text"] if p["type"] == "text" else "<|vision_start|>" for p in m.content)
                if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                    return i
        return len(messages) - 1

    def _assistant_text(self, sample: Sample, i: int, last_query: int) -> str:
        """An assistant turn's body as the template writes it (text parts only)."""
        message = sample.messages[i]
        content = ""
        for part in message.content:
            if part["type"] != "text":
                raise ValueError(f"sample {sample.id}: media in an assistant turn are not supported")
            content += part["text"]
        if self.mode == "instruct":
            return content
        # Qwen3-VL Thinking's template, expression for expression (Python's str methods are Jinja's).
        reasoning = ""
        if message.reasoning is not None:
            reasoning = message.reasoning
        elif "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        is_last = i == len(sample.messages) - 1
        if i > last_query and (is_last or reasoning):
            return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        return content

    def render(self, sample: Sample, media: list[MediaLayout], *, add_generation_prompt: bool = False) -> Rendered:
        tokens: list[int] = []
        supervised: list[bool] = []

        def emit(ids: list[int], sup: bool) -> None:
            tokens.extend(ids)
            supervised.extend([sup] * len(ids))

        last_query = self._last_query(sample.messages)
        for i, message in enumerate(sample.messages):
            if message.role not in ("system", "user", "assistant"):
                raise ValueError(f"sample {sample.id}: unknown role {message.role!r}")
            if message.role == "system" and i > 0 and self.mode == "instruct":
                # The Instruct template renders nothing for it: refuse rather than drop it silently.
                raise ValueError(f"sample {sample.id}: a system message after the first (message {i}) is "
                                 "dropped by the Qwen3-VL Instruct template")
            sup = message.role == "assistant"
            emit([self.ids["<|im_start|>"]] + self.tok.encode(f"{message.role}\n"), False)
            if sup:
                emit(self.tok.encode(self._assistant_text(sample, i, last_query)), True)
            else:
                for part in message.content:
                    if part["type"] == "text":
                        emit(self.tok.encode(part["text"]), False)
                    elif part["type"] in ("image", "video"):
                        if message.role == "system" and i == 0 and self.mode == "instruct":
                            # the Instruct template keeps only the text of a leading system message
                            raise ValueError(f"sample {sample.id}: media in the system message are dropped "
                                             "by the Qwen3-VL Instruct template")
                        emit(self._media(media[part["index"]]), False)
                    else:
                        raise ValueError(f"sample {sample.id}: unknown content part type {part['type']!r}")
            emit([self.ids["<|im_end|>"]], sup)
            emit(self.tok.encode("\n"), False)
        if add_generation_prompt:
            prompt = "assistant\n<think>\n" if self.mode == "thinking" else "assistant\n"
            emit([self.ids["<|im_start|>"]] + self.tok.encode(prompt), False)
        return Rendered(tokens, supervised)
