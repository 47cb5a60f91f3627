"""MGDA (Sener & Koltun, 2018): weight tasks by the min-norm point of their gradients' convex hull.

The min-norm element Σ α_t g_t (α on the simplex) is a common descent direction of all
task losses (or zero at a Pareto-stationary point). `mode=params` differentiates w.r.t.
the shared parameters; `mode=representation` (MGDA-UB) w.r.t. the shared representation,
an upper bound that needs one backward through the heads only. The per-task gradients
and their Gramian come from `mtlsparse.gradients`; this module is only MGDA's rule: the
min-norm problem, solved exactly on the m×m Gramian (`mtlsparse.balancers.min_norm`) for
any number of tasks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer, require_shared_parameters
from mtlsparse.balancers.min_norm import min_norm_weights_of_gram
from mtlsparse.gradients import GramianPath, check_mode, gramian, rank_mean_, require_representation

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
NAME = "mgda (MGDA-UB)"  # how the representation-mode errors name this balancer


def gram_min_norm_weights(gram: Tensor) -> Tensor:
    """Simplex weights α minimising αᵀ G α for a Gram matrix G of m task gradients (exact, float64)."""
    return min_norm_weights_of_gram(gram)


def min_norm_weights(grads: Tensor) -> Tensor:
    """Simplex weights α of the min-norm point Σ α_t g_t of the rows of `grads` [m, d]."""
    return gram_min_norm_weights(gramian(grads))


class MGDA(Balancer):
    """Σ_t α_t L_t + k0·L0 with α (detached) the MGDA min-norm weights of the current batch.

    Gradients are taken per task with `torch.autograd.grad` (nothing accumulates in
    `.grad`), normalised as in the authors' code (`none`, `l2`, `loss`, `loss+`; default
    `loss+`, their MultiMNIST setting). `k` is validated but unused: MGDA sets the weights.
    Under DDP the solver sees the whole global batch (gradients averaged, or for MGDA-UB
    the representation Gram matrices summed), so α is identical on every rank. The Gramian
    is formed in float64 outside autocast, so mixed precision does not round it.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 normalization: str = "loss+", mode: str = "params", path: str = "jacobian") -> None:
        super().__init__(tasks, k0, k)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization, self.mode = normalization, check_mode(mode)
        self.needs_representation = mode == "representation"
        object.__setattr__(self, "grad_path", GramianPath(path, "balancer=mgda"))
        self.register_buffer("alpha", torch.full((len(self.tasks),), 1.0 / len(self.tasks)), persistent=False)

    def setup(self, model: nn.Module) -> None:
        """Fail before training when the model shares no parameters, or MGDA-UB lacks a shared representation."""
        require_shared_parameters("balancer=mgda", model)
        if self.needs_representation:
            require_representation(NAME, model)
        self.grad_path.setup(model, self.needs_representation)

    def _gram(self, losses: dict[str, Tensor], ctx: BalanceContext) -> Tensor:
        """Gramian of the per-task gradients over the (global) batch (`gradients.batch_gramian`, by `path`)."""
        return self.grad_path.batch_gramian([losses[task] for task in self.tasks], ctx.shared_params,
                                            ctx.representation, self.needs_representation, "mgda")

    def _normalizers(self, gram: Tensor, losses: Tensor) -> Tensor:
        """Per-task gradient scale: 1, ‖g_t‖, L_t or L_t·‖g_t‖."""
        norms = gram.diagonal().clamp_min(0).sqrt()
        if self.normalization == "none":
            return torch.ones_like(norms)
        if self.normalization == "l2":
            return norms
        return losses if self.normalization == "loss" else losses * norms

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        with torch.no_grad():
            gram = self._gram(losses, ctx).double()
            loss_values = rank_mean_(stacked.detach().double())
            scale = self._normalizers(gram, loss_values).clamp_min(torch.finfo(torch.float64).tiny)
            # G_ts / (s_t·s_s), one factor at a time: the outer product of two tiny scales (a solved task,
            # loss and gradient 0) underflows to 0 and 0/0 would be NaN; 0/tiny/tiny stays 0
            normalized = gram / scale[:, None] / scale[None, :]
            alpha = gram_min_norm_weights(normalized).to(stacked)  # not via the fp32 buffer
            self.alpha.copy_(alpha)
        return self.add_penalty((alpha * stacked).sum(), penalty)

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(a) for t, a in zip(self.tasks, self.alpha)}
