"""FairGrad (Ban & Ji, 2024): task weights from α-fair resource allocation of the update.

H. Ban, K. Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024
(arXiv:2402.15638). With G the per-task gradients (rows g_i) and K = G Gᵀ, FairGrad
takes the weights w > 0 solving

    (K w)_i = w_i^(−1/α)   for every task i,

and steps along d = Σ_i w_i g_i. Then g_iᵀd = w_i^(−1/α) > 0: d descends on every task,
and d maximises the α-fair utility Σ_i (g_iᵀd)^(1−α)/(1−α) (α = 1: Σ log g_iᵀd,
proportional fairness; α → ∞ approaches max-min fairness). The system is the
stationarity condition of the strictly convex f(w) = ½ wᵀKw − Σ_i φ(w_i), φ' = w^(−1/α),
which we minimise by damped Newton in float64 on a scale-normalised Gramian (unique
solution when K is positive definite). `ridge` adds ridge·mean(diag K)·I so that
rank-deficient Gramians (a task without gradient, more tasks than directions) still have
a solution; when even that fails to converge, the step raises `FairGradError` with the
residual and the Gramian's eigenvalues. The per-task gradients, their Gramian and the DDP
reductions come from `mtlsparse.gradients`, exactly as for `mgda`; this module is only
FairGrad's rule. As in the authors' code, the returned loss is Σ_i w_i L_i with w
detached, whose gradient on the shared parameters is d (and, in representation mode, Jᵀ_z d).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer, require_shared_parameters
from mtlsparse.gradients import GramianPath, check_mode, require_representation

NAME = "fairgrad"


class FairGradError(RuntimeError):
    """The FairGrad system had no (numerically reachable) positive solution."""


def _objective(w: Tensor, gram: Tensor, alpha: float) -> Tensor:
    """f(w) = ½ wᵀKw − Σ φ(w_i), with φ(w) = log w (α = 1) or w^(1−1/α)/(1−1/α)."""
    utility = w.log() if alpha == 1 else w.pow(1 - 1 / alpha) / (1 - 1 / alpha)
    return 0.5 * w @ gram @ w - utility.sum()


def _accept(w: Tensor, gram: Tensor, alpha: float, f_max: float, grad_max: float) -> bool:
    """Armijo on f, or (near the solution, where f's rounding hides progress) a smaller ‖∇f‖."""
    if bool((w <= 0).any()):
        return False
    grad = gram @ w - w.pow(-1 / alpha)
    return float(_objective(w, gram, alpha)) <= f_max or float(grad.norm()) < grad_max


def fairgrad_weights(gram: Tensor, alpha: float = 1.0, ridge: float = 0.0, tol: float = 1e-10,
                     max_iter: int = 100) -> Tensor:
    """Weights w > 0 with ((K + ridge·mean diag K·I) w)_i = w_i^(−1/α) for a Gramian K [m, m] (float64).

    Solved on K / mean(diag K) (the solution rescales by s^(−α/(α+1))), starting from the
    diagonal solution, by Newton steps kept inside w > 0 and backtracked on f. Converged
    when every (K w)_i · w_i^(1/α) is within `tol` of 1. All-zero gradients give w = 1
    (d = 0 whatever w is).
    """
    if alpha <= 0:
        raise ValueError(f"balancer.alpha must be > 0, got {alpha}")
    gram = gram.detach().double()
    if not torch.isfinite(gram).all():
        raise FairGradError(f"FairGrad: the task-gradient Gramian is not finite:\n{gram}")
    m = gram.shape[0]
    scale = float(gram.diagonal().mean())
    if scale <= 0:
        return torch.ones(m, dtype=gram.dtype, device=gram.device)
    k = gram / scale + ridge * torch.eye(m, dtype=gram.dtype, device=gram.device)
    w = k.diagonal().clamp_min(1e-12).pow(-alpha / (alpha + 1))
    for _ in range(max_iter):
        kw = k @ w
        residual = kw * w.pow(1 / alpha) - 1
        if bool(residual.abs().max() < tol):
            return w * scale ** (-alpha / (alpha + 1))
        grad = kw - w.pow(-1 / alpha)
        hess = k + torch.diag(w.pow(-1 / alpha - 1) / alpha)
        try:
            step = -torch.linalg.solve(hess, grad)
        except RuntimeError:  # singular Hessian: fall back to a gradient step
            step = -grad
        shrink = step < 0
        t = min(1.0, 0.99 * float((-w[shrink] / step[shrink]).min())) if bool(shrink.any()) else 1.0
        f0, slope, g0 = float(_objective(w, k, alpha)), float(grad @ step), float(grad.norm())
        while t > 1e-12 and not _accept(w + t * step, k, alpha, f0 + 1e-4 * t * slope, g0 * (1 - 1e-4 * t)):
            t *= 0.5
        w = w + t * step
    raise FairGradError(
        f"FairGrad: no solution of (G Gᵀ w)_i = w_i^(-1/{alpha}) within {max_iter} Newton steps (largest "
        f"residual {float(residual.abs().max()):.3g}); the task-gradient Gramian has eigenvalues "
        f"{torch.linalg.eigvalsh(gram).tolist()}. Raise balancer.ridge (now {ridge}) for rank-deficient gradients.")


class FairGrad(Balancer):
    """Σ_t w_t L_t + k0·L0 with w (detached) the α-fair FairGrad weights of the current batch.

    `alpha` is α (1: proportional fairness). `k` is validated but unused: FairGrad sets the
    weights. Under DDP the solve sees the global batch (J averaged over ranks, or for
    `mode=representation` the ranks' Gramians summed), so w is the same on every rank.
    No checkpoint state: the weights are recomputed every step.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 alpha: float = 1.0, ridge: float = 1e-6, mode: str = "params", path: str = "jacobian") -> None:
        super().__init__(tasks, k0, k)
        if alpha <= 0:
            raise ValueError(f"balancer.alpha must be > 0, got {alpha}")
        if ridge < 0:
            raise ValueError(f"balancer.ridge must be >= 0, got {ridge}")
        self.alpha, self.ridge, self.mode = float(alpha), float(ridge), check_mode(mode)
        self.needs_representation = mode == "representation"
        object.__setattr__(self, "grad_path", GramianPath(path, f"balancer={NAME}"))
        self.register_buffer("weights", torch.ones(len(self.tasks)), persistent=False)

    def setup(self, model: nn.Module) -> None:
        """Fail before training when the model shares no parameters (or representation mode has no representation)."""
        require_shared_parameters(f"balancer={NAME}", model)
        if self.needs_representation:
            require_representation(NAME, model)
        self.grad_path.setup(model, self.needs_representation)

    def _gram(self, losses: dict[str, Tensor], ctx: BalanceContext) -> Tensor:
        """Gramian of the per-task gradients over the (global) batch (`gradients.batch_gramian`, by `path`)."""
        return self.grad_path.batch_gramian([losses[task] for task in self.tasks], ctx.shared_params,
                                            ctx.representation, self.needs_representation, NAME)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        with torch.no_grad():
            w = fairgrad_weights(self._gram(losses, ctx), self.alpha, self.ridge).to(stacked)
            self.weights.copy_(w)
        return self.add_penalty((w * stacked).sum(), penalty)

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(w) for t, w in zip(self.tasks, self.weights)}
