"""GLS, STCH, DB-MTL, MoCo, MoDo, SDMGrad and ExcessMTL: each rule's defining property on toy problems with
known gradients, their wiring (the gradient that reaches the parameters, k0·L0, heads), checkpointed state
and resume, DDP's code path, and the one-line errors for bad options."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, minimize_scalar
from torch import nn

from mtlsparse.balancers import BalanceContext
from mtlsparse.balancers.db_mtl import DBMTL, max_norm_direction
from mtlsparse.balancers.excess_mtl import ExcessMTL
from mtlsparse.balancers.gls import GLS, geometric_mean
from mtlsparse.balancers.min_norm import min_norm_weights_of_gram
from mtlsparse.balancers.moco import MoCo
from mtlsparse.balancers.modo import MoDo
from mtlsparse.balancers.sdmgrad import SDMGrad, sdmgrad_inner
from mtlsparse.balancers.stch import STCH, smooth_tchebycheff
from mtlsparse.config import CONF_DIR, build
from mtlsparse.errors import ConfigError
from mtlsparse.gradients import gramian
from mtlsparse.models import HPS, STL
from mtlsparse.tasks import Task
from mtlsparse.training_state import TrainingState

from conftest import compose_cfg

NEW = ["gls", "stch", "db_mtl", "moco", "modo", "sdmgrad", "excess_mtl"]
JACOBIAN = {"db_mtl": DBMTL, "moco": MoCo, "modo": MoDo, "sdmgrad": SDMGrad, "excess_mtl": ExcessMTL}
TASKS = ("a", "b", "c", "d")
F64 = torch.float64


# ------------------------------------------------------------------ toy problems
class Shared(nn.Module):
    """One shared vector w and one scalar head per task: the balancers see [w] as shared, the heads as the rest."""

    def __init__(self, size: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size, dtype=F64))
        self.heads = nn.ParameterDict({t: nn.Parameter(torch.ones((), dtype=F64)) for t in tasks})

    def shared_parameters(self):
        return [self.w]


def linear_losses(model: Shared, grads: torch.Tensor, offsets: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_t = (c_t·w + o_t)·h_t: at h = 1, ∇_w L_t = c_t (a fixed gradient) and ∇_h L_t = L_t."""
    tasks = list(model.heads)
    return {t: (grads[i] @ model.w + offsets[i]) * model.heads[t] for i, t in enumerate(tasks)}


def random_gradients(m: int, seed: int, extra: int = 2) -> torch.Tensor:
    """m generic task gradients in m + extra dimensions, some conflicting, norms over one decade."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, m + extra, generator=gen, dtype=F64)
    return g * torch.logspace(-0.5, 0.5, m, dtype=F64).unsqueeze(1)


def step(bal, model: Shared, grads: torch.Tensor, offsets: torch.Tensor | None = None,
         penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's gradient: (w.grad, {task: head grad}); the grads are cleared afterwards."""
    offsets = torch.ones(grads.shape[0], dtype=F64) if offsets is None else offsets
    if getattr(bal, "_params", ()) is None:  # a Jacobian balancer not set up yet
        bal.setup(model)
    out = bal(linear_losses(model, grads, offsets), penalty, BalanceContext(shared_params=[model.w]))
    out.backward()
    shared = model.w.grad.clone()
    heads = {t: p.grad.clone() for t, p in model.heads.items() if p.grad is not None}
    model.zero_grad()
    return shared, heads


def new_balancer(name: str, m: int = 2, **options):
    return {"gls": GLS, "stch": STCH, **JACOBIAN}[name](list(TASKS[:m]), **options)


# ------------------------------------------------------------------ GLS
@settings(deadline=None, max_examples=40)
@given(st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=6))
def test_gls_is_the_geometric_mean_with_gradient_proportional_to_its_value_over_each_loss(values):
    losses = torch.tensor(values, dtype=F64, requires_grad=True)
    tasks = [f"t{i}" for i in range(len(values))]
    bal = GLS(tasks)
    out = bal(dict(zip(tasks, losses)), None, BalanceContext())
    expected = math.prod(values) ** (1 / len(values))
    assert float(out.detach()) == pytest.approx(expected, rel=1e-12)
    out.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([expected / (len(values) * v) for v in values], dtype=F64))
    torch.testing.assert_close(bal.weights.double(), losses.grad, rtol=1e-6, atol=0)  # the logged weights


