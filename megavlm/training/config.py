"""The config of a training run, from a recipe and dotted overrides.

``checkpoint.pretrained`` is applied here, on what the user wrote, because whether a model
key came from a preset or from the user decides between giving way and an error
(``conversion.pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from megavlm.config import Config
from megavlm.config.loader import load_config_data
from megavlm.conversion.pretrained import resolve_pretrained


def _log_on_rank_zero(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def training_config(path: str | Path | None, overrides: Sequence[str] = (), *, log=_log_on_rank_zero) -> Config:
    return resolve_pretrained(load_config_data(path, overrides), log=log)
