"""MGDA: the exact min-norm solver, gradient normalisation, params vs representation (MGDA-UB) modes.

The solver is checked on adversarial gradient sets for m = 2..20 against (a) the descent
property every gᵢ·d ≥ −1e-9·‖d‖², (b) its optimality certificate and (c) independent QP
solves (KKT enumeration over supports for m ≤ 8, SLSQP beyond).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtlsparse.balancers import BalanceContext
from mtlsparse.balancers.jd import JD
from mtlsparse.balancers.mgda import MGDA, min_norm_weights
from mtlsparse.balancers.min_norm import simplex_min_norm
from mtlsparse.config import build
from mtlsparse.errors import ConfigError
from mtlsparse.models import HPS, STL
from mtlsparse.models.mdmtn import MDMTN
from mtlsparse.tasks import Task

from conftest import TINY, compose_cfg

TASKS = {"a": Task("a", num_classes=3), "b": Task("b", num_classes=3)}


def sq_norm(alpha: torch.Tensor, grads: torch.Tensor) -> float:
    return float((alpha.to(grads) @ grads).square().sum())


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_weights_lie_on_the_simplex(m):
    torch.manual_seed(m)
    alpha = min_norm_weights(torch.randn(m, 7))
    assert alpha.shape == (m,)
    assert torch.all(alpha >= 0) and float(alpha.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_two_tasks_match_the_closed_form(seed):
    torch.manual_seed(seed)
    g1, g2 = torch.randn(2, 5, dtype=torch.float64)
    if seed % 3 == 1:
        g1 = 3 * g2 + 0.1 * g1  # nearly parallel: the closed form clips to a vertex
    alpha = min_norm_weights(torch.stack([g1, g2]))
    expected = float(((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1))
    assert float(alpha[0]) == pytest.approx(expected, abs=1e-12)
    assert float(alpha[1]) == pytest.approx(1 - expected, abs=1e-12)


def test_identical_parallel_gradients_give_that_gradient():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    alpha = min_norm_weights(torch.stack([g, g, g]))
    torch.testing.assert_close(alpha @ torch.stack([g, g, g]), g)
    for other in ([1.0, 0.0, 0.0], [0.2, 0.3, 0.5]):
        torch.testing.assert_close(torch.tensor(other, dtype=torch.float64) @ torch.stack([g, g, g]), g)


# ------------------------------------------------------------------ the exact solver on adversarial sets
#: issue 14's example: Frank–Wolfe gave w = (0.598, 0.288, 0.114), raising task 3's loss (g₃·d = −0.0021)
EXAMPLE = np.array([[-1.6, 0.0, 0.5], [2.5, -0.1, -0.7], [2.1, 0.0, -0.8]])
FAMILIES = ("gaussian", "collinear", "example", "one_large", "duplicated", "rank_deficient", "pareto_stationary")
EPS = np.finfo(np.float64).eps


def gradient_set(family: str, m: int, seed: int) -> np.ndarray:
    """m task gradients (the rows) of one adversarial family."""
    rng = np.random.default_rng(1000 * m + 10 * FAMILIES.index(family) + seed)
    n = 3 * m + 4
    common = rng.normal(size=n) * rng.uniform(0.5, 2)  # a shared component: several tasks end up active
    if family == "gaussian":
        n = int(rng.choice([m, n, 64]))
        return rng.normal(size=(m, n)) + common[:n] if n <= len(common) else rng.normal(size=(m, n))
    if family == "collinear":  # positive multiples of one direction, perturbed by 1e-3 or 1e-4
        return np.outer(rng.uniform(0.5, 3, m), common) + 10.0 ** -(3 + seed) * rng.normal(size=(m, n))
    if family == "example":  # the issue's three gradients, then perturbed rescaled copies of them
        extra = [EXAMPLE[i % 3] * rng.uniform(1, 2) + 0.05 * rng.normal(size=3) for i in range(3, m)]
        return np.vstack([EXAMPLE[:m]] + extra) if extra else EXAMPLE[:m]
    grads = rng.normal(size=(m, n)) + common
    if family == "one_large":
        grads[rng.integers(m)] *= 10.0 ** (3 + seed)
    elif family == "duplicated":
        base = grads[: max(1, m // 2)]
        grads = base[rng.integers(0, len(base), m)]
        grads[-1] = grads[0]
    elif family == "rank_deficient":
        rank = max(1, m // 3)
        grads = rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) + common
    elif family == "pareto_stationary":  # g₀ and −2g₀: 0 is in the hull, d* = 0
        grads[1] = -2 * grads[0]
    return grads


def kkt_gap(gram: np.ndarray, w: np.ndarray) -> float:
    """wᵀAw − minᵢ (Aw)ᵢ ≥ 0: zero exactly at the optimum, and ≥ (f(w) − f*)/2 (a certificate)."""
    aw = gram @ w
    return max(float(w @ aw - aw.min()), 0.0)


def reference_by_kkt_enumeration(gram: np.ndarray) -> np.ndarray:
    """The minimiser by brute force: every support S, its KKT system, the feasible w of smallest gap (m ≤ 8)."""
    m, scale = len(gram), float(gram.diagonal().max())
    best = None
    for size in range(1, m + 1):
        for support in map(list, itertools.combinations(range(m), size)):
            kkt = np.block([[gram[np.ix_(support, support)] / scale, np.ones((size, 1))],
                            [np.ones((1, size)), np.zeros((1, 1))]])
            if np.linalg.cond(kkt) > 1e12:  # affinely dependent support: a smaller one gives the same point
                continue
            mu = np.linalg.solve(kkt, np.r_[np.zeros(size), 1.0])[:size]
            if mu.min() < -1e-12:
                continue
            w = np.zeros(m)
            w[support] = np.clip(mu, 0, None) / np.clip(mu, 0, None).sum()
            if best is None or kkt_gap(gram, w) < kkt_gap(gram, best):
                best = w
    return best


def reference_by_slsqp(gram: np.ndarray) -> np.ndarray:
    """The minimiser by scipy's SLSQP on the normalised problem, tight tolerance."""
    m = len(gram)
    a = gram / gram.diagonal().max()
    res = minimize(lambda w: w @ a @ w, np.full(m, 1 / m), jac=lambda w: 2 * a @ w, method="SLSQP",
                   bounds=[(0, 1)] * m, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                   options={"ftol": 1e-16, "maxiter": 1000})
    w = np.clip(res.x, 0, None)
    return w / w.sum()