def test_gls_update_direction_ignores_a_task_loss_scale_and_adds_k0_times_l0():
    g = random_gradients(3, 0)
    model = Shared(5, TASKS[:3])
    base, _ = step(GLS(list(TASKS[:3])), model, g, torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    scaled, _ = step(GLS(list(TASKS[:3])), model, g * torch.tensor([[10.0], [1.0], [0.1]], dtype=F64),
                     torch.tensor([10.0, 2.0, 0.3], dtype=F64))
    torch.testing.assert_close(scaled / scaled.norm(), base / base.norm())  # same direction, only the length changes
    zero = torch.tensor([0.0, 4.0], requires_grad=True)
    geometric_mean(zero).backward()  # a zero loss: a vanishing value and a finite gradient, not NaN
    assert torch.isfinite(zero.grad).all() and float(geometric_mean(zero.detach())) < 1e-18
    out = GLS(["a", "b"], k0=0.5)({"a": torch.tensor(4.0), "b": torch.tensor(1.0)}, torch.tensor(3.0),
                                  BalanceContext())
    assert float(out) == pytest.approx(2.0 + 1.5)
    assert GLS(["a", "b"]).state_dict() == {}


# ------------------------------------------------------------------ STCH
@settings(deadline=None, max_examples=50)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=6), st.floats(1e-3, 2.0))
def test_smooth_tchebycheff_is_within_mu_log_m_of_the_weighted_max(values, mu):
    f = torch.tensor(values, dtype=F64)
    pref = torch.full_like(f, 1 / len(values))
    top = float((pref * f).max())
    value = float(smooth_tchebycheff(f, pref, mu))
    assert top - 1e-12 <= value <= top + mu * math.log(len(values)) + 1e-12


def stch_minimiser(mu: float, pref: tuple[float, float]) -> float:
    """argmin over x of the STCH balancer's value on L_a = (x − 1)² + 0.5, L_b = (x + 1)² + 0.2, nadir 1."""
    bal = STCH(["a", "b"], k=list(pref), mu=mu, nadir=[1.0, 1.0])

    def value(x: float) -> float:
        x_t = torch.tensor(x, dtype=F64)
        losses = {"a": (x_t - 1) ** 2 + 0.5, "b": (x_t + 1) ** 2 + 0.2}
        return float(bal(losses, None, BalanceContext()))

    return minimize_scalar(value, bounds=(-1, 1), method="bounded", options={"xatol": 1e-10}).x


@pytest.mark.parametrize("pref", [(0.5, 0.5), (0.8, 0.2), (0.3, 0.7)])
def test_stch_minimiser_approaches_the_tchebycheff_solution_as_mu_goes_to_zero(pref):
    """The Tchebycheff solution equalises λ_i log L_i (the max's two branches cross inside (−1, 1))."""
    def gap(x):
        return pref[0] * math.log((x - 1) ** 2 + 0.5) - pref[1] * math.log((x + 1) ** 2 + 0.2)
    tch = minimize_scalar(lambda x: gap(x) ** 2, bounds=(-1, 1), method="bounded", options={"xatol": 1e-12}).x
    errors = [abs(stch_minimiser(mu, pref) - tch) for mu in (1.0, 0.1, 0.01, 0.001)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 2e-3 and errors[0] > 10 * errors[-1]


def test_stch_warms_up_on_log_losses_then_takes_the_last_warmup_epochs_mean_losses_as_nadir():
    bal = STCH(["a", "b"], mu=0.5)  # warmup_fraction 0.025: of 200 epochs, epochs 0..4 (the authors' 5)
    assert bal.warmup_last_epoch(200) == 4 and bal.warmup_last_epoch(5) == 0 and bal.warmup_last_epoch(40) == 0
    out = bal({"a": torch.tensor(2.0), "b": torch.tensor(8.0)}, None, BalanceContext())
    assert float(out) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(8))  # Σ λ_t log L_t, λ = k = 1/2
    for epoch in range(5):
        for a, b in [(1.0 + epoch, 4.0), (3.0 + epoch, 2.0)]:
            bal({"a": torch.tensor(a), "b": torch.tensor(b)}, None, BalanceContext())
        bal.on_train_epoch_end(TrainingState(epoch=epoch, max_epochs=200))
        assert bal.warming_up == (epoch < 4)
    torch.testing.assert_close(bal.nadir, torch.tensor([6.0, 3.0], dtype=F64))  # epoch 4's means only
    losses = {"a": torch.tensor(3.0), "b": torch.tensor(6.0)}
    expected = 0.5 * math.log(math.exp(0.5 * math.log(0.5) / 0.5) + math.exp(0.5 * math.log(2.0) / 0.5))
    assert float(bal(losses, None, BalanceContext())) == pytest.approx(expected)
    assert bal.state_summary() == {"warmup": 0.0, "nadir/a": 6.0, "nadir/b": 3.0}
    fresh = STCH(["a", "b"])
    fresh.load_state_dict(bal.state_dict())  # the nadir is checkpointed
    assert not fresh.warming_up and float(fresh(losses, None, BalanceContext())) == pytest.approx(expected)


