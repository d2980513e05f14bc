"""From a command line to a typed `RunConfig`: register the schema, compose, convert.

    cfg = compose_config(["model=tiny", "train.steps=20"])  # what longtrain.train runs

Every entry point composes through here (`python -m longtrain.train`, `longtrain.plan`,
`longtrain.check`), so a config is read the same way everywhere, and a mistake Hydra or
OmegaConf refuses (a misspelled key, an unknown group option, a value of the wrong type, a
`+key=` the schema lacks) is one `ConfigError` line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from longtrain.config.hf import register_hf_config_resolver
from longtrain.config.schema import RunConfig
from longtrain.errors import ConfigError, report_errors

# The tree `@hydra.main(config_path="../configs")` of the entry points reads.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (YAML is validated against it) and the
    `hf_config` resolver of configs/model/hf.yaml. Idempotent; entry points call it first."""
    register_hf_config_resolver()
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _unknown_keys(node: object, prefix: str) -> list[str]:
    """Attributes of schema objects that the schema does not declare (added with `+key=`)."""
    if isinstance(node, list):
        return [k for i, item in enumerate(node) for k in _unknown_keys(item, f"{prefix}[{i}]")]
    if not dataclasses.is_dataclass(node):
        return []
    declared = {f.name for f in dataclasses.fields(node)}
    found = [f"{prefix}{k}" for k in vars(node) if k not in declared]
    for name in declared:
        found += _unknown_keys(getattr(node, name), f"{prefix}{name}.")
    return found


def to_run_config(dcfg: DictConfig) -> RunConfig:
    """The typed run config of a composed Hydra config; a key the schema lacks is an error.

    Hydra lets `+train.foo=1` add keys even to a structured config, and `OmegaConf.to_object`
    keeps them as extra attributes: refused here, so a misspelled key never goes unnoticed."""
    cfg = OmegaConf.to_object(dcfg)
    unknown = _unknown_keys(cfg, "")
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}: not in the schema "
            "(longtrain/config/schema.py); check the spelling (`python -m longtrain.train "
            "--cfg job` prints every key)"
        )
    return cfg


def _hydra_message(err: BaseException) -> str:
    """Hydra's message and its cause's on one line, without the parts that mislead or repeat."""

    def own(e: BaseException) -> str:
        # OmegaConf's full_key/object_type lines and Hydra's search path repeat the first line;
        # Hydra's "To append to your config use +key=" names what to_run_config refuses.
        text = str(e).split("\n    full_key:")[0].split("Config search path:")[0]
        lines = text.splitlines()
        return " ".join(ln for ln in lines if not ln.startswith("To append to your config"))

    text = own(err)
    if err.__cause__ is not None and str(err.__cause__):
        text = f"{text.rstrip().rstrip('.')}: {own(err.__cause__)}"
    if isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError)):
        text += " (`python -m longtrain.train --cfg job` prints every key)"
    return " ".join(text.split())


def compose_config(overrides: list[str] | None = None) -> RunConfig:
    """The typed config `python -m longtrain.train *overrides` would run with.

    Raises ConfigError (one line) for what Hydra or OmegaConf refuse (a misspelled key, an
    unknown group option, a value of the wrong type) and for keys added with `+key=`."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            dcfg = compose("config", overrides=list(overrides or []))
        return to_run_config(dcfg)  # resolves interpolations (model=hf reads config.json)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_hydra_message(err)) from err


def precheck_overrides(prog: str, argv: list[str]) -> None:
    """Compose a command line's overrides before `@hydra.main` does, so that a mistake is one
    line and exit status 2 (Hydra's own report takes seven and suggests `+key=`, which the
    schema refuses). Command lines with Hydra's flags (`--cfg`, `-m`, ...) are left to Hydra,
    and `hydra.*` overrides are Hydra's business."""
    if any(arg.startswith("-") for arg in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    report_errors(prog, lambda: compose_config(overrides))


__all__ = [
    "CONFIG_DIR",
    "compose_config",
    "precheck_overrides",
    "register_configs",
    "to_run_config",
]
