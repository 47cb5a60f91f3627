"""Prox operators and prox-based methods: exact zeros below threshold, right shrinkage."""
import math

import pytest
import torch

from mtlsparse.sparsity.layers import group_norms, group_view
from mtlsparse.sparsity.prox import group_prox_, group_prox_metric_, soft_threshold_
from mtlsparse.training_state import TrainingState


def test_soft_threshold_zeroes_small_entries_and_shrinks_others():
    w = torch.tensor([-3.0, -0.5, 0.2, 0.0, 2.0])
    soft_threshold_(w, 1.0)
    assert torch.equal(w, torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
def test_group_prox_zeroes_exactly_groups_below_threshold(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    norms = group_norms(w)
    tau = float(norms.median())
    before = w.clone()
    group_prox_(w, tau)
    after = group_norms(w)
    below = norms <= tau
    assert below.any() and (~below).any()
    assert torch.all(after[below] == 0)
    # surviving groups keep their direction and lose exactly τ of their norm
    torch.testing.assert_close(after[~below], norms[~below] - tau)
    rows_before, rows_after = group_view(before), group_view(w)
    for i in torch.nonzero(~below).flatten():
        factor = 1 - tau / norms[i]
        torch.testing.assert_close(rows_after[i], rows_before[i] * factor)


def test_group_view_keeps_output_filters_apart():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).reshape(2, 3, 2, 2)
    rows = group_view(w)
    assert rows.shape == (3, 8)
    torch.testing.assert_close(rows[1], torch.cat([w[0, 1].flatten(), w[1, 1].flatten()]))


def brute_force_metric_prox(z: torch.Tensor, d: torch.Tensor, tau: float) -> torch.Tensor:
    """Minimise ½(w−z)ᵀD(w−z) + τ‖w‖ numerically (LBFGS), for one group."""
    w = z.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((w - z) ** 2 * d).sum() + tau * w.norm()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_prox_matches_numeric_minimisation(seed):
    torch.manual_seed(seed)
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    d = torch.rand_like(z) * 4 + 0.1
    dz_norms = group_norms(d * z)
    tau = float(dz_norms.median())  # half the groups below threshold
    w = z.clone()
    group_prox_metric_(w, tau, d)
    for g in range(4):
        if dz_norms[g] <= tau:
            assert torch.all(w[:, g] == 0), "groups with ‖D⊙z‖ ≤ τ must be exactly zero"
        else:
            expected = brute_force_metric_prox(z[:, g].flatten(), d[:, g].flatten(), tau)
            torch.testing.assert_close(w[:, g].flatten(), expected, atol=1e-6, rtol=1e-6)


def test_metric_prox_with_uniform_metric_is_plain_prox_with_scaled_threshold():
    torch.manual_seed(3)
    z = torch.randn(5, 7, dtype=torch.float64)
    a, b = z.clone(), z.clone()
    group_prox_metric_(a, 0.8, torch.full_like(z, 2.0))
    group_prox_(b, 0.4)
    torch.testing.assert_close(a, b)


def _adam_step_then_prox(method_name: str, prox: str = "adam"):
    from mtlsparse.models import HPS
    from mtlsparse.sparsity import L1, GroupLasso
    from mtlsparse.tasks import Task

    torch.manual_seed(0)
    model = HPS({"a": Task("a"), "b": Task("b")}, in_shape=(1, 16, 16), kernel_size=3)
    method = GroupLasso(lam=0.05, prox=prox) if method_name == "group_lasso" else L1(lam=0.05)
    method.setup(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    out = model(torch.randn(8, 1, 16, 16))
    sum(o.sum() for o in out.values()).backward()
    opt.step()
    return model, method, opt


@pytest.mark.parametrize("prox", ["plain", "adam"])
def test_group_lasso_after_step_matches_prox_definition(prox):
    from mtlsparse.sparsity.group_lasso import adam_metric

    model, method, opt = _adam_step_then_prox("group_lasso", prox)
    before = {layer.name: layer.weight.detach().clone() for layer in method.layers}
    method.after_optimizer_step(opt)
    for layer in method.layers:
        expected = before[layer.name].clone()
        tau = 0.1 * 0.05 * math.sqrt(layer.group_size)
        if prox == "plain":
            group_prox_(expected, tau)
        else:
            group, state = opt.param_groups[0], opt.state[layer.weight]
            group_prox_metric_(expected, tau, adam_metric(group, state))
        torch.testing.assert_close(layer.weight.detach(), expected)
    # the input layer and the heads are not touched
    assert model.trunk[0] not in [layer.module for layer in method.layers]
    assert all(h not in [layer.module for layer in method.layers] for h in model.heads.values())


def test_zero_groups_stay_zero_without_gradient_revival():
    """A group zeroed by the prox stays exactly zero while its gradient is zero (Adam state cannot revive it)."""
    model, method, opt = _adam_step_then_prox("group_lasso", "plain")
    layer = method.layers[-1]
    with torch.no_grad():
        layer.weight[:, :3] = 0
    for _ in range(3):
        opt.zero_grad()
        out = model(torch.randn(8, 1, 16, 16))
        sum(o.sum() for o in out.values()).backward()
        layer.weight.grad[:, :3] = 0
        opt.step()
        method.after_optimizer_step(opt)
    assert torch.all(layer.weight[:, :3] == 0)


def test_l1_after_step_soft_thresholds_with_lr_times_lambda():
    model, method, opt = _adam_step_then_prox("l1")
    before = {layer.name: layer.weight.detach().clone() for layer in method.layers}
    method.after_optimizer_step(opt)
    for layer in method.layers:
        expected = soft_threshold_(before[layer.name].clone(), 0.1 * 0.05)
        torch.testing.assert_close(layer.weight.detach(), expected)


def test_adam_prox_with_non_adam_optimizer_is_a_clear_error():
    from mtlsparse.models import HPS
    from mtlsparse.sparsity import GroupLasso
    from mtlsparse.tasks import Task

    model = HPS({"a": Task("a")}, in_shape=(1, 16, 16), kernel_size=3)
    method = GroupLasso(lam=0.1, prox="adam")
    method.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 16, 16))["a"].sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="method.prox=plain"):
        method.after_optimizer_step(opt)


