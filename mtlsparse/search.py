"""Hydra callbacks for searched and parallel sweeps (the `search` extra: Optuna sweeper, joblib launcher).

- `CheckObjective` (conf/hydra/sweeper/optuna_*.yaml): before the sweeper is built, its
  `direction` must give one direction per name in the top-level `objective` (and each must point
  the right way for losses and `val/select`); a mismatch stops the command with one line and
  exit status 2, before any job ran.
- `ThreadsPerJob` (conf/hydra/launcher/joblib.yaml): in each job's process, before training,
  torch gets `max(1, cores // n_jobs)` threads, so N jobs running at once share the CPUs
  instead of each starting one thread per core.

Both run inside Hydra (its callback hooks), so `mtlsparse.train` needs no sweep-specific code.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtlsparse.errors import EXIT_CODES, ConfigError
from mtlsparse.run_dir import RunDir

log = logging.getLogger("mtlsparse")

#: sweepers whose `direction` is checked against `objective`
DIRECTED_SWEEPERS = ("hydra_plugins.hydra_optuna_sweeper.",)
DIRECTIONS = ("minimize", "maximize")


# ---------------------------------------------------------------- objective ↔ direction


def objective_names(cfg: DictConfig) -> list[str]:
    """The metric names of the top-level `objective` (one name or a list), as a list."""
    objective = cfg.get("objective", "val/select")
    if isinstance(objective, (list, ListConfig)):
        return [str(name) for name in objective]
    return [str(objective)]


def sweeper_directions(cfg: DictConfig) -> list[str] | None:
    """`hydra.sweeper.direction` as a list of 'minimize'/'maximize'; None when the sweeper has no direction."""
    target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "")
    if not target.startswith(DIRECTED_SWEEPERS):
        return None
    direction = OmegaConf.select(cfg, "hydra.sweeper.direction", default="minimize")
    values = list(direction) if isinstance(direction, (list, ListConfig)) else [direction]
    return [str(getattr(v, "name", v)) for v in values]  # the plugin's structured config holds enums


def expected_direction(name: str) -> str | None:
    """The only sensible direction of a metric we know: losses go down, `val/select` goes up."""
    if name.endswith("/loss"):
        return "minimize"
    if name == "val/select":
        return "maximize"
    return None


def check_objective(cfg: DictConfig) -> None:
    """The sweeper's direction(s) and `objective` agree: same count, allowed values, sensible senses.

    Raises ConfigError naming both keys. Sweepers without a direction (the basic one) pass.
    """
    directions = sweeper_directions(cfg)
    if directions is None:
        return
    names = objective_names(cfg)
    shown = f"[{','.join(names)}]" if len(names) > 1 else names[0]
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ConfigError(f"hydra.sweeper.direction must be minimize or maximize (or a list of them), got {bad}")
    if len(directions) != len(names):
        example = f"[{','.join(expected_direction(n) or 'minimize' for n in names)}]"
        raise ConfigError(
            f"hydra.sweeper.direction gives {len(directions)} direction(s) {directions} for the {len(names)} "
            f"objective(s) objective={shown}: give one per objective, e.g. hydra.sweeper.direction="
            f"{example if len(names) > 1 else expected_direction(names[0]) or 'minimize'}")
    for name, direction in zip(names, directions):
        wanted = expected_direction(name)
        if wanted is not None and direction != wanted:
            raise ConfigError(f"objective {name} is to {wanted}, but hydra.sweeper.direction says {direction} "
                              f"for it (directions {directions} for objective={shown})")
    batch = OmegaConf.select(cfg, "hydra.sweeper.n_jobs", default=1)
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs (trials asked per batch) must be an integer >= 1, got {batch!r}")


class CheckObjective(Callback):
    """`check_objective` once, before the sweeper and launcher are built.

    Hydra turns an exception raised in a callback into a warning and carries on, so a
    mismatch prints the command line's one-line error and exits here (SystemExit passes
    through Hydra), with the exit status of a config mistake.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_objective(config)
        except ConfigError as err:
            print(f"mtlsparse: error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_CODES[ConfigError]) from err


# ---------------------------------------------------------------- torch threads per parallel job


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cpusets), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def concurrent_jobs(n_jobs: int | None, cores: int) -> int:
    """How many jobs joblib runs at once for `n_jobs` (None: 1; -1: one per core; -2: all cores but one; ...)."""
    if n_jobs is None:
        return 1
    if n_jobs == 0:
        raise ConfigError("hydra.launcher.n_jobs=0 runs nothing: give the number of jobs to run at once, e.g. 2")
    return max(1, cores + 1 + n_jobs) if n_jobs < 0 else n_jobs


def threads_per_job(n_jobs: int | None, cores: int | None = None) -> int:
    """Torch threads of each of `n_jobs` jobs sharing `cores` CPUs: max(1, cores // n_jobs)."""
    cores = available_cores() if cores is None else int(cores)
    return max(1, cores // concurrent_jobs(n_jobs, cores))


def apply_threads(threads: int) -> int:
    """Give torch `threads` intra-op threads (and children the same OMP_NUM_THREADS); returns the old count."""
    import torch  # the job imports torch anyway; the callback's module stays light for Hydra

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return old


class ThreadsPerJob(Callback):
    """In each job's own process, set torch's thread count to `max(1, cores // hydra.launcher.n_jobs)`.

    `cores`: the CPUs the parallel jobs share (None: this process's affinity mask, e.g. all of a
    workstation, or what `taskset`/a Slurm allocation grants). `threads`: a fixed count per job
    instead of the rule. The job log records the choice in a fresh run dir (a finished run dir that
    a re-run skips stays byte for byte as it was).
    """

    def __init__(self, cores: int | None = None, threads: int | None = None) -> None:
        for key, value in (("cores", cores), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"hydra.callbacks.threads_per_job.{key} must be an integer >= 1 or null, "
                                  f"got {value!r}")
        self.cores = cores
        self.threads = threads

    def job_threads(self, config: DictConfig) -> tuple[int, str]:
        """(threads, how they were chosen) for one job of this sweep."""
        if self.threads is not None:
            return self.threads, "hydra.callbacks.threads_per_job.threads"
        cores = available_cores() if self.cores is None else self.cores
        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
        jobs = concurrent_jobs(n_jobs, cores)
        return max(1, cores // jobs), f"{cores} cores // {jobs} jobs at once"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        threads, why = self.job_threads(config)
        apply_threads(threads)
        output_dir = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if output_dir and not RunDir(Path(output_dir)).is_job():
            log.info("torch threads: %d (%s; pid %d)", threads, why, os.getpid())