def test_stch_bad_warmup_and_nadir_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"warmup_epoch=7 is past the last epoch of trainer.max_epochs=5"):
        bal = STCH(["a", "b"], warmup_epoch=7)
        bal({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}, None, BalanceContext())
        bal.on_train_epoch_end(TrainingState(epoch=0, max_epochs=5))
    with pytest.raises(ConfigError, match=r"balancer.nadir needs one positive loss per task"):
        STCH(["a", "b"], nadir=[1.0])
    with pytest.raises(ConfigError, match=r"warmup_fraction is a fraction of trainer.max_epochs"):
        STCH(["a", "b"]).on_fit_start(TrainingState(epoch=0, max_epochs=-1))
    STCH(["a", "b"], nadir=[1.0, 1.0]).on_fit_start(TrainingState(epoch=0, max_epochs=-1))  # no warm-up: no budget
    with pytest.raises(ConfigError, match=r"balancer.mu must be a number in \(0, inf\)"):
        STCH(["a", "b"], mu=0.0)


# ------------------------------------------------------------------ DB-MTL
@settings(deadline=None, max_examples=40)
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_db_mtl_scales_every_task_gradient_to_the_largest_norm(m, seed):
    g = random_gradients(m, seed)
    direction, scales = max_norm_direction(g)
    scaled = scales.unsqueeze(1) * g
    top = float(g.norm(dim=1).max())
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((m,), top, dtype=F64))
    torch.testing.assert_close(direction, scaled.sum(0))


@settings(deadline=None, max_examples=25)
@given(st.integers(2, 4), st.integers(0, 10_000), st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4))
def test_db_mtl_update_is_the_max_norm_sum_of_log_loss_gradients_whatever_the_loss_scales(m, seed, scales):
    """β = 0: ĝ_t is this step's ∇ log L_t = c_t / L_t, so multiplying a task's loss by any constant changes nothing."""
    g, offsets = random_gradients(m, seed), torch.linspace(0.5, 2.0, m, dtype=F64)
    model = Shared(g.shape[1], TASKS[:m])
    base, heads = step(DBMTL(list(TASKS[:m]), beta=0.0, eps=1e-300), model, g, offsets)
    log_grads = g / offsets.unsqueeze(1)
    torch.testing.assert_close(base, max_norm_direction(log_grads)[0])
    torch.testing.assert_close(torch.stack([heads[t] for t in TASKS[:m]]), torch.ones(m, dtype=F64))  # ∇_h log L = 1
    c = torch.tensor(scales[:m], dtype=F64).unsqueeze(1)
    scaled, _ = step(DBMTL(list(TASKS[:m]), beta=0.0, eps=1e-300), model, g * c, offsets * c.squeeze(1))
    torch.testing.assert_close(scaled, base)


def test_db_mtl_moving_average_starts_at_zero_and_decays_with_sigma():
    model = Shared(3, TASKS[:2])
    g1, g2 = random_gradients(2, 1, extra=1), random_gradients(2, 2, extra=1)
    offsets = torch.ones(2, dtype=F64)
    bal = DBMTL(["a", "b"], beta=0.9, beta_sigma=1.0)
    bal.setup(model)
    step(bal, model, g1, offsets)
    torch.testing.assert_close(bal.average, 0.1 * g1)  # β_1 = 0.9: ĝ = 0.9·0 + 0.1·g1
    step(bal, model, g2, offsets)
    torch.testing.assert_close(bal.average, 0.45 * 0.1 * g1 + 0.55 * g2)  # β_2 = 0.9 / 2
    assert int(bal.step) == 2 and set(bal.state_summary()) == {"grad_norm/a", "grad_norm/b"}


