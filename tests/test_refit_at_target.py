"""Prox methods that refit from the first epoch reaching a target sparsity (`method.freeze_at_sparsity`)."""
import csv
import math

import pytest
import torch

from mtlsparse import train
from mtlsparse.metrics.sparsity import group_sparsity
from mtlsparse.models import HPS
from mtlsparse.sparsity.group_lasso import GroupLasso
from mtlsparse.sparsity.l1 import L1
from mtlsparse.tasks import Task
from mtlsparse.training_state import PhaseStarted, TrainingState


def _setup(method):
    torch.manual_seed(0)
    model = HPS({"a": Task("a"), "b": Task("b")}, in_shape=(1, 16, 16), kernel_size=3)
    method.setup(model)
    method.set_budget(10)
    return model, method


def _zero_groups(method, fraction: float) -> None:
    """Zero the first groups of every layer until `fraction` of all channel groups are zero."""
    with torch.no_grad():
        for layer in method.layers:
            k = int(round(fraction * layer.weight.shape[1]))
            layer.weight[:, :k] = 0


def test_the_support_freezes_at_the_first_epoch_end_reaching_the_target():
    model, method = _setup(GroupLasso(lam=0.1, freeze_at_sparsity=0.5))
    _zero_groups(method, 0.25)
    method.on_train_epoch_end(TrainingState(epoch=0))
    assert not method.refitting and method.masks() is None and int(method.refit_from_epoch) == -1
    _zero_groups(method, 0.5)
    reached = group_sparsity(method.channel_groups())
    assert reached >= 50
    method.on_train_epoch_end(TrainingState(epoch=1))
    assert method.refitting and int(method.refit_from_epoch) == 2
    for layer in method.layers:
        assert torch.equal(method.masks()[layer.name], layer.weight != 0)
    assert method.report() == {"prox/refit_from_epoch": 2.0}
    _zero_groups(method, 0.9)  # later epochs change nothing: the support is fixed
    method.on_train_epoch_end(TrainingState(epoch=2))
    assert int(method.refit_from_epoch) == 2


def test_the_refit_keys_cap_how_late_the_freeze_comes():
    model, method = _setup(GroupLasso(lam=0.1, freeze_at_sparsity=0.9, finetune_epochs=3))
    for epoch in range(6):
        method.on_train_epoch_end(TrainingState(epoch=epoch))
        assert not method.refitting
    method.on_train_epoch_end(TrainingState(epoch=6))  # 3 epochs left: the schedule freezes below the target
    assert method.refitting and int(method.refit_from_epoch) == 7


@pytest.mark.parametrize("optimizer, events", [("restart", [PhaseStarted(phase=2, epoch=3, restart_optimizer=True)]),
                                               ("continue", [])])
def test_a_restarting_refit_announces_a_fresh_optimizer_once_at_the_next_epoch_start(optimizer, events):
    model, method = _setup(GroupLasso(lam=0.1, freeze_at_sparsity=0.4, refit_optimizer=optimizer))
    seen = []
    _zero_groups(method, 0.5)
    method.on_train_epoch_end(TrainingState(epoch=3, announce=seen.append))
    assert seen == []  # not before the epoch's validation and checkpoint
    for epoch in (4, 5):
        method.on_train_epoch_start(TrainingState(epoch=epoch, announce=seen.append))
    assert seen == events


def test_numerically_dead_groups_count_toward_the_target_and_in_the_dead_row_log():
    model, method = _setup(GroupLasso(lam=0.1, freeze_at_sparsity=0.5, dead_tol=1e-6))
    _zero_groups(method, 0.5)
    layer = method.layers[-1]
    with torch.no_grad():  # one group of the half left alive is dead in float round-off
        layer.weight[:, -1] = 1e-12
    method.on_train_epoch_end(TrainingState(epoch=0))
    assert method.refitting and not method.masks()[layer.name][:, -1].any()
    assert method.snap_dead_().groups == 1  # the module's epoch-end count still sees it, once
    assert method.snap_dead_().groups == 0


def test_l1_targets_parameter_sparsity():
    model, method = _setup(L1(lam=0.1, freeze_at_sparsity=0.3))
    with torch.no_grad():
        for layer in method.layers:
            layer.weight.view(-1)[: layer.weight.numel() // 3 + 1] = 0
    method.on_train_epoch_end(TrainingState(epoch=0))
    assert method.refitting


@pytest.mark.parametrize("key, value, message", [
    ("freeze_at_sparsity", 1.2, r"method.freeze_at_sparsity must be a fraction in \(0, 1\)"),
    ("freeze_at_sparsity", 0.0, r"method.freeze_at_sparsity must be a fraction in \(0, 1\)"),
    ("refit_optimizer", "fresh", r"method.refit_optimizer must be one of \('continue', 'restart'\)")])
def test_bad_refit_options_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        GroupLasso(lam=0.1, **{key: value})


def test_a_real_fit_refits_from_the_target_with_a_fresh_optimizer(tiny_cfg, tmp_path):
    """Group sparsity is constant from the freeze on, and the refit's first epoch runs at the initial lr."""
    cfg = tiny_cfg("method=group_lasso", "lam=0.5", "method.freeze_at_sparsity=0.3", "method.refit_optimizer=restart",
                   "trainer.max_epochs=4", "+callbacks=lr_monitor", "callbacks.lr_monitor.logging_interval=epoch")
    metrics = train.run(cfg, tmp_path)
    start = int(metrics["prox/refit_from_epoch"])
    assert 1 <= start <= 3
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    group = {int(r["epoch"]): float(r["sparsity/group"]) for r in rows if r.get("sparsity/group")}
    assert group[start - 1] >= 30 and len({group[e] for e in range(start - 1, 4)}) == 1
    # the lr monitor logs at each epoch start, before the refit's restart: epoch start + 1 shows the cosine
    # schedule restarted over the 4 − start epochs left, not the original 4-epoch one
    epoch_of_step = {}
    for r in rows:
        if r.get("epoch"):
            epoch_of_step.setdefault(int(r["step"]), int(r["epoch"]))
    lr = {epoch_of_step[int(r["step"])]: float(v) for r in rows for k, v in r.items() if k.startswith("lr-") and v}
    if start + 1 < 4:
        left = 4 - start
        assert lr[start + 1] == pytest.approx(cfg.optimizer.lr * (1 + math.cos(math.pi / left)) / 2)
        assert lr[start + 1] != pytest.approx(cfg.optimizer.lr * (1 + math.cos(math.pi * (start + 1) / 4)) / 2)
