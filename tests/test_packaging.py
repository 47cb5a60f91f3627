"""The installed package works without the checkout: wheel → scratch target → run from elsewhere.

Builds the wheel, installs it (no dependencies: those are this environment's) into a
scratch directory, and from a directory outside the checkout runs what a user runs: the
console script and `python -m mtlsparse` for a training, a sweep, `report` and `export`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY

STRUCTURED = ["method=group_lasso", "lam=10", "optimizer.lr=0.05", "trainer.limit_train_batches=4"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A target dir holding only the installed wheel (package, its configs, the console script)."""
    scratch = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(scratch / "dist"), str(REPO)],
                   check=True, capture_output=True, timeout=280, cwd=scratch)
    wheel = next((scratch / "dist").glob("mtlsparse-*.whl"))
    target = scratch / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=280, cwd=scratch)
    return target


@pytest.fixture
def user(installed, tmp_path):
    """Run a command as a user would: cwd outside the checkout, only the installed copy importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(installed), OMP_NUM_THREADS="1", MTLSPARSE_DATA=str(tmp_path / "data"))
    script = installed / "bin" / "mtlsparse"

    def run(*args: str, module: bool = False, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mtlsparse", *args] if module else [sys.executable, str(script), *args]
        return subprocess.run(command, cwd=tmp_path, env={**env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=280)
    return run


def test_the_installed_copy_is_the_one_that_runs(installed):
    proc = subprocess.run([sys.executable, "-c", "import mtlsparse.conf_dir as c; print(c.__file__, c.CONF_DIR)"],
                          cwd=installed.parent, env={"PYTHONPATH": str(installed), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=60)
    module_file, conf_dir = proc.stdout.split()
    assert Path(module_file).is_relative_to(installed) and Path(conf_dir) == installed / "mtlsparse" / "_conf"
    assert (Path(conf_dir) / "sweep" / "lambda_group_lasso.yaml").is_file()  # the link to multirun_sweeps/, resolved


def test_console_script_and_module_train_sweep_report_and_export(user, tmp_path):
    proc = user(*TINY, *STRUCTURED, "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "test/mean_acc" in metrics and (tmp_path / "run" / "mtlsparse.log").is_file()

    proc = user("-m", *TINY, "lam=0,1e-2", "method=group_lasso", "hydra.sweep.dir=sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 2

    for module in (False, True):
        proc = user("report", "sweep", module=module)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "sweep" / "report" / "summary.csv").is_file()

    proc = user("export", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_help_lists_the_subcommands_and_experiment_needs_no_plus(user):
    for module in (False, True):
        proc = user("--help", module=module)
        assert proc.returncode == 0
        assert "mtlsparse report DIR" in proc.stdout and "mtlsparse export RUN_DIR" in proc.stdout
        assert "experiment: " in proc.stdout  # the config groups, from the packaged tree
    for spelling in ("experiment=mdmtn_multifashion", "+experiment=mdmtn_multifashion"):
        proc = user(spelling, "--cfg", "job")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "k0: 0.001" in proc.stdout and "GrOWL" in proc.stdout


def test_bash_completion_of_the_console_script(user):
    proc = user("-sc", "install=bash")
    assert "complete -o nospace -o default -F hydra_bash_completion mtlsparse" in proc.stdout
    proc = user("-sc", "query=bash", extra_env={"COMP_LINE": "mtlsparse method=gr", "COMP_POINT": "19"})
    assert proc.stdout.split() == ["method=group_lasso", "method=growl"]


def test_command_line_mistakes_are_one_line_with_exit_2(user):
    for args, needle in [(["reprot", "x"], "'reprot' is neither an override"),
                         (["lamm=1"], "unknown key 'lamm'"),
                         (["+lr=0.1"], "optimizer.lr"),
                         (["method=nope"], "Available options in 'method'"),
                         (["lam=0,1"], "add -m"),
                         (["method.include_heads=true"], "it is now scope.heads")]:
        proc = user(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def test_a_launcher_whose_extra_is_missing_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from mtlsparse import cli
    from mtlsparse.config import compose_config

    cfg = compose_config(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else real(name, *a))
    message = cli.missing_plugin(cfg)
    assert message == "hydra.launcher SlurmLauncher needs the 'slurm' extra: pip install \"mtlsparse[slurm]\""
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert cli.missing_plugin(cfg) is None
