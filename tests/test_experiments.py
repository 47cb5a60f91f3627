"""Paper-recipe presets (conf/experiment): each composes with the recipe's choices and budget; one trains."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from mtlsparse.config import CONF_DIR, compose_config
from mtlsparse.train import run

from conftest import compose_cfg
from fakes import write_fake_source

RECIPE_CHOICES = {"model": "mdmtn", "balancer": "chebyshev", "method": "growl", "scheduler": "step"}
# METHODS.md §1: per preset, its dataset and the paper's values (dotted keys)
MDMTN_MNIST_LIKE = {"dataset.offset": 6, "dataset.resize": 28, "dataset.train_pairs": 60000,
                    "dataset.test_pairs": 10000, "optimizer.lr": 2.5e-3, "scheduler.gamma": 0.5,
                    "balancer.mu0": 2.5e-8, "method.s_lmax": 0.8, "method.s_min": 0.2, "method.preference": 0.7,
                    "k0": 1e-3, "k": [0.2, 0.799]}
PRESETS = {
    "mdmtn_multimnist": ("multi_mnist", MDMTN_MNIST_LIKE),
    # Multi-Fashion is not in the paper: its recipe with a sparser support (README, issue #16)
    "mdmtn_multifashion": ("multi_fashion", MDMTN_MNIST_LIKE | {"method.s_lmax": 0.95, "method.lam": 2.0,
                                                                "method.s_min": 0.85}),
    "mdmtn_cifar10mnist": ("cifar10mnist", {
        "dataset.val_fraction": 0.2, "optimizer.lr": 1e-4, "scheduler.gamma": 0.98, "balancer.mu0": 6.8e-8,
        "method.s_lmax": 0.3, "method.s_min": 0.1, "method.preference": 0.8, "model.channels": [16, 32],
        "model.kernel_size": 3, "model.hidden": 32, "model.monitor_channels": 32, "model.batch_norm": True,
        "k0": 1e-2, "k": [0.8, 0.19]}),
}
BUDGET = {"trainer.max_epochs": 39, "dataset.batch_size": 256, "scheduler.step_size": 3,
          "balancer.epochs_per_iteration": 3, "method.phase1_iterations": 3, "method.phase2_iterations": 10}


def select(cfg: DictConfig, key: str) -> Any:
    """Value at a dotted key, resolved, lists as plain lists."""
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("name", sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml")))
def test_every_preset_composes(name):
    cfg = compose_config([f"+experiment={name}"])
    assert cfg.hydra.runtime.choices.experiment == name


@pytest.mark.parametrize("name", PRESETS)
def test_mdmtn_presets_set_the_paper_recipe(name):
    dataset, values = PRESETS[name]
    cfg = compose_config([f"+experiment={name}"])
    choices = cfg.hydra.runtime.choices
    assert {g: choices[g] for g in RECIPE_CHOICES} == RECIPE_CHOICES and choices.dataset == dataset
    for key, expected in (values | BUDGET).items():
        assert select(cfg, key) == pytest.approx(expected), key


def test_preset_values_yield_to_the_command_line():
    cfg = compose_config(["+experiment=mdmtn_multimnist", "k0=0.01", "optimizer.lr=0.1"])
    assert cfg.k0 == 0.01 and cfg.balancer.k0 == 0.01 and cfg.optimizer.lr == 0.1


def test_multimnist_preset_trains_two_steps(tmp_path):
    write_fake_source(tmp_path / "data" / "MNIST" / "raw", seed=2)
    cfg = compose_cfg(["+experiment=mdmtn_multimnist", "trainer=cpu", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                       "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "dataset.train_pairs=256",
                       "dataset.test_pairs=64", "dataset.batch_size=64"], data_root=tmp_path / "data")
    metrics = run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").exists()
    assert (metrics["config/model"], metrics["config/balancer"], metrics["config/method"]) == ("mdmtn", "chebyshev",
                                                                                                "growl")
    assert metrics["config/k0"] == 1e-3 and metrics["config/k"] == [0.2, 0.799]
    assert 0 <= metrics["test/mean_acc"] <= 1 and {"test/left/acc", "test/right/acc"} <= set(metrics)
