"""Resumable runs and sweeps: what to do with a run dir that already holds work.

Each run dir records the fingerprint of the config that produced it (`job.json`). When
the same command runs again in that dir (a re-run sweep, a requeued SLURM job, or an
explicit `resume=true`):

- a complete `metrics.json` for the same config → skip the job, keep its results;
- `checkpoints/last.ckpt` for the same config, no metrics → resume training from it;
- nothing yet → train from scratch;
- work of a *different* config → refuse (never overwrite finished results).

Checkpoints are written at epoch ends, so a run killed mid-epoch redoes that epoch;
the RNG streams saved with the checkpoint make the redone epoch identical.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtlsparse.errors import ConfigError
from mtlsparse.io import write_json

#: config keys that do not change results (where data lives, how progress is shown, how to resume)
NON_SEMANTIC_KEYS = ("resume", "ckpt_path", "data_root", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                     "dataset.root", "dataset.num_workers", "export")
RESUME_MODES = ("auto", "true", "false")
JOB_FILE = "job.json"


def config_fingerprint(cfg: DictConfig) -> str:
    """Short stable hash of the resolved config, ignoring keys that do not change results."""
    container = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                 for key, value in cfg.items() if key != "hydra"}
    for dotted in NON_SEMANTIC_KEYS:
        *parents, leaf = dotted.split(".")
        node: Any = container
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    """What `run` does in this run dir: 'skip', 'resume' (from `ckpt`) or 'fresh'."""

    action: str
    ckpt: Path | None = None
    metrics: dict[str, Any] | None = None


def _resume_mode(cfg: DictConfig) -> str:
    mode = str(cfg.get("resume", "auto")).lower()
    if mode not in RESUME_MODES:
        raise ConfigError(f"resume={cfg.get('resume')!r} is not valid; use one of {RESUME_MODES}")
    return mode


def complete_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run dir's metrics.json if it is a finished run's (parsable, with test results), else None."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if any(k.startswith("test/") for k in metrics) else None


def plan_run(cfg: DictConfig, run_dir: Path) -> Plan:
    """Decide skip / resume / fresh for `run_dir`, refusing to mix configs."""
    mode = _resume_mode(cfg)
    explicit = cfg.get("ckpt_path")
    if explicit:
        path = Path(str(explicit))
        if not path.is_file():
            raise ConfigError(f"ckpt_path={explicit} does not exist; pass the path of a checkpoint "
                              f"(e.g. <run_dir>/checkpoints/last.ckpt) or drop ckpt_path")
        return Plan("resume", ckpt=path)
    if mode == "false":
        if complete_metrics(run_dir) is not None:
            raise ConfigError(f"resume=false but {run_dir} holds a finished run (metrics.json); it is kept. "
                              f"Run in a new directory (hydra.run.dir=...), or delete that one first")
        return Plan("fresh")
    fingerprint = config_fingerprint(cfg)
    job_file = run_dir / JOB_FILE
    last = run_dir / "checkpoints" / "last.ckpt"
    if job_file.exists():
        recorded = json.loads(job_file.read_text()).get("config_fingerprint")
        if recorded != fingerprint:
            raise ConfigError(
                f"{run_dir} already holds a run of a different config (fingerprint {recorded}, this config "
                f"{fingerprint}); it is kept. Run in a new directory (hydra.run.dir=... or hydra.sweep.dir=...), "
                f"or delete that one if its results are no longer wanted")
        metrics = complete_metrics(run_dir)
        if metrics is not None:
            return Plan("skip", metrics=metrics)
        if last.exists():
            return Plan("resume", ckpt=last)
    elif mode == "true":
        raise ConfigError(f"resume=true but {run_dir} holds no run to resume; point hydra.run.dir at the "
                          f"run dir of the interrupted run, or pass ckpt_path=<file>")
    return Plan("fresh")


def record_job(cfg: DictConfig, run_dir: Path) -> None:
    """Write job.json (config fingerprint) so later invocations can recognise this run."""
    write_json(run_dir / JOB_FILE, {"config_fingerprint": config_fingerprint(cfg)})