# ------------------------------------------------------------------ MoCo
def test_moco_tracking_is_the_running_mean_and_converges_to_the_true_gradient():
    """β = 1, σ = 1: y_k is exactly the mean of the k noisy gradients; its error shrinks like 1/√k."""
    true = random_gradients(2, 3)
    gen = torch.Generator().manual_seed(4)
    noisy = [true + torch.randn(true.shape, generator=gen, dtype=F64) for _ in range(400)]
    model = Shared(true.shape[1], TASKS[:2])
    bal = MoCo(["a", "b"], beta=1.0, beta_sigma=1.0)
    bal.setup(model)
    errors = []
    for k, g in enumerate(noisy, start=1):
        step(bal, model, g)
        if k in (1, 400):
            torch.testing.assert_close(bal.tracked, torch.stack(noisy[:k]).mean(0))
            errors.append(float((bal.tracked - true).norm()))
    assert errors[1] < errors[0] / 8 and errors[1] < 0.4


def fixed_problem_run(bal, g: torch.Tensor, steps: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """`steps` balancer steps on the fixed task gradients g (the model does not move); the last shared gradient."""
    model = Shared(g.shape[1], TASKS[:g.shape[0]])
    bal.setup(model)
    if start is not None:
        bal.lambdas.copy_(start)
    for _ in range(steps):
        d, _ = step(bal, model, g)
    return d


MGDA_LIKE = {"moco": lambda m: MoCo(list(TASKS[:m]), beta=1.0, beta_sigma=0.0, gamma=0.5, gamma_sigma=0.0),
             "modo": lambda m: MoDo(list(TASKS[:m]), gamma=0.5, rho=0.0)}


@pytest.mark.parametrize("name", list(MGDA_LIKE))
@settings(deadline=None, max_examples=15)
@given(m=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_mgda_weights_are_the_fixed_point_of_moco_and_modo_on_a_fixed_problem(name, m, seed):
    """With exact gradients (ρ = 0) the λ iteration stays at MGDA's min-norm weights, whose d descends on every task."""
    g = random_gradients(m, seed)
    alpha = min_norm_weights_of_gram(gramian(g))
    d = fixed_problem_run(MGDA_LIKE[name](m), g, 20, start=alpha.clone())
    torch.testing.assert_close(d, alpha @ g, atol=1e-6, rtol=1e-6)  # d = Jᵀλ: λ stayed at α
    assert torch.all(g @ d > 0), (g @ d).tolist()  # every task's loss falls along −d


@pytest.mark.parametrize("name", list(MGDA_LIKE))
@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 10_000))
def test_moco_and_modo_reach_mgda_weights_from_uniform_on_two_fixed_tasks(name, seed):
    g = random_gradients(2, seed)
    d = fixed_problem_run(MGDA_LIKE[name](2), g, 60)
    torch.testing.assert_close(d, min_norm_weights_of_gram(gramian(g)) @ g, atol=1e-4, rtol=1e-4)
    assert torch.all(g @ d > 0)


def test_moco_heads_step_along_their_weighted_task_gradient():
    model = Shared(4, TASKS[:2])
    bal = MoCo(["a", "b"])
    bal.setup(model)
    g, offsets = random_gradients(2, 5), torch.tensor([2.0, 3.0], dtype=F64)
    shared, heads = step(bal, model, g, offsets)
    lam = bal.lambdas
    torch.testing.assert_close(shared, lam @ bal.tracked)
    torch.testing.assert_close(torch.stack([heads["a"], heads["b"]]), lam * offsets)  # λ_t ∇_h L_t, ∇_h L_t = L_t


# ------------------------------------------------------------------ MoDo
def test_modo_steps_with_weights_from_earlier_batches_and_updates_them_with_the_cross_matrix():
    model = Shared(4, TASKS[:2])
    bal = MoDo(["a", "b"], gamma=0.3, rho=0.1)
    bal.setup(model)
    g1, g2 = random_gradients(2, 6), random_gradients(2, 7)
    d1, _ = step(bal, model, g1)
    uniform = torch.full((2,), 0.5, dtype=F64)
    torch.testing.assert_close(d1, uniform @ g1)
    torch.testing.assert_close(bal.lambdas, uniform)  # one batch: no second sample yet
    d2, _ = step(bal, model, g2)
    torch.testing.assert_close(d2, uniform @ g2)  # the λ used on batch 2 does not depend on batch 2
    from mtlsparse.balancers.minmax import project_simplex
    scale = float((g2.norm(dim=1) * g1.norm(dim=1)).mean())
    expected = project_simplex(uniform - 0.3 * ((g2 @ g1.T) / scale @ uniform + 0.1 * uniform))
    torch.testing.assert_close(bal.lambdas, expected)
    torch.testing.assert_close(bal.previous, g2)


