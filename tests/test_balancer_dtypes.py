"""Gradient balancers in every training precision: float64 and CPU autocast (bf16, fp16), both modes.

A toy whose task losses are linear in the shared weights W makes the per-task gradients known
(the fixed matrices C_t), and whose representation z = I·Wᵀ makes the representation-mode
direction on z land unchanged in W.grad. So W.grad is the aggregated direction d in both modes,
checked for finiteness, dtype, and, for the rules that guarantee it, descent: C_t·d ≥ 0.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from mtlsparse.balancers import JD, BalanceContext
from mtlsparse.balancers.mgda import MGDA

N, TASKS = 5, ("a", "b", "c")
JD_AGGREGATORS = ["upgrad", "dualproj", "aligned_mtl", "config", "imtl_g", "mgda", "pcgrad", "cagrad", "nashmtl",
                  "graddrop", "gradvac"]
DESCENT = {"upgrad", "dualproj", "mgda", "balancer=mgda"}  # rules whose d never raises a task's loss
#: float64: W and the data in float64; bf16/fp16: float32 W, the forward under CPU autocast
PRECISIONS = ["float64", "bf16-autocast", "fp16-autocast"]


class LinearToy(nn.Module):
    """z = linear(I, W) = Wᵀ (bf16 under autocast); L_t = Σ z ⊙ C_t, so ∇_z L_t = C_t and ∇_W L_t = C_tᵀ."""

    has_representation = True

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.trunk = nn.Linear(N, N, bias=False, dtype=dtype)
        self.register_buffer("targets", torch.randn(len(TASKS), N, N, generator=gen).to(dtype))  # conflicting C_t

    def shared_parameters(self):
        return self.trunk.parameters()

    def encode(self, x):
        return self.trunk(x)

    def decode(self, z):
        return {t: (z * c).sum() for t, c in zip(TASKS, self.targets)}


def autocast_or_skip(precision: str):
    if precision == "float64":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as err:  # pragma: no cover - older CPUs/builds without fp16 autocast
        pytest.skip(f"{precision} autocast unsupported on this CPU: {err}")
    return torch.autocast("cpu", dtype=dtype)


def step(balancer: str, mode: str, precision: str) -> tuple[LinearToy, torch.Tensor]:
    """One balancer step on the toy; returns the model and W.grad (= the direction d, as a W-shaped tensor)."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    model = LinearToy(dtype)
    bal = (MGDA(list(TASKS), mode=mode, normalization="none") if balancer == "balancer=mgda"
           else JD(list(TASKS), aggregator=balancer, mode=mode))
    bal.setup(model)
    torch.manual_seed(0)
    with autocast_or_skip(precision):
        z = model.encode(torch.eye(N, dtype=dtype))
        losses = model.decode(z)
        ctx = BalanceContext(shared_params=list(model.shared_parameters()), representation=z)
        loss = bal(losses, None, ctx)
    loss.backward()
    return model, model.trunk.weight.grad


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("balancer", JD_AGGREGATORS + ["balancer=mgda"])
def test_direction_is_finite_and_descends_in_every_precision(balancer, mode, precision):
    model, d = step(balancer, mode, precision)
    assert d.dtype == model.trunk.weight.dtype and torch.isfinite(d).all()
    assert float(d.norm()) > 0
    if balancer in DESCENT:
        # float64: rounding only; autocast: the Jacobian and d pass through bf16/fp16 (2⁻⁸ / 2⁻¹¹ relative)
        rel = 1e-9 if precision == "float64" else (2**-6 if precision.startswith("bf16") else 2**-9)
        for c in model.targets.double():
            assert float((c.T * d.double()).sum()) >= -rel * float(c.norm() * d.double().norm()), balancer


@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("balancer", ["upgrad", "dualproj", "mgda", "imtl_g", "balancer=mgda"])
def test_autocast_direction_is_the_full_precision_one_up_to_rounding(balancer, mode):
    """Mixed precision changes d only by the rounding of gradients to bf16, not by a reduced-precision solve."""
    _, reference = step(balancer, mode, "float64")
    _, d = step(balancer, mode, "bf16-autocast")
    assert float((d.double() - reference).norm()) <= 2**-5 * float(reference.norm())
