"""ChannelGroups: one definition of a channel group, read by the methods, the metrics and export."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_norm_coupling import SHAPE, bn_hps
from torch import nn

from mtlsparse.channel_groups import ChannelGroups, producer_norms
from mtlsparse.metrics.sparsity import group_sparsity
from mtlsparse.sparsity import GroupLasso


def _coupled(channels: int = 4) -> ChannelGroups:
    conv, bn = nn.Conv2d(channels, 3, 3), nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return ChannelGroups("conv", conv.weight, bn)


def test_a_coupled_group_is_zero_only_when_its_norm_affine_pair_is_zero_too():
    groups = _coupled()
    with torch.no_grad():
        groups.weight[:, :2] = 0  # groups 0 and 1 have zero weights ...
        groups.norm.weight[1] = 0  # ... but only group 1 also has γ = β = 0
        groups.norm.bias[1] = 0
    assert groups.zero().tolist() == [False, True, False, False]
    assert ChannelGroups.of(groups.weight).zero().tolist() == [True, True, False, False]  # uncoupled view
    assert group_sparsity([groups]) == 25.0 and group_sparsity([groups.weight]) == 50.0
    assert groups.size == 3 * 3 * 3 + 2 and groups.count == 4


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 6), st.floats(0.5, 3.0))
def test_stacked_round_trips_through_write_back(channels, scale):
    groups = _coupled(channels)
    before = [t.detach().clone() for t in groups.tensors]
    stacked = groups.stacked()
    assert stacked.shape == (groups.size, groups.count)
    groups.write_back_(stacked * scale)
    for t, b in zip(groups.tensors, before):
        torch.testing.assert_close(t.detach(), b * scale)
    torch.testing.assert_close(groups.norms(), torch.linalg.vector_norm(groups.stacked().detach(), dim=0))


def test_methods_metrics_and_tracing_agree_on_the_coupled_groups():
    model = bn_hps()
    method = GroupLasso(lam=0.1, couple_norms=True)
    method.setup(model)
    method.coupling.couple(model, SHAPE, method.layers)
    traced = producer_norms(model, [(layer.name, layer.module) for layer in method.layers], SHAPE)
    assert {g.name: g.norm for g in method.channel_groups() if g.norm is not None} == traced
    conv = next(g for g in method.channel_groups() if g.norm is not None)
    with torch.no_grad():
        conv.write_back_(torch.zeros_like(conv.stacked()))  # every coupled group of that layer to zero
    total = sum(g.count for g in method.channel_groups())
    assert group_sparsity(method.channel_groups()) == 100.0 * conv.count / total