def convex_run(bal, steps: int = 40) -> np.ndarray:
    """SGD on L_a = 5‖w − (3, 0)‖², L_b = ½‖w − (−1, 0)‖² from w = (−1, 2); the task losses before each step."""
    model = Shared(2, ("a", "b"))
    with torch.no_grad():
        model.w.copy_(torch.tensor([-1.0, 2.0], dtype=F64))
    bal.setup(model)
    opt = torch.optim.SGD([model.w], lr=0.02)
    targets, scales = torch.tensor([[3.0, 0.0], [-1.0, 0.0]], dtype=F64), (5.0, 0.5)
    history = []
    for _ in range(steps):
        losses = {t: scales[i] * (model.w - targets[i]).square().sum() for i, t in enumerate(("a", "b"))}
        history.append([float(v.detach()) for v in losses.values()])
        opt.zero_grad()
        bal(losses, None, BalanceContext(shared_params=[model.w])).backward()
        opt.step()
    return np.array(history)


@pytest.mark.parametrize("make", [lambda: MoDo(["a", "b"], gamma=0.5, rho=0.0),
                                  lambda: MoCo(["a", "b"], beta=1.0, beta_sigma=0.0, gamma=0.5, gamma_sigma=0.0)],
                         ids=["modo", "moco"])
def test_modo_and_moco_lower_every_task_loss_on_a_convex_problem_where_the_mean_gradient_does_not(make):
    from mtlsparse.balancers.linear import Linear

    falls = np.diff(convex_run(make()), axis=0) < 0
    assert falls[10:].all(), falls.astype(int).tolist()  # after λ settles (a few steps), both losses fall
    assert not (np.diff(convex_run(Linear(["a", "b"])), axis=0) < 0)[10:, 1].any()  # the mean gradient raises L_b


# ------------------------------------------------------------------ SDMGrad
def exact_sdmgrad_weights(gram: np.ndarray, target: np.ndarray, lam: float) -> np.ndarray:
    """An independent solve of min_{w ∈ Δ} ½ (w + λ w̃)ᵀ K (w + λ w̃) (scipy SLSQP)."""
    m = len(target)
    res = minimize(lambda w: 0.5 * (w + lam * target) @ gram @ (w + lam * target), np.full(m, 1 / m),
                   jac=lambda w: gram @ (w + lam * target), bounds=[(0, 1)] * m, method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-15, "maxiter": 500})
    return res.x


@settings(deadline=None, max_examples=20)
@given(st.integers(2, 5), st.integers(0, 10_000), st.sampled_from([0.0, 0.1, 0.3, 1.0, 5.0]))
def test_sdmgrad_inner_solver_finds_the_direction_oriented_weights(m, seed, lam):
    g = random_gradients(m, seed)
    gram = gramian(g)
    gram = gram / float((g.norm(dim=1) ** 2).mean())
    target = torch.full((m,), 1 / m, dtype=F64)
    w = sdmgrad_inner(target.clone(), gram, target, lam, lr=1.0, momentum=0.0, n_iter=800)
    ref = exact_sdmgrad_weights(gram.numpy(), target.numpy(), lam)
    objective = lambda v: float((v + lam * target) @ gram @ (v + lam * target))  # noqa: E731
    assert objective(w) <= objective(torch.from_numpy(ref)) + 1e-3  # K has unit mean diagonal: absolute gap


def test_sdmgrad_spans_mgda_at_lambda_zero_to_the_mean_gradient_as_lambda_grows():
    g = random_gradients(3, 11)
    mean = g.mean(0)
    distances = []
    for lam in (0.0, 0.3, 3.0, 1e6):
        model = Shared(g.shape[1], TASKS[:3])
        bal = SDMGrad(list(TASKS[:3]), lambda_=lam, n_iter=200)
        bal.setup(model)
        for _ in range(30):
            d, _ = step(bal, model, g)
        if lam == 0.0:  # the min-norm (MGDA) direction: a common descent direction
            torch.testing.assert_close(bal.w, min_norm_weights_of_gram(gramian(g)), atol=1e-6, rtol=0)
            assert torch.all(g @ d > 0)
        distances.append(float((d - mean).norm()))
    assert distances == sorted(distances, reverse=True)  # direction-oriented: nearer g_0 as λ grows
    assert distances[-1] < 1e-5 * float(mean.norm())  # λ → ∞: the mean gradient


