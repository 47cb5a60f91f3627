"""The `logger` group: each tracker records the config, the per-epoch metrics and metrics.json's
numbers, inside the run dir and offline; the CSV log is always kept; a missing extra is one line."""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mtlsparse.cli import preflight
from mtlsparse.config import ConfigError
from mtlsparse.errors import exit_code
from mtlsparse.trackers import group_options
from mtlsparse.train import run

from conftest import TINY

TWO_EPOCHS = ["trainer.max_epochs=2"]


def csv_rows(run_dir: Path, key: str) -> list[float]:
    """The values of `key` in logs/metrics.csv, in row order (rows where it was logged)."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def numbers(metrics: dict) -> dict[str, float]:
    """metrics.json's numbers, as the trackers get them (config/* go in as hyperparameters instead)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("config/")}


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def scalars_by_step(events, tag: str) -> list:
    """A tag's points in step order (TensorBoard reads a dir's event files in name order, and the writer
    counter in the names does not sort numerically: ...tfevents.<time>.<host>.<pid>.10 before .9)."""
    return sorted(events.Scalars(tag), key=lambda e: (e.step, e.wall_time))


def tensorboard_hparams(events) -> dict:
    """The hyperparameters of the HParams tab (the session start info the logger wrote)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


def test_the_groups_options_are_the_four_trackers():
    assert group_options("logger") == ["csv", "mlflow", "tensorboard", "wandb"]


def test_csv_and_tensorboard_event_files_hold_per_epoch_and_final_metrics(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg(*TWO_EPOCHS, "logger=[csv,tensorboard]"), run_dir)
    events = tensorboard_events(run_dir / "tensorboard")
    scalars = set(events.Tags()["scalars"])
    per_epoch = scalars_by_step(events, "val/mean_acc")
    # one point per epoch, plus the tested checkpoint's validation after fit: the same rows as logs/metrics.csv
    assert len(per_epoch) == 3 and len({e.step for e in per_epoch[:2]}) == 2
    assert [e.value for e in per_epoch] == pytest.approx(csv_rows(run_dir, "val/mean_acc"))
    final = {f"final/{k}": v for k, v in numbers(json.loads((run_dir / "metrics.json").read_text())).items()}
    assert final.keys() <= scalars and "final/test/mean_acc" in final and "final/config/lam" not in scalars
    assert {tag: [e.value for e in events.Scalars(tag)] for tag in final} == {  # once each, at the last step
        tag: pytest.approx([value], rel=1e-6) for tag, value in final.items()}
    assert {e.step for tag in final for e in events.Scalars(tag)} == {per_epoch[-1].step}
    hparams = tensorboard_hparams(events)
    assert hparams["optimizer/lr"].number_value == pytest.approx(0.001)
    assert hparams["dataset/_target_"].string_value == "mtlsparse.data.synthetic.Synthetic"
    assert "hydra/run/dir" not in hparams
    assert (run_dir / "logs" / "metrics.csv").is_file()


def test_csv_stays_on_when_only_tensorboard_is_chosen(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mtlsparse"):
        run(tiny_cfg("logger=tensorboard"), tmp_path / "run")
    assert csv_rows(tmp_path / "run", "val/mean_acc") and list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert any("the CSV logger stays on as well" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("loggers: CSVLogger") and "TensorBoardLogger" in r.getMessage()
               for r in caplog.records)


def test_no_tracker_at_all_still_writes_the_csv_log(tiny_cfg, tmp_path):
    run(tiny_cfg("logger=[]"), tmp_path / "run")
    assert csv_rows(tmp_path / "run", "val/mean_acc")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["checkpoints", "logs"]


# --- wandb: the offline run's transaction log, read with wandb's own protobuf records ---------------------------

WANDB_BLOCK, WANDB_RECORD_HEADER = 32768, 7  # wandb's LevelDB-style log: 32 KiB blocks, 7-byte record headers


def wandb_records(path: Path) -> list:
    """The records of an offline run's `run-<id>.wandb` (header ':W&B', then LevelDB log records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = WANDB_RECORD_HEADER, b"", []
    while pos + WANDB_RECORD_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_RECORD_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + WANDB_RECORD_HEADER])
        pending += data[pos + WANDB_RECORD_HEADER:pos + WANDB_RECORD_HEADER + length]
        pos += WANDB_RECORD_HEADER + length
        if kind in (1, 4):  # FULL or LAST fragment: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep wandb's settings, cache and the WANDB_MODE that WandbLogger(offline=True) sets inside the test."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


