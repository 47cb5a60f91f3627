"""LeNet-scale building blocks used by the Multi-* (MNIST/Fashion) benchmarks."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mtlsparse.models.base import flat_features


def lenet_trunk(in_shape: Sequence[int], channels: Sequence[int] = (10, 20), hidden: int = 50,
                kernel_size: int = 5, batch_norm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Conv(k5)-pool-ReLU blocks then Flatten-FC-ReLU (HPS trunk, docs/methods/growl_mdmtn.md).

    The FC input size is derived from `in_shape`, so the same trunk serves 28×28,
    36×36 and small (e.g. 12×12 digits) inputs; `kernel_size` shrinks for tiny images.
    `dropout` (after the FC ReLU) regularises the wider variants, which overfit Multi-Fashion.
    """
    layers: list[nn.Module] = []
    c_in, size = in_shape[0], min(in_shape[1:])
    for c_out in channels:
        if size < kernel_size + 1:
            raise ValueError(f"{in_shape[1]}x{in_shape[2]} inputs are too small for {len(channels)} conv blocks with "
                             f"kernel_size={kernel_size}: set model.kernel_size=3 (e.g. for dataset=multi_digits)")
        size = (size - kernel_size + 1) // 2
        layers += [nn.Conv2d(c_in, c_out, kernel_size)]
        if batch_norm:
            layers += [nn.BatchNorm2d(c_out)]
        layers += [nn.MaxPool2d(2), nn.ReLU()]
        c_in = c_out
    convs = nn.Sequential(*layers)
    fc = [nn.Flatten(), nn.Linear(flat_features(in_shape, convs), hidden), nn.ReLU()]
    if dropout:
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        fc.append(nn.Dropout(dropout))
    return nn.Sequential(*convs, *fc)


def first_layer(trunk: nn.Module) -> nn.Module:
    """The first conv/linear layer of a trunk: the one reading the raw input."""
    return next(m for m in trunk.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
