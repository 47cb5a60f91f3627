"""Optuna's own verdict on a sweep: which jobs its `optimization_results.yaml` names as best.

hydra-optuna-sweeper writes `<sweep dir>/optimization_results.yaml` when a sweep ends: for a
multi-objective study `solutions: [{params, values}, ...]`, its Pareto set (`study.best_trials`)
on the validation objectives the jobs returned; for one objective `best_params` and `best_value`.
Trials are not numbered there, so a job is matched by its recorded overrides (every searched
parameter, as the sweeper wrote it) and, when its config names the objective, by its metrics
(the values it returned). `mark_optuna_pareto` sets `row["optuna_pareto"]` for every job of
such a sweep: True for Optuna's best trials, False for the others.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import yaml

from mtlsparse.reporting.collect import Row, parse_value
from mtlsparse.run_dir import RunDir

RESULTS_FILE = "optimization_results.yaml"
COLUMN = "optuna_pareto"

Solution = tuple[dict[str, object], list[float]]


def read_solutions(path: Path) -> list[Solution]:
    """(params, values) of each best trial in an optimization_results.yaml; [] for another sweeper's file."""
    data = yaml.safe_load(path.read_text()) or {}
    if data.get("name") != "optuna":
        return []
    if "solutions" in data:
        return [(dict(s.get("params") or {}), [float(v) for v in s.get("values") or []])
                for s in data["solutions"] or []]
    if "best_params" in data:
        return [(dict(data["best_params"] or {}), [float(data["best_value"])])]
    return []


def results_file(job_dir: Path, root: Path) -> Path | None:
    """The nearest optimization_results.yaml above a job dir, looking no higher than the report's root."""
    for directory in [job_dir, *job_dir.parents]:
        if (directory / RESULTS_FILE).is_file():
            return directory / RESULTS_FILE
        if directory == root:
            return None
    return None


def job_objective(job_dir: Path) -> list[str] | None:
    """The `objective` names in a job's recorded config (None when it has none)."""
    path = RunDir(job_dir).config_file
    if not path.is_file():
        return None
    objective = (yaml.safe_load(path.read_text()) or {}).get("objective")
    if objective is None:
        return None
    return [str(n) for n in objective] if isinstance(objective, list) else [str(objective)]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def matches(row: Row, objective: Sequence[str] | None, solution: Solution) -> bool:
    """Does this job hold this best trial: same searched values, and (if known) the same returned values?"""
    params, values = solution
    if not params:
        return False
    for key, value in params.items():
        if not _same(parse_value(str(value)), row.get(key)):
            return False
    if objective is None or len(objective) != len(values):
        return True
    returned = [row.get(name) for name in objective]
    if any(v is None for v in returned):
        return True  # a job that did not record the metric is matched on its parameters alone
    return all(_same(float(v), r) for v, r in zip(values, returned))


def mark_optuna_pareto(rows: Sequence[Row], root: Path) -> list[str]:
    """Set `optuna_pareto` on the rows of Optuna sweeps; return the jobs Optuna found best, in row order.

    Rows outside any sweep with an optimization_results.yaml are left without the column.
    """
    cache: dict[Path, list[Solution]] = {}
    best = []
    for row in rows:
        job_dir = root / str(row["job"])
        path = results_file(job_dir, root)
        if path is None:
            continue
        if path not in cache:
            cache[path] = read_solutions(path)
        if not cache[path]:
            continue
        objective = job_objective(job_dir)
        row[COLUMN] = row["status"] == "ok" and any(matches(row, objective, s) for s in cache[path])
        if row[COLUMN]:
            best.append(str(row["job"]))
    return best
