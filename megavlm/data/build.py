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
from megavlm.data.tokenizer import synthetic_tokenizer, token_ids_config
from megavlm.data.vlm_dataset import EncodedDataset, PaddedDataset


def synthetic_encoder(cfg: Config) -> SampleEncoder:
    """Tokenizer, chat template and preprocessing of the built-in multimodal data, checked
    against the model's vocabulary and placeholder ids."""
    tokenizer = synthetic_tokenizer()
    expected = token_ids_config(tokenizer)
    if cfg.model.token_ids != expected:
        raise ConfigError(
            f"model.token_ids {cfg.model.token_ids} differ from the synthetic tokenizer's {expected}; "
            "use a qwen3vl-*-tiny preset or set model.token_ids to match"
        )
    if cfg.model.language.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.language.vocab_size ({cfg.model.language.vocab_size}) is smaller than the synthetic "
            f"tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    d = cfg.data
    return SampleEncoder(Qwen3VLChatTemplate(tokenizer), min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                         max_length=d.seq_length)


def training_rows(cfg: Config) -> Sequence[Batch]:
    """Index -> one row ``[1, seq_length]`` (a packed group of samples, or one padded sample)."""
    d = cfg.data
    if d.dataset == "synthetic_text":
        rows = SyntheticTextDataset(vocab_size=cfg.model.language.vocab_size, seq_length=d.seq_length,
                                    seed=d.seed, min_length=d.min_sample_length)
    else:
        rows = EncodedDataset(SyntheticMultimodalDataset(seed=d.seed), synthetic_encoder(cfg), cfg.model)
    if d.pack:
        return PackedDataset(rows, seq_length=d.seq_length)
    return PaddedDataset(rows, seq_length=d.seq_length, pad_token_id=0)
