"""FairGrad (Ban & Ji, 2024): the solver satisfies (G Gᵀ w)_i = w_i^(−1/α), so for α = 1 every
wᵢ·(G Gᵀ w)ᵢ = 1 (proportional fairness) and d = Σ wᵢ gᵢ descends on every task; an independent
least-squares solve agrees; degenerate Gramians and the balancer's wiring behave as documented."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from mtlsparse.balancers import BalanceContext
from mtlsparse.balancers.fairgrad import FairGrad, FairGradError, fairgrad_weights
from mtlsparse.config import build
from mtlsparse.errors import ConfigError
from mtlsparse.gradients import gramian
from mtlsparse.models import HPS, STL
from mtlsparse.tasks import Task

from conftest import compose_cfg

TASKS = {"a": Task("a", num_classes=3), "b": Task("b", num_classes=3)}
CASES = [(m, seed) for m in range(2, 7) for seed in range(5)]


def random_gradients(m: int, seed: int) -> torch.Tensor:
    """m full-rank task gradients in 3m dimensions, with mixed scales and some conflicts."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, 3 * m, generator=gen, dtype=torch.float64)
    return g * torch.logspace(-2, 2, m, dtype=torch.float64)[torch.randperm(m, generator=gen)].unsqueeze(1)


@pytest.mark.parametrize("m, seed", CASES)
def test_alpha_one_is_proportional_fairness_and_descends_on_every_task(m, seed):
    g = random_gradients(m, seed)
    w = fairgrad_weights(gramian(g), alpha=1.0)
    assert torch.all(w > 0)
    torch.testing.assert_close(w * (gramian(g) @ w), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-8)
    d = w @ g
    assert torch.all(g @ d > 0)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("m, seed", CASES[::4])
def test_other_alphas_solve_the_fairgrad_system(m, seed, alpha):
    g = random_gradients(m, seed)
    w = fairgrad_weights(gramian(g), alpha=alpha)
    torch.testing.assert_close(gramian(g) @ w * w.pow(1 / alpha), torch.ones(m, dtype=torch.float64), rtol=0,
                               atol=1e-8)
    assert torch.all(g @ (w @ g) > 0)


@pytest.mark.parametrize("m, seed", CASES[::3])
def test_agrees_with_an_independent_least_squares_solve(m, seed):
    """The authors' formulation: scipy least squares on K x − 1/x over x > 0 (K scaled to unit mean diagonal)."""
    gram = gramian(random_gradients(m, seed)).numpy()
    scale = np.diag(gram).mean()
    k = gram / scale
    ref = least_squares(lambda x: k @ x - 1 / x, np.diag(k) ** -0.5, bounds=(0, np.inf), xtol=1e-15, ftol=1e-15,
                        gtol=1e-15)
    np.testing.assert_allclose(fairgrad_weights(torch.from_numpy(gram)).numpy() * scale ** 0.5, ref.x, rtol=1e-5)


def test_a_task_without_gradient_needs_the_ridge_and_fails_clearly_without_it():
    g = random_gradients(3, 0)
    g[1] = 0
    with pytest.raises(FairGradError, match=r"no solution .*eigenvalues.*balancer.ridge"):
        fairgrad_weights(gramian(g), ridge=0.0)
    w = fairgrad_weights(gramian(g), ridge=1e-6)
    assert torch.all(torch.isfinite(w)) and torch.all(w > 0)
    assert torch.all((g @ (w @ g))[[0, 2]] > 0)


def test_degenerate_and_bad_gramians():
    torch.testing.assert_close(fairgrad_weights(torch.zeros(3, 3, dtype=torch.float64)),
                               torch.ones(3, dtype=torch.float64))
    with pytest.raises(FairGradError, match="not finite"):
        fairgrad_weights(torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        FairGrad(["a", "b"], alpha=0.0)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        FairGrad(["a", "b"], ridge=-1.0)


def hps_batch() -> tuple[HPS, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = HPS(TASKS, in_shape=(1, 12, 12), kernel_size=3)
    return model, torch.randn(16, 1, 12, 12), {n: torch.randint(0, 3, (16,)) for n in TASKS}


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_the_shared_gradient_is_the_fairgrad_direction(mode):
    model, x, y = hps_batch()
    bal = FairGrad(list(TASKS), mode=mode, ridge=0.0)
    bal.setup(model)
    rep = model.encode(x)
    out = model.decode(rep)
    losses = {n: TASKS[n].loss(out[n], y[n]) for n in TASKS}
    shared = list(model.shared_parameters())
    wrt = [rep] if mode == "representation" else shared
    rows = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[n], wrt, retain_graph=True)])
                        for n in TASKS])
    loss = bal(losses, None, BalanceContext(shared_params=shared, representation=rep))
    w = fairgrad_weights(gramian(rows)).float()
    torch.testing.assert_close(bal.weights, w)
    loss.backward()
    if mode == "params":
        got = torch.cat([p.grad.flatten() for p in shared])
        torch.testing.assert_close(got, w @ rows, rtol=1e-4, atol=1e-6)
    assert bal.state_summary().keys() == {"w/a", "w/b"}


def test_k0_adds_the_sparsity_objective_and_checkpoints_hold_no_state():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = {"a": (w[0] - 3) ** 2, "b": (w[1] + 1) ** 2}
    bal = FairGrad(["a", "b"], k0=0.5)
    out = bal(losses, torch.tensor(4.0), BalanceContext(shared_params=[w]))
    weights = bal.weights
    assert float(out.detach()) == pytest.approx(float(weights[0] * 4 + weights[1] * 9 + 0.5 * 4), rel=1e-6)
    assert bal.state_dict() == {}  # weights are recomputed every step: nothing to checkpoint


def test_config_builds_and_stl_is_a_clear_error():
    bal = build(compose_cfg(["balancer=fairgrad"]), "balancer", tasks=list(TASKS))
    assert isinstance(bal, FairGrad) and (bal.alpha, bal.mode) == (1.0, "params")
    with pytest.raises(ConfigError, match="balancer=fairgrad .* \\(STL\\) has none"):
        bal.setup(STL(TASKS, in_shape=(1, 12, 12), kernel_size=3))
