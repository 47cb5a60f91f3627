"""CPU batch-inference latency and FLOPs, measured the same way for every model compared.

Latency is the median of timed repeats after warm-up, under `torch.inference_mode` with a
fixed thread count. Models take turns within each repeat (alternating the order), so load
from other processes on a shared machine hits all of them alike instead of biasing one.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(threads)`, restoring the previous count after."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def latency_samples_ms(models: Mapping[str, nn.Module], x: Tensor, warmup: int = 3, repeats: int = 20,
                       threads: int = 1) -> dict[str, list[float]]:
    """Every timed forward of each model on batch `x`, in ms; models interleaved within each repeat."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with num_threads(threads), torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(x)
        for i in range(repeats):
            for name in names if i % 2 == 0 else reversed(names):
                start = time.perf_counter()
                models[name](x)
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def median_latency_ms(models: Mapping[str, nn.Module], x: Tensor, warmup: int = 3, repeats: int = 20,
                      threads: int = 1) -> dict[str, float]:
    """Median batch-inference latency (ms) of each model on `x`."""
    samples = latency_samples_ms(models, x, warmup, repeats, threads)
    return {name: statistics.median(values) for name, values in samples.items()}


def count_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of one forward on `x` (torch's counter: conv/matmul, 2 per multiply-add)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
