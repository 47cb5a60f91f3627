"""The dead-row tolerance rule: exactly the groups / units below tol × their layer's largest norm become zero."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mtlsparse.channel_groups import ChannelGroups, group_norms
from mtlsparse.sparsity.dead_rows import check_tolerance, dead, snap_dead_, snap_dead_groups_
from mtlsparse.sparsity.group_lasso import GroupLasso
from mtlsparse.sparsity.growl import GrOWL


@settings(max_examples=40, deadline=None)
@given(scales=st.lists(st.sampled_from([0.0, 1e-30, 1e-9, 1e-7, 1e-3, 0.5, 1.0, 3.0]), min_size=2, max_size=12),
       tol=st.sampled_from([0.0, 1e-8, 1e-6, 1e-2]), seed=st.integers(0, 1000))
def test_snap_zeroes_exactly_the_groups_below_tolerance(scales, tol, seed):
    torch.manual_seed(seed)
    weight = torch.randn(5, len(scales), dtype=torch.float64)
    weight = weight / weight.norm(dim=0) * torch.tensor(scales, dtype=torch.float64)  # group c has norm scales[c]
    before = group_norms(weight).clone()
    expected_dead = dead(before, tol)
    zeroed = snap_dead_groups_(ChannelGroups("fc", weight), tol)
    after = group_norms(weight)
    assert torch.all(after[expected_dead] == 0)
    assert torch.equal(after[~expected_dead], before[~expected_dead])  # every other group untouched
    if tol > 0:
        assert torch.equal(expected_dead, before <= tol * before.max())
    assert zeroed == int((expected_dead & (before > 0)).sum())  # float64: no underflow here
    if tol == 0:
        assert zeroed == 0 and snap_dead_([ChannelGroups("fc", weight)], tol).units == 0


def test_snap_zeroes_dead_output_units_and_keeps_their_bias():
    fc = nn.Linear(4, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 2.0, 0.5, 1.0], [1e-30, -1e-30, 1e-31, 0.0], [0.3, 0.1, 0.2, 0.4]]))
        fc.bias.fill_(-0.5)
    snapped = snap_dead_([ChannelGroups("fc", fc.weight)], 1e-6)
    assert snapped.units == 1 and torch.all(fc.weight[1] == 0) and torch.all(fc.weight[[0, 2]] != 0)
    assert torch.all(fc.bias == -0.5)


def test_coupled_group_loses_its_norm_parameters_too():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(3)
    with torch.no_grad():
        conv.weight[:, 1] = 1e-20
        bn.weight[1], bn.bias[1] = 1e-20, -1e-20
    snapped = snap_dead_([ChannelGroups("conv", conv.weight, bn)], 1e-6)
    assert snapped.groups == 1
    assert torch.all(conv.weight[:, 1] == 0) and bn.weight[1] == 0 and bn.bias[1] == 0
    assert torch.all(conv.weight[:, [0, 2]] != 0)


@pytest.mark.parametrize("method", [GroupLasso, GrOWL])
def test_bad_tolerance_names_the_key(method):
    with pytest.raises(ValueError, match="method.dead_tol must be in \\[0, 1\\)"):
        method(dead_tol=1.5)
    assert check_tolerance(0.0) == 0.0


def test_the_rule_runs_at_epoch_ends_of_a_real_fit_and_is_logged(tiny_cfg, tmp_path):
    from mtlsparse.builders import build_module, build_trainer
    from mtlsparse.config import build

    # lr so small the planted dead group and unit stay ~1e-9 of their layer's scale through the epoch
    cfg = tiny_cfg("method=group_lasso", "lam=0", "trainer.max_epochs=1", "method.dead_tol=1e-6",
                   "optimizer.lr=1e-12")
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    weight = module.method.layers[-1].weight
    with torch.no_grad():
        weight[:, 0] *= 1e-9  # input group 0
        weight[1] *= 1e-9  # output unit 1
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=datamodule)
    logged = trainer.callback_metrics
    assert float(logged["sparsity/dead_groups_zeroed"]) == 1 and float(logged["sparsity/dead_units_zeroed"]) == 1
    assert torch.all(weight[:, 0] == 0) and torch.all(weight[1] == 0)
    assert torch.count_nonzero(weight) == (weight.shape[0] - 1) * (weight.shape[1] - 1)  # nothing else
