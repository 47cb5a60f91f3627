"""Group lasso with BatchNorm-coupled groups (`method.couple_norms=true`)."""
from __future__ import annotations

import math

import pytest
import torch

from mtlsparse.channel_groups import stack_groups, unstack_groups_
from mtlsparse.export import compact
from mtlsparse.models import HPS
from mtlsparse.sparsity import GroupLasso
from mtlsparse.sparsity.group_lasso import adam_metric
from mtlsparse.sparsity.layers import group_norms, group_view
from mtlsparse.sparsity.prox import group_prox_, group_prox_metric_
from mtlsparse.tasks import Task
from mtlsparse.training_state import TrainingState

SHAPE = (1, 16, 16)


def bn_hps(batch_norm: bool = True) -> HPS:
    torch.manual_seed(0)
    return HPS({"a": Task("a"), "b": Task("b")}, in_shape=SHAPE, channels=(6, 8), hidden=12, kernel_size=3,
               batch_norm=batch_norm)


def coupled_method(model: HPS, prox: str = "plain", lam: float = 0.05) -> GroupLasso:
    method = GroupLasso(lam=lam, prox=prox, couple_norms=True)
    method.setup(model)
    method.coupling.couple(model, SHAPE, method.layers)
    return method


def test_conv_after_batchnorm_is_coupled_and_flatten_fc_is_not():
    model = bn_hps()
    method = coupled_method(model)
    conv2, fc1 = method.layers
    assert method.coupling.norms == {conv2.name: model.trunk[1]}  # Conv-BN-pool-ReLU-Conv: the first BN feeds conv2
    assert fc1.name not in method.coupling.norms  # 8 BN channels feed 8·s² features: not one-to-one
    assert method.coupling.groups(conv2).size == conv2.group_size + 2
    assert method.coupling.groups(fc1).size == fc1.group_size


def test_coupling_a_model_without_batchnorm_warns_and_keeps_plain_groups(caplog):
    with caplog.at_level("WARNING", logger="mtlsparse"):
        method = coupled_method(bn_hps(batch_norm=False))
    assert method.coupling.norms == {} and "no layer reads a BatchNorm" in caplog.text
    assert all(method.coupling.groups(layer).size == layer.group_size for layer in method.layers)