def test_wandb_offline_run_holds_config_history_and_summary(tiny_cfg, tmp_path, wandb_env):
    import wandb

    run_dir = tmp_path / "run"
    metrics = run(tiny_cfg(*TWO_EPOCHS, "logger=[csv,wandb]"), run_dir)
    assert wandb.run is None  # finished at the end: the next run of this process gets its own
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(next(offline.glob("run-*.wandb")))
    # the config reaches the log with the run record, or in config records after it, depending on timing
    updates = [r.run.config.update if r.HasField("run") else r.config.update for r in records
               if r.HasField("run") or r.HasField("config")]
    config = {_key(i): json.loads(i.value_json) for update in updates for i in update}
    assert config["optimizer"]["lr"] == pytest.approx(0.001) and config["dataset"]["batch_size"] == 32
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    per_epoch = [(h["trainer/global_step"], h["val/mean_acc"]) for h in history if "val/mean_acc" in h]
    assert [v for _, v in per_epoch] == pytest.approx(csv_rows(run_dir, "val/mean_acc"))
    assert len({step for step, _ in per_epoch[:2]}) == 2
    summary: dict = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    final = {f"final/{k}": v for k, v in numbers(metrics).items()}
    assert {k: summary[k] for k in final} == pytest.approx(final)
    (exit_record,) = [r for r in records if r.HasField("exit")]
    assert exit_record.exit.exit_code == 0


def test_a_wandb_run_left_open_by_a_failed_run_is_finished_not_reused(tiny_cfg, tmp_path, wandb_env, caplog):
    import wandb

    stale = wandb.init(mode="offline", dir=str(tmp_path / "stale"), project="other")
    with caplog.at_level(logging.WARNING, logger="mtlsparse"):
        run(tiny_cfg("logger=wandb"), tmp_path / "run")
    assert any(f"finishing the wandb run {stale.id}" in r.getMessage() for r in caplog.records)
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert not offline.name.endswith(stale.id)


# --- mlflow: a local SQLite store in the run dir, read back through mlflow's client ----------------------------

def test_mlflow_local_store_holds_params_and_metrics(tiny_cfg, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    metrics = run(tiny_cfg(*TWO_EPOCHS, "logger=[csv,mlflow]"), run_dir)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mtlsparse")
    assert Path(experiment.artifact_location) == run_dir / "mlflow" / "artifacts"
    (record,) = client.search_runs([experiment.experiment_id])
    assert record.info.status == "FINISHED"
    assert record.data.params["optimizer/lr"] == "0.001" and record.data.params["method/_target_"].endswith("Dense")
    history = client.get_metric_history(record.info.run_id, "val/mean_acc")
    assert [m.value for m in history] == pytest.approx(csv_rows(run_dir, "val/mean_acc"))
    final = {f"final/{k}": v for k, v in numbers(metrics).items()}
    assert {k: record.data.metrics[k] for k in final} == pytest.approx(final)
    assert list(cwd.iterdir()) == []  # no ./mlruns or anything else outside the run dir


# --- failures: one line each ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tracker, packages", [("tensorboard", {"tensorboard", "tensorboardX"}),
                                               ("wandb", {"wandb"}), ("mlflow", {"mlflow"})])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tracker, packages, tiny_cfg, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in packages else real(name, *a, **k))
    line = f"logger={tracker} needs the 'trackers' extra: pip install \"mtlsparse[trackers]\""
    with pytest.raises(ConfigError) as err:
        run(tiny_cfg(f"logger=[csv,{tracker}]"), tmp_path / "run")
    assert str(err.value) == line and exit_code(err.value) == 2
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert preflight([*TINY, f"+logger={tracker}"]) == line  # the command line says it before Hydra starts


