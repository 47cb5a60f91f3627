"""Dense-prediction metrics over a whole split, with sum-reducible states so DDP syncs them exactly.

Depth and surface-normal errors are averaged over all valid pixels of the split (not
per batch). The median angle error needs the whole split's distribution: it is read
from a histogram of angle errors (bins of `ANGLE_BIN` degrees, summed across ranks),
so it is exact to within one bin — far below the precision papers report — and its
memory does not grow with the split.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

ANGLE_BIN = 1e-3  # degrees per histogram bin of the normal angle error
ANGLE_THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}


def depth_valid(target: Tensor) -> Tensor:
    """Pixels with a depth measurement (target > 0 and finite)."""
    return (target > 0) & torch.isfinite(target)


def normal_valid(target: Tensor) -> Tensor:
    """Pixels `[B,H,W]` whose ground-truth normal `[B,3,H,W]` is non-zero (zero = no measurement)."""
    return target.abs().sum(dim=1) > 0


def as_depth_map(x: Tensor) -> Tensor:
    """Depth maps as `[B,1,H,W]` (accepts `[B,H,W]`)."""
    return x.unsqueeze(1) if x.dim() == 3 else x


class DepthErrors(Metric):
    """Mean absolute error and mean relative error |d̂ − d| / d over the valid pixels of the split."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("abs_sum", "rel_sum", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = as_depth_map(preds).detach(), as_depth_map(target)
        valid = depth_valid(target)
        err = (preds - target).abs()[valid]
        self.abs_sum += err.sum(dtype=torch.float64)
        self.rel_sum += (err / target[valid]).sum(dtype=torch.float64)
        self.count += valid.sum()

    def compute(self) -> dict[str, Tensor]:
        count = self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return {"abs_err": (self.abs_sum / count).float(), "rel_err": (self.rel_sum / count).float()}


class NormalErrors(Metric):
    """Angle error (degrees) of predicted vs true normals over the valid pixels of the split.

    Reports the mean and median angle, the fraction of pixels within 11.25°, 22.5° and
    30°, and the mean cosine similarity (the "CS" of Upadhyay et al.). Predictions need
    not be unit length: they are normalised first.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_bins = int(round(180.0 / ANGLE_BIN))
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("angle_sum", "cos_sum", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        valid = normal_valid(target)
        cos = F.cosine_similarity(preds.detach().float(), target.float(), dim=1)[valid].clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.acos(cos))
        bins = (angle / ANGLE_BIN).long().clamp_(0, self.num_bins - 1)
        self.hist += torch.bincount(bins, minlength=self.num_bins).to(self.hist.dtype)
        self.angle_sum += angle.sum(dtype=torch.float64)
        self.cos_sum += cos.sum(dtype=torch.float64)
        self.count += valid.sum()

    def compute(self) -> dict[str, Tensor]:
        if self.count == 0:
            nan = torch.tensor(float("nan"))
            return {"mean_angle": nan, "median_angle": nan, **{k: nan for k in ANGLE_THRESHOLDS}, "cos_sim": nan}
        cumulative = self.hist.cumsum(0)
        out = {"mean_angle": self.angle_sum / self.count, "median_angle": histogram_median(self.hist, ANGLE_BIN)}
        for key, threshold in ANGLE_THRESHOLDS.items():
            out[key] = cumulative[int(round(threshold / ANGLE_BIN)) - 1] / self.count
        out["cos_sim"] = self.cos_sum / self.count
        return {k: torch.as_tensor(v).float() for k, v in out.items()}


def histogram_median(hist: Tensor, bin_width: float) -> Tensor:
    """Median of the values counted in `hist` (bins [i·w, (i+1)·w)), to within one bin.

    As numpy's median: the middle order statistic, or the mean of the two middle ones for an
    even count, each taken at the centre of its bin.
    """
    cumulative = hist.cumsum(0)
    n = int(cumulative[-1])
    middle = torch.tensor([(n - 1) // 2 + 1, n // 2 + 1], dtype=cumulative.dtype, device=cumulative.device)
    bins = torch.searchsorted(cumulative, middle)  # first bin holding at least k+1 values, k = middle order index
    return (bins.to(torch.float64) + 0.5).mean() * bin_width


def delta_m(values: Mapping[str, float], reference: Mapping[str, float], modes: Mapping[str, str]) -> float:
    """Δm % of `values` vs `reference` (keys 'task/metric'): positive = better than the reference.

    Per metric the relative change (−1)^l (M − R)/R with l = 1 when lower is better
    (`modes[key] == 'min'`); averaged over each task's metrics, then over tasks
    (Vandenhende et al. 2021's Δ_MTL; one metric per task gives the usual form), × 100.
    A zero reference value counts the absolute change instead of dividing by zero.
    """
    per_task: dict[str, list[float]] = {}
    for key, ref in reference.items():
        sign = -1.0 if modes[key] == "min" else 1.0
        per_task.setdefault(key.split("/", 1)[0], []).append(sign * (values[key] - ref) / (ref or 1.0))
    return 100.0 * sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)


def check_reference(reference: Mapping | None, modes: Mapping[str, str]) -> dict[str, float]:
    """Reference values as {'task/metric': value}, checked against the metrics that exist (`modes`).

    Accepts flat keys ('seg/miou': 0.5) or nesting ({'seg': {'miou': 0.5}}); values must be
    non-zero numbers (Δm divides by them). Raises ValueError naming the allowed keys.
    """
    flat: dict[str, float] = {}
    for key, value in (reference or {}).items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{metric}": v for metric, v in value.items()})
        else:
            flat[str(key)] = value
    for key, value in flat.items():
        if key not in modes:
            raise ValueError(f"reference key '{key}' is not a metric of this dataset's tasks; allowed: {sorted(modes)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0 or value != value:
            raise ValueError(f"reference '{key}' must be a non-zero number (Δm divides by it), got {value!r}")
    return {k: float(v) for k, v in flat.items()}