def test_sdmgrad_target_is_the_preference_and_heads_get_the_combination_weights():
    g, offsets = random_gradients(2, 12), torch.tensor([2.0, 3.0], dtype=F64)
    model = Shared(g.shape[1], TASKS[:2])
    bal = SDMGrad(["a", "b"], k=[0.9, 0.1], lambda_=1e6)
    bal.setup(model)
    shared, heads = step(bal, model, g, offsets)
    torch.testing.assert_close(shared, torch.tensor([0.9, 0.1], dtype=F64) @ g, rtol=1e-5, atol=1e-6)  # λ → ∞: g_0
    c = bal.coefficients()
    torch.testing.assert_close(torch.stack([heads["a"], heads["b"]]), c * offsets)


# ------------------------------------------------------------------ ExcessMTL
def excess_run(targets_a: list[float]) -> tuple[ExcessMTL, list[list[float]]]:
    """Task a: L_a = ½(w_0 − θ_a)² + 5 (noisy: high loss), task b: L_b = ½(w_1 − 1)² (clean); w_0 is moved by hand."""
    model = Shared(2, ("a", "b"))
    bal = ExcessMTL(["a", "b"], step_size=0.5)
    bal.setup(model)
    losses_seen = []
    for theta in targets_a:
        losses = {"a": 0.5 * (model.w[0] - theta) ** 2 + 5.0, "b": 0.5 * (model.w[1] - 1.0) ** 2}
        losses_seen.append([float(v.detach()) for v in losses.values()])
        bal(losses, None, BalanceContext(shared_params=[model.w])).backward()
        model.zero_grad()
    return bal, losses_seen


def test_excess_mtl_up_weights_the_task_far_from_convergence_not_the_one_with_the_larger_loss():
    """Both start 1 away from their optimum; then task a (loss > 5) is almost converged, task b (loss ½) is not."""
    bal, losses = excess_run([1.0] + [0.01] * 20)
    assert all(a > b for a, b in losses)  # a loss-based weighting would favour a
    weights = bal.weights
    assert float(weights[1]) > 0.9 and float(weights.sum()) == pytest.approx(1.0)
    assert float(bal.excess[1]) > float(bal.excess[0])
    even, _ = excess_run([1.0] * 21)  # same distance to go for both: the weights stay equal
    torch.testing.assert_close(even.weights, torch.full((2,), 0.5, dtype=F64))


def test_excess_mtl_estimate_normalisation_and_update_rule():
    g1, g2 = random_gradients(2, 13), random_gradients(2, 14)
    model = Shared(g1.shape[1], TASKS[:2])
    bal = ExcessMTL(["a", "b"], step_size=0.2, warmup_steps=2)
    bal.setup(model)
    step(bal, model, g1)
    step(bal, model, g2)
    s1, s2 = g1**2, g1**2 + g2**2
    e1, e2 = (g1**2 / (s1 + 1e-7).sqrt()).sum(1), (g2**2 / (s2 + 1e-7).sqrt()).sum(1)
    torch.testing.assert_close(bal.weights, torch.full((2,), 0.5, dtype=F64))  # uniform during the warm-up
    torch.testing.assert_close(bal.baseline, (e1 + e2) / 2)  # E⁰ = the warm-up's mean estimate
    g3 = random_gradients(2, 15)
    d, _ = step(bal, model, g3)
    e3 = (g3**2 / (s2 + g3**2 + 1e-7).sqrt()).sum(1)
    expected = 0.5 * torch.exp(0.2 * e3 / bal.baseline)
    expected = expected / expected.sum()
    torch.testing.assert_close(bal.weights, expected)
    torch.testing.assert_close(d, expected @ g3)  # the step uses the weights it just updated


