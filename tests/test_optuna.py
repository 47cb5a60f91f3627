"""Optuna sweeps (hydra/sweeper=optuna_tpe|optuna_nsga2, +sweep=optuna_lambda|optuna_preferences): tiny
trials through the real command line from a dir outside the checkout, `mtlsparse report` marking the trials
Optuna found best, the objective/direction check, seeded samplers, and the 'search' extra when missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate

from mtlsparse.config import ConfigError, compose_config
from mtlsparse.pareto import non_dominated
from mtlsparse.reporting.optuna import mark_optuna_pareto, read_solutions
from mtlsparse.search import check_objective

from conftest import REPO, TINY

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

SYNTHETIC_LOSSES = "objective=[val/t0/loss,val/t1/loss]"


def cli(cwd: Path, *args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    """`python -m mtlsparse ARGS` in cwd (outside the checkout), one torch thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}
    return subprocess.run([sys.executable, "-m", "mtlsparse", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A 3-trial Optuna multirun on tiny synthetic data; returns (process, sweep dir)."""
    out = tmp_path / "sweep"
    proc = cli(tmp_path, "-m", *TINY, "hydra.sweeper.n_trials=3", *overrides, f"data_root={tmp_path}/data",
               f"hydra.sweep.dir={out}")
    return proc, out


def metrics(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))}


def report(sweep_dir: Path, *args: str) -> dict:
    proc = cli(sweep_dir.parent, "report", str(sweep_dir), *args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((sweep_dir / "report" / "report.json").read_text())


def csv_column(sweep_dir: Path, name: str) -> dict[str, str]:
    import csv

    with (sweep_dir / "report" / "summary.csv").open() as f:
        return {row["job"]: row[name] for row in csv.DictReader(f)}


@pytest.mark.slow  # the multi-objective sweep below runs the same Optuna path in the fast suite
def test_single_objective_sweep_marks_the_trial_with_the_best_val_select(tmp_path):
    proc, out = sweep(tmp_path, "+sweep=optuna_lambda", "trainer.max_epochs=2", "min_sparsity=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = metrics(out)
    assert sorted(runs) == ["0", "1", "2"]
    assert len({m["config/lam"] for m in runs.values()}) == 3  # three λ drawn from the log-uniform range
    assert all(5e-4 <= m["config/lam"] <= 1e-2 for m in runs.values())
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert set(results) == {"name", "best_params", "best_value"}
    best = max(runs, key=lambda job: runs[job]["val/select"])  # maximised: the sweep's direction
    assert results["best_value"] == pytest.approx(runs[best]["val/select"])

    summary = report(out)
    assert summary["optuna_pareto"] == [best]
    assert csv_column(out, "optuna_pareto") == {job: str(job == best) for job in runs}
    md = (out / "report" / "summary.md").read_text()
    assert "| optuna_pareto |" in md and f"`{best}`" in md


def test_multi_objective_sweep_marks_optunas_pareto_set_of_the_validation_losses(tmp_path):
    proc, out = sweep(tmp_path, "+sweep=optuna_preferences", "method=growl", SYNTHETIC_LOSSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = metrics(out)
    assert sorted(runs) == ["0", "1", "2"]
    for m in runs.values():  # k = [a, 1 - a] from the choice, k0 and GrOWL's λ from their log ranges
        assert len(m["config/k"]) == 2 and sum(m["config/k"]) == pytest.approx(1)
        assert 1e-4 <= m["config/k0"] <= 1e-1
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert set(results) == {"name", "solutions"}

    jobs = sorted(runs)
    val = np.array([[runs[j]["val/t0/loss"], runs[j]["val/t1/loss"]] for j in jobs])
    expected = [j for j, keep in zip(jobs, non_dominated(val)) if keep]  # Pareto set on the validation losses
    summary = report(out, "--ref", "2,2")
    assert summary["optuna_pareto"] == expected
    assert summary["objectives"] == ["test/t0/loss", "test/t1/loss"]  # our own front: the test losses
    assert summary["hypervolume"] > 0
    pareto_rows = (out / "report" / "pareto.csv").read_text().splitlines()
    assert "optuna_pareto" in pareto_rows[0]
    assert (out / "report" / "front.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("overrides", "message"), [
    (["+sweep=optuna_preferences", "method=growl", "objective=val/t0/loss"],
     "hydra.sweeper.direction gives 2 direction(s) ['minimize', 'minimize'] for the 1 objective(s)"),
    (["+sweep=optuna_lambda", "objective=[val/t0/loss,val/t1/loss]"],
     "hydra.sweeper.direction gives 1 direction(s) ['maximize'] for the 2 objective(s)"),
])
def test_inconsistent_objective_and_direction_stop_before_any_job_with_one_line(tmp_path, overrides, message):
    proc, out = sweep(tmp_path, *overrides)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtlsparse: error: ") and message in lines[0], proc.stderr
    assert not out.exists()  # no trial ran


def directed(*overrides: str):
    return compose_config(["hydra.sweep.dir=/sweep", *overrides])


@pytest.mark.parametrize("overrides", [
    ["+sweep=optuna_lambda"],
    ["+sweep=optuna_preferences"],
    ["hydra/sweeper=optuna_tpe", "objective=val/left/acc"],  # a metric of unknown sense: either direction
    ["hydra/sweeper=optuna_nsga2", "objective=[val/left/loss,val/select]",
     "hydra.sweeper.direction=[minimize,maximize]"],
    ["seed=1"],  # the basic sweeper has no direction
])
def test_consistent_objective_and_direction_pass(overrides):
    check_objective(directed(*overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["+sweep=optuna_lambda", "hydra.sweeper.direction=minimize"],
     "objective val/select is to maximize, but hydra.sweeper.direction says minimize"),
    (["+sweep=optuna_preferences", "hydra.sweeper.direction=[minimize,maximize]"],
     "objective val/right/loss is to minimize, but hydra.sweeper.direction says maximize"),
    (["+sweep=optuna_preferences", "hydra.sweeper.direction=[minimize,minimize,minimize]"],
     "gives 3 direction(s)"),
    (["+sweep=optuna_lambda", "hydra.sweeper.direction=up"], "must be minimize or maximize"),
    (["+sweep=optuna_lambda", "hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs"),
])
def test_inconsistent_objective_and_direction_name_both_keys(overrides, message):
    with pytest.raises(ConfigError, match="hydra.sweeper") as err:
        check_objective(directed(*overrides))
    assert message in str(err.value)


def test_the_plugins_structured_config_is_checked_too():
    """hydra/sweeper=optuna (the plugin's own preset, enum directions) goes through the same check."""
    check_objective(directed("hydra/sweeper=optuna", "objective=val/left/loss"))
    with pytest.raises(ConfigError, match="1 direction"):
        check_objective(directed("hydra/sweeper=optuna", "objective=[val/left/loss,val/right/loss]"))


@pytest.mark.parametrize("sweep_name", ["optuna_lambda", "optuna_preferences"])
def test_seeded_samplers_draw_the_same_trials_again(sweep_name):
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    cfg = directed(f"+sweep={sweep_name}")
    space, _ = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    directions = list(cfg.hydra.sweeper.direction) if sweep_name == "optuna_preferences" else ["maximize"]

    def draw() -> list[dict]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=instantiate(cfg.hydra.sweeper.sampler), directions=directions)
        params = []
        for i in range(12):  # past NSGA-II's first generation (population 8) and TPE's 5 random trials
            trial = study.ask(space)
            study.tell(trial, [float(i % 5)] * len(directions))
            params.append(trial.params)
        return params

    assert draw() == draw()


def test_report_reads_both_result_formats_and_leaves_other_sweeps_alone(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "optimization_results.yaml").write_text("name: optuna\nbest_params: {lam: 0.001}\nbest_value: 0.5\n")
    assert read_solutions(single / "optimization_results.yaml") == [({"lam": 0.001}, [0.5])]
    rows = [{"job": "0", "status": "ok", "lam": 0.001, "val/select": 0.5},
            {"job": "1", "status": "ok", "lam": 0.002, "val/select": 0.4}]
    assert mark_optuna_pareto(rows, single) == ["0"]
    assert [r["optuna_pareto"] for r in rows] == [True, False]
    plain = [{"job": "0", "status": "ok", "lam": 0.001}]
    assert mark_optuna_pareto(plain, tmp_path / "grid") == [] and "optuna_pareto" not in plain[0]


@pytest.mark.parametrize(("overrides", "node", "name"), [
    (["+sweep=optuna_lambda"], "sweeper", "OptunaSweeper"),
    (["+sweep=optuna_preferences"], "sweeper", "OptunaSweeper"),
    (["hydra/launcher=parallel"], "launcher", "JoblibLauncher"),
])
def test_a_search_plugin_that_is_missing_names_the_search_extra(monkeypatch, overrides, node, name):
    import importlib.util

    from mtlsparse import cli

    cfg = directed(*overrides)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod.startswith(("hydra_plugins.hydra_optuna",
                                                                "hydra_plugins.hydra_joblib")) else real(mod, *a))
    assert cli.missing_plugin(cfg) == f"hydra.{node} {name} needs the 'search' extra: pip install \"mtlsparse[search]\""
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert cli.missing_plugin(cfg) is None
