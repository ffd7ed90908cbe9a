"""The training dataset a config asks for: rows of single samples, then packed or padded."""

from __future__ import annotations

from typing import Sequence

from megavlm.config import ConfigError
from megavlm.config.schema import Config
from megavlm.data.batch import Batch
from megavlm.data.chat_template import Qwen3VLChatTemplate
from megavlm.data.encode import SampleEncoder
from megavlm.data.packing import PackedDataset
from megavlm.data.synthetic import SyntheticMultimodalDataset
from megavlm.data.synthetic_text import SyntheticTextDataset
from megavlm.data.tokenizer import Tokenizer, synthetic_tokenizer, token_ids_config
from megavlm.data.shards import ShardDataset
from megavlm.data.vlm_dataset import EncodedDataset, PaddedDataset
from megavlm.data.webdataset import WebdatasetSource


def sample_encoder(cfg: Config) -> SampleEncoder:
    """Tokenizer (``data.tokenizer``, else the synthetic one), chat template and preprocessing,
    checked against the model's vocabulary and placeholder ids."""
    d = cfg.data
    tokenizer = Tokenizer.from_file(d.tokenizer) if d.tokenizer else synthetic_tokenizer()
    name = d.tokenizer or "the synthetic tokenizer"
    family = "step3vl" if cfg.model.vision is not None and cfg.model.vision.kind == "pe" else "qwen3vl"
    expected = token_ids_config(tokenizer, family=family)
    if cfg.model.token_ids != expected:
        raise ConfigError(
            f"model.token_ids {cfg.model.token_ids} differ from {name}'s {expected}; "
            "use a qwen3vl-*-tiny preset with the synthetic tokenizer, or set model.token_ids to match"
        )
    if cfg.model.language.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.language.vocab_size ({cfg.model.language.vocab_size}) is smaller than {name}'s "
            f"vocabulary ({tokenizer.vocab_size})"
        )
    return SampleEncoder(Qwen3VLChatTemplate(tokenizer, mode=d.chat_template), min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                         max_length=d.seq_length, family=family, image_decoder=d.image_decoder,
                         video_decoder=d.video_decoder, decode_threads=d.decode_threads)


def pack_alignment(cfg: Config) -> int:
    """``data.pack_align``, or 2 x CP by default (each packed sample is padded to it under CP)."""
    return cfg.data.pack_align if cfg.data.pack_align is not None else 2 * cfg.parallel.cp


def training_rows(cfg: Config) -> Sequence[Batch]:
    """Index -> one row ``[1, seq_length]`` (a packed group of samples, or one padded sample)."""
    d = cfg.data
    if d.dataset == "synthetic_text":
        rows = SyntheticTextDataset(vocab_size=cfg.model.language.vocab_size, seq_length=d.seq_length,
                                    seed=d.seed, min_length=d.min_sample_length)
    else:
        if d.dataset == "webdataset":  # existing webdataset / Energon shards, in megavlm's seeded order
            source = WebdatasetSource(d.path, seed=d.seed, split=d.split)
        else:
            source = SyntheticMultimodalDataset(seed=d.seed) if d.dataset == "synthetic_multimodal" else ShardDataset(d.path)
        rows = EncodedDataset(source, sample_encoder(cfg), cfg.model)
    if d.pack:
        return PackedDataset(rows, seq_length=d.seq_length, align=pack_alignment(cfg))
    return PaddedDataset(rows, seq_length=d.seq_length, pad_token_id=0)
