"""Config mistakes fail at start with one line naming the key; options are honoured or refused, never ignored."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from mtlsparse.config import ConfigError
from mtlsparse.errors import DataError, exit_code
from mtlsparse.train import objective_values, run


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=abc", "optimizer.lr must be a number"),
    ("optimizer.lr=-1", r"bad value in 'optimizer'.*learning rate"),
    ("trainer.limit_val_batches=0.00001", "trainer: .*limit_val_batches"),
    ("+lr=0.1", r"unknown top-level key\(s\) \['lr'\].*optimizer.lr"),
    ("+trainer.logger=false", "trainer.logger=False is not usable: give a logger as a _target_ node"),
    ("+trainer.callbacks=[1]", "trainer.callbacks=.*_target_ node"),
    ("+trainer.default_root_dir=/x", "trainer.default_root_dir is set by mtlsparse"),
    ("objective=test/mean_acc", "objective must name validation metrics"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1"),
    ("method=magnitude +method.include_heads=true", "method.include_heads.*it is now scope.heads"),
    ("method=magnitude method.prune_epoch=9", "method.prune_epoch=9 is past the last epoch of trainer.max_epochs=1"),
])
def test_config_mistakes_are_one_line_config_errors_before_training(override, message, tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=message) as err:
        run(tiny_cfg(*override.split()), tmp_path / "run")
    assert "\n" not in str(err.value) and exit_code(err.value) == 2
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_missing_data_is_a_data_error_with_the_layout(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match="NYUv2 not found under") as err:
        run(tiny_cfg("dataset=nyuv2", "model=deeplab_resnet"), tmp_path / "run")
    assert "Expected layout" in str(err.value) and exit_code(err.value) == 2


def test_user_callbacks_and_loggers_are_added_to_the_built_in_ones(tiny_cfg, tmp_path):
    extra = tmp_path / "extra"
    cfg = tiny_cfg(f"+trainer.logger={{_target_:lightning.pytorch.loggers.CSVLogger,save_dir:{extra}}}",
                   "+trainer.callbacks=[{_target_:lightning.pytorch.callbacks.LearningRateMonitor}]")
    run(cfg, tmp_path / "run")
    assert list(extra.rglob("metrics.csv")), "the user's logger wrote nothing"
    built_in = next((tmp_path / "run" / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "lr-Adam" in built_in  # LearningRateMonitor ran; the CSV logger mtlsparse reads is still there


@pytest.mark.parametrize("overrides, knob", [
    (["k0=0.1"], "k0=0.1 has no effect: method=dense"),
    (["lam=0.1", "method=magnitude"], "lam=0.1 has no effect: method=magnitude"),
    (["sparsity=0.5", "method=group_lasso"], "sparsity=0.5 has no effect"),
])
def test_knobs_the_method_does_not_read_warn_by_name(overrides, knob, tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mtlsparse"):
        run(tiny_cfg(*overrides), tmp_path)
    assert sum(knob in r.getMessage() for r in caplog.records) == 1


def test_no_warning_for_knobs_that_are_read(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mtlsparse"):
        run(tiny_cfg("method=group_lasso", "lam=1e-2", "balancer=chebyshev", "k0=0.1"), tmp_path)
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_the_sweep_objective_is_the_tested_models_validation_metric(tiny_cfg, tmp_path):
    metrics = run(tiny_cfg(), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert "val/select" in saved and "val/t0/loss" in saved
    assert objective_values(OmegaConf.create({"objective": "val/select"}), saved) == saved["val/select"]
    assert objective_values(OmegaConf.create({"objective": ["val/t0/loss", "val/t1/loss"]}), saved) == [
        saved["val/t0/loss"], saved["val/t1/loss"]]
    best = torch.load(next((tmp_path / "checkpoints").glob("best-*.ckpt")), weights_only=False)
    score = next(v["best_model_score"] for k, v in best["callbacks"].items() if "val/select" in k)
    assert saved["checkpoint/tested"].startswith("best-") and metrics["val/select"] == pytest.approx(float(score))
