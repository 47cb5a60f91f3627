"""Shared fixtures: compose the real Hydra config tree with overrides, run tiny trainings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mtlsparse.config import compose_config
from mtlsparse.data.synthetic import Synthetic

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist the workers already fill the cores: one torch thread each (and for their subprocesses)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)

# a 2-step training on tiny procedural data: what every smoke test runs
TINY = [
    "dataset=synthetic",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "dataset.batch_size=32",
]


def compose_cfg(overrides: list[str], data_root: Path | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, as `python -m mtlsparse` would."""
    extra = [f"data_root={data_root}"] if data_root is not None else []
    return compose_config(overrides + extra)


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: compose TINY + overrides with a tmp data root."""
    def make(*overrides: str) -> DictConfig:
        return compose_cfg(TINY + list(overrides), data_root=tmp_path / "data")
    return make


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    """Tiny synthetic data, set up, for the sparsity methods that read training batches."""
    dm = Synthetic(root=str(tmp_path_factory.mktemp("data")), batch_size=32)
    dm.setup()
    return dm
