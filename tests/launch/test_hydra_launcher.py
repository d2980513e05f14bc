"""configs/hydra/launcher/slurm.yaml composes with the rest of the config tree (needs the
hydra-submitit-launcher plugin: the `slurm` extra)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from longtrain.config import register_configs

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_and_instantiates():
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "optim.lr=1e-3"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 1  # one trainer process per job (see the YAML)
    assert launcher.partition == "gpu"
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120
    assert list(launcher.setup) == ["export OMP_NUM_THREADS=8"]
    assert cfg.optim.lr == 1e-3  # the run's own config is untouched
    made = instantiate(launcher)
    assert type(made).__name__ == "SlurmLauncher" and made.params["max_num_timeout"] == 3


def test_unknown_launcher_field_is_an_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="no_such_field"):
        _compose(["hydra/launcher=slurm", "hydra.launcher.no_such_field=1"])
