"""The run config: the schema, how a command line becomes one, and every rule it must obey.

    schema.py   typed dataclasses (the Hydra ConfigStore schema), one documented field each
    load.py     overrides -> composed Hydra config -> typed RunConfig (unknown keys refused)
    rules.py    every check of values and cross-field rules, before any work starts
    hf.py       shapes of a local Hugging Face model from its config.json (model=hf)

`register_configs()` registers the schema and the `hf_config` resolver with Hydra; entry
points call it at start-up (nothing registers as a side effect of an import).
"""

from longtrain.config.load import (
    compose_config,
    precheck_overrides,
    register_configs,
    to_run_config,
)
from longtrain.config.schema import (
    EMBEDDED_STORE_DIR,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PlanConfig,
    RunConfig,
    StageConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "EMBEDDED_STORE_DIR",
    "DataConfig",
    "DeepSpeedConfig",
    "LoggingConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PlanConfig",
    "RunConfig",
    "StageConfig",
    "TrainConfig",
    "WandbConfig",
    "compose_config",
    "precheck_overrides",
    "register_configs",
    "to_run_config",
]
