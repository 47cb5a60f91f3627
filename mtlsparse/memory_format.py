"""The tensor layout convolutions train in: `memory_format=contiguous` (NCHW, the default) or
`channels_last` (NHWC).

On CPU, PyTorch's oneDNN kernels for small convolutions and max-pooling can be much faster in
channels_last: on one thread the MDMTN preset trains in half the CPU time, while the default
`hps` model (BatchNorm, 16/32 channels) gains 1.09× (README, Results). The layout changes the
order of float sums, so results differ at round-off from a contiguous run's; each layout on its
own is deterministic. The default stays contiguous so that runs measured with it keep
reproducing in every digit.
"""
from __future__ import annotations

import torch

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def check_memory_format(name: str) -> str:
    """Return `name` if it is a known layout, else raise naming the choices."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, got {name!r}")
    return name