# ------------------------------------------------------------------ wiring, state, errors
@pytest.mark.parametrize("name", list(JACOBIAN))
def test_shared_gradient_on_hps_matches_an_independent_jacobian_and_k0_adds_the_penalty(name):
    tasks = {"a": Task("a", num_classes=3), "b": Task("b", num_classes=3)}
    torch.manual_seed(0)
    model = HPS(tasks, in_shape=(1, 12, 12), kernel_size=3)
    x, y = torch.randn(16, 1, 12, 12), {n: torch.randint(0, 3, (16,)) for n in tasks}
    bal = new_balancer(name, k0=0.5)
    bal.setup(model)
    losses = {n: tasks[n].loss(out, y[n]) for n, out in model(x).items()}
    shared = [p for p in model.shared_parameters()]
    objectives = [(losses[t] + 1e-8).log() if name == "db_mtl" else losses[t] for t in ("a", "b")]
    rows = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(o, shared, retain_graph=True)])
                        for o in objectives])
    penalty = sum(p.abs().sum() for p in shared)
    bal(losses, penalty, BalanceContext(shared_params=shared)).backward()
    got = torch.cat([p.grad.flatten() for p in shared])
    penalty_grad = torch.cat([0.5 * p.detach().sign().flatten() for p in shared])
    if name == "db_mtl":
        expected = max_norm_direction(0.1 * rows)[0]
    else:
        weights = {"moco": lambda: bal.lambdas, "modo": lambda: torch.full((2,), 0.5),
                   "sdmgrad": lambda: torch.full((2,), 0.5), "excess_mtl": lambda: torch.full((2,), 0.5)}[name]()
        source = bal.tracked if name == "moco" else rows
        expected = weights.float() @ source
    torch.testing.assert_close(got, expected + penalty_grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is not None for p in model.heads.parameters())
    assert all(isinstance(v, float) for v in bal.state_summary().values())


def trained_state(name: str, steps: int) -> tuple[nn.Module, Shared, list[torch.Tensor]]:
    gens = [random_gradients(3, 20 + i) for i in range(steps + 1)]
    model = Shared(gens[0].shape[1], TASKS[:3])
    bal = new_balancer(name, m=3)
    bal.setup(model)
    for g in gens[:steps]:
        step(bal, model, g)
    return bal, model, gens


@pytest.mark.parametrize("name", list(JACOBIAN))
def test_checkpointed_state_resumes_the_run_exactly(name):
    bal, model, gens = trained_state(name, 4)
    state = {key: value.clone() for key, value in bal.state_dict().items()}  # the buffers change in place
    assert {n for n in bal.state_buffers} <= set(state)
    expected, _ = step(bal, model, gens[4])
    resumed = new_balancer(name, m=3)  # not set up: the checkpoint sizes the m×P state
    resumed.load_state_dict(state)
    resumed.setup(model)
    assert torch.equal(step(resumed, model, gens[4])[0], expected)
    fresh = new_balancer(name, m=3)
    fresh.setup(model)
    assert not torch.allclose(step(fresh, model, gens[4])[0], expected)  # the state matters


@pytest.mark.parametrize("name", NEW)
def test_state_round_trips_through_the_module_state_dict(tiny_cfg, name):
    """The module's state dict (what Lightning checkpoints) holds the balancer state and loads strictly elsewhere."""
    from mtlsparse.train import build, build_module

    cfg = tiny_cfg(f"balancer={name}")
    dm = build(cfg, "dataset")
    dm.setup()
    module = build_module(cfg, dm)
    x, y = next(iter(dm.train_dataloader()))
    module.train()
    for _ in range(2):
        out, rep = module._outputs(x)
        module.balancer(module._losses(out, y), None, BalanceContext(module._shared_params, rep)).backward()
    if name == "stch":
        module.balancer.on_train_epoch_end(TrainingState(epoch=0, max_epochs=1))
    state = module.state_dict()
    again = build_module(cfg, dm)
    again.load_state_dict(state)  # strict: the m×P buffers were sized by setup
    theirs = again.balancer.state_dict()
    assert theirs.keys() == module.balancer.state_dict().keys()
    for key, value in module.balancer.state_dict().items():
        assert torch.equal(theirs[key], value), key
    width = sum(p.numel() for p in module.model.shared_parameters())
    for buffer in getattr(module.balancer, "state_buffers", ()):
        assert theirs[buffer].shape == (2, width) and theirs[buffer].abs().sum() > 0


@pytest.mark.parametrize("name", list(JACOBIAN))
def test_representation_mode_and_models_without_shared_parameters_are_one_line_errors(name):
    with pytest.raises(ConfigError) as caught:
        new_balancer(name, mode="representation")
    assert "use balancer.mode=params" in str(caught.value) and "\n" not in str(caught.value)
    tasks = {"a": Task("a", num_classes=3), "b": Task("b", num_classes=3)}
    with pytest.raises(ConfigError, match=rf"balancer={name} .* \(STL\) has none"):
        new_balancer(name).setup(STL(tasks, in_shape=(1, 12, 12), kernel_size=3))


