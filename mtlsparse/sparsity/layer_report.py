"""Per-layer sparsity of a structured method's layers (Upadhyay et al.'s per-layer plot).

For every layer the method acts on: % of input-channel groups that are all zero and
% of weights that are zero, in network order, written as `layer_sparsity.json` and
plotted as `layer_sparsity.png` in the run dir.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from mtlsparse.io import write_json
from mtlsparse.metrics.sparsity import group_sparsity, param_sparsity
from mtlsparse.sparsity.base import SparsityMethod


def layer_sparsity(method: SparsityMethod) -> dict[str, dict[str, float]]:
    """{layer name: {'group': %, 'param': %}} over the method's layers, in network order."""
    return {layer.name: {"group": group_sparsity([layer.weight.detach()]),
                         "param": param_sparsity([layer.weight.detach()])} for layer in method.layers}


def plot_layer_sparsity(stats: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Bars of group and parameter sparsity per layer (layer names as tick labels), saved as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(stats)
    fig = Figure(figsize=(max(5.0, 0.28 * n + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    xs = range(n)
    ax.bar([x - 0.2 for x in xs], [s["group"] for s in stats.values()], width=0.4, label="zero channel groups")
    ax.bar([x + 0.2 for x in xs], [s["param"] for s in stats.values()], width=0.4, label="zero weights")
    ax.set_xticks(list(xs), list(stats), rotation=90, fontsize=7)
    ax.set(xlabel="layer", ylabel="sparsity (%)", ylim=(0, 100), title="Sparsity per layer")
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def write_layer_report(method: SparsityMethod, out_dir: str | Path) -> dict[str, dict[str, float]] | None:
    """Write `layer_sparsity.json` / `.png` to `out_dir` for structured methods; None (nothing written) otherwise."""
    if not method.structured or not method.layers:
        return None
    stats = layer_sparsity(method)
    out_dir = Path(out_dir)
    write_json(out_dir / "layer_sparsity.json", stats)
    plot_layer_sparsity(stats, out_dir / "layer_sparsity.png")
    return stats
