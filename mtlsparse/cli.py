"""The one command line: `mtlsparse ...` and `python -m mtlsparse ...` are this `main`.

- `mtlsparse [overrides]` trains one run, `mtlsparse -m [overrides]` sweeps (Hydra);
- `mtlsparse report DIR` aggregates run/sweep dirs (mtlsparse.report);
- `mtlsparse export RUN_DIR` compacts a trained channel-sparse model (mtlsparse.export).

Expected failures print one line and exit with `mtlsparse.errors.EXIT_CODES` (2 for any
config or data mistake, Hydra's own included); `HYDRA_FULL_ERROR=1` shows the traceback.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtlsparse.conf_dir import CONF_DIR, normalise_overrides
from mtlsparse.errors import EXIT_CODES, ConfigError, exit_code
from mtlsparse.run_dir import file_log_handlers

#: subcommand → (module with `main(argv) -> int`, its argument, one-line description for --help)
SUBCOMMANDS = {
    "report": ("mtlsparse.report", "DIR", "tables, Pareto front, hypervolume and plots of run/sweep dirs"),
    "export": ("mtlsparse.export", "RUN_DIR", "compact a trained channel-sparse model, measure its speed-up"),
}
CONFIG_ERROR_EXIT = EXIT_CODES[ConfigError]

log = logging.getLogger("mtlsparse")
_task_started = False  # set once Hydra has composed the config and called the task


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train(cfg: DictConfig) -> float | list[float] | None:
    """Hydra task: train, test and write metrics.json into the Hydra run dir.

    Returns the sweep objective(s) named by `objective` (validation metrics, so a sweeper
    never tunes on the test set).
    """
    global _task_started
    _task_started = True
    from mtlsparse.config import check_slurm_tasks
    from mtlsparse.train import objective_values, run  # heavy imports after Hydra has parsed the command line

    hydra_cfg = HydraConfig.get()
    try:
        check_slurm_tasks(cfg)  # under hydra/launcher=slurm: one task per Lightning device
        metrics = run(cfg, hydra_cfg.runtime.output_dir)
    except Exception as err:
        code = exit_code(err)
        brief = code is not None and os.environ.get("HYDRA_FULL_ERROR") != "1"
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # the job log (and the sweep's console) get the reason, so `mtlsparse report` lists the failed job
            log.error("%s: %s", type(err).__name__, err, exc_info=not brief)
            raise  # the other jobs of the sweep still run; Hydra exits non-zero at the end
        # the job log gets the record (a finished run's log was detached: it stays untouched); the terminal one line
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s: %s", (type(err).__name__, err),
                                None if brief else sys.exc_info())
        for _, handler in file_log_handlers(Path(hydra_cfg.runtime.output_dir)):
            handler.handle(record)
        if brief:
            print(f"mtlsparse: error: {err}", file=sys.stderr)
        else:
            traceback.print_exc()
        sys.exit(code or 1)
    return objective_values(cfg, metrics)


def usage() -> str:
    """The subcommand overview printed above Hydra's own `--help`."""
    rows = [("[OVERRIDES]", "train one run (`python -m mtlsparse` is the same command)"),
            ("-m [OVERRIDES]", "sweep with Hydra multirun, e.g. mtlsparse -m lam=0,1e-3")]
    rows += [(f"{name} {arg} [...]", f"{text} (mtlsparse {name} --help)")
             for name, (_, arg, text) in SUBCOMMANDS.items()]
    width = max(len(command) for command, _ in rows)
    lines = [f"{'usage:' if i == 0 else '':<6} mtlsparse {command:<{width}}  {text}"
             for i, (command, text) in enumerate(rows)]
    return "\n".join(lines + [""])


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf error message on one line (option lists joined by commas)."""
    lines = [line.strip() for line in str(err).splitlines()]
    text = ""
    for raw, line in zip(str(err).splitlines(), lines):
        if not line or line.startswith("See https://"):
            continue
        text += (", " if raw.startswith("\t") and text.endswith(tuple("abcdefghijklmnopqrstuvwxyz0123456789_"))
                 else "; " if text and not text.endswith(":") else " " if text else "") + line
    return text


def preflight(args: list[str]) -> str | None:
    """Parse and compose the command line before Hydra does: a mistake becomes one line.

    Hydra prints its own errors over several lines with a hint about HYDRA_FULL_ERROR; this
    check finds the same mistakes (bad override syntax, unknown key or group option, a sweep
    without -m) first. A sweep is checked with the first value of each swept key. Command
    lines with other Hydra flags (--cfg, -cd, -sc, ...) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from mtlsparse.config import compose_config

    multirun = any(a in ("-m", "--multirun") for a in args)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None
    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        bad = next((o for o in overrides if "=" not in o and not o.startswith("~")), None)
        hint = (f"'{bad}' is neither an override (key=value) nor a subcommand ({', '.join(SUBCOMMANDS)})"
                if bad else one_line(err))
        return f"cannot parse the command line: {hint}; see mtlsparse --help"
    single = []
    for override in parsed:
        if not override.is_sweep_override():
            single.append(override.input_line)
            continue
        if not multirun:
            return (f"'{override.input_line}' gives several values: add -m to sweep over them, or write a list "
                    f"as {override.get_key_element()}=[...]")
        try:
            first = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - interval sweeps etc.: the sweeper plugin checks those
            continue
        single.append(f"{override.get_key_element()}={first}")
    try:
        cfg = compose_config(single)
    except (HydraException, OmegaConfBaseException) as err:
        return explain(err)
    from mtlsparse.config import check_root_keys

    try:
        check_root_keys(cfg)
    except ConfigError as err:
        return str(err)
    from mtlsparse.trackers import missing_tracker_extra  # logger=wandb etc. without the 'trackers' extra

    return missing_tracker_extra(cfg) or (missing_plugin(cfg) if multirun else None)