BAD_OPTIONS = [
    ("db_mtl", "balancer.beta=1.0", r"balancer.beta must be a number in \[0, 1\)"),
    ("moco", "balancer.beta=0", r"balancer.beta must be a number in \(0, 1\]"),
    ("moco", "balancer.gamma=-1", r"balancer.gamma must be a number in \(0, inf\)"),
    ("modo", "balancer.rho=-0.1", r"balancer.rho must be a number in \[0, inf\)"),
    ("sdmgrad", "balancer.n_iter=0", r"balancer.n_iter must be an integer >= 1"),
    ("sdmgrad", "balancer.momentum=1.0", r"balancer.momentum must be a number in \[0, 1\)"),
    ("excess_mtl", "balancer.warmup_steps=-1", r"balancer.warmup_steps must be an integer >= 0"),
    ("stch", "balancer.warmup_fraction=2", r"balancer.warmup_fraction must be a number in \[0, 1\]"),
    ("moco", "balancer.mode=representation", r"balancer=moco tracks .* use balancer.mode=params"),
    ("gls", "+balancer.mu=1", r"unknown key 'balancer.mu'"),
]


@pytest.mark.parametrize("name, override, message", BAD_OPTIONS)
def test_bad_options_are_one_line_config_errors_naming_the_key(name, override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build(compose_cfg([f"balancer={name}", override]), "balancer", tasks=["a", "b"])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", NEW)
def test_every_new_config_builds_with_its_documented_defaults(name):
    bal = build(compose_cfg([f"balancer={name}"]), "balancer", tasks=["a", "b"])
    assert type(bal).__module__ == f"mtlsparse.balancers.{name}"


def test_the_sparsity_family_smoke_test_runs_every_new_balancer_on_hps():
    """tests/test_jd_balancers.py::test_every_balancer_trains_with_each_sparsity_family runs every conf/balancer yaml
    × {dense, group_lasso, rigl} on the default model: that is the issue's hps matrix as long as these hold."""
    assert compose_cfg([]).model._target_ == "mtlsparse.models.hps.HPS"
    assert set(NEW) <= {p.stem for p in Path(CONF_DIR, "balancer").glob("*.yaml")}


def test_distributed_code_path_gives_the_same_updates_and_state_in_a_one_process_group(tmp_path):
    """Rank averages of the rows and the broadcast of the weights run under a gloo group (world size 1)."""
    import torch.distributed as dist

    def updates():
        out = []
        for name in JACOBIAN:
            bal, model, gens = trained_state(name, 3)
            out.append(step(bal, model, gens[3])[0])
            out.extend(v.clone() for v in bal.state_dict().values())
        return out

    plain = updates()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        distributed = updates()
    finally:
        dist.destroy_process_group()
    for a, b in zip(plain, distributed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stch", "db_mtl", "moco", "modo", "sdmgrad", "excess_mtl"])
def test_ddp_two_cpu_ranks_stay_identical(tmp_path, name):
    """2 gloo ranks, 2 epochs: the per-epoch rank check finds every state tensor identical on both."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    overrides = ["dataset=synthetic", "model=hps_lenet", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.enable_progress_bar=false", "dataset.batch_size=32", "dataset.eval_batch_size=32",
                 "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "test_ckpt=last",
                 "export.enabled=false", "trainer.max_epochs=2", f"balancer={name}", "method=group_lasso", "lam=1e-3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtlsparse", *overrides, f"data_root={tmp_path}/data",
                           f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=280, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RankDivergenceError" not in log, log[-4000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config/balancer"] == name


def test_stch_warmup_past_the_budget_fails_before_the_first_step(tiny_cfg, tmp_path, monkeypatch):
    from mtlsparse.module import MultiTaskModule
    from mtlsparse.train import run

    def trained(*args, **kwargs):
        raise AssertionError("a training step ran before the warm-up check")

    monkeypatch.setattr(MultiTaskModule, "training_step", trained)
    with pytest.raises(ConfigError, match=r"balancer.warmup_epoch=3 is past the last epoch of trainer.max_epochs=1"):
        run(tiny_cfg("balancer=stch", "balancer.warmup_epoch=3"), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()
