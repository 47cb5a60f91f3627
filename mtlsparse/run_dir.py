"""The layout of one run dir, and the few operations that touch it as a whole.

    <run_dir>/
      .hydra/config.yaml, hydra.yaml, overrides.yaml   the composed config (written by us, see below)
      job.json          config fingerprint + the semantic config, to recognise (or diff) a re-run
      environment.json  package versions and git revision
      mtlsparse.log     the job log (Hydra's file handler)
      logs/             Lightning CSV logs (logs/resumed-N/ for resumed attempts)
      checkpoints/      best-epochNNN.ckpt (by val/select) and last.ckpt (every epoch end)
      metrics.json      final metrics: written last, so its presence means the run finished
      attempts/N/       files of an earlier attempt that died before its first checkpoint

Hydra is configured with `hydra.output_subdir: null`, so it writes no `.hydra/` of its own:
the run code writes it only after deciding what to do with the dir, and a refused or
skipped re-run therefore leaves every byte of a finished run as it was.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = ".hydra"
CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
JOB_FILE = "job.json"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINTS = "best-*.ckpt"
COMPACT_FILE = "compact_model.pt"
#: prefix of the model's weights in a Lightning checkpoint of MultiTaskModule (its attribute `model`)
MODEL_PREFIX = "model."
ATTEMPTS_DIR = "attempts"
MLFLOW_DIR = "mlflow"  # the local MLflow store (trackers.py), when no tracking_uri is given
#: what a dead attempt leaves besides checkpoints/metrics: moved to attempts/N/ before a new start
#: (with the trackers' dirs: wandb/, the MLflow store, and any dir of TensorBoard event files, the default
#: tensorboard/ (conf/logger/tensorboard.yaml) or the one `logger.tensorboard.name` gives)
TENSORBOARD_EVENTS = "events.out.tfevents.*"
ATTEMPT_FILES = (CONFIG_DIR, JOB_FILE, ENVIRONMENT_FILE, "logs", "*.log", "mask_report.json", "layer_report.json",
                 "tensorboard", "wandb", MLFLOW_DIR)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run dir; the only place that spells out its file names."""

    path: Path

    @property
    def config_dir(self) -> Path:
        return self.path / CONFIG_DIR

    @property
    def config_file(self) -> Path:
        """`.hydra/config.yaml`: the composed config, what export rebuilds the model from."""
        return self.config_dir / CONFIG_FILE

    @property
    def overrides_file(self) -> Path:
        """`.hydra/overrides.yaml`: the task overrides, what report reads the swept knobs from."""
        return self.config_dir / OVERRIDES_FILE

    @property
    def compact_model(self) -> Path:
        """`compact_model.pt`, written by export."""
        return self.path / COMPACT_FILE

    @property
    def job_file(self) -> Path:
        return self.path / JOB_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def environment_file(self) -> Path:
        return self.path / ENVIRONMENT_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / LAST_CHECKPOINT

    def checkpoints(self) -> list[Path]:
        """Every checkpoint file the run kept."""
        return sorted(self.checkpoint_dir.glob("*.ckpt")) if self.checkpoint_dir.is_dir() else []

    def best_checkpoints(self) -> list[Path]:
        """The val/select checkpoints (`best-epochNNN.ckpt`), by name: the zero-padded epoch."""
        return sorted(self.checkpoint_dir.glob(BEST_CHECKPOINTS))

    def log_files(self) -> list[Path]:
        """The job logs (`*.log`) at the top of the dir."""
        return sorted(self.path.glob("*.log"))

    def is_job(self) -> bool:
        """A `.hydra/` or a metrics.json: a job dir (what report collects), finished or not."""
        return self.config_dir.is_dir() or self.metrics_file.is_file()

    def holds_results(self) -> bool:
        """A checkpoint or a metrics.json: work that a re-run must never overwrite."""
        return self.metrics_file.exists() or bool(self.checkpoints())

    def archive_attempt(self) -> Path | None:
        """Move a dead attempt's files (no checkpoint, no metrics) to attempts/N/; None if there were none."""
        if not (self.job_file.exists() or (self.path / CONFIG_DIR).exists()):
            return None  # nothing ran here before (Hydra may just have opened this attempt's log)
        found = sorted({p for pattern in ATTEMPT_FILES for p in self.path.glob(pattern)} | self._tensorboard_dirs())
        attempts = self.path / ATTEMPTS_DIR
        number = 1 + max((int(p.name) for p in attempts.glob("*") if p.name.isdigit()), default=0)
        target = attempts / str(number)
        target.mkdir(parents=True)
        with paused_file_logs(self.path):
            for source in found:
                source.rename(target / source.name)
        return target

    def _tensorboard_dirs(self) -> set[Path]:
        """Top-level dirs holding TensorBoard event files, whatever `logger.tensorboard.name` called them."""
        keep = {ATTEMPTS_DIR, CHECKPOINT_DIR}
        return {d for d in self.path.iterdir()
                if d.is_dir() and d.name not in keep and next(d.rglob(TENSORBOARD_EVENTS), None) is not None}

    def write_config_record(self, cfg: DictConfig, hydra_cfg: DictConfig | None) -> None:
        """`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml` as Hydra would write them."""
        if hydra_cfg is None:
            return
        self.config_dir.mkdir(parents=True, exist_ok=True)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
        OmegaConf.save(task, self.config_file)
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), self.config_dir / "hydra.yaml")
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), self.overrides_file)


def file_log_handlers(directory: Path) -> list[tuple[logging.Logger, logging.FileHandler]]:
    """Logging file handlers (any logger) that write into `directory` — Hydra's job log among them."""
    directory = directory.resolve()
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    found = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == directory:
                found.append((logger, handler))
    return found


def detach_file_logs(directory: Path) -> None:
    """Stop every file handler writing into `directory`, so a refused or skipped re-run adds nothing there.

    A log file the handler only just created (empty) is removed with it.
    """
    for logger, handler in file_log_handlers(directory):
        logger.removeHandler(handler)
        handler.close()
        log_file = Path(handler.baseFilename)
        if log_file.is_file() and log_file.stat().st_size == 0:
            log_file.unlink()


class paused_file_logs:
    """Close the dir's log files while the block moves them; each reopens (a new file) on its next record."""

    def __init__(self, directory: Path) -> None:
        self.handlers = [h for _, h in file_log_handlers(directory)]

    def __enter__(self) -> None:
        for handler in self.handlers:
            handler.acquire()
            handler.close()  # FileHandler reopens its file on the next emit (mode 'a')

    def __exit__(self, *exc: Any) -> None:
        for handler in self.handlers:
            handler.release()
