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

Deploy formats (docs/export.md): `--make-run DIR` writes a `deeplab_resnet` run dir instead
(`.hydra/config.yaml` + `checkpoints/last.ckpt` of the same zeroed model, heads included with
`--heads`), for `mtlsparse export DIR --format onnx,torch_export` to export as it would a
trained run; `--deploy-table DIR ...` reads the exported runs' metrics.json and writes
`bench/export_deploy.{json,md}`: equality and latency in torch eager, torch.export and
onnxruntime, dense vs compact.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Collection
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from mtlsparse.builders import build_run_model
from mtlsparse.compaction.graph import Budget, channel_role, coupled_groups, dependency_graph
from mtlsparse.compaction.surgery import compact, max_abs_diff, num_params, removal_counts
from mtlsparse.config import compose_config
from mtlsparse.io import atomic_write_text, write_json
from mtlsparse.latency import count_flops, latency_spread_ms, measurable_difference
from mtlsparse.metrics.sparsity import group_sparsity
from mtlsparse.run_dir import MODEL_PREFIX, RunDir
from mtlsparse.sparsity.layers import prunable_layers
from mtlsparse.sparsity.scope import Scope
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


def make_run(run_dir: Path, depth: int, width: float, size: int, sparsity: float, heads: bool,
             seed: int = 0) -> dict:
    """A run dir as training leaves one, holding `deeplab_resnet` with `sparsity` of its channel groups zeroed.

    The config is the composed `model=deeplab_resnet dataset=nyuv2 method=group_lasso` one
    (scope.heads as `heads`), so `mtlsparse export` rebuilds the model from it; the weights
    are random, zeroed by `zero_channel_groups_` (trunk, and the heads with `heads`).
    """
    cfg = compose_config(["model=deeplab_resnet", f"model.depth={depth}", f"model.width={width}", "dataset=nyuv2",
                          f"dataset.image_size=[{size},{size}]", "method=group_lasso",
                          f"scope.heads={str(heads).lower()}", f"seed={seed}", f"data_root={run_dir / 'data'}"])
    torch.manual_seed(seed)
    model, input_shape = build_run_model(cfg)
    model.eval()
    layers = prunable_layers(model, Scope(heads=heads))
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(seed))
    zero_channel_groups_(model, x, sparsity, [layer.module for layer in layers], seed)
    layout = RunDir(run_dir)
    layout.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    composed = OmegaConf.to_container(cfg, resolve=False)
    composed.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(composed), layout.config_file)
    torch.save({"state_dict": {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}}, layout.last_checkpoint)
    made = {"sparsity/group": group_sparsity([layer.weight for layer in layers]), "params/total": num_params(model),
            "bench/model": f"deeplab_resnet-{depth} width {width:g}, {size}×{size}", "bench/heads_zeroed": heads,
            "bench/weights": f"random init, {sparsity:.0%} of each coupled channel set zeroed (seed {seed})"}
    write_json(layout.metrics_file, made)
    return made


RUNTIMES = (("torch", "torch eager", "latency/"), ("torch_export", "torch.export (.pt2)", "latency/torch_export/"),
            ("onnx", "onnxruntime (.onnx)", "latency/onnx/"))


def run_label(cfg) -> str:
    """'HPS, group_lasso λ=0.001 (BN-coupled), 3×64×64' from a trained run's config."""
    model = str(cfg.model._target_).rsplit(".", 1)[-1]
    method = str(cfg.method._target_).rsplit(".", 1)[-1]
    coupled = " (BN-coupled)" if OmegaConf.select(cfg, "method.couple_norms", default=False) else ""
    size = OmegaConf.select(cfg, "dataset.image_size", default="?")
    channels = OmegaConf.select(cfg, "dataset.channels", default="?")
    return f"{model}, {method} λ={cfg.lam:g}{coupled}, trained, {channels}×{size}×{size}"


