"""The `callbacks` group: early_stopping, lr_monitor, model_summary, none by default, several at once;
early stopping is part of the run's identity (it changes results), the reporting callbacks are not."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelSummary

from mtlsparse.builders import build_trainer
from mtlsparse.config import ConfigError
from mtlsparse.resume import config_fingerprint, semantic_config
from mtlsparse.trackers import group_options
from mtlsparse.train import run

# an improvement must beat the best val/select by more than 1.0, which no accuracy can: stop after `patience`
NEVER_IMPROVES = ["callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1.0"]


def epochs_trained(run_dir: Path) -> list[int]:
    """The epochs logs/metrics.csv has training-step rows for."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return sorted({int(row["epoch"]) for row in csv.DictReader(f) if row.get("train/loss")})


def test_the_groups_options():
    assert group_options("callbacks") == ["early_stopping", "lr_monitor", "model_summary"]


def test_none_by_default_and_several_at_once(tiny_cfg, tmp_path):
    assert tiny_cfg().get("callbacks") is None
    cfg = tiny_cfg("callbacks=[early_stopping,lr_monitor,model_summary]")
    trainer, _ = build_trainer(cfg, tmp_path)
    (stopper,) = [cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert (stopper.monitor, stopper.mode, stopper.patience) == ("val/select", "max", 3)
    assert [type(cb) for cb in trainer.callbacks if isinstance(cb, (LearningRateMonitor, ModelSummary))] == [
        LearningRateMonitor, ModelSummary]


def test_early_stopping_stops_before_max_epochs(tiny_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        metrics = run(tiny_cfg("trainer.max_epochs=6", "callbacks=[early_stopping]", *NEVER_IMPROVES), run_dir)
    # epoch 0 sets the best score, epoch 1 does not beat it by min_delta: patience 1 is spent, training stops
    assert epochs_trained(run_dir) == [0, 1]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 4)  # saved at the end of epoch 1, after 2 x 2 batches
    assert "test/mean_acc" in metrics and (run_dir / "metrics.json").is_file()
    assert any("did not improve in the last 1 records" in r.getMessage() for r in caplog.records)


def test_without_early_stopping_the_same_run_trains_every_epoch(tiny_cfg, tmp_path):
    run(tiny_cfg("trainer.max_epochs=4"), tmp_path / "run")
    assert epochs_trained(tmp_path / "run") == [0, 1, 2, 3]


def test_trainer_min_epochs_holds_early_stopping_off(tiny_cfg, tmp_path):
    """What the early_stopping yaml tells users of scheduled methods to set."""
    run(tiny_cfg("trainer.max_epochs=6", "trainer.min_epochs=4", "callbacks=[early_stopping]", *NEVER_IMPROVES),
        tmp_path / "run")
    assert epochs_trained(tmp_path / "run") == [0, 1, 2, 3]


def test_lr_monitor_and_model_summary(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run(tiny_cfg("callbacks=[lr_monitor,model_summary]"), tmp_path / "run")
    header = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "lr-Adam" in header
    summary = [r.getMessage() for r in caplog.records if r.name == "lightning.pytorch.callbacks.model_summary"]
    assert summary and "model.trunk" in summary[0] and "Trainable params" in summary[0]


def test_only_early_stopping_is_part_of_the_run_identity(tiny_cfg):
    plain = config_fingerprint(tiny_cfg())
    assert config_fingerprint(tiny_cfg("callbacks=[lr_monitor,model_summary]")) == plain
    assert "callbacks" not in semantic_config(tiny_cfg("callbacks=[lr_monitor]"))  # not even an empty node
    assert config_fingerprint(tiny_cfg("callbacks=[early_stopping]")) != plain
    assert config_fingerprint(tiny_cfg("callbacks=[early_stopping]", "callbacks.early_stopping.patience=5")) != \
        config_fingerprint(tiny_cfg("callbacks=[early_stopping]"))


def test_a_finished_run_is_skipped_with_other_reporting_callbacks_and_refused_with_early_stopping(tiny_cfg, tmp_path,
                                                                                                  caplog):
    run_dir = tmp_path / "run"
    first = run(tiny_cfg("callbacks=[lr_monitor]"), run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with caplog.at_level(logging.INFO, logger="mtlsparse"):
        assert run(tiny_cfg("callbacks=[model_summary]"), run_dir) == first
    assert any("skipped" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"holds a run of a different config.*callbacks.early_stopping.patience: "
                                          r'"\(unset\)" → 3') as err:
        run(tiny_cfg("callbacks=[early_stopping]"), run_dir)
    assert "\n" not in str(err.value) and "verbose" not in str(err.value)  # how it logs is not identity
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_an_unknown_callbacks_entry_points_to_trainer_callbacks(tiny_cfg, tmp_path):
    cfg = tiny_cfg("+callbacks.mine={_target_:lightning.pytorch.callbacks.Timer}")
    with pytest.raises(ConfigError, match=r"callbacks.mine is not an option of the 'callbacks' group "
                                          r"\(early_stopping, lr_monitor, model_summary\).*\+trainer.callbacks="):
        run(cfg, tmp_path / "run")


def test_a_bad_callback_key_names_it(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'callbacks.early_stopping.patients' for .*EarlyStopping"):
        run(tiny_cfg("callbacks=[early_stopping]", "+callbacks.early_stopping.patients=2"), tmp_path / "run")
