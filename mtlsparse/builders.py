"""Construct a run's parts from its config: model, Lightning module, trainer.

Training (`mtlsparse.train`) and export (`mtlsparse.export`, which rebuilds a trained run's
model from `.hydra/config.yaml`) both build through here, so neither imports the other.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

from mtlsparse.config import build, check_task_count
from mtlsparse.errors import ConfigError
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.module import MultiTaskModule
from mtlsparse.rank_check import RankConsistencyCheck
from mtlsparse.run_dir import RunDir
from mtlsparse.trackers import build_callbacks, build_loggers, log_run_config

log = logging.getLogger("mtlsparse")
ECHOED_GROUPS = ("dataset", "model", "balancer", "method")


def group_choices(cfg: DictConfig) -> dict[str, str]:
    """Names of the chosen config-group options (e.g. method → 'group_lasso')."""
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    else:
        choices = OmegaConf.select(cfg, "hydra.runtime.choices", default={}) or {}
    return {g: str(choices.get(g)) for g in ECHOED_GROUPS}


def build_model(cfg: DictConfig, datamodule: L.LightningDataModule) -> MultiTaskModel:
    """The model, sized from the dataset's tasks and input shape (also rebuilt this way by export)."""
    return build(cfg, "model", tasks=datamodule.tasks, in_shape=datamodule.input_shape)


def build_run_model(cfg: DictConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """The run's (dense) model, built exactly as training builds it, and its input shape (no data is loaded)."""
    datamodule = build(cfg, "dataset")
    return build_model(cfg, datamodule), tuple(datamodule.input_shape)


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> MultiTaskModule:
    """Instantiate model, balancer and sparsity method around the dataset's tasks."""
    tasks = list(datamodule.tasks)
    check_task_count(cfg, tasks)
    model = build_model(cfg, datamodule)
    model.set_budget(cfg.trainer.max_epochs)  # architecture schedules (LTB's search phase), checked before data
    balancer = build(cfg, "balancer", tasks=tasks)
    method = build(cfg, "method")
    method.set_budget(cfg.trainer.max_epochs)  # fractions of the run → epochs; unreachable epochs fail here
    optimizer = build(cfg, "optimizer")
    scheduler = build(cfg, "scheduler") if cfg.get("scheduler") else None
    probe_optimizer(cfg, optimizer, scheduler)
    module = MultiTaskModule(model, balancer, method, optimizer, scheduler, min_sparsity=cfg.min_sparsity,
                             reference=getattr(datamodule, "reference", None), memory_format=cfg.memory_format)
    if cfg.k0 != 0 and method.penalty() is None:
        log.warning("k0=%s has no effect: method=%s has no sparsity objective for the balancer to weigh "
                    "(group_lasso, l1 and growl have one)", cfg.k0, group_choices(cfg)["method"])
    return module


def probe_optimizer(cfg: DictConfig, optimizer: Callable, scheduler: Callable | None) -> None:
    """Make the optimizer (and scheduler) once on a dummy parameter: torch checks lr, betas, ...

    only when one is made, which would otherwise be at the first training step, after the data.
    """
    group = "optimizer"
    try:
        made = optimizer([torch.nn.Parameter(torch.zeros(1))])
        group = "scheduler"
        if scheduler is not None:
            scheduler(made)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad value in '{group}' ({cfg[group].get('_target_')}): {err}") from err


def build_trainer(cfg: DictConfig, run_dir: Path, log_version: str = "") -> tuple[L.Trainer, ModelCheckpoint]:
    """Lightning Trainer from `cfg.trainer`, with checkpointing, the chosen loggers and callbacks, a rich progress bar.

    CSV logs go to `logs/metrics.csv` whatever `logger` chooses; a resumed run logs to
    `logs/<log_version>/` (TensorBoard to `tensorboard/<log_version>/`) so the interrupted
    attempt's log is kept. The `logger` / `callbacks` groups' options come first, then the
    user's own `trainer.logger` / `trainer.callbacks` nodes; every logger gets the run's
    config as hyperparameters.
    """
    checkpoints = RunDir(run_dir).checkpoint_dir
    checkpoint = ModelCheckpoint(dirpath=checkpoints, monitor="val/select", mode="max",
                                 save_top_k=1, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)
    # every epoch end, whatever the score (save_last only fires together with a top-k save): what resume reads
    latest = ModelCheckpoint(dirpath=checkpoints, save_top_k=1, filename="last", enable_version_counter=False)
    callbacks: list[L.Callback] = [checkpoint, latest, RankConsistencyCheck(), *build_callbacks(cfg)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar(leave=False))
    loggers = build_loggers(cfg, run_dir, log_version)  # CSV first, always
    extra = {key: [instantiate(node) for node in _as_list(cfg.trainer.get(key))] for key in ("callbacks", "logger")}
    trainer_cfg = OmegaConf.masked_copy(cfg, ["trainer"])
    with open_dict(trainer_cfg):
        trainer_cfg.trainer.pop("callbacks", None)
        trainer_cfg.trainer.pop("logger", None)
    trainer = build(trainer_cfg, "trainer", callbacks=callbacks + extra["callbacks"], default_root_dir=str(run_dir),
                    logger=loggers + extra["logger"])
    log_run_config(trainer.loggers, cfg)
    return trainer, checkpoint


def _as_list(value: Any) -> list:
    """A config node or list of nodes (the user's trainer.callbacks / trainer.logger) as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, ListConfig)) else [value]