#: Hydra plugins that come with an extra of ours: module → extra
PLUGIN_EXTRAS = {"hydra_plugins.hydra_submitit_launcher": "slurm",
                 "hydra_plugins.hydra_optuna_sweeper": "search",
                 "hydra_plugins.hydra_joblib_launcher": "search"}


def missing_plugin(cfg: DictConfig) -> str | None:
    """The one line for a chosen launcher/sweeper whose plugin (an optional extra) is not installed."""
    from importlib.util import find_spec

    for node in ("launcher", "sweeper"):
        target = str(OmegaConf.select(cfg, f"hydra.{node}._target_", default="") or "")
        for module, extra in PLUGIN_EXTRAS.items():
            if target.startswith(module) and find_spec(module) is None:
                return (f"hydra.{node} {target.rsplit('.', 1)[-1]} needs the '{extra}' extra: "
                        f"pip install \"mtlsparse[{extra}]\"")
    return None


def explain(err: BaseException) -> str:
    """One line for a Hydra composition error, with the fix for an unknown key."""
    unknown = re.match(r"Could not override '([^']+)'", str(err))
    if unknown:
        key = unknown.group(1)
        if "." not in key:
            from mtlsparse.config import root_keys

            return f"unknown key '{key}'; the top-level keys are {', '.join(root_keys())}"
        group, leaf = key.split(".", 1)[0], key.rsplit(".", 1)[-1]
        from mtlsparse.config import RENAMED_KEYS

        if leaf in RENAMED_KEYS:
            return f"unknown key '{key}': it is now {RENAMED_KEYS[leaf]}"
        return (f"unknown key '{key}' (its yaml does not set it); an argument that {group}'s _target_ accepts but "
                f"the yaml leaves at its default is added with +{key}=VALUE; `mtlsparse --cfg job` prints the config")
    return one_line(err).split("; Config search path:")[0]


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch a subcommand, or hand the command line to Hydra for training."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--help"], ["-h"]):
        print(usage())
    if args and args[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[args[0]][0])
        sys.exit(module.main(args[1:]))
    args = normalise_overrides(args)
    problem = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else preflight(args)
    if problem:
        print(f"mtlsparse: error: {problem}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    sys.argv = [sys.argv[0], *args]
    try:
        train()
    except SystemExit as done:
        # Hydra exits 1 on its own errors (bad override, unknown group option) before any task ran
        if done.code == 1 and not _task_started:
            sys.exit(CONFIG_ERROR_EXIT)
        raise
