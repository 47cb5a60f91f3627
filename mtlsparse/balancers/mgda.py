"""MGDA (Sener & Koltun, 2018): weight tasks by the min-norm point of their gradients' convex hull.

The min-norm element Σ α_t g_t (α on the simplex) is a common descent direction of all
task losses (or zero at a Pareto-stationary point). `mode=params` differentiates w.r.t.
the shared parameters; `mode=representation` (MGDA-UB) w.r.t. the shared representation,
an upper bound that needs one backward through the heads only. The min-norm problem is
solved exactly on the m×m Gramian (`mtlsparse.balancers.min_norm`), for any number of tasks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer, require_shared_parameters
from mtlsparse.balancers.min_norm import gramian, min_norm_weights_of_gram
from mtlsparse.errors import ConfigError

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
MODES = ("params", "representation")


def gram_min_norm_weights(gram: Tensor) -> Tensor:
    """Simplex weights α minimising αᵀ G α for a Gram matrix G of m task gradients (exact, float64)."""
    return min_norm_weights_of_gram(gram)


def min_norm_weights(grads: Tensor) -> Tensor:
    """Simplex weights α of the min-norm point Σ α_t g_t of the rows of `grads` [m, d]."""
    return gram_min_norm_weights(gramian(grads))


def _distributed() -> bool:
    """Whether a torch.distributed process group is running (DDP)."""
    return dist.is_available() and dist.is_initialized()


def no_representation_error(model_name: str) -> ConfigError:
    """The error for MGDA-UB on a model without a shared representation; it names the fix."""
    return ConfigError(f"balancer mgda with mode=representation (MGDA-UB) needs a model with "
                      f"`shared_representation(x)` and `decode(z)`; {model_name} has none. "
                      "Use balancer.mode=params (gradients w.r.t. the shared parameters) instead.")


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
                 normalization: str = "loss+", mode: str = "params") -> None:
        super().__init__(tasks, k0, k)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.normalization, self.mode = normalization, mode
        self.needs_representation = mode == "representation"
        self.register_buffer("alpha", torch.full((len(self.tasks),), 1.0 / len(self.tasks)), persistent=False)

    def setup(self, model: nn.Module) -> None:
        """Fail before training when the model shares no parameters, or MGDA-UB lacks a shared representation."""
        require_shared_parameters("balancer=mgda", model)
        if self.needs_representation and not (callable(getattr(model, "shared_representation", None))
                                              and callable(getattr(model, "decode", None))):
            raise no_representation_error(type(model).__name__)

    def _gram(self, losses: dict[str, Tensor], ctx: BalanceContext) -> Tensor:
        """Gram matrix of the per-task gradients over the (global) batch."""
        if self.needs_representation:
            if ctx.representation is None:
                raise no_representation_error("the model")
            wrt = [ctx.representation]
        else:
            wrt = [p for p in ctx.shared_params if p.requires_grad]
            if not wrt:  # setup(model) catches this for models that declare their shared parameters
                raise ConfigError("balancer=mgda combines per-task gradients of the shared parameters, but the model "
                                  "has none: use balancer=linear (or another loss-weighting balancer)")
        rows = []
        for task in self.tasks:
            grads = torch.autograd.grad(losses[task], wrt, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(w) if g is None else g).flatten() for g, w in zip(grads, wrt)]))
        grads = torch.stack(rows)
        if _distributed() and not self.needs_representation:
            dist.all_reduce(grads)
            grads /= dist.get_world_size()
        gram = gramian(grads)
        if _distributed() and self.needs_representation:
            dist.all_reduce(gram)
        return gram

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
            loss_values = stacked.detach().double()
            if _distributed():
                dist.all_reduce(loss_values)
                loss_values /= dist.get_world_size()
            scale = self._normalizers(gram, loss_values).clamp_min(torch.finfo(torch.float64).tiny)
            alpha = gram_min_norm_weights(gram / torch.outer(scale, scale)).to(stacked)  # not via the fp32 buffer
            self.alpha.copy_(alpha)
        return self.add_penalty((alpha * stacked).sum(), penalty)

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(a) for t, a in zip(self.tasks, self.alpha)}
