"""MGDA: the min-norm solver, gradient normalisation, params vs representation (MGDA-UB) modes."""
from __future__ import annotations

import pytest
import torch

from mtlsparse.balancers import BalanceContext
from mtlsparse.balancers.mgda import MGDA, min_norm_weights
from mtlsparse.models import HPS, STL
from mtlsparse.models.mdmtn import MDMTN
from mtlsparse.tasks import Task

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


@pytest.mark.parametrize("seed", range(5))
def test_three_tasks_reach_the_min_norm_point(seed):
    """Frank–Wolfe result is at least as good as a fine simplex grid, and satisfies the optimality condition."""
    torch.manual_seed(seed)
    grads = torch.randn(3, 4, dtype=torch.float64)
    if seed % 2:
        grads[2] = 0.5 * (grads[0] + grads[1]) + 0.05 * torch.randn(4, dtype=torch.float64)
    alpha = min_norm_weights(grads)
    s = torch.linspace(0, 1, 301, dtype=torch.float64)
    a, b = torch.meshgrid(s, s, indexing="ij")
    inside = a + b <= 1
    grid = torch.stack([a[inside], b[inside], 1 - a[inside] - b[inside]], dim=1)
    assert sq_norm(alpha, grads) <= float((grid @ grads).square().sum(1).min()) + 1e-12
    gram = grads @ grads.T
    g_alpha = gram @ alpha
    assert float(alpha @ g_alpha - g_alpha.min()) < 1e-6  # Frank–Wolfe duality gap


def test_identical_parallel_gradients_give_that_gradient():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    alpha = min_norm_weights(torch.stack([g, g, g]))
    torch.testing.assert_close(alpha @ torch.stack([g, g, g]), g)
    for other in ([1.0, 0.0, 0.0], [0.2, 0.3, 0.5]):
        torch.testing.assert_close(torch.tensor(other, dtype=torch.float64) @ torch.stack([g, g, g]), g)


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
    rep = model.shared_representation(x)
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


def test_model_without_shared_parameters_is_a_clear_error():
    model = STL(TASKS, in_shape=(1, 12, 12), kernel_size=3)
    out = model(torch.randn(4, 1, 12, 12))
    task_losses = {n: out[n].sum() for n in TASKS}
    with pytest.raises(ValueError, match="no shared parameters|has none"):
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
