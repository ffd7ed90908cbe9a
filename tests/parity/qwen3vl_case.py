"""Tiny HF Qwen3-VL models and processor-style inputs, shared by the parity tests.

The HF model is built from our preset's config (``hf_config_from_model``), initialized
randomly (norms too, so QK-norm and the mergers' norms are exercised), and its weights are
what megavlm loads: both sides compute the same function by construction of the weights,
not of the code.
"""

from __future__ import annotations

import torch
import transformers

from megavlm.config import load_config
from megavlm.config.schema import Config
from megavlm.conversion.hf_config import hf_config_from_model

# sample layouts: ("text", n) | ("image", h, w) in patches | ("video", t, h, w), t frame pairs
CASES = {
    "text": [[("text", 20)]],
    "image": [[("text", 5), ("image", 4, 6), ("text", 7)]],
    "images": [[("text", 3), ("image", 4, 4), ("text", 4), ("image", 6, 2), ("text", 3), ("image", 2, 8), ("text", 2)]],
    "video": [[("text", 4), ("video", 3, 4, 4), ("text", 5)]],
    "images_video": [[("image", 2, 4), ("text", 3), ("video", 2, 4, 2), ("text", 2), ("image", 4, 4), ("text", 3)]],
    # two rows of different lengths (left padding) with media in both
    "batch": [[("text", 3), ("image", 4, 4), ("text", 6)], [("text", 9), ("video", 2, 2, 4), ("text", 2)]],
}


def tiny_config(preset: str = "qwen3vl-tiny", extra: list[str] = ()) -> Config:
    return load_config(None, [f"model.preset={preset}", *extra])


def hf_model(cfg: Config, seed: int = 0):
    config = hf_config_from_model(cfg.model)
    moe = config["model_type"] == "qwen3_vl_moe"
    cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    hf_cfg = cls(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model_cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    model = model_cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif p.dim() == 3:  # fused MoE experts are left empty by HF's init
                p.normal_(0.0, 0.02)
    return model


def processor_inputs(cfg: Config, rows: list[list[tuple]], seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids (left-padded), attention_mask, mm_token_type_ids and random media."""
    g = torch.Generator().manual_seed(seed)
    ids = cfg.model.token_ids
    v = cfg.model.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    specials = {ids.image_token_id, ids.video_token_id, ids.vision_start_token_id, ids.vision_end_token_id}
    vocab = [t for t in range(cfg.model.language.vocab_size) if t not in specials]

    def text(n):
        return [vocab[int(i)] for i in torch.randint(0, len(vocab), (n,), generator=g)]

    seqs, images, videos = [], [], []
    for row in rows:
        seq = []
        for part in row:
            if part[0] == "text":
                seq += text(part[1])
            elif part[0] == "image":
                _, h, w = part
                images.append((1, h, w))
                seq += [ids.vision_start_token_id] + [ids.image_token_id] * (h * w // 4) + [ids.vision_end_token_id]
            else:
                _, t, h, w = part
                videos.append((t, h, w))
                for _ in range(t):  # each frame pair: timestamp text, then its own vision block
                    seq += text(3) + [ids.vision_start_token_id] + [ids.video_token_id] * (h * w // 4) + [ids.vision_end_token_id]
        seqs.append(seq)
    longest = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    attention = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, longest - len(seq):] = torch.tensor(seq)
        attention[i, longest - len(seq):] = 1
    types = torch.zeros_like(input_ids)
    types[input_ids == ids.image_token_id] = 1
    types[input_ids == ids.video_token_id] = 2
    out = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": types}
    for kind, grids in (("", images), ("_videos", videos)):
        if grids:
            grid = torch.tensor(grids)
            out[f"pixel_values{kind}"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
            out["image_grid_thw" if not kind else "video_grid_thw"] = grid
    return out


def hf_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()
