"""Qwen3-VL chat template: megavlm's rendering equals HF's, byte for byte, in every case.

The reference is transformers itself: the released template text (tests/unit/assets/, sources
in its README) rendered by ``Qwen3VLProcessor.apply_chat_template`` (transformers' Jinja
renderer), then expanded by the processor's own ``replace_image_token`` /
``replace_video_token`` / ``get_text_with_replacements`` (image grids from HF's Qwen2-VL Pillow
image processor, video grids from HF's video ``smart_resize`` and ``sample_frames``).
Calling the processor end to end is not possible here: its video path needs torchvision.
Video expansion follows transformers 4.57's Qwen3VLProcessor (see ``_hf_text``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megavlm.data.chat_template import Qwen3VLChatTemplate
from megavlm.data.encode import SampleEncoder
from megavlm.data.sample import Media, Message, Sample
from megavlm.data.tokenizer import synthetic_tokenizer

ASSETS = Path(__file__).parent / "assets"
MIN_PX, MAX_PX = 4096, 16384


@pytest.fixture(scope="module")
def hf():
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    raw = RawTokenizer.from_str(synthetic_tokenizer().backend.to_str())
    raw.encode_special_tokens = False  # HF reads its own placeholders as special tokens
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    image = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3, min_pixels=MIN_PX, max_pixels=MAX_PX)
    processors = {}
    with pytest.MonkeyPatch.context() as mp:
        # the constructor's class check walks the auto video-processor mapping, which needs torchvision
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        for mode in ("instruct", "thinking"):
            processors[mode] = Qwen3VLProcessor(
                image_processor=image, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                chat_template=(ASSETS / f"qwen3vl_{mode}_chat_template.jinja").read_text())
    return processors


def _hf_text(processor, sample: Sample, *, add_generation_prompt: bool) -> str:
    """HF's rendering of ``sample``: template, then the processor's placeholder expansion."""
    from PIL import Image
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    from transformers.video_utils import VideoMetadata

    from megavlm.data.video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

    conversation = []
    for m in sample.messages:
        content = [{"type": p["type"], p["type"]: f"m{p['index']}"} if "index" in p else dict(p) for p in m.content]
        message = {"role": m.role, "content": content}
        if m.reasoning is not None:
            message["reasoning_content"] = m.reasoning
        conversation.append(message)
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    images, videos = [], []
    for media in sample.media:
        if media.kind == "image":
            grid = processor.image_processor(images=[Image.fromarray(media.array)], return_tensors="pt")["image_grid_thw"]
            images.append(processor.replace_image_token({"image_grid_thw": grid}, 0))
        else:
            n, h, w = media.array.shape[:3]
            meta = VideoMetadata(total_num_frames=n, fps=media.fps, width=w, height=h)
            index = processor.video_processor.sample_frames(meta)
            th, tw = smart_resize(len(index), h, w, temporal_factor=2, factor=32, min_pixels=VIDEO_MIN_PIXELS,
                                  max_pixels=VIDEO_MAX_PIXELS)
            meta.frames_indices = index
            grid = torch.tensor([[-(-len(index) // 2), th // 16, tw // 16]])
            videos.append(processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [meta]}, 0))
    (expanded,), _ = processor.get_text_with_replacements([text], images, [], [])
    for replacement in videos:
        # As Qwen3VLProcessor.__call__ of transformers 4.57 (the release the model shipped with) does:
        # the template's whole <|vision_start|><|video_pad|><|vision_end|> becomes the timestamped
        # blocks. transformers 5.24's generic expansion replaces only <|video_pad|> and so keeps an
        # extra outer vision_start/vision_end pair around the blocks, which no released recipe has.
        block = processor.vision_start_token + processor.video_token + processor.vision_end_token
        assert block in expanded
        expanded = expanded.replace(block, replacement, 1)
    return expanded


def _picture(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _video(n, h, w, fps):
    return Media("video", array=np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8), fps=fps)


def _text(t):
    return {"type": "text", "text": t}


IMG, IMG2, VID = {"type": "image", "index": 0}, {"type": "image", "index": 1}, {"type": "video", "index": 2}
MEDIA = [Media("image", array=_picture(60, 90, 0)), Media("image", array=_picture(130, 40, 1)), _video(9, 48, 64, 4.0)]
SYSTEM = Message("system", [_text("You are a careful assistant.")])

CASES = {  # name -> (mode, messages)
    "instruct_single_image": ("instruct", [Message("user", [IMG, _text("What is this?")]),
                                           Message("assistant", [_text("A texture.")])]),
    "instruct_system_multiturn_video": ("instruct", [
        SYSTEM, Message("user", [_text("Look: "), IMG, _text(" and "), IMG2]),
        Message("assistant", [_text("Two pictures.")]),
        Message("user", [VID, _text("When does it move?")]),
        Message("assistant", [_text("<think>\nkept verbatim\n</think>\n\nAt 1.0 seconds.")])]),
    "thinking_single_turn": ("thinking", [Message("user", [IMG, _text("Count.")]),
                                          Message("assistant", [_text("<think>\nOne, two.\n</think>\n\n2")])]),
    "thinking_no_reasoning_gets_empty_block": ("thinking", [Message("user", [_text("Hi")]),
                                                            Message("assistant", [_text("Hello!")])]),
    "thinking_system_multiturn_video": ("thinking", [
        SYSTEM, Message("user", [IMG, _text("Describe.")]),
        Message("assistant", [_text("<think>\nearlier turn: dropped\n</think>\n\nNoise.")]),
        Message("user", [VID, IMG2, _text("And now?")]),
        Message("assistant", [_text("\n\nStill noise.")], reasoning="\nfrom reasoning_content\n")]),
    "thinking_two_answers_after_last_query": ("thinking", [
        Message("user", [_text("Q")]), Message("assistant", [_text("first")]),
        Message("system", [_text("late system note")]),
        Message("assistant", [_text("<think>r2</think>second")])]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rendering_equals_hf(hf, name):
    """Training rendering (every turn) and the inference prompt (every turn before the last
    assistant turn + the generation prompt) against HF; labels cover exactly the assistant
    bodies and their <|im_end|>."""
    mode, messages = CASES[name]
    tok = synthetic_tokenizer()
    enc = SampleEncoder(Qwen3VLChatTemplate(tok, mode=mode), min_pixels=MIN_PX, max_pixels=MAX_PX,
                        max_length=8192, image_decoder="pillow")
    used = {p["index"] for m in messages for p in m.content if "index" in p}
    media = [m if i in used else Media("image", array=_picture(32, 32, 9)) for i, m in enumerate(MEDIA)]
    sample = Sample(id=name, messages=messages, media=[m for i, m in enumerate(media) if i in used])
    remap = {old: new for new, old in enumerate(sorted(used))}
    for m in sample.messages:
        m.content = [dict(p, index=remap[p["index"]]) if "index" in p else p for p in m.content]
    try:
        out = enc(sample)
        ours = tok.decode(out.tokens.tolist())
        assert ours == _hf_text(hf[mode], sample, add_generation_prompt=False)
        supervised = tok.decode(out.labels[out.loss_mask.bool()].tolist())
        bodies = [part.split("<|im_end|>")[0] + "<|im_end|>" for part in ours.split("<|im_start|>assistant\n")[1:]]
        assert supervised == "".join(bodies)
        prompt, _ = enc.prompt(sample)
        last = max(i for i, m in enumerate(sample.messages) if m.role == "assistant")
        context = Sample(id=name, messages=sample.messages[:last], media=sample.media)
        assert tok.decode(prompt.tolist()) == _hf_text(hf[mode], context, add_generation_prompt=True)
    finally:
        for m in sample.messages:  # CASES is shared: put the media indices back
            back = {new: old for old, new in remap.items()}
            m.content = [dict(p, index=back[p["index"]]) if "index" in p else p for p in m.content]


def test_instruct_refuses_what_its_template_drops(hf):
    """The Instruct template renders nothing for a system message after the first (and only the
    text of the first): megavlm refuses such samples instead of training on something else."""
    tok = synthetic_tokenizer()
    late = Sample(id="late", messages=[Message("user", [_text("Q")]), SYSTEM, Message("assistant", [_text("A")])])
    text = hf["instruct"].apply_chat_template(
        [{"role": m.role, "content": [dict(p) for p in m.content]} for m in late.messages], tokenize=False)
    assert "careful" not in text  # HF drops it
    with pytest.raises(ValueError, match="system message after the first"):
        Qwen3VLChatTemplate(tok).render(late, [])
    with pytest.raises(ValueError, match="mode"):
        Qwen3VLChatTemplate(tok, mode="reasoning")
