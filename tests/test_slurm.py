"""The SLURM launcher preset (`hydra/launcher=slurm`) and submitit's local launcher.

Slow tests submit tiny multiruns to a real single-node Slurm cluster started on localhost
(tests/slurm_cluster.py): jobs go through sbatch as a job array, each writes metrics.json in its
own Hydra sweep dir, and a 2-task job trains with Lightning DDP ranks taken from SLURM. They skip
when the Slurm/munge binaries are missing (`make setup-slurm`) or without root. The fast tests
check the preset's sbatch script without a cluster and run a 2-job multirun via submitit_local.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtlsparse.config import ConfigError, check_slurm_tasks

from conftest import REPO, TINY, compose_cfg
from slurm_cluster import SlurmCluster, missing_binaries

# what every Slurm test job asks for: one CPU, no GPU, small memory, a short limit
SLURM_CPU = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


def multirun(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None,
             timeout: float = 280) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m mtlsparse -m TINY overrides` in tmp_path with one thread per job; returns (process, sweep dir)."""
    sweep = tmp_path / "sweep"
    env = {**(env or os.environ), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtlsparse", "-m", *TINY, *overrides, f"data_root={tmp_path}/data",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, sweep


def job_ids(sweep: Path) -> dict[str, str]:
    """Sweep job number → scheduler job id that ran it, read from each job's .hydra/hydra.yaml."""
    ids = {}
    for hydra_yaml in sweep.glob("*/.hydra/hydra.yaml"):
        job = yaml.safe_load(hydra_yaml.read_text())["hydra"]["job"]
        ids[str(job["num"])] = str(job["id"])
    return ids


def report(capsys, line: str) -> None:
    """Print to the terminal even under pytest's output capture (job ids and timings for the log)."""
    with capsys.disabled():
        print(f"\n[test_slurm] {line}")


# ---------------------------------------------------------------- fast: no cluster needed
def slurm_params(*overrides: str) -> dict:
    """The submitit parameters `hydra/launcher=slurm` passes to AutoExecutor, mapped as the launcher maps them."""
    BaseQueueConf = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config").BaseQueueConf

    cfg = compose_cfg(["hydra/launcher=slurm", "hydra.sweep.dir=/sweep", *overrides])
    launcher = instantiate(cfg.hydra.launcher)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"submitit_folder", "max_num_timeout"}
    return {k if k in base else f"slurm_{k}": v for k, v in launcher.params.items() if k not in skip}


@pytest.fixture
def slurm_executor(tmp_path, monkeypatch):
    """submitit's Slurm executor as the launcher builds it, on a machine without Slurm.

    AutoExecutor refuses `cluster="slurm"` unless `srun` is on the PATH; the sbatch script
    it writes does not depend on that, so the detection is answered as on a login node.
    """
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    return submitit.AutoExecutor(folder=tmp_path, cluster="slurm")


