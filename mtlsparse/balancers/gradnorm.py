"""GradNorm (Chen et al., ICML 2018): learn task weights that equalise the tasks' training rates.

The model minimises Σ_t w_t L_t with w held fixed in that term. The weights are learned
(by the same optimizer) from the gradient loss

    L_grad = Σ_t | G_t − Ḡ · r_t^α |,   G_t = w_t ‖∇_W L_t‖,   r_t = L̃_t / mean(L̃),   L̃_t = L_t / L_t(0),

with W the last shared layer's weights, Ḡ the mean of the G_t and the target Ḡ·r_t^α held
constant: tasks that train slower (large r_t) are pushed towards larger gradients. α sets
the strength of that asymmetry (α = 0 equalises the gradient norms). After every optimizer
step the weights are renormalised to Σ_t w_t = m (done at the start of the next step).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer, require_shared_parameters
from mtlsparse.errors import ConfigError
from mtlsparse.gradients import check_mode, rank_mean_, representation_of, require_representation, task_gradients


def last_shared_weight(shared_params: Sequence[nn.Parameter]) -> nn.Parameter:
    """The last trainable shared parameter with ≥ 2 dims: the last shared layer's weight matrix/kernel."""
    weights = [p for p in shared_params if p.requires_grad and p.dim() >= 2]
    if not weights:
        raise ConfigError("balancer=gradnorm needs a shared layer, but the model has no shared weights (e.g. "
                          "model=stl): use a loss-weighting balancer such as balancer=linear")
    return weights[-1]


class GradNorm(Balancer):
    """Σ_t w_t L_t + k0·L0 with learnable w (a parameter of this module) trained on L_grad.

    `mode=params` (the paper) takes the gradient norms at the last shared layer: the last
    shared weight in `shared_parameters()` order (with parallel shared branches, as the
    columns of cross_stitch or the experts of mmoe, the last branch's last layer);
    `mode=representation` at the shared representation (models with `has_representation`).
    L_t(0) are the first training step's losses (persistent buffers, so a resumed run keeps
    them). The preference `k` is not used: the weights are learned.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 alpha: float = 1.5, mode: str = "params", min_weight: float = 1e-3) -> None:
        super().__init__(tasks, k0, k)
        if alpha < 0:
            raise ValueError(f"balancer.alpha must be >= 0 (asymmetry of GradNorm's target), got {alpha}")
        check_mode(mode)
        if min_weight <= 0:
            raise ValueError(f"balancer.min_weight must be > 0, got {min_weight}")
        self.alpha, self.mode, self.min_weight = float(alpha), mode, float(min_weight)
        self.needs_representation = mode == "representation"
        m = len(self.tasks)
        self.weights = nn.Parameter(torch.ones(m))
        self.register_buffer("initial_losses", torch.ones(m))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("grad_norms", torch.zeros(m), persistent=False)  # G_t of the last step, for logging

    def setup(self, model: nn.Module) -> None:
        """Fail before training when the model shares no parameters, or representation mode has no representation."""
        require_shared_parameters("balancer=gradnorm", model)
        if self.needs_representation:
            require_representation("gradnorm", model)

    @torch.no_grad()
    def renormalise_(self) -> None:
        """Keep the weights positive and summing to m (the paper renormalises after each update)."""
        self.weights.clamp_(min=self.min_weight)
        self.weights.mul_(len(self.tasks) / self.weights.sum())

    def _unweighted_grad_norms(self, losses: dict[str, Tensor], ctx: BalanceContext) -> Tensor:
        """‖∇_W L_t‖ per task (detached), W the last shared weight or the shared representation."""
        if self.needs_representation:
            wrt = representation_of(ctx.representation, "gradnorm")
        else:
            wrt = last_shared_weight(ctx.shared_params)
        norms = [wrt.new_zeros(()) if grad is None else torch.linalg.vector_norm(grad)
                 for (grad,) in task_gradients([losses[task] for task in self.tasks], [wrt])]
        return torch.stack(norms).detach()

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        self.renormalise_()
        stacked = self.stack(losses)
        loss = (self.weights.detach() * stacked).sum()
        if self.training:
            loss = loss + self._grad_loss(stacked.detach(), self._unweighted_grad_norms(losses, ctx))
        return self.add_penalty(loss, penalty)

    def _grad_loss(self, loss_values: Tensor, norms: Tensor) -> Tensor:
        """L_grad with value 0 added to the model loss: only its gradient (w.r.t. w) matters."""
        loss_values = rank_mean_(loss_values.clone())
        if not bool(self.initialised):
            self.initial_losses.copy_(loss_values.clamp_min(torch.finfo(loss_values.dtype).tiny))
            self.initialised.fill_(True)
        ratios = loss_values / self.initial_losses
        rates = ratios / ratios.mean()
        weighted = self.weights * norms.to(self.weights)
        target = (weighted.mean() * rates.to(weighted) ** self.alpha).detach()
        grad_loss = (weighted - target).abs().sum()
        self.grad_norms.copy_(weighted.detach())
        return grad_loss - grad_loss.detach()

    def state_summary(self) -> dict[str, float]:
        w = self.weights.detach()
        w = w.clamp_min(self.min_weight) * len(self.tasks) / w.clamp_min(self.min_weight).sum()
        summary = {f"w/{t}": float(v) for t, v in zip(self.tasks, w)}
        summary.update({f"grad_norm/{t}": float(g) for t, g in zip(self.tasks, self.grad_norms)})
        return summary
