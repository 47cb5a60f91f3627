"""Config checks that fail at start with a message naming the key and the allowed values.

Hydra already rejects unknown override keys and unknown group options. This module
checks the top-level knobs and turns instantiation errors (unknown constructor key,
out-of-range value) into one-line `ConfigError`s instead of a traceback wall.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtlsparse.conf_dir import CONF_DIR, normalise_overrides
from mtlsparse.errors import ConfigError
from mtlsparse.memory_format import check_memory_format

__all__ = ["CONF_DIR", "ConfigError", "build", "compose_config"]
log = logging.getLogger("mtlsparse")


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, as `python -m mtlsparse` would (for tests, bench)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=normalise_overrides(list(overrides)), return_hydra_config=True)


def _number(cfg: DictConfig, key: str) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def apply_preference(cfg: DictConfig) -> None:
    """Expand `pref=[k0,k1,..,km]` (one sweep value per preference vector) into k0 and k."""
    pref = cfg.get("pref")
    if pref is None:
        return
    if not isinstance(pref, (list, ListConfig)) or len(pref) < 2:
        raise ConfigError(f"pref must be a list [k0, k1, ..., km] with one weight per task after k0, got {pref!r}")
    cfg.k0 = float(pref[0])
    cfg.k = [float(v) for v in pref[1:]]


def validate_knobs(cfg: DictConfig) -> None:
    """Check the top-level knobs before anything is built."""
    check_root_keys(cfg)
    if _number(cfg, "lam") < 0:
        raise ConfigError(f"lam must be >= 0 (regularisation strength λ), got {cfg.lam}")
    if _number(cfg, "k0") < 0:
        raise ConfigError(f"k0 must be >= 0 (preference weight of the sparsity objective), got {cfg.k0}")
    sparsity = _number(cfg, "sparsity")
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1) (fraction of prunable weights set to zero), got {sparsity}")
    k = cfg.get("k")
    if k is not None:
        if not isinstance(k, (list, ListConfig)):
            raise ConfigError(f"k must be a list with one weight per task, e.g. k=[0.5,0.5], got {k!r}")
        if any(not isinstance(v, (int, float)) or v < 0 for v in k):
            raise ConfigError(f"k must hold non-negative numbers, got {list(k)}")
    if cfg.get("test_ckpt") not in ("best", "last"):
        raise ConfigError(f"test_ckpt must be one of ['best', 'last'], got {cfg.get('test_ckpt')!r}")
    if not 0 <= _number(cfg, "min_sparsity") <= 100:
        raise ConfigError(f"min_sparsity must be a percentage in [0, 100], got {cfg.min_sparsity}")
    try:
        check_memory_format(cfg.get("memory_format"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_budget(cfg)
    check_trainer_extras(cfg)
    warn_iteration_mismatch(cfg)
    objective = cfg.get("objective", "val/select")
    names = [objective] if isinstance(objective, str) else objective
    if not isinstance(names, (list, ListConfig)) or not names or any(
            not isinstance(n, str) or not n.startswith("val/") for n in names):
        raise ConfigError(f"objective must name validation metrics (val/...), one or a list, e.g. objective=val/select "
                          f"or objective=[val/left/loss,val/right/loss]; got {_plain(objective)!r}")


def warn_iteration_mismatch(cfg: DictConfig) -> None:
    """GrOWL's outer iterations and the Chebyshev balancer's multiplier updates should last the same epochs."""
    method_p = OmegaConf.select(cfg, "method.epochs_per_iteration", default=None)
    balancer_p = OmegaConf.select(cfg, "balancer.epochs_per_iteration", default=None)
    if method_p is not None and balancer_p is not None and method_p != balancer_p:
        log.warning("method.epochs_per_iteration=%s but balancer.epochs_per_iteration=%s: the method's outer "
                    "iterations and the balancer's multiplier updates fall on different epochs (set one; the "
                    "method follows the balancer by default)", method_p, balancer_p)


def _plain(value: Any) -> Any:
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def check_budget(cfg: DictConfig) -> None:
    """trainer.max_epochs is a whole number of epochs >= 1: the schedules and the tested model need one."""
    epochs = cfg.trainer.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1 (the run's epoch budget), got {epochs!r}")


#: Trainer arguments the run code sets itself, and where the user's wishes go instead
RUN_OWNED_TRAINER_KEYS = {
    "default_root_dir": "the run dir is hydra.run.dir (hydra.sweep.dir for sweeps)",
    "enable_checkpointing": "checkpoints are always kept (resume and test_ckpt read them)",
}


def check_trainer_extras(cfg: DictConfig) -> None:
    """`trainer.logger` / `trainer.callbacks` are added to the built-in ones, so they must be _target_ nodes."""
    for key, what in (("logger", "logger"), ("callbacks", "callback")):
        value = cfg.trainer.get(key)
        if value is None:
            continue
        nodes = list(value) if isinstance(value, (list, ListConfig)) else [value]
        if not all(isinstance(n, DictConfig) and "_target_" in n for n in nodes):
            raise ConfigError(
                f"trainer.{key}={_plain(value)!r} is not "
                f"usable: give a {what} as a _target_ node (or a list of them), e.g. +trainer.{key}="
                + ("'{_target_:lightning.pytorch.loggers.TensorBoardLogger,save_dir:tb}'" if key == "logger" else
                   "'[{_target_:lightning.pytorch.callbacks.LearningRateMonitor}]'")
                + (". The CSV logger is always on (mtlsparse report reads it)" if key == "logger" else
                   ". Checkpointing and the rank check are always on"))
    for key, where in RUN_OWNED_TRAINER_KEYS.items():
        if cfg.trainer.get(key) is not None:
            raise ConfigError(f"trainer.{key} is set by mtlsparse itself: {where}; drop trainer.{key}")


#: top-level knobs that only act through a group node interpolating them (e.g. `lam: ${lam}`)
INTERPOLATED_KNOBS = {"lam": 0.0, "sparsity": 0.0}


def warn_unused_knobs(cfg: DictConfig, method: str) -> list[str]:
    """Warn once, by name, for each top-level knob that is set but read by no chosen group option."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    groups = {k: v for k, v in raw.items() if isinstance(v, dict) and k != "hydra"}
    text = repr(groups)
    unused = [knob for knob, default in INTERPOLATED_KNOBS.items()
              if cfg.get(knob) != default and "${" + knob + "}" not in text]
    for knob in unused:
        log.warning("%s=%s has no effect: method=%s does not read it (its keys: %s)", knob, cfg.get(knob), method,
                    ", ".join(sorted(k for k in (groups.get("method") or {}) if k != "_target_")) or "none")
    return unused


