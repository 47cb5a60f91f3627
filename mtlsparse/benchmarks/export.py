"""`make bench-export`: how much faster a channel-sparse DeepLab trunk gets once compacted (CPU).

Builds `deeplab_resnet` (dilated ResNet trunk + ASPP heads for seg/depth/normals, random
init, 256×256 inputs), zeroes `--sparsity` of the channel groups the way a structured
method leaves them (every prunable trunk layer: the same random 70% of each coupled set of
channels zeroed in all prunable readers, so residual streams are zeroed consistently;
heads untouched, as group lasso leaves them), compacts it with `mtlsparse.compaction`, checks
the outputs, and times dense vs compact trunk on CPU batch inference (warm-up, then the
median and interquartile range of repeats, dense and compact interleaved so machine load
hits both alike). Reports the measured speed-up next to the FLOP ratio, the speed-up a
perfect kernel would give, or "no measurable change" when the two ranges overlap. Writes
`bench/export.json` and `bench/export.md`.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Collection
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlsparse.compaction.graph import Budget, channel_role, coupled_groups, dependency_graph
from mtlsparse.compaction.surgery import compact, max_abs_diff, num_params, removal_counts
from mtlsparse.io import atomic_write_text, write_json
from mtlsparse.latency import count_flops, latency_spread_ms, measurable_difference
from mtlsparse.metrics.sparsity import group_sparsity
from mtlsparse.sparsity.layers import prunable_layers
from mtlsparse.tasks import Task

NYU_TASKS = {"seg": Task("seg", kind="segmentation", num_classes=13), "depth": Task("depth", kind="depth"),
             "normal": Task("normal", kind="normal")}


@torch.no_grad()
def zero_channel_groups_(model: nn.Module, x: Tensor, fraction: float, prunable: Collection[nn.Module],
                         seed: int = 0) -> None:
    """Zero the input groups of a random `fraction` of each coupled channel set in every prunable reader.

    Coupled channels (a residual stream, conv → BN → next conv) are chosen together, so the
    zeros line up as a structured method's would. Readers outside `prunable` (heads) keep
    their weights, so channels they read stay in the compact model though counted as zero groups.
    """
    generator = torch.Generator().manual_seed(seed)
    graph, outputs = dependency_graph(model, x)
    prunable = set(prunable)
    for _, group in coupled_groups(graph, Budget()):
        roles = [channel_role(graph, item.dep, outputs) for item in group]
        if "unsafe" in roles:
            continue
        n = len(group[0].idxs)
        drop = torch.randperm(n, generator=generator)[: min(n - 1, round(fraction * n))]
        for item, role in zip(group, roles):
            module = item.dep.target.module
            if role == "consumer" and module in prunable:
                idxs = torch.as_tensor(item.idxs)[torch.isin(torch.as_tensor(item.root_idxs), drop)]
                module.weight[:, idxs] = 0


def build_deeplab(depth: int, width: float, size: int) -> nn.Module:
    """The `deeplab_resnet` model for three NYUv2-like dense tasks on `size`×`size` RGB inputs."""
    from mtlsparse.models.deeplab import DeepLabResNet

    return DeepLabResNet(NYU_TASKS, (3, size, size), depth=depth, width=width).eval()


def measure(depth: int, width: float, size: int, batch: int, sparsity: float, warmup: int, repeats: int,
            threads: int, seed: int = 0) -> dict:
    """One benchmark row: sparsify, compact, check, count FLOPs and time the trunks."""
    torch.manual_seed(seed)
    model = build_deeplab(depth, width, size)
    layers = prunable_layers(model)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    zero_channel_groups_(model, x[:1], sparsity, [layer.module for layer in layers], seed)
    start = time.perf_counter()
    small, removed = compact(model, x[:1])
    compact_s = time.perf_counter() - start
    diff = max_abs_diff(model, small, x[:2])
    flops = {"trunk_dense": count_flops(model.trunk, x[:1]), "trunk_compact": count_flops(small.trunk, x[:1]),
             "model_dense": count_flops(model, x[:1]), "model_compact": count_flops(small, x[:1])}
    spreads, samples = latency_spread_ms({"dense": model.trunk, "compact": small.trunk}, x, warmup, repeats, threads)
    return {"depth": depth, "width": width, "size": size, "batch": batch, "threads": threads,
            "repeats": repeats, "warmup": warmup,
            "sparsity_group": group_sparsity([layer.weight for layer in layers]),
            "channels_removed": removal_counts(removed)[0], "compact_s": compact_s, "max_abs_diff": diff,
            "params_trunk_dense": num_params(model.trunk), "params_trunk_compact": num_params(small.trunk),
            "params_model_dense": num_params(model), "params_model_compact": num_params(small),
            **{f"flops_{k}": v for k, v in flops.items()},
            "flop_ratio_trunk": flops["trunk_dense"] / flops["trunk_compact"],
            "flop_ratio_model": flops["model_dense"] / flops["model_compact"],
            "latency_dense_ms": spreads["dense"].median, "latency_compact_ms": spreads["compact"].median,
            "latency_dense_iqr_ms": spreads["dense"].iqr, "latency_compact_iqr_ms": spreads["compact"].iqr,
            "speedup_trunk": spreads["dense"].median / spreads["compact"].median,
            "speedup_measurable": measurable_difference(samples["dense"], samples["compact"])}


def markdown(rows: list[dict], note: str) -> str:
    first = rows[0]
    lines = [f"Export benchmark: `deeplab_resnet` trunk (output stride 8), {first['size']}×{first['size']} random "
             f"inputs, CPU batch {first['batch']}, {first['threads']} thread(s), median [interquartile range] of "
             f"{first['repeats']} interleaved repeats after {first['warmup']} warm-up. {note}", "",
             "| ResNet | group sparsity % | trunk params dense → compact | trunk GMACs/img dense → compact | "
             "FLOP ratio | trunk latency dense → compact (ms) | measured speed-up | ≥ 2× | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measurable = r["speedup_measurable"]
        speedup = f"{r['speedup_trunk']:.2f}×" if measurable else "no measurable change"
        lines.append(
            f"| {r['depth']} | {r['sparsity_group']:.1f} | {r['params_trunk_dense'] / 1e6:.2f}M → "
            f"{r['params_trunk_compact'] / 1e6:.2f}M | {r['flops_trunk_dense'] / 2e9:.2f} → "
            f"{r['flops_trunk_compact'] / 2e9:.2f} | {r['flop_ratio_trunk']:.2f}× | {r['latency_dense_ms']:.0f} "
            f"[{r['latency_dense_iqr_ms']:.2g}] → {r['latency_compact_ms']:.0f} [{r['latency_compact_iqr_ms']:.2g}] | "
            f"{speedup} | {'yes' if measurable and r['speedup_trunk'] >= 2 else 'NO'} | {r['max_abs_diff']:.1e} |")
    lines += ["", "GMACs: multiply-adds per image (torch's FLOP counter / 2). FLOP ratio = dense / compact FLOPs, the "
              "speed-up a perfectly efficient kernel would reach. Whole model with the (unpruned) ASPP heads: "
              + ", ".join(f"ResNet-{r['depth']} {r['flop_ratio_model']:.2f}× fewer FLOPs" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, nargs="+", default=[18, 50], help="ResNet depths (18 | 34 | 50)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of the model")
    parser.add_argument("--size", type=int, default=256, help="input height = width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.7, help="fraction of each coupled channel set zeroed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing")
    parser.add_argument("--note", default="", help="free text for the table caption (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    rows = [measure(d, args.width, args.size, args.batch, args.sparsity, args.warmup, args.repeats, args.threads)
            for d in args.depth]
    results = {"rows": rows, "machine": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "note": args.note}
    write_json(args.out / "export.json", results)
    atomic_write_text(args.out / "export.md", markdown(rows, args.note))
    print(markdown(rows, args.note))


if __name__ == "__main__":
    main()