@pytest.mark.parametrize("override, message", [
    ("+logger.tensorboard.save_dir=/elsewhere", "logger.tensorboard.save_dir is set by mtlsparse itself"),
    ("+logger.csv.name=other", r"logger.csv.name is set by mtlsparse itself: always logs/"),
    ("+logger.tensorboard.colour=red", r"unknown key 'logger.tensorboard.colour' for .*TensorBoardLogger"),
    ("+logger.mine={_target_:lightning.pytorch.loggers.CSVLogger}", r"logger.mine is not an option of the 'logger' "
                                                                    r"group .*\+trainer.logger="),
])
def test_run_owned_and_unknown_logger_keys_are_refused(override, message, tiny_cfg, tmp_path):
    cfg = tiny_cfg("logger=[csv,tensorboard]", override)
    with pytest.raises(ConfigError, match=message) as err:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_the_logger_choice_is_not_part_of_the_run_identity(tiny_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    first = run(tiny_cfg(), run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with caplog.at_level(logging.INFO, logger="mtlsparse"):
        again = run(tiny_cfg("logger=[csv,tensorboard,mlflow]"), run_dir)
    assert again == first and any("skipped" in r.getMessage() for r in caplog.records)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing written, no tracker dirs


def test_console_entry_point_with_csv_and_tensorboard(tmp_path):
    """`python -m mtlsparse ... logger=[csv,tensorboard]` from a directory outside the checkout."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    proc = subprocess.run([sys.executable, "-m", "mtlsparse", *TINY, *TWO_EPOCHS, "logger=[csv,tensorboard]",
                           f"data_root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run_dir / "mtlsparse.log").read_text()
    assert f"TensorBoardLogger → {run_dir}/tensorboard/" in log
    events = tensorboard_events(run_dir / "tensorboard")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(events.Scalars("val/mean_acc")) == 3
    assert events.Scalars("final/test/mean_acc")[0].value == pytest.approx(metrics["test/mean_acc"])
    assert tensorboard_hparams(events)["trainer/max_epochs"].number_value == 2
    assert list(elsewhere.iterdir()) == []


def test_the_console_refuses_a_missing_extra_in_one_line(tmp_path):
    """The real command line with a tracker whose package cannot be imported (hidden by a shadowing module path)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # a sitecustomize that hides mlflow from importlib, as on a machine without the extra
    (shadow / "sitecustomize.py").write_text(
        "import importlib.util as u\n_real = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name.split('.')[0] == 'mlflow' else _real(name, *a, **k)\n")
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "PYTHONPATH": str(shadow)}
    proc = subprocess.run([sys.executable, "-m", "mtlsparse", *TINY, "logger=mlflow", f"hydra.run.dir={tmp_path}/run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mtlsparse: error: logger=mlflow needs the 'trackers' extra: "
                                   "pip install \"mtlsparse[trackers]\"")
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run dir


class Preempted(RuntimeError):
    """Stands in for a preemption in the middle of an epoch."""


def test_a_resumed_run_logs_its_attempt_next_to_the_interrupted_one(tiny_cfg, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mtlsparse.module import MultiTaskModule

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    overrides = ("trainer.max_epochs=3", "logger=[csv,tensorboard,mlflow]")
    original = MultiTaskModule.training_step

    def killed_in_epoch_2(self, batch, batch_idx):
        if self.global_step == 4:
            raise Preempted("killed in epoch 2")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(MultiTaskModule, "training_step", killed_in_epoch_2)
        with pytest.raises(Preempted):
            run(tiny_cfg(*overrides), run_dir)
    run(tiny_cfg(*overrides), run_dir)  # resume=auto: from checkpoints/last.ckpt (end of epoch 1)
    first, resumed = tensorboard_events(run_dir / "tensorboard"), tensorboard_events(run_dir / "tensorboard" /
                                                                                     "resumed-1")
    assert [e.step for e in scalars_by_step(first, "val/mean_acc")] == [1, 3]
    assert [e.step for e in scalars_by_step(resumed, "val/mean_acc")] == [5, 6]  # epoch 2, then the tested checkpoint
    assert "final/test/mean_acc" in resumed.Tags()["scalars"] and "final/test/mean_acc" not in first.Tags()["scalars"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mtlsparse").experiment_id], order_by=["start_time"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
