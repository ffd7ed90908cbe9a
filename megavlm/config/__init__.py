"""Configuration: typed dataclasses, YAML recipes with dotted overrides, validation."""

from megavlm.config.loader import ConfigError, dump_yaml, load_config, parse_overrides
from megavlm.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    FP8Config,
    LanguageModelConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
)
from megavlm.config.validate import data_parallel_size, validate

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "FP8Config",
    "LanguageModelConfig", "LoggingConfig", "ModelConfig", "MoEConfig", "ParallelConfig",
    "TrainConfig", "data_parallel_size", "dump_yaml", "load_config", "parse_overrides",
    "validate",
]
