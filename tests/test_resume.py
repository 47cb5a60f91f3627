"""Resume: a run killed mid-epoch and resumed ends exactly where the uninterrupted run ends;
re-running finished work skips it; a run dir never mixes configs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mtlsparse.config import ConfigError
from mtlsparse.module import MultiTaskModule
from mtlsparse.train import run

from conftest import REPO, TINY

RESUMABLE = [
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "test_ckpt=last",
]
KILL_AT_STEP = 7  # epoch 2, second batch: the newest checkpoint is from the end of epoch 1

# one combination per kind of state that must survive the restart
CASES = {
    "growl+chebyshev (AL multipliers, phases, tying)": [
        "method=growl", "k0=1e-3", "balancer.epochs_per_iteration=1", "method.phase1_iterations=2",
        "method.s_lmax=0.5", "method.s_min=0.0"],
    "rigl+minmax (masks, rewire counter, simplex weights)": [
        "method=rigl", "sparsity=0.8", "method.update_interval=2", "method.end_step=10",
        "balancer=minmax", "balancer.update_every=2"],
    "set+uncertainty (random regrowth, log-variances)": [
        "method=set", "sparsity=0.7", "method.update_interval=2", "method.end_step=10", "balancer=uncertainty"],
    "reweighted_l1+dwa (stage boundaries, loss history)": [
        "method=reweighted_l1", "sparsity=0.7", "method.pretrain_epochs=1", "method.reweight_epochs=2",
        "method.refresh_every=1", "balancer=dwa"],
    "magnitude gradual + dropout + augmentation (RNG streams)": [
        "method=magnitude", "sparsity=0.6", "method.schedule=gradual", "method.start_epoch=0",
        "method.end_epoch=2", "model.dropout=0.3", "dataset.augment_shift=2"],
    "group_lasso + snip-free prox": ["method=group_lasso", "lam=1e-2"],
}


class Killed(RuntimeError):
    """Stands in for SIGKILL / preemption in the middle of an epoch."""


def _kill_at(monkeypatch, step: int) -> None:
    original = MultiTaskModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == step:
            raise Killed(f"killed at step {step}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MultiTaskModule, "training_step", training_step)


def _results(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "latency/"))}, state


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_killed_run_resumes_to_identical_metrics(tiny_cfg, tmp_path, monkeypatch, overrides):
    def cfg():
        return tiny_cfg(*RESUMABLE, *overrides)
    run(cfg(), tmp_path / "straight")
    straight_metrics, straight_state = _results(tmp_path / "straight")

    with monkeypatch.context() as patch:
        _kill_at(patch, KILL_AT_STEP)
        with pytest.raises(Killed):
            run(cfg(), tmp_path / "killed")
    assert not (tmp_path / "killed" / "metrics.json").exists()
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1  # the kill hit epoch 2, so the run really continues from the middle
    run(cfg(), tmp_path / "killed")  # resume=auto picks up checkpoints/last.ckpt
    resumed_metrics, resumed_state = _results(tmp_path / "killed")
    # both attempts' training logs are kept
    assert (tmp_path / "killed" / "logs" / "metrics.csv").exists()
    assert (tmp_path / "killed" / "logs" / "resumed-1" / "metrics.csv").exists()

    assert resumed_metrics == straight_metrics
    for key, value in straight_state["state_dict"].items():
        assert same_state(resumed_state["state_dict"][key], value), key


def same_state(a, b) -> bool:
    """Tensors equal exactly; modules' extra state (dicts, numbers, None) compared entry by entry."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    return a == b


def test_finished_run_is_skipped_and_kept(tiny_cfg, tmp_path, monkeypatch):
    first = run(tiny_cfg("method=group_lasso", "lam=1e-2"), tmp_path)
    stamp = (tmp_path / "metrics.json").stat().st_mtime_ns
    monkeypatch.setattr(MultiTaskModule, "training_step", lambda *a: pytest.fail("a finished run was retrained"))
    again = run(tiny_cfg("method=group_lasso", "lam=1e-2"), tmp_path)
    assert again == first and (tmp_path / "metrics.json").stat().st_mtime_ns == stamp