def deploy_rows(run_dirs: list[Path]) -> list[dict]:
    """One row per exported run and runtime, from each run's metrics.json."""
    import json

    rows = []
    for run_dir in run_dirs:
        layout = RunDir(run_dir)
        m = json.loads(layout.metrics_file.read_text())
        name = m.get("bench/model") or run_label(OmegaConf.load(layout.config_file))
        for runtime, label, p in RUNTIMES:
            if p + "dense_ms" not in m:
                continue
            diff = m["export/max_abs_diff_fp32"] if runtime == "torch" else m[f"export/{runtime}/max_abs_diff"]
            rows.append({"run": str(run_dir), "model": name, "runtime": label, "sparsity_group": m["sparsity/group"],
                         "params_dense": m["params/dense"], "params_compact": m.get("params/compact"),
                         "flop_ratio": m["flops/dense"] / m["flops/compact"] if "flops/compact" in m else None,
                         "max_abs_diff": diff,
                         "dense_max_abs_diff": m.get(f"export/{runtime}/dense_max_abs_diff", 0.0),
                         **{k: m.get(p + k) for k in ("dense_ms", "dense_iqr_ms", "compact_ms", "compact_iqr_ms",
                                                      "speedup", "measurable", "dense_vs_torch",
                                                      "dense_vs_torch_measurable", "compact_vs_torch",
                                                      "compact_vs_torch_measurable")},
                         "batch": m["latency/batch"], "threads": m["latency/threads"], "repeats": m["latency/repeats"]})
    return rows


def deploy_markdown(rows: list[dict], note: str) -> str:
    def ratio(value, measurable) -> str:
        return "—" if value is None else f"{value:.2f}×" if measurable else f"{value:.2f}× (not measurable)"

    lines = ["| model | batch | group sparsity % | params dense → compact | FLOP ratio | runtime | max abs diff "
             "dense / compact vs torch | latency dense → compact (ms, median [IQR]) | compact speed-up | "
             "vs torch eager, dense / compact |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = "—" if r["speedup"] is None else f"{r['speedup']:.2f}×" if r["measurable"] else \
            "no measurable change"
        vs = "—" if r["runtime"] == "torch eager" else \
            f"{ratio(r['dense_vs_torch'], r['dense_vs_torch_measurable'])} / " \
            f"{ratio(r['compact_vs_torch'], r['compact_vs_torch_measurable'])}"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['sparsity_group']:.1f} | {r['params_dense'] / 1e6:.3g}M → "
            f"{r['params_compact'] / 1e6:.3g}M | {r['flop_ratio']:.2f}× | {r['runtime']} | "
            f"{r['dense_max_abs_diff']:.1e} / {r['max_abs_diff']:.1e} | "
            f"{r['dense_ms']:.3g} [{r['dense_iqr_ms']:.2g}] → {r['compact_ms']:.3g} [{r['compact_iqr_ms']:.2g}] | "
            f"{speedup} | {vs} |")
    lines += ["", f"CPU, {rows[0]['threads']} thread(s) (torch and onnxruntime intra-op), median [interquartile "
              f"range] of {', '.join(sorted({str(r['repeats']) for r in rows}))} repeats per model, the six models of "
              "a run (3 runtimes × dense, compact) timed interleaved. max abs diff: "
              "fp32 outputs against the masked torch model (torch eager row: the compact torch model). A speed-up or "
              "a ratio counts only when the interquartile ranges do not overlap. " + note]
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
    parser.add_argument("--make-run", type=Path, default=None, metavar="DIR",
                        help="write a zeroed deeplab_resnet run dir (first --depth) for `mtlsparse export`, then stop")
    parser.add_argument("--heads", action="store_true", help="with --make-run: zero the heads' channel groups too")
    parser.add_argument("--deploy-table", type=Path, nargs="+", default=None, metavar="DIR",
                        help="exported run dirs: write bench/export_deploy.{json,md} from their metrics.json")
    args = parser.parse_args(argv)
    if args.make_run is not None:
        made = make_run(args.make_run, args.depth[0], args.width, args.size, args.sparsity, args.heads)
        print(f"{args.make_run}: {made['bench/model']}, group sparsity {made['sparsity/group']:.1f}%")
        return
    if args.deploy_table is not None:
        rows = deploy_rows(args.deploy_table)
        write_json(args.out / "export_deploy.json", {"rows": rows, "machine": platform.processor() or
                                                     platform.machine(), "cpu_count": os.cpu_count(),
                                                     "torch": torch.__version__, "note": args.note})
        atomic_write_text(args.out / "export_deploy.md", deploy_markdown(rows, args.note))
        print(deploy_markdown(rows, args.note))
        return
    rows = [measure(d, args.width, args.size, args.batch, args.sparsity, args.warmup, args.repeats, args.threads)
            for d in args.depth]
    results = {"rows": rows, "machine": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "note": args.note}
    write_json(args.out / "export.json", results)
    atomic_write_text(args.out / "export.md", markdown(rows, args.note))
    print(markdown(rows, args.note))


if __name__ == "__main__":
    main()