def solve(grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, d = Gᵀw) from the solver under test."""
    w = simplex_min_norm(grads @ grads.T)
    return w, w @ grads


@pytest.mark.parametrize("m", range(2, 21))
@pytest.mark.parametrize("family", FAMILIES)
def test_min_norm_direction_never_raises_a_task_loss(family, m):
    """Descent: every gᵢ·d ≥ −1e-9·‖d‖²; and the optimality certificate gᵢ·d ≥ ‖d‖² (up to rounding).

    The absolute slack 1e-13·max‖gᵢ‖² is the rounding of d = Gᵀw itself (≈ m·eps·max‖gᵢ‖²), which
    is all that is left of d at a Pareto-stationary point (d* = 0); the certificate's relative slack
    1e-7 covers the solver stopping once the violation is below the rounding of its own gᵢ·d.
    """
    for seed in range(2):
        grads = gradient_set(family, m, seed)
        w, d = solve(grads)
        assert w.shape == (m,) and np.all(w >= 0) and w.sum() == pytest.approx(1, abs=1e-12)
        g_d, d_sq, floor = grads @ d, float(d @ d), 1e-13 * float((grads**2).sum(1).max())
        assert g_d.min() >= -1e-9 * d_sq - floor, (family, m, seed)
        assert g_d.min() >= (1 - 1e-7) * d_sq - floor, (family, m, seed)


@pytest.mark.parametrize("m", range(2, 21))
@pytest.mark.parametrize("family", FAMILIES)
def test_min_norm_point_agrees_with_an_independent_qp_solve(family, m):
    """Against KKT enumeration (m ≤ 8) or SLSQP, to tolerances that follow from the certificates.

    For points d, d' of the hull, ‖d − d*‖² ≤ ‖d‖² − ‖d*‖² ≤ 2·gap(w), so ‖d − d_ref‖ ≤ √(2 gap) +
    √(2 gap_ref); with λ the smallest eigenvalue of the Gramian, ‖w − w*‖ ≤ √(2 gap / λ). The
    extra 1e-7·max‖gᵢ‖ is the rounding of the gaps themselves (√ of eps·max‖gᵢ‖²).
    """
    for seed in range(2):
        grads = gradient_set(family, m, seed)
        gram = grads @ grads.T
        w, d = solve(grads)
        ref = reference_by_kkt_enumeration(gram) if m <= 8 else reference_by_slsqp(gram)
        d_ref, g_max = ref @ grads, math.sqrt(float(gram.diagonal().max()))
        assert float(d @ d) <= float(d_ref @ d_ref) + 1e-12 * g_max**2  # no independent solver does better
        gap, gap_ref = kkt_gap(gram, w), kkt_gap(gram, ref)
        assert np.linalg.norm(d - d_ref) <= math.sqrt(2 * gap) + math.sqrt(2 * gap_ref) + 1e-7 * g_max
        smallest = float(np.linalg.eigvalsh(gram)[0])
        if smallest > 1e-6 * g_max**2:  # a unique, well-determined w
            bound = (math.sqrt(2 * gap) + math.sqrt(2 * gap_ref)) / math.sqrt(smallest) + 1e-7
            assert np.linalg.norm(w - ref) <= bound, (family, m, seed)


def test_the_issue_example_is_solved_exactly():
    """The published exact point w = (0.5918, 0.2164, 0.1918): all three tasks active, gᵢ·d = ‖d‖² > 0."""
    w, d = solve(EXAMPLE)
    np.testing.assert_allclose(w, [0.5918, 0.2164, 0.1918], atol=1e-4)
    np.testing.assert_allclose(EXAMPLE @ d, np.full(3, d @ d), rtol=1e-9)
    assert float(d @ d) > 0


@pytest.mark.parametrize("gram, expected", [(np.zeros((3, 3)), [1 / 3] * 3), (np.ones((1, 1)), [1.0]),
                                            (np.ones((4, 4)), None)])
def test_degenerate_gramians_give_a_valid_answer(gram, expected):
    """All-zero gradients: every w is optimal (uniform returned); identical ones: any simplex point."""
    w = simplex_min_norm(gram)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1)
    if expected is not None:
        np.testing.assert_allclose(w, expected)


def test_non_finite_gramian_gives_nan_weights_for_the_callers_check():
    assert np.isnan(simplex_min_norm(np.array([[1.0, np.nan], [np.nan, 1.0]]))).all()


def linear_tasks(grads: torch.Tensor) -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    """Shared w; L_t = g_t·w, so the task gradients are exactly the rows of `grads`."""
    w = torch.nn.Parameter(torch.zeros(grads.shape[1], dtype=grads.dtype))
    return w, {f"t{i}": (w * g).sum() for i, g in enumerate(grads)}


@pytest.mark.parametrize("balancer", ["mgda", "jd"])
def test_both_mgda_paths_use_the_exact_solver(balancer):
    """balancer=mgda and balancer=jd aggregator=mgda step along the exact min-norm direction (5 tasks)."""
    grads = torch.from_numpy(gradient_set("example", 5, 0))
    w, losses = linear_tasks(grads)
    bal = (MGDA(list(losses), normalization="none") if balancer == "mgda"
           else JD(list(losses), aggregator="mgda"))
    bal.setup(torch.nn.Module())
    bal(losses, None, BalanceContext(shared_params=[w])).backward()
    expected = torch.from_numpy(solve(grads.numpy())[1])
    torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=1e-9)
    assert float((grads @ w.grad).min()) > 0  # no task's loss rises


def test_frank_wolfe_knobs_are_gone_and_rejected():
    with pytest.raises(TypeError):
        MGDA(["a", "b"], max_iter=250)
    cfg = compose_cfg(TINY + ["balancer=mgda", "+balancer.max_iter=250"])
    with pytest.raises(ConfigError, match="max_iter"):
        build(cfg, "balancer", tasks=["a", "b"])
    with pytest.raises(ValueError, match="unknown option"):
        JD(["a", "b"], aggregator="mgda", epsilon=1e-3)


def scaled_problem() -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    """Shared w = (1, 1), L_a = 100·w_0 (gradient (100, 0)), L_b = w_1 (gradient (0, 1))."""
    w = torch.nn.Parameter(torch.ones(2))
    return w, {"a": 100 * w[0], "b": w[1]}


@pytest.mark.parametrize("normalization, alpha_a", [("none", 1 / 10001), ("l2", 0.5), ("loss", 0.5),
                                                    ("loss+", 1 / (1 + 1e-4))])
def test_gradient_normalisation_matches_the_authors_definitions(normalization, alpha_a):
    w, task_losses = scaled_problem()
    bal = MGDA(["a", "b"], normalization=normalization)
    loss = bal(task_losses, None, BalanceContext(shared_params=[w]))
    assert float(bal.alpha[0]) == pytest.approx(alpha_a, rel=1e-5)
    assert w.grad is None  # per-task gradients never accumulate into .grad
    loss.backward()
    torch.testing.assert_close(w.grad, torch.stack([100 * bal.alpha[0], bal.alpha[1]]))
    assert set(bal.state_summary()) == {"w/a", "w/b"}


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_a_solved_task_with_zero_loss_and_gradient_gives_finite_weights(normalization):
    """A task at loss 0 with gradient 0 is its own min-norm point: all weight on it, no NaN."""
    w = torch.nn.Parameter(torch.ones(2))
    bal = MGDA(["a", "b"], normalization=normalization)
    loss = bal({"a": 0 * w.sum(), "b": w[1]}, None, BalanceContext(shared_params=[w]))
    assert torch.isfinite(bal.alpha).all() and float(bal.alpha[0]) == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(w.grad).all()


def test_k0_weights_the_sparsity_objective_outside_the_min_norm_problem():
    w, task_losses = scaled_problem()
    bal = MGDA(["a", "b"], k0=0.5, normalization="l2")
    out = bal(task_losses, torch.tensor(4.0), BalanceContext(shared_params=[w]))
    assert float(out.detach()) == pytest.approx(0.5 * 100 + 0.5 * 1 + 0.5 * 4)


def hps_batch() -> tuple[HPS, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = HPS(TASKS, in_shape=(1, 12, 12), kernel_size=3)
    return model, torch.randn(16, 1, 12, 12), {n: torch.randint(0, 3, (16,)) for n in TASKS}


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_modes_weight_by_the_min_norm_of_the_right_gradients(mode):
    model, x, y = hps_batch()
    bal = MGDA(list(TASKS), mode=mode, normalization="none")
    bal.setup(model)
    assert bal.needs_representation == (mode == "representation")
    rep = model.encode(x)
    out = model.decode(rep)
    task_losses = {n: TASKS[n].loss(out[n], y[n]) for n in TASKS}
    shared = list(model.shared_parameters())
    loss = bal(task_losses, None, BalanceContext(shared_params=shared, representation=rep))
    wrt = [rep] if mode == "representation" else shared
    grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(task_losses[n], wrt, retain_graph=True)])
                         for n in TASKS])
    torch.testing.assert_close(bal.alpha, min_norm_weights(grads).float())
    loss.backward()
    assert all(p.grad is not None for p in shared)


def test_representation_mode_trains_hps_end_to_end(tiny_cfg, tmp_path):
    from mtlsparse.train import run

    metrics = run(tiny_cfg("balancer=mgda", "balancer.mode=representation"), tmp_path)
    assert 0 <= metrics["test/mean_acc"] <= 1


def test_model_without_shared_representation_is_a_clear_error():
    model = MDMTN(TASKS, in_shape=(1, 12, 12), kernel_size=3)
    bal = MGDA(list(TASKS), mode="representation")
    with pytest.raises(ValueError, match="balancer.mode=params"):
        bal.setup(model)
    with pytest.raises(ValueError, match="balancer.mode=params"):
        bal({n: torch.tensor(1.0, requires_grad=True) for n in TASKS}, None, BalanceContext())
    MGDA(list(TASKS), mode="params").setup(model)  # params mode works with any model


def test_model_without_shared_parameters_is_a_clear_error_at_setup():
    model = STL(TASKS, in_shape=(1, 12, 12), kernel_size=3)
    with pytest.raises(ConfigError, match="balancer=mgda .* but this model \\(STL\\) has none.*balancer=linear"):
        MGDA(list(TASKS)).setup(model)
    out = model(torch.randn(4, 1, 12, 12))  # without setup, the first step still fails clearly
    task_losses = {n: out[n].sum() for n in TASKS}
    with pytest.raises(ConfigError, match="has none"):
        MGDA(list(TASKS))(task_losses, None, BalanceContext(shared_params=list(model.shared_parameters())))


@pytest.mark.parametrize("kwargs, msg", [({"normalization": "l1"}, "normalization must be one of"),
                                         ({"mode": "rep"}, "mode must be one of")])
def test_bad_options_are_clear_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        MGDA(["a", "b"], **kwargs)


def test_weights_use_the_global_batch_under_torch_distributed(tmp_path):
    """With a (single-process) process group the all_reduce path runs and gives the same α."""
    import torch.distributed as dist

    w, task_losses = scaled_problem()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bal = MGDA(["a", "b"], normalization="l2")
        bal(task_losses, None, BalanceContext(shared_params=[w]))
    finally:
        dist.destroy_process_group()
    assert float(bal.alpha[0]) == pytest.approx(0.5)
