"""What DB-MTL, MoCo, MoDo, SDMGrad and ExcessMTL share: per-task gradients of the shared parameters kept across steps.

Each of these rules holds an m×P tensor per task across training steps (DB-MTL's moving
average of log-loss gradients, MoCo's tracked gradients, the previous step's Jacobian that
MoDo and SDMGrad use as their second independent sample, ExcessMTL's AdaGrad accumulator),
with P the number of trainable shared parameters. `SharedGradientBalancer` gives them:

- the per-task gradients of one step, from the gradient service (`mtlsparse.gradients`):
  the rows of the shared parameters averaged over DDP ranks (the global batch, identical on
  every rank, so every rank updates the same state), and each task's own gradient of the
  other parameters (heads, attention, fusion weights), which DDP averages as usual;
- the surrogate whose gradient is the rule's direction d on the shared parameters and
  Σ_t c_t ∇_ψ L_t on the others (`linear_surrogate`), so Lightning's backward, clipping and
  the sparsity hooks run unchanged;
- the m×P state as persistent buffers, sized to the model's shared parameters at `setup`
  (and to the incoming tensor when a checkpoint is loaded), so checkpoints hold it and a
  resumed run continues with it.

Only `mode=params`: these states average or pair gradients of different batches, which is
meaningful for the parameters but not for the shared representation z (its gradient rows
belong to one batch's samples).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer, require_shared_parameters
from mtlsparse.balancers.minmax import project_simplex
from mtlsparse.errors import ConfigError
from mtlsparse.gradients import (
    flat_gradient,
    from_rank0_,
    linear_surrogate,
    rank_mean_,
    split_like,
    task_gradients,
    trainable_shared,
)


def check_range(key: str, value: float, low: float, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> float:
    """`value` as a float if it lies in the interval; a one-line ConfigError naming balancer.<key> otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
        interval = f"{left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"
        raise ConfigError(f"balancer.{key} must be a number in {interval}, got {value!r}{hint}")
    return value


def check_count(key: str, value: int, low: int) -> int:
    """An integer option ≥ low; a one-line ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"balancer.{key} must be an integer >= {low}, got {value!r}")
    return value


def params_only(name: str, mode: str, why: str) -> str:
    """`mode` if it is 'params'; the error naming why this rule has no representation mode otherwise."""
    if mode == "params":
        return mode
    if mode == "representation":
        raise ConfigError(f"balancer={name} {why}; gradients w.r.t. the shared representation belong to one batch's "
                          f"samples, so they cannot be carried across steps: use balancer.mode=params (the only mode "
                          f"of balancer={name})")
    raise ConfigError(f"balancer.mode must be 'params' for balancer={name}, got {mode!r}")


def decayed(rate: float, sigma: float, step: int) -> float:
    """The step size rate / step^σ of step `step` (1-based); σ = 0 keeps it constant."""
    return rate / step ** sigma if sigma else rate


def cross_gramian(a: Tensor, b: Tensor, chunk: int = 1 << 20) -> Tensor:
    """Float64 A Bᵀ of two [m, P] matrices, a chunk of columns at a time, outside autocast (like `gramian`)."""
    gram = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    with torch.autocast(a.device.type, enabled=False):
        for x, y in zip(a.detach().split(chunk, dim=1), b.detach().split(chunk, dim=1)):
            gram += x.double() @ y.double().T
    return gram


def simplex_step(weights: Tensor, matrix: Tensor, scale: float, rate: float, rho: float = 0.0) -> Tensor:
    """One projected step Π_Δ(w − rate · (M / scale + ρ I) w) on the simplex; w unchanged when scale is 0.

    M is an m×m (cross-)Gramian of task gradients and `scale` its size (mean squared norm), so
    `rate` is a step in units that do not depend on the gradients' magnitude.
    """
    if not scale > 0:
        return weights
    return project_simplex(weights - rate * (matrix / scale @ weights + rho * weights))


def mean_norm_product(a: Tensor, b: Tensor) -> float:
    """mean_t ‖a_t‖·‖b_t‖ (float64): the scale of the cross matrix A Bᵀ, positive unless a task has no gradient."""
    return float((a.double().norm(dim=1) * b.double().norm(dim=1)).mean())


@dataclass
class StepGradients:
    """One step's per-task gradients: rows of the shared parameters (global batch) and of the others (this rank)."""

    shared: list[nn.Parameter]
    shared_rows: Tensor          # [m, P_shared], averaged over DDP ranks
    others: list[nn.Parameter]   # the trainable parameters outside the shared set that some task reaches
    other_rows: Tensor           # [m, P_others], this rank's batch (DDP averages the final gradient)


