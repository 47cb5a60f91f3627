"""Experiment trackers and optional callbacks: the `logger` and `callbacks` config groups.

Each option of `conf/logger/` (csv, tensorboard, wandb, mlflow) and `conf/callbacks/`
(early_stopping, lr_monitor, model_summary) puts one `_target_` node under its own key,
`logger.<option>` / `callbacks.<option>`, so several can be chosen at once
(`logger=[csv,tensorboard]`, `callbacks=[early_stopping,lr_monitor]`). The CSV logger is
always on, chosen or not: `logs/metrics.csv` is the run dir's per-epoch record.

Where each tracker writes is set here from the run dir, never from the yaml, so every
tracker stays inside the run dir and needs no network: TensorBoard `tensorboard/`, wandb
`wandb/` (offline), MLflow a local SQLite store `mlflow/mlflow.db` (artifacts in
`mlflow/artifacts/`). Every tracker gets the run's composed config as hyperparameters when
training starts (`log_run_config`), the per-epoch metrics through Lightning's `self.log`, and
at the end the numbers of `metrics.json` as `final/<key>` (`log_final_metrics`).
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtlsparse.conf_dir import CONF_DIR
from mtlsparse.errors import ConfigError
from mtlsparse.run_dir import MLFLOW_DIR

log = logging.getLogger("mtlsparse")

#: the group of each kind of part, and where a class of the user's own goes instead
GROUPS = {"logger": "trainer.logger", "callbacks": "trainer.callbacks"}
#: logger option → (packages its Lightning class can run on, the extra that installs them)
LOGGER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "trackers"),
                   "wandb": (("wandb",), "trackers"),
                   "mlflow": (("mlflow",), "trackers")}
#: logger option → constructor keys mtlsparse sets from the run dir (and why)
RUN_OWNED_LOGGER_KEYS = {
    "csv": {"save_dir": "the run dir", "name": "always logs/", "version": "'' or resumed-N for a resumed run"},
    "tensorboard": {"save_dir": "the run dir", "version": "'' or resumed-N for a resumed run"},
    "wandb": {"save_dir": "the run dir", "dir": "the run dir"},
    "mlflow": {"save_dir": "the run dir (set logger.mlflow.tracking_uri for a server)"},
}
CSV = "csv"
FINAL_PREFIX = "final/"


def group_options(group: str) -> list[str]:
    """The options of a config group: the yaml files of `conf/<group>/`."""
    return sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml"))


def chosen(cfg: DictConfig, group: str) -> dict[str, DictConfig]:
    """The chosen options of `group` (empty when none, e.g. `callbacks=[]`), by option name."""
    node = cfg.get(group)
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{group}={OmegaConf.to_object(node) if OmegaConf.is_config(node) else node!r} is not "
                          f"usable: choose options of the group, e.g. {group}=[{','.join(group_options(group)[:2])}]")
    return {str(name): value for name, value in node.items()}


def missing_tracker_extra(cfg: DictConfig) -> str | None:
    """The one line for a chosen logger whose package (an optional extra) is not installed, else None."""
    from importlib.util import find_spec

    for name in chosen(cfg, "logger"):
        packages, extra = LOGGER_PACKAGES.get(name, ((), ""))
        if packages and all(find_spec(package) is None for package in packages):
            return f"logger={name} needs the '{extra}' extra: pip install \"mtlsparse[{extra}]\""
    return None


def check_trackers(cfg: DictConfig) -> None:
    """The chosen logger and callbacks options are the groups' own, set no run-owned key, and can be imported."""
    for group, own_class in GROUPS.items():
        options = group_options(group)
        for name, node in chosen(cfg, group).items():
            if name not in options:
                raise ConfigError(f"{group}.{name} is not an option of the '{group}' group ({', '.join(options)}); "
                                  f"choose with {group}=[...], or add a class of your own as "
                                  f"+{own_class}='{{_target_:...}}'")
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise ConfigError(f"{group}.{name} has no _target_: reset it with {group}=[{name}]")
    for name, node in chosen(cfg, "logger").items():
        for key, where in RUN_OWNED_LOGGER_KEYS.get(name, {}).items():
            if node.get(key) is not None:
                raise ConfigError(f"logger.{name}.{key} is set by mtlsparse itself: {where}; drop it")
    problem = missing_tracker_extra(cfg)
    if problem:
        raise ConfigError(problem)


def _build_option(cfg: DictConfig, group: str, option: str, /, **runtime: Any) -> Any:
    """Instantiate `cfg[group][option]` through `config.build`, so a bad key names `group.option.key`."""
    from mtlsparse.config import build

    key = f"{group}.{option}"
    return build(OmegaConf.create({key: cfg[group][option]}, parent=cfg), key, **runtime)


