"""Typed recipe schema and YAML loading (extends, presets, overrides, validation)."""

from megatron_lowp.config.loader import (
    available_presets,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from megatron_lowp.config.schema import (
    Config,
    DataConfig,
    DeviceConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "Config", "DataConfig", "DeviceConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "PrecisionConfig", "RunConfig", "TrainConfig",
    "available_presets", "config_to_dict", "dump_config", "load_config", "parse_override",
]