class SharedGradientBalancer(Balancer):
    """Base of the rules that keep per-task gradients of the shared parameters across steps.

    Subclasses set `name` (as in `balancer=<name>`) and `state_buffers` (the names of their
    m×P persistent buffers), call `step_gradients` for the step's rows, and return
    `surrogate(...)`. `_mode_reason` says, for the representation-mode error, what state the
    rule carries across steps.
    """

    name = "?"
    state_buffers: tuple[str, ...] = ()
    _mode_reason = "keeps per-task gradients of the shared parameters across steps"

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 mode: str = "params") -> None:
        super().__init__(tasks, k0, k)
        self.mode = params_only(self.name, mode, self._mode_reason)
        for buffer in self.state_buffers:
            self.register_buffer(buffer, torch.zeros(len(self.tasks), 0))
        self._params: list[nn.Parameter] | None = None

    def setup(self, model: nn.Module) -> None:
        """Check the model shares parameters, remember its parameters, size the m×P state to its shared ones."""
        require_shared_parameters(f"balancer={self.name}", model)
        self._params = list(model.parameters())
        shared = getattr(model, "shared_parameters", None)
        if callable(shared):
            self._size_state(sum(p.numel() for p in shared() if p.requires_grad))

    def _size_state(self, width: int, like: Tensor | None = None) -> None:
        """Give every m×P state buffer `width` columns (zeros if that changes) and, with `like`, its dtype/device."""
        for buffer in self.state_buffers:
            old = getattr(self, buffer)
            if old.shape[1] != width:
                setattr(self, buffer, old.new_zeros(len(self.tasks), width))
            if like is not None and (old.dtype, old.device) != (like.dtype, like.device):
                setattr(self, buffer, getattr(self, buffer).to(like))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        """Take the m×P state's shape and dtype from the checkpoint (a balancer built without `setup` loads too)."""
        for buffer in self.state_buffers:
            incoming = state_dict.get(prefix + buffer)
            if isinstance(incoming, Tensor) and incoming.shape != getattr(self, buffer).shape:
                setattr(self, buffer, getattr(self, buffer).new_zeros(incoming.shape, dtype=incoming.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def step_gradients(self, objectives: Sequence[Tensor], ctx: BalanceContext) -> StepGradients:
        """Per-task gradients of this step's objectives (one backward each), the shared rows averaged over ranks."""
        if self._params is None:
            raise RuntimeError(f"balancer={self.name}: call setup(model) before training (MultiTaskModule does)")
        shared = trainable_shared(ctx.shared_params, f"balancer={self.name}")
        shared_ids = {id(p) for p in ctx.shared_params}
        candidates = [p for p in self._params if p.requires_grad and id(p) not in shared_ids]
        shared_rows, other_rows, reached = [], [], set()
        for grads in task_gradients(list(objectives), [*shared, *candidates]):
            shared_rows.append(flat_gradient(grads[:len(shared)], shared))
            other_rows.append(grads[len(shared):])
            reached.update(i for i, g in enumerate(grads[len(shared):]) if g is not None)
        others = [p for i, p in enumerate(candidates) if i in reached]
        rows = torch.stack(shared_rows)
        rank_mean_(rows)
        width = rows.shape[1]
        if self.state_buffers and getattr(self, self.state_buffers[0]).shape[1] not in (0, width):
            raise RuntimeError(f"balancer={self.name}: the model has {width} trainable shared parameters but the "
                               f"balancer's state was sized for {getattr(self, self.state_buffers[0]).shape[1]}; "
                               "the set of trainable shared parameters must not change during training")
        self._size_state(width, like=rows)
        if others:
            kept = [i for i in range(len(candidates)) if i in reached]
            flat = torch.stack([flat_gradient([row[i] for i in kept], others) for row in other_rows])
        else:
            flat = rows.new_zeros(len(self.tasks), 0)
        return StepGradients(shared, rows, others, flat)

    def surrogate(self, grads: StepGradients, direction: Tensor, other_weights: Tensor, value: Tensor) -> Tensor:
        """A scalar equal to `value`, its gradient `direction` on the shared parameters, Σ_t c_t ∇_ψ L_t elsewhere."""
        pairs = list(zip(grads.shared, split_like(direction.to(grads.shared_rows.dtype), grads.shared)))
        if grads.others:
            head_direction = other_weights.to(grads.other_rows.dtype) @ grads.other_rows
            pairs += list(zip(grads.others, split_like(head_direction, grads.others)))
        return linear_surrogate(pairs, value)

    @staticmethod
    def same_on_every_rank(weights: Tensor) -> Tensor:
        """Rank 0's copy of a small state vector (the ranks computed it from the same global rows)."""
        return from_rank0_(weights)

    def weights_summary(self, weights: Tensor, prefix: str = "w") -> dict[str, float]:
        """{'<prefix>/<task>': weight} for `state_summary`."""
        return {f"{prefix}/{t}": float(w) for t, w in zip(self.tasks, weights)}
