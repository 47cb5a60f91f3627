"""One notion of a channel group, as tensor operations every layer of the package shares.

A *group* (docs/methods/group_lasso.md) is everything connected to one input neuron/channel:
column W[:, i] of a Linear (out, in) weight, slice W[:, i, :, :] of a Conv weight
(out, in, kh, kw). The sparsity methods (prox, GrOWL, tying, norm coupling), the sparsity
metrics and compaction all read groups through these functions. `group_view` exposes a
weight as (in, rest) without mixing output filters (the reference code's
`weight.view(in_ch, -1)` bug).
"""
from __future__ import annotations

import torch
from torch import Tensor


def group_view(weight: Tensor) -> Tensor:
    """(in, out·kh·kw) view: row i holds every weight reading input channel i."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1)


def group_norms(weight: Tensor) -> Tensor:
    """L2 norm of each input-channel group, shape (in,)."""
    dims = [d for d in range(weight.dim()) if d != 1]
    return torch.linalg.vector_norm(weight, dim=dims)


def group_shape(weight: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one value per input channel against `weight`."""
    return (1, weight.shape[1]) + (1,) * (weight.dim() - 2)
