"""The per-task gradient service (`mtlsparse.gradients`) and the models' shared-representation contract."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mtlsparse.config import CONF_DIR, build, compose_config
from mtlsparse.gradients import (
    flat_gradient,
    gramian,
    jacobian,
    pull_back,
    rank_mean_,
    split_like,
    task_gradients,
    task_jacobian,
)
from mtlsparse.tasks import Task

TASKS = {"a": Task("a", num_classes=3), "b": Task("b", num_classes=4)}
MODELS = sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml"))
#: overrides that keep each model tiny (or buildable without teachers)
SMALL = {"deeplab_resnet": ["model.depth=18", "model.width=0.0625"], "vgg16_mt": ["model.width=0.125"],
         "kdmtl": ["model.allow_untrained_teachers=true"], "ltb_resnet": ["model.depth=18", "model.width=0.0625"]}
SPLIT = {"cross_stitch", "deeplab_resnet", "hps", "hps_lenet", "kdmtl", "vgg16_mt",  # today's split models
         "dselect_k", "ltb", "ltb_resnet"}  # dselect_k with its default static gates


class Tiny(nn.Module):
    """trunk Linear(4→3)-tanh → z; head t: Linear(3→1); L_t a smooth loss of head t's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 3, dtype=torch.float64)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1, dtype=torch.float64) for t in TASKS})

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = torch.tanh(self.trunk(x))
        return z, [(self.heads["a"](z) - 1).square().mean(), (self.heads["b"](z) + 2).square().mean()]


def batch() -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_task_gradients_equal_autograd_of_each_loss_on_its_own_graph():
    model = Tiny()
    shared, heads = list(model.trunk.parameters()), list(model.heads.parameters())
    _, losses = model.losses(batch())
    jac, summed = task_jacobian(losses, shared, heads)
    for t in range(2):
        _, fresh = model.losses(batch())
        expected = torch.autograd.grad(fresh[t], shared)
        assert torch.equal(jac[t], torch.cat([g.flatten() for g in expected]))
    head_grads = [torch.autograd.grad(model.losses(batch())[1][t], list(model.heads[name].parameters()))
                  for t, name in enumerate(TASKS)]
    assert all(torch.equal(s, g) for s, g in zip(summed, [*head_grads[0], *head_grads[1]]))
    assert torch.equal(jacobian(model.losses(batch())[1], shared), jac)
    assert torch.equal(gramian(jac), jac @ jac.T)


def test_unused_tensors_and_constant_losses_give_zero_gradients():
    model = Tiny()
    _, losses = model.losses(batch())
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    grads = list(task_gradients([losses[0], torch.tensor(3.0)], [model.trunk.weight, unused]))
    assert grads[0][1] is None and grads[1] == (None, None)
    row = flat_gradient(grads[0], [model.trunk.weight, unused])
    assert torch.equal(row[-2:], torch.zeros(2, dtype=torch.float64))
    assert [p.shape for p in split_like(row, [model.trunk.weight, unused])] == [(3, 4), (2,)]


def test_representation_pull_back_equals_the_parameter_direction_of_a_linear_aggregation():
    """Jᵀ_z (Σ w_t ∇_z L_t) = Σ w_t ∇_θ L_t: the chain rule, for any fixed weights w."""
    model = Tiny()
    shared = list(model.trunk.parameters())
    z, losses = model.losses(batch())
    weights = torch.tensor([0.3, 1.7], dtype=torch.float64)
    d_params = weights @ jacobian(losses, shared)
    d_z = weights @ jacobian(losses, [z])
    pulled = pull_back(z, d_z, shared)
    assert [p for p, _ in pulled] == shared
    torch.testing.assert_close(torch.cat([g.flatten() for _, g in pulled]), d_params, rtol=1e-12, atol=1e-12)


def test_rank_reductions_are_the_identity_without_a_process_group():
    t = torch.tensor([1.0, 2.0])
    assert rank_mean_(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))


def test_the_service_is_a_leaf_that_imports_neither_balancers_nor_sparsity():
    code = ("import sys, mtlsparse.gradients; "
            "assert not [m for m in sys.modules if m.startswith(('mtlsparse.balancers', 'mtlsparse.sparsity', "
            "'mtlsparse.models'))]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name", MODELS)
def test_capability_flag_matches_whether_decode_of_encode_is_forward(name):
    model = build(compose_config([f"model={name}", *SMALL.get(name, [])]), "model", tasks=TASKS,
                  in_shape=(3, 28, 28)).eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        try:
            decoded = model.decode(model.encode(x))
        except NotImplementedError:
            splits = False
        else:
            splits = decoded.keys() == out.keys() and all(torch.equal(decoded[t], out[t]) for t in out)
    assert splits == model.has_representation
    assert model.has_representation == (name in SPLIT)
