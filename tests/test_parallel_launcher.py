"""Local parallel sweeps (hydra/launcher=parallel, the joblib launcher): jobs run at once in their own
worker processes, each with torch threads max(1, cores // n_jobs), and write their normal job dirs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from mtlsparse.config import ConfigError, compose_config
from mtlsparse.search import ThreadsPerJob, concurrent_jobs, threads_per_job

from conftest import REPO, TINY

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


def test_two_jobs_run_in_two_workers_and_both_write_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    # cores=4 makes the thread rule visible on any machine: 4 cores // 2 jobs = 2 threads each
    proc = subprocess.run([sys.executable, "-m", "mtlsparse", "-m", "hydra/launcher=parallel",
                           "hydra.launcher.n_jobs=2", "hydra.callbacks.threads_per_job.cores=4", *TINY,
                           "method=group_lasso", "lam=0,1e-2", f"data_root={tmp_path}/data",
                           f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    files = sorted(sweep.glob("*/metrics.json"))
    assert [f.parent.name for f in files] == ["0", "1"]
    assert sorted(json.loads(f.read_text())["config/lam"] for f in files) == [0.0, 1e-2]
    pids = set()
    for job in ("0", "1"):
        line = re.search(r"torch threads: (\d+) \((.*?); pid (\d+)\)", (sweep / job / "mtlsparse.log").read_text())
        assert line and line.group(1) == "2" and line.group(2) == "4 cores // 2 jobs at once"
        pids.add(line.group(3))
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two workers, neither of them this process


@pytest.mark.parametrize(("n_jobs", "cores", "threads"), [
    (2, 2, 1), (1, 2, 2), (4, 2, 1), (3, 16, 5), (2, 16, 8), (None, 8, 8), (-1, 8, 1), (-2, 8, 1), (-7, 8, 4),
])
def test_threads_per_job_is_cores_divided_by_the_jobs_running_at_once(n_jobs, cores, threads):
    assert threads_per_job(n_jobs, cores) == threads


def test_zero_jobs_is_a_config_error():
    with pytest.raises(ConfigError, match="hydra.launcher.n_jobs=0"):
        concurrent_jobs(0, 8)


def test_callback_sets_torch_threads_in_the_job_process(tmp_path):
    cfg = compose_config(["hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}",
                          f"+hydra.runtime.output_dir={tmp_path}/0"])
    before = torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS")
    try:
        ThreadsPerJob(cores=6).on_job_start(config=cfg, task_function=None)
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
        ThreadsPerJob(cores=6, threads=1).on_job_start(config=cfg, task_function=None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_callback_rejects_bad_counts(bad):
    with pytest.raises(ConfigError, match="threads_per_job.cores"):
        ThreadsPerJob(cores=bad)


@pytest.mark.parametrize(("launcher", "batch"), [([], 1), (["hydra/launcher=parallel"], 2),
                                                 (["hydra/launcher=parallel", "hydra.launcher.n_jobs=4"], 4)])
def test_optuna_presets_ask_as_many_trials_per_batch_as_the_launcher_runs_at_once(launcher, batch):
    cfg = compose_config(["+sweep=optuna_lambda", "hydra.sweep.dir=/sweep", *launcher])
    assert cfg.hydra.sweeper.n_jobs == batch