def test_run_dir_of_another_config_is_refused(tiny_cfg, tmp_path):
    run(tiny_cfg("method=group_lasso", "lam=1e-2"), tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        run(tiny_cfg("method=group_lasso", "lam=2e-2"), tmp_path)
    with pytest.raises(ConfigError, match="finished run"):
        run(tiny_cfg("method=group_lasso", "lam=1e-2", "resume=false"), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["config/lam"] == 1e-2


def test_resume_errors_name_the_fix(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="holds no run to resume"):
        run(tiny_cfg("resume=true"), tmp_path / "empty")
    with pytest.raises(ConfigError, match="ckpt_path=.*does not exist"):
        run(tiny_cfg(f"ckpt_path={tmp_path}/nope.ckpt"), tmp_path / "x")
    with pytest.raises(ConfigError, match="resume="):
        run(tiny_cfg("resume=maybe"), tmp_path / "y")


def test_sweep_with_a_failing_job_keeps_the_others_and_a_rerun_only_retries_it(tmp_path):
    """6 jobs, one with a wrong-length k: five metrics.json, the report names the failure,
    and re-running the same command skips the five finished jobs."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, TINY

    sweep = tmp_path / "sweep"
    prefs = "[0.5,0.5],[0.4,0.6],[0.3,0.7],[0.2,0.8],[0.1,0.9],[1,2,3]"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mtlsparse", "-m", *TINY, f"k={prefs}", f"data_root={tmp_path}/data",
               f"hydra.sweep.dir={sweep}"]

    def sweep_once() -> subprocess.CompletedProcess:
        return subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)

    first = sweep_once()
    assert first.returncode != 0  # Hydra reports the failed job at the end of the sweep...
    done = sorted(sweep.glob("*/metrics.json"))
    assert len(done) == 5  # ...after running all the others
    stamps = {f: f.stat().st_mtime_ns for f in done}

    report = subprocess.run([sys.executable, "-c", "from mtlsparse.cli import main; main()", "report", str(sweep)],
                            check=False,
                            cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "k has 3 entries" in (sweep / "report" / "summary.md").read_text()

    record = (sweep / "multirun.yaml").read_bytes()
    second = sweep_once()
    assert second.returncode != 0  # the bad job fails again; nothing else ran
    assert {f: f.stat().st_mtime_ns for f in sorted(sweep.glob("*/metrics.json"))} == stamps
    assert (second.stdout + second.stderr).count("skipped") == 5
    assert (sweep / "multirun.yaml").read_bytes() == record  # the same sweep: the same record, none kept aside
    assert not list(sweep.glob("multirun.*.yaml"))

    command.append("seed=1")  # another sweep into the same dir: each finished job refuses it...
    third = sweep_once()
    assert third.returncode != 0
    assert {f: f.stat().st_mtime_ns for f in sorted(sweep.glob("*/metrics.json"))} == stamps
    output = third.stdout + third.stderr
    refused = {d.parent.name for d in done if f"{d.parent} holds a run of a different config" in output}
    assert refused == {d.parent.name for d in done}
    assert (sweep / "multirun.1.yaml").read_bytes() == record  # ...and the first sweep's record is kept
    assert "seed=1" in (sweep / "multirun.yaml").read_text()


@pytest.mark.slow
def test_sigkilled_growl_chebyshev_run_resumes_to_identical_metrics(tmp_path):
    """The real thing: `kill -9` a GrOWL + Chebyshev run on real digits pairs in the middle of an
    epoch, re-run the same command, and compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    args = ["dataset=multi_digits", "model.kernel_size=3", "method=growl", "k0=1e-3", "trainer=cpu",
            "balancer.epochs_per_iteration=1", "method.phase1_iterations=2", "method.phase2_iterations=2",
            "trainer.max_epochs=4", "dataset.batch_size=32", "trainer.enable_progress_bar=false",
            f"data_root={tmp_path}/data"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def command(run_dir):
        return [sys.executable, "-m", "mtlsparse", *args, f"hydra.run.dir={run_dir}"]

    straight = subprocess.run(command(tmp_path / "straight"), check=False, env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=280)
    assert straight.returncode == 0, straight.stderr[-3000:]

    victim = subprocess.Popen(command(tmp_path / "killed"), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (last.exists() and torch.load(last, weights_only=False)["epoch"] >= 1):
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2 (phase 2 has started: rows are clustered and tied)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(command(tmp_path / "killed"), check=False, env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=280)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, _ = _results(tmp_path / "straight")
    b, _ = _results(tmp_path / "killed")
    assert a == b
    print(f"\nkill -9 during epoch 2; resumed metrics identical: test/mean_acc={b['test/mean_acc']:.4f} "
          f"sparsity/sr={b['sparsity/sr']:.2f} cr={b['sparsity/cr']:.3f} ps={b['sparsity/ps']:.3f}")


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _cli_env(tmp_path: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MTLSPARSE_DATA": str(tmp_path / "data")}


def test_refused_rerun_leaves_the_finished_run_byte_identical_and_lists_the_keys(tmp_path):
    import subprocess

    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "mtlsparse", *TINY, "method=group_lasso", f"hydra.run.dir={run_dir}"]
    first = subprocess.run([*base, "lam=1e-2"], cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True, text=True,
                           timeout=280)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "mtlsparse.log").is_file()
    before = _snapshot(run_dir)
    for changed in (["lam=2e-2"], ["lam=1e-2", "model.hidden=64"], ["lam=1e-2", "resume=false"], ["lam=-1"]):
        again = subprocess.run([*base, *changed], cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True,
                               text=True, timeout=280)
        assert again.returncode == 2, (changed, again.stderr[-2000:])
        assert _snapshot(run_dir) == before, changed
    differ = subprocess.run([*base, "lam=2e-2"], cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True, text=True,
                            timeout=280)
    assert "lam: 0.01 → 0.02" in differ.stderr and "method.lam: 0.01 → 0.02" in differ.stderr
    skipped = subprocess.run([*base, "lam=1e-2"], cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True, text=True,
                             timeout=280)
    assert skipped.returncode == 0 and "skipped" in skipped.stderr + skipped.stdout
    assert _snapshot(run_dir) == before


def _die_before_the_first_epoch_ends(monkeypatch, cfg: DictConfig, run_dir: Path) -> None:
    """Run `cfg` in `run_dir` with a training step that raises: an attempt that leaves no checkpoint."""
    def die(*args, **kwargs):
        raise RuntimeError("killed before the first epoch ended")

    with monkeypatch.context() as patch:
        patch.setattr(MultiTaskModule, "training_step", die)
        with pytest.raises(RuntimeError, match="killed"):
            run(cfg, run_dir)


def test_a_dir_without_checkpoint_or_metrics_is_free_and_keeps_the_dead_attempt(tiny_cfg, tmp_path, monkeypatch):
    _die_before_the_first_epoch_ends(monkeypatch, tiny_cfg("method=group_lasso", "lam=1e-2"), tmp_path)
    assert (tmp_path / "job.json").is_file() and not list(tmp_path.glob("checkpoints/*.ckpt"))
    dead_job = (tmp_path / "job.json").read_bytes()
    metrics = run(tiny_cfg("method=group_lasso", "lam=2e-2"), tmp_path)  # another config: allowed
    assert metrics["config/lam"] == 2e-2
    assert (tmp_path / "attempts" / "1" / "job.json").read_bytes() == dead_job


@pytest.mark.parametrize("name", [None, "tb_runs"])
def test_a_dead_attempts_tracker_logs_move_with_it(tiny_cfg, tmp_path, monkeypatch, name):
    """The dead attempt's TensorBoard dir moves too, under the default name or the one the user gave."""
    overrides = ["logger=[csv,tensorboard]"] + ([f"logger.tensorboard.name={name}"] if name else [])
    board = name or "tensorboard"
    _die_before_the_first_epoch_ends(monkeypatch, tiny_cfg(*overrides), tmp_path)
    dead = sorted(p.relative_to(tmp_path) for p in (tmp_path / board).rglob("*") if p.is_file())
    assert dead, "the dead attempt wrote no TensorBoard files"
    run(tiny_cfg(*overrides), tmp_path)
    assert sorted(p.relative_to(tmp_path / "attempts" / "1") for p in
                  (tmp_path / "attempts" / "1" / board).rglob("*") if p.is_file()) == dead
    assert not any((tmp_path / f).exists() for f in dead if f.name.startswith("events."))  # none of the dead ones
    assert list((tmp_path / board).rglob("events.out.tfevents.*"))  # but its own


def test_a_zero_epoch_budget_is_refused(tiny_cfg, tmp_path):
    for epochs in ("0", "-1"):
        with pytest.raises(ConfigError, match="trainer.max_epochs must be an integer >= 1"):
            run(tiny_cfg(f"trainer.max_epochs={epochs}"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()