def test_tracing_leaves_batchnorm_statistics_and_train_mode_alone():
    model = bn_hps().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    coupled_method(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resnet_couples_block_internal_convs_only():
    from torchvision.models.resnet import BasicBlock

    from test_export import tiny_resnet

    model = tiny_resnet()
    method = GroupLasso(lam=0.1, couple_norms=True)
    method.setup(model)
    method.coupling.couple(model, (3, 16, 16), method.layers)
    blocks = {name for name, m in model.named_modules() if isinstance(m, BasicBlock)}
    # a block's conv2 reads bn1 only; convs reading the residual stream have several readers
    assert set(method.coupling.norms) == {f"{b}.conv2" for b in blocks}
    for name, norm in method.coupling.norms.items():
        assert norm is model.get_submodule(name.replace("conv2", "bn1"))


def test_stack_and_unstack_groups_round_trip():
    model = bn_hps()
    conv2, bn = model.trunk[4], model.trunk[1]
    tensors = [conv2.weight, bn.weight, bn.bias]
    stacked = stack_groups(tensors)
    assert stacked.shape == (conv2.weight[:, 0].numel() + 2, conv2.in_channels)
    torch.testing.assert_close(stacked[:-2].T, group_view(conv2.weight))
    torch.testing.assert_close(stacked[-2], bn.weight.detach())
    originals = [t.detach().clone() for t in tensors]
    unstack_groups_(stacked * 2, tensors)
    for t, o in zip(tensors, originals):
        torch.testing.assert_close(t.detach(), 2 * o)


@pytest.mark.parametrize("prox", ["plain", "adam"])
def test_coupled_prox_acts_on_weight_and_bn_pair_as_one_group(prox):
    model = bn_hps()
    method = coupled_method(model, prox)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sum(o.sum() for o in model(torch.randn(8, *SHAPE)).values()).backward()
    opt.step()
    conv2, bn = model.trunk[4], model.trunk[1]
    tensors = [conv2.weight, bn.weight, bn.bias]
    expected = stack_groups([t.detach() for t in tensors])
    tau = 0.1 * 0.05 * math.sqrt(expected.shape[0])
    if prox == "plain":
        group_prox_(expected, tau)
    else:
        group, state = opt.param_groups[0], opt.state
        group_prox_metric_(expected, tau, stack_groups([adam_metric(group, state[t]) for t in tensors]))
    method.after_optimizer_step(opt)
    torch.testing.assert_close(stack_groups([t.detach() for t in tensors]), expected)


def test_group_survives_on_its_bn_scale_and_dies_with_it():
    """Plain prox: a group is zero iff ‖(W[:, c], γ_c, β_c)‖ ≤ τ, so a large γ keeps a small W[:, c] alive."""
    model = bn_hps()
    method = coupled_method(model, "plain", lam=1.0)
    conv2, bn = model.trunk[4], model.trunk[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tau = 0.1 * math.sqrt(method.coupling.groups(method.layers[0]).size)
    with torch.no_grad():
        conv2.weight.mul_(1e-3)  # every W[:, c] is far below τ on its own
        bn.bias.zero_()
        bn.weight.copy_(torch.tensor([10.0, 10.0, 10.0, 0.01, 0.01, 0.01]))
    norms = group_norms(stack_groups([conv2.weight, bn.weight, bn.bias])).detach()
    method.after_optimizer_step(opt)
    alive = group_norms(conv2.weight) > 0
    assert alive.tolist() == [True] * 3 + [False] * 3
    assert torch.all(bn.weight[3:] == 0) and torch.all(bn.bias[3:] == 0)
    torch.testing.assert_close(bn.weight[:3].detach(), 10.0 * (1 - tau / norms[:3]))  # survivors shrink as one


def test_dead_channel_stays_zero_under_adam_and_export_removes_its_producer():
    model = bn_hps()
    method = coupled_method(model, "adam", lam=1e-3)
    conv1, bn, conv2 = model.trunk[0], model.trunk[1], model.trunk[4]
    with torch.no_grad():
        conv2.weight[:, :4] = 0
        bn.weight[:4] = 0
        bn.bias[:4] = 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        sum(o.square().mean() for o in model(torch.randn(8, *SHAPE)).values()).backward()
        opt.step()
        method.after_optimizer_step(opt)
    assert torch.all(conv2.weight[:, :4] == 0) and torch.all(bn.weight[:4] == 0)
    small, _ = compact(model.eval(), torch.randn(4, *SHAPE))
    assert small.trunk[0].out_channels == conv1.out_channels - 4  # the producer conv loses the dead channels
    assert small.trunk[4].in_channels == conv2.in_channels - 4


def test_penalty_sums_coupled_group_norms():
    model = bn_hps()
    method = coupled_method(model, lam=0.5)
    conv2, fc1 = method.layers
    bn = model.trunk[1]
    coupled = group_norms(stack_groups([conv2.weight, bn.weight, bn.bias]))
    expected = 0.5 * (math.sqrt(conv2.group_size + 2) * coupled.sum()
                      + math.sqrt(fc1.group_size) * group_norms(fc1.weight).sum())
    torch.testing.assert_close(method.penalty(), expected)


def test_coupling_without_a_datamodule_is_a_clear_error():
    method = GroupLasso(lam=0.1, couple_norms=True)
    method.setup(bn_hps())
    with pytest.raises(ValueError, match="method.couple_norms=false"):
        method.on_fit_start(TrainingState(model=bn_hps()))  # no input shape: nothing to trace


def test_growl_prox_and_cap_act_on_coupled_rows():
    from mtlsparse.sparsity.growl import GrOWL
    from mtlsparse.sparsity.owl import cap_zero_rows_, growl_prox_

    model = bn_hps()
    method = GrOWL(lam=2.0, couple_norms=True, s_lmax=0.5, phase1_iterations=1, epochs_per_iteration=1)
    method.setup(model)
    method.coupling.couple(model, SHAPE, method.layers)
    conv2, bn = model.trunk[4], model.trunk[1]
    assert set(method.coupling.norms) == {method.layers[0].name}
    with torch.no_grad():
        conv2.weight.mul_(0.05)
        bn.weight.copy_(torch.linspace(0.01, 3.0, 6))
    stacked = stack_groups([conv2.weight, bn.weight, bn.bias]).detach()
    expected = stacked.clone()
    growl_prox_(expected, 0.1 * method.theta(method.layers[0]))
    cap_zero_rows_(expected, stacked, 3)  # s_lmax 0.5 of 6 rows
    method.prox_step.fill_(0.1)
    method._prox(cap=0.5)
    torch.testing.assert_close(stack_groups([conv2.weight, bn.weight, bn.bias]), expected)
    zero = group_norms(conv2.weight) == 0
    assert 0 < int(zero.sum()) <= 3 and torch.all(bn.weight[zero] == 0)
    # the large-γ channels survive although their conv2 slices alone are small
    assert not zero[-1] and not zero[-2]


def test_growl_penalty_uses_coupled_rows():
    from mtlsparse.sparsity.growl import GrOWL
    from mtlsparse.sparsity.owl import owl_value

    model = bn_hps()
    method = GrOWL(lam=1.0, couple_norms=True)
    method.setup(model)
    method.coupling.couple(model, SHAPE, method.layers)
    conv2, fc1 = method.layers
    bn = model.trunk[1]
    expected = (owl_value(group_norms(stack_groups([conv2.weight, bn.weight, bn.bias])), method.spike(conv2))
                + owl_value(group_norms(fc1.weight), method.spike(fc1)))
    torch.testing.assert_close(method.penalty(), expected)


@pytest.mark.parametrize("method_name", ["group_lasso", "growl"])
def test_non_boolean_couple_norms_is_a_clear_error(method_name):
    from mtlsparse.config import build, compose_config

    cfg = compose_config([f"method={method_name}", "method.couple_norms=yes"])
    with pytest.raises(Exception, match="method.couple_norms must be true or false, got 'yes'"):
        build(cfg, "method")