def root_keys() -> list[str]:
    """Top-level keys of the config: conf/config.yaml's knobs and its config groups."""
    primary = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    groups = [next(iter(entry)) for entry in primary.defaults if not isinstance(entry, str)]
    return [key for key in [*primary.keys(), *groups] if key not in ("defaults", "hydra")]


def check_root_keys(cfg: DictConfig) -> None:
    """The root config is strict: a top-level key that nothing reads (e.g. `+lr=0.1`) is an error."""
    allowed = set(root_keys()) | {"hydra", "sweep"}
    unknown = [key for key in cfg.keys() if key not in allowed]
    if unknown:
        hint = "; the learning rate is optimizer.lr" if "lr" in unknown else ""
        raise ConfigError(f"unknown top-level key(s) {unknown}: nothing reads them{hint}; "
                          f"the top-level keys are {sorted(allowed - {'hydra', 'sweep'})}")


def check_task_count(cfg: DictConfig, tasks: list[str]) -> None:
    """k must have one entry per task of the chosen dataset."""
    k = cfg.get("k")
    if k is not None and len(k) != len(tasks):
        raise ConfigError(f"k has {len(k)} entries but dataset '{cfg.dataset._target_.rsplit('.', 1)[-1]}' has "
                          f"{len(tasks)} tasks {tasks}: pass one weight per task, e.g. "
                          f"k=[{','.join(['0.5'] * len(tasks))}] (or pref=[k0,...] with {len(tasks) + 1} entries)")


def _slurm_int(environ: dict[str, str], key: str) -> int | None:
    match = re.match(r"\d+", environ.get(key, ""))  # SLURM_NTASKS_PER_NODE may read "2(x3)"
    return int(match.group()) if match else None


