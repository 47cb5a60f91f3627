"""Chebyshev + Augmented Lagrangian balancer: constraint values, multiplier updates, learned t."""
from __future__ import annotations

import pytest
import torch

from mtlsparse.balancers import BalanceContext
from mtlsparse.balancers.chebyshev import Chebyshev
from mtlsparse.training_state import PhaseStarted, TrainingState

EPS = 1e-4


def losses(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(a), "b": torch.tensor(b)}


def hand_h(f: list[float], w: list[float], t: float, eps: float = EPS) -> torch.Tensor:
    """H_i = w_i [f_i + ε Σ_j f_j] − t with reference point 0, computed independently of the balancer."""
    total = sum(f)
    return torch.tensor([wi * (fi + eps * total) - t for fi, wi in zip(f, w)])


def epoch(bal: Chebyshev, steps: list[tuple[float, float, float]], index: int) -> None:
    """Run training-mode forwards for (L0, La, Lb) steps, then the epoch-end hook of epoch `index`."""
    bal.train()
    for pen, a, b in steps:
        bal(losses(a, b), torch.tensor(pen), BalanceContext())
    bal.on_train_epoch_end(TrainingState(epoch=index))


def test_loss_is_the_augmented_lagrangian_of_the_chebyshev_constraints():
    bal = Chebyshev(["a", "b"], k0=0.2, k=[0.3, 0.5], mu0=0.1, t_init=0.7)
    f, w = [3.0, 1.0, 2.0], [0.2, 0.3, 0.5]
    h = hand_h(f, w, t=0.7)
    expected = 0.7 + (torch.full((3,), 1 / 3) * h).sum() + 0.05 * h.square().sum()
    out = bal(losses(1.0, 2.0), torch.tensor(3.0), BalanceContext())
    assert float(out.detach()) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(bal.constraints(losses(1.0, 2.0), torch.tensor(3.0)).detach(), h)


def test_multipliers_follow_the_al_update_after_each_outer_iteration():
    bal = Chebyshev(["a", "b"], k0=0.2, k=[0.3, 0.5], mu0=0.1, epochs_per_iteration=1, inequality=False)
    w = [0.2, 0.3, 0.5]
    steps = [(3.0, 1.0, 2.0), (1.0, 2.0, 1.0), (2.0, 0.5, 0.5)]
    h_bar = torch.stack([hand_h([p, a, b], w, t=0.0) for p, a, b in steps]).mean(0)
    epoch(bal, steps, index=0)
    lam1 = torch.full((3,), 1 / 3) + 0.1 * h_bar
    torch.testing.assert_close(bal.lambdas, lam1)
    assert float(bal.mu) == pytest.approx(0.2)
    torch.testing.assert_close(bal.h_mean, h_bar)

    steps2 = [(0.5, 0.5, 0.5)]
    epoch(bal, steps2, index=1)  # H̄ is the mean of this epoch only, the update uses μ before doubling
    torch.testing.assert_close(bal.lambdas, lam1 + 0.2 * hand_h([0.5, 0.5, 0.5], w, t=0.0))
    assert float(bal.mu) == pytest.approx(0.4)


def test_nothing_changes_until_the_outer_iteration_ends():
    bal = Chebyshev(["a", "b"], k0=0.2, k=[0.3, 0.5], mu0=0.1, epochs_per_iteration=2, inequality=False)
    epoch(bal, [(3.0, 1.0, 2.0)], index=0)
    torch.testing.assert_close(bal.lambdas, torch.full((3,), 1 / 3))
    assert float(bal.mu) == pytest.approx(0.1)
    epoch(bal, [(1.0, 1.0, 1.0)], index=1)  # only the last epoch's steps enter H̄
    torch.testing.assert_close(bal.lambdas, 1 / 3 + 0.1 * hand_h([1.0, 1.0, 1.0], [0.2, 0.3, 0.5], t=0.0))
    assert float(bal.mu) == pytest.approx(0.2)


def test_eval_mode_forwards_do_not_enter_the_epoch_mean():
    bal = Chebyshev(["a", "b"], k=[0.5, 0.5], mu0=1.0, epochs_per_iteration=1)
    bal.eval()
    bal(losses(5.0, 5.0), None, BalanceContext())
    bal.on_train_epoch_end(TrainingState(epoch=0))
    torch.testing.assert_close(bal.lambdas, torch.full((3,), 1 / 3))
    assert float(bal.mu) == pytest.approx(1.0)


def test_t_is_a_learned_parameter_and_state_is_checkpointed():
    bal = Chebyshev(["a", "b"], k=[0.4, 0.6], mu0=1.0, t_init=0.5)
    assert any(p is bal.t for p in bal.parameters())
    out = bal(losses(1.0, 2.0), None, BalanceContext())
    out.backward()
    h = bal.constraints(losses(1.0, 2.0), None).detach()
    # ∂L_A/∂t = 1 − Σλ − μ ΣH
    assert float(bal.t.grad) == pytest.approx(float(1 - bal.lambdas.sum() - h.sum()), rel=1e-6)
    assert float(bal.t.grad) != 0
    state = bal.state_dict()
    assert {"t", "lambdas", "mu"} <= set(state)
    other = Chebyshev(["a", "b"], k=[0.4, 0.6])
    other.load_state_dict(state)
    assert float(other.mu) == 1.0 and float(other.t) == 0.5