def test_refit_freezes_the_support_and_stops_shrinking():
    """With finetune_epochs, the last epochs keep zero groups at zero and no longer shrink the others."""
    model, method, opt = _adam_step_then_prox("group_lasso", "plain")
    method = type(method)(lam=0.05, prox="plain", finetune_epochs=2)
    method.setup(model)
    layer = method.layers[-1]
    with torch.no_grad():
        layer.weight[:, :4] = 0
    method.set_budget(5)
    method.on_train_epoch_end(TrainingState(epoch=1))
    assert not method.refitting and method.masks() is None  # 3 epochs left > 2
    method.on_train_epoch_end(TrainingState(epoch=2))
    assert method.refitting and torch.equal(method.masks()[layer.name][:, :4], torch.zeros_like(layer.weight[:, :4],
                                                                                                 dtype=torch.bool))
    for _ in range(3):
        opt.zero_grad()
        sum(o.sum() for o in model(torch.randn(8, 1, 16, 16)).values()).backward()
        before = layer.weight.detach().clone()
        opt.step()
        adam_only = layer.weight.detach().clone()
        method.after_optimizer_step(opt)
        assert torch.all(layer.weight[:, :4] == 0)
        torch.testing.assert_close(layer.weight[:, 4:], adam_only[:, 4:])  # no prox shrinkage any more
        assert not torch.equal(layer.weight[:, 4:], before[:, 4:])
    assert "weight_mask" in dict(layer.module.named_buffers())  # the frozen support lives with the model


def test_lambda_warm_up_ramps_the_prox_strength_then_holds_it():
    from mtlsparse.sparsity.group_lasso import GroupLasso
    from mtlsparse.training_state import TrainingState

    method = GroupLasso(lam=0.4, warmup_epochs=4, finetune_epochs=2)
    method.set_budget(10)
    strengths = []
    for epoch in range(8):
        method.on_train_epoch_start(TrainingState(epoch=epoch))
        strengths.append(method.strength)
    assert strengths == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4])
    fraction = GroupLasso(lam=0.4, warmup_fraction=0.2)
    fraction.set_budget(10)
    assert fraction.ramp_epochs == 2


def test_a_warm_up_past_the_refit_is_refused_with_the_keys():
    from mtlsparse.errors import ConfigError
    from mtlsparse.sparsity.group_lasso import GroupLasso

    with pytest.raises(ConfigError, match="warm-up lasts 8 epochs but only 6 epochs run the prox"):
        GroupLasso(lam=0.4, warmup_epochs=8, finetune_epochs=4).set_budget(10)