def _logger_runtime(name: str, node: DictConfig | None, run_dir: Path, version: str) -> dict[str, Any]:
    """Where each logger writes: inside the run dir (a resumed run's CSV/TensorBoard logs in `resumed-N/`)."""
    if name == CSV:
        return {"save_dir": str(run_dir), "name": "logs", "version": version}
    if name == "tensorboard":
        return {"save_dir": str(run_dir), "version": version}
    if name == "wandb":
        return {"save_dir": str(run_dir)}
    if name == "mlflow" and (node is None or node.get("tracking_uri") is None):
        # MLflow >= 3.17 refuses its file store (maintenance mode); a SQLite file is its local store now
        store = (run_dir / MLFLOW_DIR).resolve()
        store.mkdir(parents=True, exist_ok=True)
        runtime = {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}"}
        if node is None or node.get("artifact_location") is None:
            runtime["artifact_location"] = str(store / "artifacts")
        return runtime
    return {}


def _finish_stale_wandb_run() -> None:
    """An earlier run in this process (a sweep job) that failed leaves its wandb run open; wandb would reuse it."""
    import wandb

    if wandb.run is not None:
        log.warning("finishing the wandb run %s left open by an earlier run in this process", wandb.run.id)
        wandb.finish(exit_code=1)


def build_loggers(cfg: DictConfig, run_dir: Path, version: str = "") -> list:
    """The chosen loggers, the CSV logger first whether chosen or not."""
    from lightning.pytorch.loggers import CSVLogger

    options = chosen(cfg, "logger")
    if CSV in options:
        loggers = [_build_option(cfg, "logger", CSV, **_logger_runtime(CSV, options[CSV], run_dir, version))]
    else:
        loggers = [CSVLogger(**_logger_runtime(CSV, None, run_dir, version))]
        if options:
            log.info("logger=[%s]: the CSV logger stays on as well (logs/metrics.csv is the run dir's per-epoch "
                     "record)", ",".join(options))
    for name, node in options.items():
        if name == CSV:
            continue
        if name == "wandb":
            _finish_stale_wandb_run()
        loggers.append(_start(_build_option(cfg, "logger", name, **_logger_runtime(name, node, run_dir, version)),
                              name))
    log.info("loggers: %s", ", ".join(f"{type(lg).__name__} → {where(lg)}" for lg in loggers))
    return loggers


def _start(logger: Any, name: str) -> Any:
    """Start the tracker's run now: TensorBoard and wandb pass unknown keys on to SummaryWriter / wandb.init,
    which would otherwise reject them only once training has started."""
    try:
        _ = logger.experiment
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        bad = str(err).rsplit("argument", 1)[-1].strip(" '\"")
        raise ConfigError(f"unknown key 'logger.{name}.{bad}' for {type(logger).__name__}: {err}") from err
    return logger


def where(logger: Any) -> str:
    """Where a logger writes, for the log line."""
    tracking_uri = getattr(logger, "_tracking_uri", None)  # MLFlowLogger keeps no public attribute for it
    if tracking_uri:
        return str(tracking_uri)
    return str(getattr(logger, "log_dir", None) or logger.save_dir)


def build_callbacks(cfg: DictConfig) -> list:
    """The chosen optional callbacks (the checkpoint callbacks and the rank check are built in)."""
    callbacks = [_build_option(cfg, "callbacks", name) for name in chosen(cfg, "callbacks")]
    if callbacks:
        log.info("callbacks: %s", ", ".join(type(cb).__name__ for cb in callbacks))
    return callbacks


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config, resolved, without Hydra's node: what every tracker records as hyperparameters."""
    return {str(key): OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            for key, value in cfg.items() if key != "hydra"}


def log_run_config(loggers: list, cfg: DictConfig) -> None:
    """Hand the run's config to every logger as hyperparameters (each flattens it its own way)."""
    params = run_config(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)


def final_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json as `final/<key>` (the echoed config/* are already hyperparameters)."""
    return {f"{FINAL_PREFIX}{key}": float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("config/")}


def log_final_metrics(trainer: Any, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """After metrics.json is written: its numbers to every tracker at the last step, then close them.

    CSV loggers are left out (their file holds per-epoch rows; metrics.json is the final record).
    TensorBoard takes them together with the config (its HParams tab); wandb's run is finished,
    so its summary holds them and the next run of this process starts a run of its own.
    """
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    final = final_values(metrics)
    params = run_config(cfg)
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            continue
        if "metrics" in inspect.signature(logger.log_hyperparams).parameters:
            logger.log_hyperparams(params, metrics=final, step=trainer.global_step)
        else:
            logger.log_metrics(final, step=trainer.global_step)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