def test_reset_restarts_the_multipliers_and_skips_the_current_update():
    bal = Chebyshev(["a", "b"], k=[0.5, 0.5], mu0=0.1, epochs_per_iteration=1)
    epoch(bal, [(0.0, 1.0, 1.0)], index=0)
    assert float(bal.mu) == pytest.approx(0.2)
    bal.train()
    bal(losses(1.0, 1.0), None, BalanceContext())
    bal.on_phase_started(PhaseStarted(phase=2, epoch=1))  # GrOWL announces phase 2 at the end of epoch 1
    bal.on_train_epoch_end(TrainingState(epoch=1))
    torch.testing.assert_close(bal.lambdas, torch.full((3,), 1 / 3))
    assert float(bal.mu) == pytest.approx(0.1)
    epoch(bal, [(0.0, 1.0, 1.0)], index=2)  # later iterations update again
    assert float(bal.mu) == pytest.approx(0.2)


def test_inequality_update_clamps_multipliers_at_zero():
    steps = [(0.0, 1.0, 1.0)]
    for inequality in (True, False):
        bal = Chebyshev(["a", "b"], k=[0.5, 0.5], mu0=1.0, t_init=10.0, epochs_per_iteration=1,
                        inequality=inequality)
        epoch(bal, steps, index=0)  # every H ≈ −10 < 0, so λ + μH̄ < 0
        if inequality:
            assert torch.all(bal.lambdas == 0)
        else:
            assert torch.all(bal.lambdas < 0)


def test_without_sparsity_objective_k0_is_irrelevant():
    with_k0 = Chebyshev(["a", "b"], k0=0.5, k=[0.5, 0.5], t_init=0.3)
    without = Chebyshev(["a", "b"], k0=0.0, k=[0.5, 0.5], t_init=0.3)
    assert with_k0.uses_penalty and not without.uses_penalty
    h = with_k0.constraints(losses(1.0, 2.0), None)
    torch.testing.assert_close(h, without.constraints(losses(1.0, 2.0), None))
    assert float(h[0]) == pytest.approx(-0.3)


def test_state_summary_reports_t_multipliers_mu_and_epoch_constraints():
    bal = Chebyshev(["a", "b"], k0=0.1, k=[0.5, 0.4], epochs_per_iteration=1)
    epoch(bal, [(1.0, 1.0, 1.0)], index=0)
    summary = bal.state_summary()
    assert {"t", "mu", "lambda/L0", "lambda/a", "lambda/b", "H/L0", "H/a", "H/b"} == set(summary)
    assert summary["H/a"] == pytest.approx(0.5 * (1 + 3 * EPS))


@pytest.mark.parametrize("kwargs, msg", [({"reference": [0.0, 0.0]}, "reference has 2 entries"),
                                         ({"mu0": 0.0}, "mu0 > 0"),
                                         ({"epochs_per_iteration": 0}, "epochs_per_iteration")])
def test_bad_arguments_are_clear_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Chebyshev(["a", "b"], **kwargs)


def toy_run(k: list[float]) -> tuple[float, float]:
    """Two quadratic task losses of a shared 2-D vector (minima (1,0) and (0,1)); returns final (f_a, f_b)."""
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.tensor([-1.0, -1.0]))
    bal = Chebyshev(["a", "b"], k=k, mu0=0.1, epochs_per_iteration=1)
    opt = torch.optim.SGD([x, *bal.parameters()], lr=0.2)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for index in range(5):
        for _ in range(40):
            f = (x - targets).square().sum(1)
            opt.zero_grad()
            bal({"a": f[0], "b": f[1]}, None, BalanceContext()).backward()
            opt.step()
        bal.on_train_epoch_end(TrainingState(epoch=index))
    f = (x.detach() - targets).square().sum(1)
    return float(f[0]), float(f[1])


def test_dominant_preference_weight_wins_on_a_toy_problem():
    fa, fb = toy_run([0.9, 0.1])
    assert fa < fb / 4
    ga, gb = toy_run([0.1, 0.9])
    assert gb < ga / 4
    assert fa < ga and gb < fb


def test_multipliers_are_averaged_across_ranks_under_torch_distributed(tmp_path):
    """With a (single-process) process group the epoch-end all_reduce path runs and gives the same update."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bal = Chebyshev(["a", "b"], k0=0.2, k=[0.3, 0.5], mu0=0.1, epochs_per_iteration=1, inequality=False)
        epoch(bal, [(3.0, 1.0, 2.0), (1.0, 2.0, 1.0)], index=0)
    finally:
        dist.destroy_process_group()
    h_bar = torch.stack([hand_h([3.0, 1.0, 2.0], [0.2, 0.3, 0.5], 0.0), hand_h([1.0, 2.0, 1.0], [0.2, 0.3, 0.5], 0.0)])
    torch.testing.assert_close(bal.lambdas, 1 / 3 + 0.1 * h_bar.mean(0))