def test_slurm_preset_makes_a_valid_sbatch_script(slurm_executor):
    executor = slurm_executor
    executor.update_parameters(**slurm_params("hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                                              "hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=2"))
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for flag in ("--partition=gpu", "--account=proj", "--gpus-per-node=2", "--ntasks-per-node=2",
                 "--cpus-per-task=4", "--mem=16GB", "--time=240", "--job-name=mtlsparse", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in script
    assert "\nsrun --unbuffered" in script


def test_slurm_preset_use_srun_false_runs_python_directly(slurm_executor):
    executor = slurm_executor
    executor.update_parameters(**slurm_params("hydra.launcher.use_srun=false", "hydra.launcher.gpus_per_node=null"))
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    assert "\nsrun " not in script and "\npython -m x" in script and "gpus-per-node" not in script


@pytest.mark.parametrize("sweep, base, key", [("slurm_lambda_group_lasso", "lambda_group_lasso", "lam"),
                                              ("slurm_mdmtn_preferences", "mdmtn_preferences", "pref")])
def test_slurm_sweeps_are_the_paper_sweeps_on_the_slurm_launcher(sweep, base, key):
    slurm, local = compose_cfg([f"+sweep={sweep}"]), compose_cfg([f"+sweep={base}"])
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.sweeper.params[key] == local.hydra.sweeper.params[key]
    assert slurm.hydra.runtime.choices.method == local.hydra.runtime.choices.method


SRUN_2_TASKS = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0",
                "SLURM_JOB_NAME": "mtlsparse"}


@pytest.mark.parametrize("environ, overrides", [
    ({}, []),                                                   # not under SLURM
    ({**SRUN_2_TASKS, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"}, []),  # one task
    (SRUN_2_TASKS, ["trainer=ddp", "trainer.devices=2"]),      # one DDP rank per task
    ({**SRUN_2_TASKS, "SLURM_JOB_NAME": "interactive"}, []),  # salloc shell: Lightning ignores SLURM
    ({k: v for k, v in SRUN_2_TASKS.items() if k != "SLURM_STEP_ID"}, []),  # batch script, one process
])
def test_slurm_task_check_accepts_one_rank_per_task(environ, overrides):
    check_slurm_tasks(compose_cfg(TINY + overrides), environ)


@pytest.mark.parametrize("environ, overrides, message", [
    (SRUN_2_TASKS, [], "trainer.devices=1, so every task would train its own copy"),
    ({k: v for k, v in SRUN_2_TASKS.items() if k != "SLURM_STEP_ID"}, ["trainer=ddp", "trainer.devices=2"],
     "without srun"),
    ({**SRUN_2_TASKS, "SLURM_NNODES": "2", "SLURM_NTASKS": "4"}, ["trainer=ddp", "trainer.devices=2"],
     "trainer.num_nodes=1"),
])
def test_slurm_task_check_rejects_tasks_lightning_would_not_join(environ, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_slurm_tasks(compose_cfg(TINY + overrides), environ)


def test_submitit_local_multirun_writes_one_metrics_json_per_job(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    start = time.monotonic()
    proc, sweep = multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                           "method=group_lasso", "lam=0,1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(sweep.glob("*/metrics.json"))
    assert sorted(json.loads(f.read_text())["config/lam"] for f in files) == [0.0, 1e-2]
    ids = job_ids(sweep)
    assert sorted(ids) == ["0", "1"] and all((sweep / ".submitit" / i).is_dir() for i in ids.values())
    report(capsys, f"submitit_local job ids (pids) {ids} in {time.monotonic() - start:.1f}s")


# ---------------------------------------------------------------- slow: a real Slurm cluster
@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node Slurm (munged, slurmctld, slurmd) for this module; stopped by pid afterwards."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge binaries not found: {missing} (install with `make setup-slurm`)")
    if os.geteuid() != 0:
        pytest.skip("the throwaway Slurm cluster runs its daemons as root (SlurmUser=root)")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("use_srun", ["true", "false"])
def test_slurm_multirun_submits_a_job_array_and_each_job_writes_metrics(slurm_cluster, tmp_path, capsys, use_srun):
    start = time.monotonic()
    proc, sweep = multirun(tmp_path, *SLURM_CPU, f"hydra.launcher.use_srun={use_srun}", "method=group_lasso",
                           "lam=0,1e-2", env=slurm_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm_cluster.logs()
    files = sorted(sweep.glob("*/metrics.json"))
    assert sorted(json.loads(f.read_text())["config/lam"] for f in files) == [0.0, 1e-2]
    # each sweep dir ran as one task of a single sbatch array: hydra.job.id = <array id>_<task>
    ids = job_ids(sweep)
    array_id = ids["0"].split("_")[0]
    assert ids == {"0": f"{array_id}_0", "1": f"{array_id}_1"}
    assert array_id in slurm_cluster.submitted_job_ids()
    assert slurm_cluster.wait_queue_empty(60)
    done = {j["ArrayTaskId"]: j for j in slurm_cluster.completed_jobs() if j.get("ArrayJobId") == array_id}
    assert sorted(done) == ["0", "1"] and all(j["JobState"] == "COMPLETED" for j in done.values()), done
    report(capsys, f"use_srun={use_srun}: sbatch array job {array_id}: tasks " + ", ".join(
        f"{array_id}_{t} (JobId={j['JobId']}, {j['JobState']})" for t, j in sorted(done.items()))
        + f"; sweep took {time.monotonic() - start:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_two_tasks_per_node_train_one_ddp_run(slurm_cluster, tmp_path, capsys):
    start = time.monotonic()
    proc, sweep = multirun(tmp_path, *SLURM_CPU, "hydra.launcher.tasks_per_node=2", "trainer=ddp",
                           "trainer.accelerator=cpu", "trainer.devices=2", "seed=0", env=slurm_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm_cluster.logs()
    assert (sweep / "0" / "metrics.json").exists()
    log = (sweep / "0" / "mtlsparse.log").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    job = job_ids(sweep)["0"]
    assert slurm_cluster.wait_queue_empty(60)
    done = [j for j in slurm_cluster.completed_jobs() if j["JobId"] == job]
    assert done and done[0]["JobState"] == "COMPLETED" and done[0]["ProcCnt"] == "2", done
    report(capsys, f"sbatch job {job} (2 tasks, DDP world size 2, {done[0]['JobState']}) "
                   f"in {time.monotonic() - start:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_tasks_without_matching_devices_stop_at_job_start(slurm_cluster, tmp_path, capsys):
    start = time.monotonic()
    proc, sweep = multirun(tmp_path, *SLURM_CPU, "hydra.launcher.tasks_per_node=2", "seed=0", env=slurm_cluster.env)
    assert proc.returncode != 0
    assert "every task would train its own copy" in (sweep / "0" / "mtlsparse.log").read_text()
    assert not (sweep / "0" / "metrics.json").exists()
    report(capsys, f"sbatch job {job_ids(sweep)['0']} (2 tasks, trainer.devices=1) refused "
                   f"in {time.monotonic() - start:.1f}s")
