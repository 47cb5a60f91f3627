"""Resumable runs and sweeps: what to do with a run dir that already holds work.

Each run dir records the config that produced it (`job.json`: fingerprint and the semantic
config). When a command runs in a dir that already holds something (a re-run sweep, a
requeued SLURM job, an explicit `resume=true`), the decision is made before anything is
written there:

- a complete `metrics.json` of the same config → skip the job, keep its results;
- `checkpoints/last.ckpt` of the same config, no metrics → resume training from it;
- a checkpoint or metrics.json of a *different* config → refuse, listing the keys that
  differ (old → new); the finished or interrupted run is left byte for byte as it was;
- neither a checkpoint nor a metrics.json (an attempt that died before its first epoch
  ended) → free for any config: that attempt's files move to `attempts/N/`;
- nothing yet → train from scratch.

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
from mtlsparse.run_dir import RunDir

#: config keys that do not change results (where data lives, how progress is shown and recorded, how to resume):
#: the trackers (`logger` group, `trainer.logger`) and the callbacks that only report; early_stopping does change
#: results, so it stays part of the run's identity
NON_SEMANTIC_KEYS = ("resume", "ckpt_path", "data_root", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                     "dataset.root", "dataset.num_workers", "export", "objective", "logger", "trainer.logger",
                     "callbacks.lr_monitor", "callbacks.model_summary", "callbacks.early_stopping.verbose")
RESUME_MODES = ("auto", "true", "false")
MAX_LISTED_DIFFERENCES = 8


def semantic_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's node and the keys that do not change results."""
    container = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                 for key, value in cfg.items() if key != "hydra"}
    for dotted in NON_SEMANTIC_KEYS:
        *parents, leaf = dotted.split(".")
        chain: list[Any] = [container]
        for key in parents:
            chain.append(chain[-1].get(key) if isinstance(chain[-1], dict) else None)
        if not isinstance(chain[-1], dict) or leaf not in chain[-1]:
            continue
        chain[-1].pop(leaf)
        # a node the pops left empty (callbacks=[lr_monitor]) is the same run as no node (no callbacks)
        for key, node, parent in reversed(list(zip(parents, chain[1:], chain[:-1]))):
            if node:
                break
            parent.pop(key)
    return container


def _fingerprint(container: dict[str, Any]) -> str:
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_fingerprint(cfg: DictConfig) -> str:
    """Short stable hash of the resolved config, ignoring keys that do not change results."""
    return _fingerprint(semantic_config(cfg))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old → new' for every leaf that differs ('(unset)' where a side lacks it)."""
    before, after = _flatten(old), _flatten(new)
    missing = "(unset)"

    def show(value: Any) -> str:
        return json.dumps(value, default=str)
    return [f"{key}: {show(before.get(key, missing))} → {show(after.get(key, missing))}"
            for key in sorted(before.keys() | after.keys()) if before.get(key, missing) != after.get(key, missing)]


@dataclass(frozen=True)
class Plan:
    """What `run` does in this run dir: 'skip', 'resume' (from `ckpt`) or 'fresh'."""

    action: str
    ckpt: Path | None = None
    metrics: dict[str, Any] | None = None
    archived: Path | None = None  # where a dead attempt's files went, when it left some


def _resume_mode(cfg: DictConfig) -> str:
    mode = str(cfg.get("resume", "auto")).lower()
    if mode not in RESUME_MODES:
        raise ConfigError(f"resume={cfg.get('resume')!r} is not valid; use one of {RESUME_MODES}")
    return mode


def complete_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run dir's metrics.json if it is a finished run's (parsable, with test results), else None."""
    try:
        metrics = json.loads(RunDir(run_dir).metrics_file.read_text())
    except (OSError, ValueError):
        return None
    return metrics if any(k.startswith("test/") for k in metrics) else None


def _recorded(job_file: Path) -> tuple[str | None, dict[str, Any] | None]:
    try:
        job = json.loads(job_file.read_text())
    except (OSError, ValueError):
        return None, None
    return job.get("config_fingerprint"), job.get("config")


def _refusal(run_dir: Path, recorded_config: dict[str, Any] | None, cfg: DictConfig) -> ConfigError:
    if recorded_config is None:
        changes = "(its job.json does not record the config, so the differing keys are unknown)"
    else:
        diffs = config_differences(recorded_config, semantic_config(cfg))
        more = f"; and {len(diffs) - MAX_LISTED_DIFFERENCES} more" if len(diffs) > MAX_LISTED_DIFFERENCES else ""
        changes = "differing keys: " + "; ".join(diffs[:MAX_LISTED_DIFFERENCES]) + more
    return ConfigError(f"{run_dir} holds a run of a different config, kept unchanged ({changes}). Run in a new "
                       f"directory (hydra.run.dir=... or hydra.sweep.dir=...), or delete that one if its results are "
                       f"no longer wanted")


def plan_run(cfg: DictConfig, run_dir: Path) -> Plan:
    """Decide skip / resume / fresh for `run_dir`, refusing to mix configs. Writes nothing."""
    mode = _resume_mode(cfg)
    layout = RunDir(run_dir)
    explicit = cfg.get("ckpt_path")
    if explicit:
        path = Path(str(explicit))
        if not path.is_file():
            raise ConfigError(f"ckpt_path={explicit} does not exist; pass the path of a checkpoint "
                              f"(e.g. <run_dir>/checkpoints/last.ckpt) or drop ckpt_path")
        return Plan("resume", ckpt=path)
    holds_results = layout.holds_results()
    if mode == "false":
        if holds_results:
            finished = layout.metrics_file.exists()
            what = "a finished run (metrics.json)" if finished else "an unfinished run (checkpoints)"
            raise ConfigError(f"resume=false but {run_dir} holds {what}; it is kept. "
                              f"Run in a new directory (hydra.run.dir=...), or delete that one first")
        return Plan("fresh")
    if not holds_results:
        if mode == "true":
            raise ConfigError(f"resume=true but {run_dir} holds no run to resume; point hydra.run.dir at the "
                              f"run dir of the interrupted run, or pass ckpt_path=<file>")
        return Plan("fresh")
    recorded, recorded_config = _recorded(layout.job_file)
    if recorded != config_fingerprint(cfg):
        raise _refusal(run_dir, recorded_config, cfg)
    metrics = complete_metrics(run_dir)
    if metrics is not None:
        return Plan("skip", metrics=metrics)
    if layout.last_checkpoint.exists():
        return Plan("resume", ckpt=layout.last_checkpoint)
    raise ConfigError(f"{run_dir} holds checkpoints of this config but no checkpoints/last.ckpt to resume from and "
                      f"no finished metrics.json; resume from one of them with ckpt_path=<file>, or delete the dir")


def record_job(cfg: DictConfig, run_dir: Path) -> None:
    """Write job.json (config fingerprint and semantic config) so later invocations can recognise this run."""
    config = semantic_config(cfg)
    write_json(RunDir(run_dir).job_file, {"config_fingerprint": _fingerprint(config), "config": config})
