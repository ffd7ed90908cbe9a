"""The files that travel with a model besides its weights: tokenizer, chat template, processor.

A Hugging Face directory keeps them next to ``config.json``; a megavlm checkpoint keeps them
in ``<iter dir>/hf_assets/`` (written on import, carried by every later save of a run that
started from it, copied out on export), so a fine-tuned model leaves with the tokenizer it
was trained with.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from megavlm.checkpointing.directories import is_complete

ASSETS_DIR = "hf_assets"
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)


def assets_of(path: str | Path) -> Path | None:
    """Where the assets of a model directory are: a complete megavlm checkpoint's
    ``hf_assets/``, else the directory itself when it holds any (an HF model directory)."""
    path = Path(path)
    candidates = [path / ASSETS_DIR] if is_complete(path) else [path / ASSETS_DIR, path]
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in ASSET_FILES):
            return folder
    return None


def copy_assets(source: str | Path | None, target: str | Path) -> list[str]:
    """Copy the known asset files from ``source`` (a folder of them, or None) into ``target``."""
    if source is None:
        return []
    source, target = Path(source), Path(target)
    copied = []
    for name in ASSET_FILES:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def tokenizer_file(assets: Path | None) -> Path | None:
    """The tokenizer among the assets (``tokenizer.json``, else a sentencepiece model)."""
    if assets is None:
        return None
    return next((assets / n for n in ("tokenizer.json", "tokenizer.model") if (assets / n).is_file()), None)
