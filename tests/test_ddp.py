"""DDP on CPU (2 gloo processes): ranks stay identical through prox steps, DST rewiring and
GrOWL's phase change; test metrics are reduced over ranks; only rank 0 writes files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtlsparse.rank_check import (
    RankConsistencyCheck,
    RankDivergenceError,
    state_digests,
)
from tests.conftest import REPO, compose_cfg

DDP = ["dataset=synthetic", "model=hps_lenet", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
       "trainer.enable_progress_bar=false", "dataset.batch_size=32", "dataset.eval_batch_size=32",
       "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "test_ckpt=last", "export.enabled=false"]
METHODS = {
    "group_lasso": ["method=group_lasso", "lam=1e-2", "trainer.max_epochs=2"],
    # phase 1 = epochs 0-1 (prox), phase 2 from epoch 2 (affinity-propagation tying)
    "growl": ["method=growl", "k0=1e-3", "balancer.epochs_per_iteration=1", "method.phase1_iterations=2",
              "method.s_lmax=0.5", "method.s_min=0.0", "method.lam=3000", "trainer.max_epochs=3"],
    "rigl": ["method=rigl", "sparsity=0.8", "method.update_interval=1", "method.end_step=6", "trainer.max_epochs=2"],
}


def _ddp_run(tmp_path, overrides):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mtlsparse", *DDP, *overrides, f"data_root={tmp_path}/data",
                           f"hydra.run.dir={tmp_path}/run"], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True,
                          timeout=280)


def _single_process_test_metrics(tmp_path, overrides):
    """Evaluate the DDP run's final weights on the whole test set in one process."""
    import lightning as L

    from mtlsparse.train import build, build_module

    cfg = compose_cfg([*DDP, *overrides, "trainer=cpu", "trainer.devices=1"], data_root=tmp_path / "data")
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    return trainer.test(module, datamodule=datamodule, verbose=False)[0]


# group lasso in the fast suite; GrOWL (tying across ranks) and RigL (mask updates) under `make test-slow`
@pytest.mark.parametrize("method", [m if m == "group_lasso" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHODS])
def test_ddp_two_cpu_ranks_stay_identical_and_reduce_metrics(tmp_path, method):
    proc = _ddp_run(tmp_path, METHODS[method])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "RankDivergenceError" not in log  # checked after every epoch
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sparsity/param"] > 0
    if method == "growl":  # phase 2 (affinity-propagation tying) ran, on both ranks alike
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        assert bool(state["method.tied"]) and metrics["sparsity/cr"] > 1
    # the synthetic test split (128 = 2 ranks × 2 batches of 32) is covered exactly once
    reference = _single_process_test_metrics(tmp_path, METHODS[method])
    for key, value in reference.items():
        if key.endswith("/acc"):
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
    # rank 1 wrote no files of its own: one metrics file, one checkpoint set, logs only from rank 0's logger
    assert len(list(tmp_path.rglob("metrics.json"))) == 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "last.ckpt" and len(names) == 2 and names[0].startswith("best-epoch")


class _Stub(torch.nn.Module):
    """A module whose all_gather returns its own digests next to another replica's."""

    def __init__(self, other: torch.nn.Module) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.other = [other]
        self.device = torch.device("cpu")

    def all_gather(self, local):
        return torch.stack([local, state_digests(self.other[0])[1]])


class _Trainer:
    world_size = 2
    current_epoch = 4


def test_rank_check_names_the_diverged_tensor():
    same = _Stub(torch.nn.Module())
    same.other[0] = same
    RankConsistencyCheck().on_train_epoch_end(_Trainer(), same)  # identical replicas pass

    drifted = _Stub(torch.nn.Module())
    replica = _Stub(torch.nn.Module())
    with torch.no_grad():
        replica.weight[1] += 1e-7  # one ulp-scale difference is enough
    drifted.other[0] = replica
    with pytest.raises(RankDivergenceError, match=r"epoch 4: .* 1 tensors \(weight\)"):
        RankConsistencyCheck().on_train_epoch_end(_Trainer(), drifted)
