"""CPU batch-inference latency and FLOPs, measured the same way for every model compared.

Latency is sampled over timed repeats after warm-up, under `torch.inference_mode` with a
fixed thread count. Models take turns within each repeat (alternating the order), so load
from other processes on a shared machine hits all of them alike instead of biasing one.

A latency is reported as the median with its spread (interquartile range, min, max), and
two models differ measurably only when their interquartile ranges do not overlap
(`measurable_difference`): a ratio of two medians inside each other's noise is no speed-up.

A model here is a torch module or any callable on a batch (an onnxruntime session, a
reloaded `torch.export` program), so every runtime is timed by the same loop.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

#: what is timed: a torch module or any callable on a batch (e.g. an onnxruntime session wrapper)
Runnable = Callable[[Tensor], object]

# fewer timed forwards per model than this cannot show a difference: the quartiles are the samples themselves
MIN_SAMPLES = 5


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


def latency_samples_ms(models: Mapping[str, Runnable], x: Tensor, warmup: int = 3, repeats: int = 20,
                       threads: int = 1) -> dict[str, list[float]]:
    """Every timed forward of each model on batch `x`, in ms; models interleaved within each repeat.

    `threads` is torch's thread count; a callable with its own thread pool (onnxruntime)
    is set up with the same count by whoever builds it.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with num_threads(threads), torch.inference_mode():
        for model in models.values():
            if isinstance(model, nn.Module):
                model.eval()
        for _ in range(warmup):  # interleaved too, so no model is timed on a cache the other warmed
            for name in names:
                models[name](x)
        for i in range(repeats):
            for name in names if i % 2 == 0 else reversed(names):
                start = time.perf_counter()
                models[name](x)
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and range of timing samples (ms)."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def spread(samples: Sequence[float]) -> Spread:
    """Median, quartiles (linear interpolation between samples) and min/max of `samples`."""
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("no timing samples")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return Spread(statistics.median(values), q1, q3, values[0], values[-1], len(values))


def measurable_difference(a: Sequence[float], b: Sequence[float], min_samples: int = MIN_SAMPLES) -> bool:
    """True when timing samples `a` and `b` differ beyond their noise.

    That needs at least `min_samples` samples each and interquartile ranges that do not
    overlap (touching counts as overlap): otherwise the ratio of their medians is noise.
    """
    if min(len(a), len(b)) < min_samples:
        return False
    sa, sb = spread(a), spread(b)
    return sa.q3 < sb.q1 or sb.q3 < sa.q1


def latency_spread_ms(models: Mapping[str, Runnable], x: Tensor, warmup: int = 3, repeats: int = 20,
                      threads: int = 1) -> tuple[dict[str, Spread], dict[str, list[float]]]:
    """Per model: the spread of its batch-inference latency (ms) on `x`, and the raw samples."""
    samples = latency_samples_ms(models, x, warmup, repeats, threads)
    return {name: spread(values) for name, values in samples.items()}, samples


def median_latency_ms(models: Mapping[str, Runnable], x: Tensor, warmup: int = 3, repeats: int = 20,
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
