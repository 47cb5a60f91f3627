"""Per-task gradients: the one service behind gradient balancers and gradient-based sparsity.

A gradient balancer differentiates each task loss L_t separately, w.r.t. the shared
parameters (`mode=params`) or the shared representation z (`mode=representation`, a
backward through the heads only), combines the rows g_t by its own rule into a direction
d, and turns d into a surrogate scalar whose gradient is d (pulled back through the
trunk, Jᵀ_z d, in representation mode). SNIP / DiSparse read the same per-task gradients
of the prunable weights. Everything here uses `torch.autograd.grad`, so nothing
accumulates in `.grad`. This is a leaf module (torch only): balancers and sparsity
methods both import it, neither imports the other.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlsparse.errors import ConfigError

#: what a gradient balancer differentiates: the shared parameters, or the shared representation z
MODES = ("params", "representation")


# ------------------------------------------------------------------ modes and capability
def check_mode(mode: str) -> str:
    """`mode` if it is one of MODES; a ValueError naming the choices otherwise."""
    if mode not in MODES:
        raise ValueError(f"balancer.mode must be one of {MODES}, got {mode!r}")
    return mode


def no_representation_error(balancer: str, model_name: str) -> ConfigError:
    """The error for representation mode on a model without a shared representation; it names the fix."""
    return ConfigError(f"balancer {balancer} with mode=representation needs a model with a shared representation "
                       f"(`encode(x)` and `decode(z)`, has_representation=True); {model_name} has none. "
                       "Use balancer.mode=params (gradients w.r.t. the shared parameters) instead.")


def require_representation(balancer: str, model: nn.Module) -> None:
    """Fail at setup when `model` does not declare a shared representation (`has_representation`)."""
    if not getattr(model, "has_representation", False):
        raise no_representation_error(balancer, type(model).__name__)


def representation_of(z: Tensor | None, balancer: str) -> Tensor:
    """The step's shared representation, or the representation-mode error when the step has none."""
    if z is None:
        raise no_representation_error(balancer, "the model")
    return z


def trainable_shared(params: Sequence[nn.Parameter], balancer: str) -> list[nn.Parameter]:
    """The shared parameters that require a gradient; a ConfigError when there are none."""
    wrt = [p for p in params if p.requires_grad]
    if not wrt:  # the balancer's setup(model) catches this for models that declare their shared parameters
        raise ConfigError(f"{balancer} combines per-task gradients of the shared parameters, but the model has "
                          "none: use balancer=linear (or another loss-weighting balancer)")
    return wrt


# ------------------------------------------------------------------ per-task gradients
def task_gradients(losses: Sequence[Tensor], wrt: Sequence[Tensor],
                   retain_graph: bool = True) -> Iterator[tuple[Tensor | None, ...]]:
    """Per loss, in order, its gradients w.r.t. `wrt` (None where a tensor is unused or the loss is constant).

    One backward per loss, yielded one at a time so only one loss's gradients are alive
    besides what the caller keeps. `retain_graph=False` frees the graph after the last loss.
    """
    last = len(losses) - 1
    for i, loss in enumerate(losses):
        if not loss.requires_grad:
            yield (None,) * len(wrt)
            continue
        yield torch.autograd.grad(loss, wrt, retain_graph=retain_graph or i < last, allow_unused=True)


def flat_gradient(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """One flat vector of gradients (zeros where a tensor got none)."""
    return torch.cat([(torch.zeros_like(t) if g is None else g).flatten() for g, t in zip(grads, like)])


def split_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """A flat vector cut into tensors shaped like `like` (the inverse of `flat_gradient`)."""
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in like]), like)]