def check_slurm_tasks(cfg: DictConfig, environ: dict[str, str] | None = None) -> None:
    """Inside a SLURM job with several tasks, each task must be one rank of one Lightning run.

    `hydra.launcher.tasks_per_node=N` (`nodes=M`) makes srun start N·M processes of the job and
    Lightning's SLURMEnvironment joins them into one DDP run only if `trainer.devices=N`
    (`trainer.num_nodes=M`). Lightning checks that for DDP but not for a one-device trainer,
    where N processes would silently train the same run N times into one dir; and without srun
    (`use_srun=false`) only one rank starts and DDP waits for the others until the time limit.
    Both fail here, at job start, with the fix.
    """
    env = os.environ if environ is None else environ
    ntasks = _slurm_int(env, "SLURM_NTASKS") or 1
    if ntasks == 1 or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # Lightning ignores SLURM then
        return
    devices, num_nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    n_devices = len(devices) if isinstance(devices, (list, ListConfig)) else devices
    known = isinstance(n_devices, int) and n_devices > 0  # not "auto" / -1
    if "SLURM_STEP_ID" not in env:  # the batch script itself: one process, whatever the task count
        if (known and n_devices > 1) or num_nodes > 1:
            raise ConfigError(f"trainer.devices={devices}, trainer.num_nodes={num_nodes} need one SLURM task per "
                              f"device started by srun, but this job ({ntasks} tasks) runs without srun: "
                              "set hydra.launcher.use_srun=true")
        return
    per_node = _slurm_int(env, "SLURM_NTASKS_PER_NODE") or ntasks
    if known and n_devices != per_node:
        raise ConfigError(f"SLURM started {per_node} tasks per node (hydra.launcher.tasks_per_node) but "
                          f"trainer.devices={devices}, so every task would train its own copy of this run: set "
                          f"trainer=ddp trainer.devices={per_node}, or hydra.launcher.tasks_per_node={n_devices}")
    nodes = _slurm_int(env, "SLURM_NNODES")
    if nodes is not None and num_nodes != nodes:
        raise ConfigError(f"SLURM gave this job {nodes} nodes (hydra.launcher.nodes) but "
                          f"trainer.num_nodes={num_nodes}: set trainer.num_nodes={nodes}, "
                          f"or hydra.launcher.nodes={num_nodes}")


def allowed_keys(target: str) -> list[str]:
    """Constructor keyword arguments of a `_target_` class or function."""
    params = inspect.signature(get_object(target)).parameters
    return [p for p in params if p not in ("self", "args", "kwargs")]


def _kind(default: Any) -> tuple[type, ...] | None:
    """The value types a constructor default admits (None: no check)."""
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, (int, float)):
        return (int, float)
    return None


def check_value_types(node: DictConfig, group: str, target: str) -> None:
    """A value whose type differs from its constructor default's (e.g. optimizer.lr=abc) names its key."""
    try:
        params = inspect.signature(get_object(target)).parameters
    except (ImportError, ValueError, TypeError, AttributeError):
        return  # instantiate reports an unknown _target_ itself
    for key, param in params.items():
        if key not in node or param.default is inspect.Parameter.empty:
            continue
        kinds = _kind(param.default)
        value = OmegaConf.select(node, key, throw_on_missing=False)
        if kinds is None or value is None:
            continue
        if isinstance(value, bool) and kinds != (bool,) or not isinstance(value, kinds):
            wanted = "true or false" if kinds == (bool,) else f"a number (default {param.default!r})"
            raise ConfigError(f"{group}.{key} must be {wanted}, got {value!r}")


#: constructor keys that moved to another config node: old name → where it lives now
RENAMED_KEYS = {"include_heads": "scope.heads (top level: scope.heads=true)",
                "include_input_layers": "scope.input_layers (top level: scope.input_layers=true)"}


def build(cfg: DictConfig, group: str, **runtime: Any) -> Any:
    """Instantiate `cfg[group]`, then call it with runtime objects (tasks, callbacks, ...).

    Runtime objects are passed to the constructed partial rather than to `instantiate`
    so Hydra does not turn them into configs. Bad keys/values become a `ConfigError`
    that names the group, the key and the allowed keys.
    """
    node = cfg[group]
    target = OmegaConf.select(node, "_target_", default="?")
    check_value_types(node, group, target)
    try:
        factory = instantiate(node, _partial_=True)
        return factory(**runtime) if not node.get("_partial_", False) else factory
    except InstantiationException as err:
        cause = err.__cause__ or err
    except (TypeError, ValueError) as err:
        if isinstance(err, TypeError) and "unexpected keyword argument" not in str(err):
            raise
        cause = err
    except Exception as err:
        if type(err).__name__ != "MisconfigurationException":  # Lightning's word for a bad Trainer argument
            raise
        cause = err
    if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
        bad = str(cause).rsplit("argument", 1)[-1].strip(" '\"")
        allowed = [k for k in allowed_keys(target) if k not in runtime]
        moved = f"; it is now {RENAMED_KEYS[bad]}" if bad in RENAMED_KEYS else ""
        raise ConfigError(f"unknown key '{group}.{bad}' for {target}{moved}; allowed keys: {allowed}")
    raise ConfigError(f"bad value in '{group}' ({target}): {cause}")
