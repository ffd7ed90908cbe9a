"""The config of a training run, from a recipe and dotted overrides.

``checkpoint.pretrained`` is applied here, on what the user wrote, because whether a model
key came from a preset or from the user decides between giving way and an error
(``conversion.pretrained``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

from megavlm.config import Config, ConfigError
from megavlm.config.loader import load_config_data
from megavlm.conversion.pretrained import resolve_pretrained


def _log_on_rank_zero(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def training_config(path: str | Path | None, overrides: Sequence[str] = (), *, log=_log_on_rank_zero) -> Config:
    cfg = resolve_pretrained(load_config_data(path, overrides), log=log)
    # checked here, not in config.validate: inference of a checkpoint saved with it needs no wandb
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb_project={cfg.logging.wandb_project!r} needs the wandb package "
                          "(pip install wandb); or leave logging.wandb_project unset")
    return cfg