def task_jacobian(losses: Sequence[Tensor], wrt: Sequence[Tensor],
                  summed: Sequence[Tensor] = ()) -> tuple[Tensor, list[Tensor | None]]:
    """J, one row ∇_wrt L_t (flat) per loss, and Σ_t ∇L_t of each tensor in `summed`, from one backward per loss.

    `summed` are the parameters a gradient balancer leaves to plain summation (heads,
    attention, fusion weights); None where no loss reaches one.
    """
    rows: list[Tensor] = []
    totals: list[Tensor | None] = [None] * len(summed)
    for grads in task_gradients(losses, [*wrt, *summed]):
        rows.append(flat_gradient(grads[:len(wrt)], wrt))
        for i, g in enumerate(grads[len(wrt):]):
            if g is not None:
                totals[i] = g if totals[i] is None else totals[i] + g
    return torch.stack(rows), totals


def jacobian(losses: Sequence[Tensor], wrt: Sequence[Tensor]) -> Tensor:
    """J [m, Σ numel(wrt)]: row t is the flat gradient of loss t w.r.t. `wrt`."""
    return task_jacobian(losses, wrt)[0]


def gramian(rows: Tensor, chunk: int = 1 << 20) -> Tensor:
    """Float64 Gramian J Jᵀ of the rows of an [m, …] tensor, outside autocast.

    Cast to float64 a chunk of columns at a time, so the extra memory is O(m·chunk) rather
    than a float64 copy of every gradient; mixed precision never rounds the Gramian.
    """
    flat = rows.detach().flatten(1)
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    with torch.autocast(flat.device.type, enabled=False):
        for block in flat.split(chunk, dim=1):
            block = block.double()
            gram += block @ block.T
    return gram


def batch_gramian(losses: Sequence[Tensor], shared_params: Sequence[nn.Parameter], representation: Tensor | None,
                  use_representation: bool, balancer: str) -> Tensor:
    """Gramian of the per-task gradients over the global batch, for Gramian-based balancer rules.

    Params mode averages J over the DDP ranks (the global batch's gradients); representation
    mode sums the ranks' Gramians (each rank's z covers only its own samples). `balancer`
    names the rule in the errors for a missing representation or no shared parameters.
    """
    if use_representation:
        wrt = [representation_of(representation, balancer)]
    else:
        wrt = trainable_shared(shared_params, f"balancer={balancer}")
    grads = jacobian(losses, wrt)
    if not use_representation:
        rank_mean_(grads)
    gram = gramian(grads)
    return rank_sum_(gram) if use_representation else gram


# ------------------------------------------------------------------ direction → update
def pull_back(z: Tensor, direction: Tensor, params: Sequence[nn.Parameter]) -> list[tuple[nn.Parameter, Tensor]]:
    """(p, Jᵀ_z d) for the parameters z depends on: a representation-space direction d on the trunk's parameters."""
    grads = torch.autograd.grad(z, params, grad_outputs=direction.view_as(z), retain_graph=True, allow_unused=True)
    return [(p, g) for p, g in zip(params, grads) if g is not None]


def linear_surrogate(pairs: Sequence[tuple[Tensor, Tensor]], value: Tensor) -> Tensor:
    """A scalar equal to `value` whose gradient w.r.t. each tensor p of `pairs` is exactly its paired g.

    Σ ⟨p, g⟩ − (the same, detached) + value: the gradient of ⟨p, g⟩ w.r.t. p is g bit for bit,
    so Lightning's backward, clipping and the sparsity hooks see the balancer's direction.
    """
    terms = [(p * g.detach()).sum() for p, g in pairs]
    if not terms:
        return value.detach()
    surrogate = torch.stack(terms).sum()
    return surrogate - surrogate.detach() + value.detach()


# ------------------------------------------------------------------ DDP
def distributed() -> bool:
    """Whether a torch.distributed process group is running (DDP)."""
    return dist.is_available() and dist.is_initialized()


def rank_sum_(t: Tensor) -> Tensor:
    """`t` summed over DDP ranks, in place (unchanged without a process group)."""
    if distributed():
        dist.all_reduce(t)
    return t


def rank_mean_(t: Tensor) -> Tensor:
    """`t` averaged over DDP ranks, in place (unchanged without a process group): e.g. the global batch's J."""
    if distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def from_rank0_(t: Tensor) -> Tensor:
    """`t` replaced by rank 0's, in place, so every rank steps along the same direction."""
    if distributed():
        dist.broadcast(t, src=0)
    return t
