"""Min–max (Guo et al.) and DWA (Liu et al.) balancers: simplex projection, ascent, weights, state."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtlsparse.balancers import BalanceContext
from mtlsparse.balancers.dwa import DWA
from mtlsparse.balancers.minmax import MinMax, project_simplex
from mtlsparse.training_state import TrainingState

CTX = BalanceContext()


def losses(a: float, b: float, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(a, requires_grad=requires_grad), "b": torch.tensor(b, requires_grad=requires_grad)}


def feed(balancer, steps: int, a: float, b: float) -> None:
    for _ in range(steps):
        balancer(losses(a, b), None, CTX)


# ------------------------------------------------------------------ project_simplex
@pytest.mark.parametrize("v, expected", [
    ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # already on the simplex
    ([1.0, 1.0], [0.5, 0.5]),
    ([2.0, 0.0, 0.0], [1.0, 0.0, 0.0]),
    ([0.5, -1.0, 0.7], [0.4, 0.0, 0.6]),
    ([-1.0, -2.0], [1.0, 0.0]),
    ([0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]),
])
def test_project_simplex_hand_made_points(v, expected):
    torch.testing.assert_close(project_simplex(torch.tensor(v)), torch.tensor(expected))


def test_project_simplex_is_the_closest_point_of_a_3d_grid():
    step = 0.005
    n = round(1 / step)
    grid = torch.tensor([(i * step, j * step, (n - i - j) * step) for i, j in itertools.product(range(n + 1), repeat=2)
                         if i + j <= n], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for v in 2 * torch.randn(20, 3, generator=generator, dtype=torch.float64):
        p = project_simplex(v)
        assert (p >= 0).all() and float(p.sum()) == pytest.approx(1.0)
        best = grid[(grid - v).norm(dim=1).argmin()]
        assert float((p - v).norm()) <= float((best - v).norm()) + 1e-12
        assert float((p - best).norm()) < 2 * step


def test_project_simplex_works_on_batches():
    v = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    torch.testing.assert_close(project_simplex(v), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))


# ------------------------------------------------------------------ minmax
def test_minmax_loss_is_w_weighted_sum_plus_k0_penalty_and_k_is_unused():
    bal = MinMax(["a", "b"], k0=0.5, k=[0.9, 0.1])
    out = bal(losses(1.0, 3.0), torch.tensor(2.0), CTX)
    assert float(out) == pytest.approx(0.5 * 1 + 0.5 * 3 + 0.5 * 2)
    assert bal.state_summary() == {"w/a": 0.5, "w/b": 0.5}


def test_minmax_epoch_update_moves_weight_to_the_larger_loss():
    bal = MinMax(["a", "b"], beta=10.0, gamma=0.0)
    feed(bal, 3, a=2.0, b=0.5)
    assert bal.state_summary() == {"w/a": 0.5, "w/b": 0.5}  # no update during the epoch
    bal.on_train_epoch_end(TrainingState())
    # w + L/β = (0.7, 0.55) → projection subtracts 0.125 from both
    torch.testing.assert_close(bal.w, torch.tensor([0.575, 0.425]))
    assert bal.meter.count == 0


def test_minmax_gamma_pulls_towards_uniform():
    def step(gamma: float) -> torch.Tensor:
        bal = MinMax(["a", "b"], beta=10.0, gamma=gamma)
        bal.w.copy_(torch.tensor([1.0, 0.0]))
        feed(bal, 1, a=1.0, b=1.0)  # equal losses: only γ can change w
        bal.on_train_epoch_end(TrainingState())
        return bal.w

    torch.testing.assert_close(step(0.0), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(step(5.0), torch.tensor([0.75, 0.25]))  # (1,0) − 5·(0.5,−0.5)/10


def test_minmax_update_every_n_steps_uses_the_new_weights_from_the_next_step():
    bal = MinMax(["a", "b"], beta=10.0, gamma=0.0, update_every=2)
    out = bal(losses(2.0, 0.5, requires_grad=True), None, CTX)
    assert bal.w[0] == 0.5
    out = bal(losses(2.0, 0.5, requires_grad=True), None, CTX)  # second step triggers the update
    out.backward()  # the in-place update of w must not break this step's backward
    assert float(out.detach()) == pytest.approx(0.5 * 2.0 + 0.5 * 0.5)
    torch.testing.assert_close(bal.w, torch.tensor([0.575, 0.425]))
    bal.on_train_epoch_end(TrainingState())  # epoch end does nothing in step mode
    torch.testing.assert_close(bal.w, torch.tensor([0.575, 0.425]))
    assert float(bal(losses(2.0, 0.5), None, CTX)) == pytest.approx(0.575 * 2.0 + 0.425 * 0.5)


def test_minmax_eval_forward_does_not_accumulate():
    bal = MinMax(["a", "b"]).eval()
    feed(bal, 2, a=5.0, b=0.0)
    bal.on_train_epoch_end(TrainingState())
    assert bal.meter.count == 0 and bal.state_summary() == {"w/a": 0.5, "w/b": 0.5}


def test_minmax_weights_survive_state_dict_round_trip():
    bal = MinMax(["a", "b"], beta=10.0)
    feed(bal, 2, a=3.0, b=1.0)
    bal.on_train_epoch_end(TrainingState())
    fresh = MinMax(["a", "b"], beta=10.0)
    fresh.load_state_dict(bal.state_dict())
    assert set(bal.state_dict()) == {"w"}  # the loss window is not state (see LossMeter)
    assert fresh.w[0] > 0.5
    torch.testing.assert_close(fresh.w, bal.w)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta must be > 0"),
    ({"gamma": -1.0}, "gamma must be >= 0"),
    ({"update_every": 0}, "update_every must be 'epoch' or a positive number"),
    ({"update_every": "step"}, "update_every must be 'epoch' or a positive number"),
])
def test_minmax_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MinMax(["a", "b"], **kwargs)


class _Wrapped(nn.Module):
    """A balancer inside a DDP-wrapped module, as in Lightning (DDP broadcasts buffers each forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.balancer = MinMax(["a", "b"], beta=10.0, gamma=0.0)

    def forward(self, a: float, b: float) -> torch.Tensor:
        return self.balancer({"a": self.scale * a, "b": self.scale * b}, None, CTX)


def _ddp_rank(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        model = DistributedDataParallel(_Wrapped())
        for _ in range(2):
            model([3.0, 1.0][rank], 0.5).backward()  # the ranks see different losses: mean a = 2
        model.module.balancer.on_train_epoch_end(TrainingState())
        torch.save(model.module.balancer.w, f"{tmp}/w{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_minmax_ddp_ranks_average_losses_and_keep_identical_weights(tmp_path):
    mp.start_processes(_ddp_rank, args=(str(tmp_path),), nprocs=2, start_method="fork")  # fork: no re-imports
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"w{rank}.pt"), torch.tensor([0.575, 0.425]))


def test_minmax_weights_are_updated_and_checkpointed_in_a_run(tiny_cfg, tmp_path):
    from mtlsparse.train import run  # heavy import, kept out of the DDP test's worker processes

    run(tiny_cfg("balancer=minmax", "balancer.update_every=1", "balancer.beta=1"), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w = state["balancer.w"]
    assert float(w.sum()) == pytest.approx(1.0) and not torch.allclose(w, torch.full_like(w, 0.5))


# ------------------------------------------------------------------ DWA
def test_dwa_weights_are_one_for_the_first_two_epochs_then_favour_the_slower_task():
    bal = DWA(["a", "b"], temperature=2.0)
    for a, b in ((1.0, 1.0), (0.9, 0.5)):
        feed(bal, 2, a, b)
        assert float(bal(losses(a, b), None, CTX)) == pytest.approx(a + b)  # w = 1
        bal.on_train_epoch_end(TrainingState())
    ratios = torch.tensor([0.9, 0.5])  # a's loss fell less
    expected = 2 * torch.softmax(ratios / 2.0, dim=0)
    torch.testing.assert_close(bal.w, expected)
    assert bal.w[0] > bal.w[1] and float(bal.w.sum()) == pytest.approx(2.0)
    assert bal.state_summary() == pytest.approx({"w/a": float(expected[0]), "w/b": float(expected[1])})
    assert float(bal(losses(1.0, 1.0), None, CTX)) == pytest.approx(2.0)


def test_dwa_uses_epoch_mean_losses_and_the_last_two_epochs():
    bal = DWA(["a", "b", "c"], temperature=1.0)
    for values in ([(4.0, 1.0, 1.0), (2.0, 1.0, 1.0)], [(3.0, 1.0, 2.0)], [(3.0, 2.0, 1.0)]):
        for a, b, c in values:
            bal({"a": torch.tensor(a), "b": torch.tensor(b), "c": torch.tensor(c)}, None, CTX)
        bal.on_train_epoch_end(TrainingState())
    ratios = torch.tensor([3.0 / 3.0, 2.0 / 1.0, 1.0 / 2.0])  # epoch means (3,1,1), (3,1,2), (3,2,1)
    torch.testing.assert_close(bal.w, 3 * torch.softmax(ratios, dim=0))
    assert float(bal.w.sum()) == pytest.approx(3.0)


def test_dwa_state_survives_state_dict_round_trip_and_adds_the_penalty():
    bal = DWA(["a", "b"], k0=0.1)
    for a in (1.0, 0.5, 0.4):
        feed(bal, 1, a, 1.0)
        bal.on_train_epoch_end(TrainingState())
    fresh = DWA(["a", "b"], k0=0.1)
    fresh.load_state_dict(bal.state_dict())
    for name in ("w", "history", "epochs_recorded"):
        assert torch.equal(getattr(fresh, name), getattr(bal, name)), name
    out = fresh(losses(1.0, 1.0), torch.tensor(10.0), CTX)
    assert float(out) == pytest.approx(float(bal.w.sum()) + 1.0)


def test_dwa_bad_temperature_is_a_clear_error():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DWA(["a", "b"], temperature=0.0)
