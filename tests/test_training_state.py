"""The hook contract: methods and balancers get a TrainingState (never the LightningModule), and
a method's phase change reaches the balancer as a declared event."""
from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from mtlsparse.balancers.chebyshev import Chebyshev
from mtlsparse.builders import build_module, build_trainer
from mtlsparse.config import build, validate_knobs
from mtlsparse.sparsity.base import SparsityMethod
from mtlsparse.sparsity.growl import GrOWL
from mtlsparse.training_state import PhaseStarted, TrainingState

from test_masks import attach


class Recorder(SparsityMethod):
    """A method that only records what its hooks receive."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, object]] = []

    def on_fit_start(self, state):
        super().on_fit_start(state)
        self.seen.append(("fit_start", state))
        self.first_batch = next(iter(state.batches(1)))

    def on_train_epoch_end(self, state):
        self.seen.append(("epoch_end", state))


def test_hooks_receive_a_training_state_with_the_run_counters(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_epochs=3")
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    module.method = recorder = Recorder()
    recorder.setup(module.model)
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=datamodule)

    states = [state for _, state in recorder.seen]
    assert [hook for hook, _ in recorder.seen] == ["fit_start", "epoch_end", "epoch_end", "epoch_end"]
    assert all(isinstance(s, TrainingState) and not isinstance(s, L.LightningModule) for s in states)
    assert [s.epoch for s in states[1:]] == [0, 1, 2]
    assert [s.step for s in states[1:]] == [2, 4, 6]  # limit_train_batches=2 optimizer steps per epoch
    assert all(s.max_epochs == 3 and s.total_steps == 6 for s in states)
    assert all(s.model is module.model for s in states)
    x, y = recorder.first_batch
    assert x.shape[0] == cfg.dataset.batch_size and set(y) == set(module.model.tasks)


def test_a_state_without_data_says_what_is_missing():
    with pytest.raises(RuntimeError, match="no training data"):
        next(iter(TrainingState().batches(1)))


def test_growl_announces_phase_two_once_when_the_support_is_fixed():
    method, _ = attach(GrOWL(lam=0.1, phase1_epochs=2, phase2_iterations=1))
    method.set_budget(4)
    events: list = []
    for epoch in range(4):
        method.on_train_epoch_start(TrainingState(epoch=epoch, announce=events.append))
        method.on_train_epoch_end(TrainingState(epoch=epoch, announce=events.append))
    assert events == [PhaseStarted(phase=2, epoch=1, restart_optimizer=True)]


def _chebyshev_after(order: str) -> Chebyshev:
    bal = Chebyshev(["a", "b"], k=[0.5, 0.5], mu0=0.1, epochs_per_iteration=1)
    bal.train()
    for epoch in range(2):
        bal({"a": torch.tensor(1.0 + epoch), "b": torch.tensor(2.0)}, None, None)
        event, state = PhaseStarted(phase=2, epoch=1), TrainingState(epoch=epoch)
        if epoch == 1 and order == "event first":
            bal.on_phase_started(event)
        bal.on_train_epoch_end(state)
        if epoch == 1 and order == "event last":
            bal.on_phase_started(event)
    return bal


def test_the_phase_two_restart_does_not_depend_on_hook_order():
    first, last = _chebyshev_after("event first"), _chebyshev_after("event last")
    torch.testing.assert_close(first.lambdas, torch.full((3,), 1 / 3))
    assert float(first.mu) == pytest.approx(0.1)
    torch.testing.assert_close(first.lambdas, last.lambdas)
    assert float(first.mu) == float(last.mu)


def test_the_event_reaches_the_balancer_in_a_real_growl_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=growl", "trainer.max_epochs=3", "method.phase1_epochs=1", "method.lam=0.05")
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    received: list = []
    handler = module.balancer.on_phase_started
    module.balancer.on_phase_started = lambda event: (received.append(event), handler(event))
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=datamodule)
    assert received == [PhaseStarted(phase=2, epoch=0, restart_optimizer=True)]  # after the only phase-1 epoch, once


def test_disagreeing_iteration_lengths_are_named(tiny_cfg, caplog):
    cfg = tiny_cfg("method=growl", "method.epochs_per_iteration=2", "balancer.epochs_per_iteration=3")
    with caplog.at_level(logging.WARNING, logger="mtlsparse"):
        validate_knobs(cfg)
    assert "method.epochs_per_iteration=2 but balancer.epochs_per_iteration=3" in caplog.text


class OptimizerProbe(L.Callback):
    """Records, at each epoch's first batch (before its step), the lr and whether Adam holds state."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            optimizer = trainer.optimizers[0]
            self.seen.append((optimizer.param_groups[0]["lr"], bool(optimizer.state)))


@pytest.mark.parametrize("restart", ["restart", "continue"])
def test_phase_two_restarts_the_optimizer_and_its_schedule(tiny_cfg, tmp_path, restart):
    cfg = tiny_cfg("method=growl", "trainer.max_epochs=3", "method.phase1_epochs=1", "method.lam=0.05",
                   "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5", "optimizer.lr=0.01",
                   f"method.phase2_optimizer={restart}")
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    probe = OptimizerProbe()
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)
    if restart == "restart":  # phase 2 (epoch 1) starts at the initial lr with no Adam moments, then decays again
        assert probe.seen == [(0.01, False), (0.01, False), (0.005, True)]
    else:
        assert probe.seen == [(0.01, False), (0.005, True), (0.0025, True)]


def test_epoch_end_logs_reach_metrics_csv_every_epoch_whatever_the_step_logging_interval(tiny_cfg, tmp_path):
    import csv

    cfg = tiny_cfg("method=growl", "trainer.max_epochs=3", "method.phase1_epochs=1", "method.lam=0.05",
                   "trainer.log_every_n_steps=1000")
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=datamodule)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    phases = [float(r["growl/phase"]) for r in rows if r.get("growl/phase")]
    mus = [r["balancer/mu"] for r in rows if r.get("balancer/mu")]
    assert phases == [1.0, 2.0, 2.0] and len(mus) == 3
