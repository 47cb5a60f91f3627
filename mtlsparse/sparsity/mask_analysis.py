"""Per-layer agreement of task masks (DiSparse's IoU analysis): where do tasks stop sharing weights?

Methods that decide per task expose `task_masks()` → {layer: {task: mask}}. For each
layer used by two or more tasks the IoU |A ∩ B| / |A ∪ B| of the task masks is taken
(the mean over task pairs for more than two tasks); plotting it against layer depth
shows the "watershed" layer where task agreement drops.
"""
from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from pathlib import Path

from matplotlib.figure import Figure
from torch import Tensor

from mtlsparse.io import write_json
from mtlsparse.sparsity.base import SparsityMethod


def mask_iou(a: Tensor, b: Tensor) -> float:
    """|a ∧ b| / |a ∨ b| of two bool masks (1 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def layer_iou(task_masks: Mapping[str, Mapping[str, Tensor]]) -> dict[str, float]:
    """Mean pairwise IoU of the task masks of each layer shared by at least two tasks (layer order kept)."""
    ious = {}
    for layer, masks in task_masks.items():
        pairs = list(combinations(masks.values(), 2))
        if pairs:
            ious[layer] = sum(mask_iou(a, b) for a, b in pairs) / len(pairs)
    return ious


def plot_layer_iou(ious: Mapping[str, float], path: str | Path) -> Path:
    """Line plot of IoU vs layer index (layer names as tick labels), saved as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(max(4.0, 0.6 * len(ious) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(len(ious)), list(ious.values()), "o-")
    ax.set_xticks(range(len(ious)), list(ious), rotation=45, ha="right")
    ax.set(xlabel="layer", ylabel="task-mask IoU", ylim=(0, 1.05), title="Agreement of task masks per layer")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def write_mask_report(method: SparsityMethod, out_dir: str | Path) -> dict[str, float] | None:
    """Write `mask_iou.json` and `mask_iou.png` to `out_dir` for methods with per-task masks.

    Returns the per-layer IoU, or None (and writes nothing) when the method has no task
    masks or no layer is shared by two tasks.
    """
    task_masks = getattr(method, "task_masks", None)
    if task_masks is None:
        return None
    ious = layer_iou({name: {t: m.detach().cpu() for t, m in masks.items()} for name, masks in task_masks().items()})
    if not ious:
        return None
    out_dir = Path(out_dir)
    write_json(out_dir / "mask_iou.json", ious)
    plot_layer_iou(ious, out_dir / "mask_iou.png")
    return ious
