"""Tokenizers: HF ``tokenizer.json`` and sentencepiece models behind one interface, plus the
small byte-level BPE trained on the synthetic dataset.

Special tokens are looked up by name, never by guessed id: Qwen3-VL's
(``<|im_start|>`` ... ``<|image_pad|>``) and STEP3-VL's (``<im_patch>`` ...).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from megavlm.config.vision import TokenIdsConfig

QWEN3VL_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")
STEP3VL_SPECIAL = ("<im_start>", "<im_end>", "<im_patch>", "<patch_start>", "<patch_end>", "<patch_newline>")
SYNTHETIC_VOCAB_SIZE = 512


class Tokenizer:
    """encode / decode / special-token ids over ``tokenizers`` or ``sentencepiece``."""

    def __init__(self, backend, *, kind: str):
        self.backend, self.kind = backend, kind
        if kind == "hf":
            # Text is text: "<|image_pad|>" typed by a user must not become a placeholder
            # (the chat template inserts special tokens by id).
            backend.encode_special_tokens = True

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            candidates = [path / "tokenizer.json", path / "tokenizer.model"]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            return cls(HFTokenizer.from_file(str(path)), kind="hf")
        if path.suffix == ".model":
            import sentencepiece

            return cls(sentencepiece.SentencePieceProcessor(model_file=str(path)), kind="sentencepiece")
        raise ValueError(f"{path}: not a tokenizer.json (HF tokenizers) or .model (sentencepiece) file")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size() if self.kind == "hf" else self.backend.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in ``text`` are not interpreted."""
        if self.kind == "hf":
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.backend.decode(ids)

    def token_id(self, token: str) -> int:
        tid = self.backend.token_to_id(token) if self.kind == "hf" else self.backend.piece_to_id(token)
        if tid is None or (self.kind == "sentencepiece" and tid == self.backend.unk_id() and token != "<unk>"):
            raise KeyError(f"the tokenizer has no token {token!r}")
        return tid


def train_synthetic_tokenizer(texts: list[str], vocab_size: int = SYNTHETIC_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE with every Qwen3-VL and STEP3-VL special token (ids 0..12), in seconds."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[*QWEN3VL_SPECIAL, *STEP3VL_SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, kind="hf")


# The synthetic tokenizer, checked in: training it takes ~4 s, which every process start paid.
# ``train_synthetic_tokenizer_from_corpus()`` rebuilds it; a test holds the file to that.
SYNTHETIC_TOKENIZER_FILE = Path(__file__).parent / "assets" / "synthetic_tokenizer.json"


def train_synthetic_tokenizer_from_corpus() -> Tokenizer:
    """The synthetic tokenizer trained from scratch on the first 2000 synthetic samples (deterministic)."""
    from megavlm.data.synthetic import SyntheticMultimodalDataset, corpus

    texts = corpus(SyntheticMultimodalDataset(seed=0), 2000)
    # every digit and the answer formats, whatever the first samples happened to contain
    texts += [" ".join(str(i) for i in range(1001)), "[0, 0, 1000, 1000] <0.0 seconds> <0h:0m:0s>"]
    return train_synthetic_tokenizer(texts)


@lru_cache(maxsize=1)
def synthetic_tokenizer() -> Tokenizer:
    """The tokenizer of the synthetic dataset (the checked-in asset)."""
    return Tokenizer.from_file(SYNTHETIC_TOKENIZER_FILE)


def token_ids_config(tokenizer: Tokenizer, *, family: str = "qwen3vl") -> TokenIdsConfig:
    """The model's placeholder ids, read from the tokenizer (STEP3-VL: ``<im_patch>``)."""
    if family == "step3vl":
        return TokenIdsConfig(image_token_id=tokenizer.token_id("<im_patch>"), video_token_id=-1,  # images only
                              vision_start_token_id=tokenizer.token_id("<im_start>"),
                              vision_end_token_id=tokenizer.token_id("<im_end>"))
    return TokenIdsConfig(
        image_token_id=tokenizer.token_id("<|image_pad|>"), video_token_id=tokenizer.token_id("<|video_pad|>"),
        vision_start_token_id=tokenizer.token_id("<|vision_start|>"),
        vision_end_token_id=tokenizer.token_id("<|vision_end|>"),
    )
