"""`run(cfg, run_dir)`: compose → instantiate → fit → test → metrics.json.

Used by `python -m mtlsparse` and by the tests (which compose configs with Hydra's
compose API and call `run` directly).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# ECHOED_GROUPS and build_model are imported from here by tests and user code
from mtlsparse.allocator import keep_freed_memory
from mtlsparse.builders import ECHOED_GROUPS, build_model, build_module, build_trainer, group_choices  # noqa: F401
from mtlsparse.config import apply_preference, build, validate_knobs, warn_unused_knobs
from mtlsparse.errors import ConfigError, DataError, MissingDataError
from mtlsparse.export import export_after_training, export_settings
from mtlsparse.io import environment, write_json
from mtlsparse.metrics.sparsity import matrix_weights, param_counts, row_metrics
from mtlsparse.module import MultiTaskModule
from mtlsparse.resume import plan_run, record_job
from mtlsparse.run_dir import RunDir, detach_file_logs
from mtlsparse.sparsity.layer_report import write_layer_report
from mtlsparse.sparsity.mask_analysis import write_mask_report
from mtlsparse.trackers import check_trackers, log_final_metrics

log = logging.getLogger("mtlsparse")
ECHOED_KNOBS = ("k0", "k", "lam", "sparsity", "seed", "memory_format")


def route_lightning_logs_through_hydra() -> None:
    """Lightning installs its own stderr handlers; drop them so each message prints once, via Hydra's logging."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def final_metrics(cfg: DictConfig, module: MultiTaskModule, test_results: dict[str, float],
                  train_s: float) -> dict[str, Any]:
    """Flat metrics.json content: val/test metrics, sparsity, parameter counts, timings and the echoed config."""
    metrics: dict[str, Any] = {k: float(v) for k, v in test_results.items()}
    metrics.update(module.sparsity_summary())
    metrics.update(module.method.report())  # method-specific: GrOWL tying per layer
    metrics.update({f"sparsity/{k}": v for k, v in row_metrics(matrix_weights(module.model)).items()})
    metrics.update({f"params/{k}": v for k, v in param_counts(module.model).items()})
    metrics["time/train_s"] = train_s
    # every DDP rank sees its own share of each global batch
    metrics["time/train_samples_per_s"] = module.samples_seen * module.trainer.world_size / max(module.train_seconds,
                                                                                                1e-9)
    for knob in ECHOED_KNOBS:
        value = cfg.get(knob)
        metrics[f"config/{knob}"] = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    metrics.update({f"config/{g}": name for g, name in group_choices(cfg).items()})
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """One line with the numbers a researcher looks at first."""
    keys = sorted(k for k in metrics if k.startswith("test/") and not k.endswith("/loss"))
    keys += ["sparsity/param", "sparsity/group", "sparsity/sr", "time/train_s"]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train and test one configuration; write `<run_dir>/metrics.json` and return the metrics.

    What to do with the run dir (skip / resume / refuse / start) is decided before anything
    is written into it; until training really starts, a dir that holds results gets no log
    line either, so a refused or skipped re-run leaves it byte for byte as it was.
    """
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    route_lightning_logs_through_hydra()
    rank_zero = rank_zero_only.rank == 0
    try:
        apply_preference(cfg)
        plan = plan_run(cfg, run_dir)
    except Exception:
        if layout.holds_results():
            detach_file_logs(run_dir)
        raise
    if plan.action == "skip":
        detach_file_logs(run_dir)
        log.info("%s already holds a finished run of this config: skipped (%s)", run_dir, summary_line(plan.metrics))
        return plan.metrics
    if rank_zero and plan.action == "fresh":
        archived = layout.archive_attempt()
        if archived is not None:
            log.info("%s: an earlier attempt died before its first checkpoint; its files are in %s",
                     run_dir, archived)
    if rank_zero:
        layout.write_config_record(cfg, HydraConfig.get() if HydraConfig.initialized() else None)
    validate_knobs(cfg)
    check_trackers(cfg)  # logger / callbacks options, and the extra a chosen tracker needs
    try:
        export_settings(cfg)  # a bad export node fails now, not after training
    except ValueError as err:
        raise ConfigError(str(err)) from None
    warn_unused_knobs(cfg, group_choices(cfg)["method"])
    keep_freed_memory()  # no page faults for the activations every step re-allocates (allocator.py)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    log_version = "" if plan.ckpt is None else f"resumed-{len(list(run_dir.glob('logs/resumed-*'))) + 1}"
    trainer, checkpoint = build_trainer(cfg, run_dir, log_version)
    if trainer.is_global_zero:
        write_json(layout.environment_file, environment())
        record_job(cfg, run_dir)
    if plan.ckpt is not None:
        log.info("resuming from %s", plan.ckpt)

    start = time.perf_counter()
    with user_errors():
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(plan.ckpt) if plan.ckpt else None)
    train_s = time.perf_counter() - start
    ckpt = checkpoint.best_model_path if cfg.test_ckpt == "best" and checkpoint.best_model_path else None
    if ckpt:  # load here (not via trainer.test) so the sparsity metrics read the tested weights
        module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    # the tested weights' validation metrics: what sweeps optimise (never the test set)
    val_results = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    test_results = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    metrics = final_metrics(cfg, module, {**val_results, **test_results}, train_s)
    metrics["checkpoint/tested"] = Path(ckpt).name if ckpt else "last"
    if trainer.is_global_zero:
        write_mask_report(module.method, run_dir)  # per-layer IoU of task masks, for methods that keep them
        write_layer_report(module.method, run_dir)  # per-layer group/param sparsity, for structured methods
        metrics.update(export_after_training(cfg, module.model, module.method.structured,
                                             datamodule.input_shape, run_dir))  # compact model + latency
        write_json(layout.metrics_file, metrics)
        log.info("%s → %s", summary_line(metrics), layout.metrics_file)
        log_final_metrics(trainer, cfg, metrics)  # metrics.json's numbers to every tracker as final/<key>
    return metrics


@contextmanager
def user_errors():
    """Lightning's and the data's own complaints during fit, as one-line ConfigError / DataError."""
    try:
        yield
    except MisconfigurationException as err:
        raise ConfigError(f"trainer: {err}") from err
    except DataError:
        raise
    except FileNotFoundError as err:  # a data module's own missing-file error
        raise MissingDataError(str(err)) from err


def objective_values(cfg: DictConfig, metrics: dict[str, Any]) -> float | list[float] | None:
    """The sweep objective(s) `cfg.objective` names, read from this run's validation metrics."""
    names = cfg.get("objective", "val/select")
    names = [names] if isinstance(names, str) else list(names)
    values = [metrics.get(name) for name in names]
    values = [None if v is None else float(v) for v in values]
    return values[0] if len(values) == 1 else values
