"""Export: physically remove the channels of a channel-sparse model that no output depends on.

`compact(model, x)` returns a smaller copy with the same outputs. torch-pruning's
DependencyGraph says which channels are coupled and must go together (conv → BN → ReLU,
residual adds, concatenations, flatten → FC blocks, several task heads reading one trunk).
A channel is removed only when every conv/linear that reads it ignores it, i.e. for each
such consumer either

* its input group for the channel is all zero (what group lasso / GrOWL produce), or
* the channel is identically zero there: every producer's output row for it is zero, so
  the channel is a constant (bias, BN shift, ReLU) independent of the input, and a probe
  forward shows that constant is 0. A zero row with a non-zero bias/BN shift is kept.

Channels that reach a model output are never removed, and groups touching layers whose
channels are not independent (LayerNorm, GroupNorm, grouped convs, loose parameters) are
left whole. After the channel cut, a linear layer that still has all-zero input columns
(e.g. an FC layer after Flatten whose group lasso zeroed single features, not whole conv
channels) keeps only its read columns and gathers its inputs (`gather_inputs_`), so its
weight and its multiply-adds shrink with the group sparsity. Every export then checks the
compact outputs against the original ones.

`mtlsparse export <run_dir>` (`main`) rebuilds a run's model from `.hydra/config.yaml`,
loads a checkpoint, compacts it, checks max |Δoutput| ≤ 1e-4, saves `compact_model.pt`
and adds `params/compact`, `latency/dense_ms`, `latency/compact_ms` (CPU batch inference)
to metrics.json. `export_after_training` does the same at the end of `train.run`.

`compact_model.pt` holds the compact `state_dict` and the run's config, not a pickled
module (whole-model pickles break when code moves, see METHODS.md): `load_compact`
rebuilds the model from the config, shrinks its layers to the saved shapes and loads the
weights, so it reloads with `torch.load(weights_only=True)` and stays trainable.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mtlsparse.io import write_json
from mtlsparse.latency import count_flops, median_latency_ms
from mtlsparse.sparsity.layers import group_norms
from mtlsparse.sparsity.masks import MASK

log = logging.getLogger("mtlsparse")

COMPACT_FILE = "compact_model.pt"
FORMAT = "mtlsparse-compact/1"
TOLERANCE = 1e-4
EXPORT_DEFAULTS = {"enabled": "auto", "batch": 8, "warmup": 2, "repeats": 10, "threads": 1}
# layers whose channels are not independent of each other: a group touching them stays whole
UNSAFE_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention, nn.RNNBase, nn.Embedding)
INPUT_INDEX = "input_index"  # buffer of a linear layer that reads only these input features


class ExportError(RuntimeError):
    """Export cannot proceed (bad run dir, missing checkpoint, outputs that do not match)."""


# ------------------------------------------------------------------ compaction


def strip_masks_(model: nn.Module) -> nn.Module:
    """Fold `weight_mask` buffers into the weights and drop them (compaction changes weight shapes)."""
    with torch.no_grad():
        for module in model.modules():
            mask = module._buffers.pop(MASK, None)
            if mask is not None:
                module.weight.mul_(mask)
    return model


def _is_plain_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def channel_role(graph: tp.DependencyGraph, dep: Any, output_nodes: set) -> str:
    """What a group member does with the group's channels.

    consumer: conv/linear reading them (its input groups decide); producer: conv/linear
    writing them; output: they leave the model there; unsafe: channels are mixed or owned
    by something we cannot shrink exactly; passthrough: per-channel ops (BN, ReLU, add, cat ...).
    """
    module, writes = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
    if isinstance(module, nn.Parameter):
        return "unsafe"
    if isinstance(module, nn.Linear) or _is_plain_conv(module):
        if not writes:
            return "consumer"
        return "output" if dep.target in output_nodes else "producer"
    if dep.target in output_nodes:
        return "output"
    if _is_depthwise(module):
        return "passthrough"
    if isinstance(module, UNSAFE_TYPES + (nn.modules.conv._ConvNd,)):
        return "unsafe"
    return "passthrough"


def _scatter(n: int, roots: Tensor, values: Tensor, reduce: str) -> Tensor:
    """Reduce per-member bools onto the root channels (several members can map to one root)."""
    out = torch.full((n,), 1 if reduce == "amin" else 0, dtype=torch.int8)
    return out.scatter_reduce_(0, roots, values.to(torch.int8), reduce=reduce, include_self=True).bool()


def removable_channels(graph: tp.DependencyGraph, group: Any, output_nodes: set,
                       input_is_zero: dict[nn.Module, Tensor]) -> list[int]:
    """Root-channel indices of `group` that no output depends on (see module docstring)."""
    n = len(group[0].idxs)
    source_zero = torch.ones(n, dtype=torch.bool)
    consumers, producers = [], 0
    for item in group:
        role = channel_role(graph, item.dep, output_nodes)
        if role in ("unsafe", "output"):
            return []
        if role == "passthrough":
            continue
        idxs, roots = torch.as_tensor(item.idxs), torch.as_tensor(item.root_idxs)
        weight = item.dep.target.module.weight.detach()
        if len(idxs) and int(idxs.max()) >= weight.shape[0 if role == "producer" else 1]:
            return []  # torch-pruning coupled dims that do not match here (e.g. a broadcast): leave whole
        if role == "producer":
            producers += 1
            row_zero = weight.flatten(1).abs().amax(dim=1) == 0
            source_zero &= _scatter(n, roots, row_zero[idxs], "amin")
        else:
            consumers.append((item.dep.target.module, idxs, roots, weight))
    if not consumers:
        return []
    read = torch.zeros(n, dtype=torch.bool)
    for module, idxs, roots, weight in consumers:
        ignored = group_norms(weight)[idxs] == 0
        if producers and module in input_is_zero:  # identically-zero channels (zero rows, zero constant)
            ignored |= source_zero[roots] & input_is_zero[module][idxs]
        read |= _scatter(n, roots, ~ignored, "amax")
    drop = (~read).nonzero().flatten().tolist()
    return drop[1:] if len(drop) == n else drop  # keep one channel: layers cannot be 0 wide


def zero_inputs(model: nn.Module, x: Tensor) -> dict[nn.Module, Tensor]:
    """Per conv/linear: which input channels were exactly zero everywhere in a forward on `x`."""
    seen: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, inputs: tuple) -> None:
        inp = inputs[0].detach()
        dim = inp.dim() - 1 if isinstance(module, nn.Linear) else 1
        zero = inp.transpose(0, dim).reshape(inp.shape[dim], -1).abs().amax(dim=1) == 0
        seen[module] = seen[module] & zero if module in seen else zero

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, nn.Linear) or _is_plain_conv(m)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def dependency_graph(model: nn.Module, x: Tensor) -> tuple[tp.DependencyGraph, set]:
    """torch-pruning's graph of `model` traced on `x`, and the nodes that produce model outputs.

    Output nodes are found from the traced outputs' autograd nodes (dicts of task outputs
    are flattened by torch-pruning), so an output also consumed inside the model still counts.
    """
    outputs: list[Tensor] = []

    def keep_outputs(out: Any) -> Any:
        outputs.extend(tp.utils.flatten_as_list(out))
        return out

    graph = tp.DependencyGraph()
    with torch.enable_grad():
        graph.build_dependency(model, example_inputs=x, forward_fn=lambda m, inp: m(inp),
                               output_transform=keep_outputs, verbose=False)
    grad_fns = {t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None}
    output_nodes = {node for node in graph.module2node.values()
                    if node.grad_fn in grad_fns or not node.outputs}
    return graph, output_nodes


def plan_removal(model: nn.Module, x: Tensor) -> tuple[tp.DependencyGraph, dict[str, list[int]]]:
    """Trace `model` on `x` and decide, per coupled group, which root-layer output channels can go."""
    input_is_zero = zero_inputs(model, x)
    graph, output_nodes = dependency_graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    plan = {}
    for group in graph.get_all_groups():
        drop = removable_channels(graph, group, output_nodes, input_is_zero)
        if drop:
            plan[names[group[0].dep.target.module]] = drop
    return graph, plan


def apply_plan(model: nn.Module, graph: tp.DependencyGraph, plan: dict[str, list[int]]) -> None:
    """Cut the planned channels (with everything coupled to them) out of `model`, in place.

    A root layer's own output channels never shift when other groups are cut, so plans made
    on the uncut model stay valid; torch-pruning re-derives concat/flatten offsets per group.
    """
    modules = dict(model.named_modules())
    for name, drop in plan.items():
        module = modules[name]
        graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, drop).prune()


def _cut_is_exact(reference: nn.Module, model: nn.Module, graph: tp.DependencyGraph,
                  plan: dict[str, list[int]], x: Tensor) -> bool:
    """Apply `plan` to `model`; True when its outputs on `x` still match `reference`'s."""
    try:
        apply_plan(model, graph, plan)
        return max_abs_diff(reference, model, x, exact=True) <= TOLERANCE
    except Exception as err:  # noqa: BLE001 - a surgery torch-pruning cannot do is a plan we drop
        log.debug("export: cutting %s failed: %s", list(plan), err)
        return False


def compact(model: nn.Module, x: Tensor) -> tuple[nn.Module, dict[str, int]]:
    """A physically smaller copy of `model` (eval mode, CPU) with the same outputs.

    Returns the copy and the number of channels removed per root layer name; `x` is an
    example batch for tracing and for the zero-channel probe. If cutting every planned
    group at once changes the outputs (an op torch-pruning misreads, e.g. a broadcast that
    mixes unrelated dims), each group is tried alone and only the exact ones are kept.
    """
    reference = strip_masks_(copy.deepcopy(model)).cpu().eval()
    x = x.cpu()
    small = copy.deepcopy(reference)
    graph, plan = plan_removal(small, x)
    if not _cut_is_exact(reference, small, graph, plan, x):
        log.info("export: cutting all %d planned groups at once changed the outputs; checking each alone", len(plan))
        kept = {}
        for name, drop in plan.items():
            trial = copy.deepcopy(reference)
            if _cut_is_exact(reference, trial, dependency_graph(trial, x)[0], {name: drop}, x):
                kept[name] = drop
        plan, small = kept, copy.deepcopy(reference)
        if not _cut_is_exact(reference, small, dependency_graph(small, x)[0], plan, x):
            raise ExportError("no exact compaction found: the groups that are exact alone are not exact together")
    removed = {name: len(drop) for name, drop in plan.items()}
    for name, module in small.named_modules():
        if isinstance(module, nn.Linear) and not hasattr(module, INPUT_INDEX):
            read = group_norms(module.weight.detach()) != 0
            if 0 < int(read.sum()) < len(read):
                gather_inputs_(module, read.nonzero().flatten())
                removed[f"{name}:inputs"] = len(read) - int(read.sum())
    return small.eval(), removed


def removal_counts(removed: dict[str, int]) -> tuple[int, int]:
    """(channels removed, linear input features dropped) from `compact`'s per-layer counts."""
    features = sum(n for name, n in removed.items() if name.endswith(":inputs"))
    return sum(removed.values()) - features, features


def _gather_input(module: nn.Linear, inputs: tuple) -> tuple:
    return (inputs[0].index_select(-1, getattr(module, INPUT_INDEX)), *inputs[1:])


def attach_input_gather_(linear: nn.Linear, index: Tensor) -> None:
    """Make `linear` read x[..., index] (its weight must already have len(index) columns)."""
    linear.register_buffer(INPUT_INDEX, index.clone())
    linear.register_forward_pre_hook(_gather_input)


def gather_inputs_(linear: nn.Linear, keep: Tensor) -> None:
    """Keep only the weight columns `keep` of `linear` and gather those input features.

    Exact whenever the dropped columns are zero: they contribute nothing to the output.
    """
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight[:, keep].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(keep)
    attach_input_gather_(linear, keep)


def max_abs_diff(a: nn.Module, b: nn.Module, x: Tensor, exact: bool = False) -> float:
    """Largest |difference| over all (task) outputs of two models on `x`.

    `exact=True` compares in float64 (models converted and converted back, losslessly), so
    float32 rounding differences from summing fewer terms cannot pass for a wrong cut or
    make a right one fail: what is left is the surgery's own error.
    """
    dtype = next((p.dtype for p in a.parameters()), torch.float32)
    if exact:
        a, b, x = a.double(), b.double(), x.double()
    try:
        with torch.inference_mode():
            out_a, out_b = tp.utils.flatten_as_list(a.eval()(x)), tp.utils.flatten_as_list(b.eval()(x))
    finally:
        if exact:
            a.to(dtype), b.to(dtype)
    if len(out_a) != len(out_b) or any(u.shape != v.shape for u, v in zip(out_a, out_b)):
        raise ExportError("compact model's outputs have different shapes than the original's")
    return max((float((u - v).abs().max()) for u, v in zip(out_a, out_b) if u.numel()), default=0.0)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ save / reload


def save_compact(model: nn.Module, path: str | Path, config: DictConfig | dict | None = None) -> None:
    """Save the compact state_dict with the config that rebuilds its architecture."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)
    config = {k: v for k, v in (config or {}).items() if k != "hydra"}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), "config": config}, tmp)
    tmp.replace(path)


def shrink_to_(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Resize `model`'s parameters/buffers to the shapes in `state_dict` and fix layer attributes."""
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name == INPUT_INDEX and isinstance(module, nn.Linear) and not hasattr(module, INPUT_INDEX):
            attach_input_gather_(module, value)
            continue
        current = getattr(module, name, None)
        if not isinstance(current, Tensor) or current.shape == value.shape:
            continue
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(torch.empty_like(value), requires_grad=current.requires_grad)
        else:
            module._buffers[name] = torch.empty_like(value)
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            module.out_channels = module.weight.shape[0]
            module.groups = module.out_channels if depthwise else module.groups
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            source = module.running_mean if module.running_mean is not None else module.weight
            if source is not None:
                module.num_features = source.shape[0]
    return model


def load_compact(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compact model saved by `save_compact`: dense model (`model`, or built from the
    saved config) → layers shrunk to the saved shapes → weights loaded."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ExportError(f"{path} is not a compact model saved by mtlsparse export ({FORMAT})")
    if model is None:
        if not saved["config"]:
            raise ExportError(f"{path} was saved without a config: pass the dense model to rebuild")
        model, _ = build_run_model(OmegaConf.create(saved["config"]))
    shrink_to_(model, saved["state_dict"])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval()


def build_run_model(cfg: DictConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """The run's (dense) model, built exactly as training builds it, and its input shape (no data is loaded)."""
    from mtlsparse.config import build
    from mtlsparse.train import build_model  # late: train imports this module

    datamodule = build(cfg, "dataset")
    return build_model(cfg, datamodule), tuple(datamodule.input_shape)


# ------------------------------------------------------------------ export of a model / run


def export_model(model: nn.Module, input_shape: Sequence[int], out_dir: str | Path,
                 config: DictConfig | dict | None = None, batch: int = 8, warmup: int = 2,
                 repeats: int = 10, threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Compact `model`, check its outputs, save it to `out_dir`, and time both (CPU).

    Returns the metrics to merge into metrics.json.
    """
    if batch < 1:
        raise ValueError(f"export batch must be >= 1, got {batch}")
    dense = strip_masks_(copy.deepcopy(model)).cpu().eval()
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    small, removed = compact(dense, x[:2])
    diff = max_abs_diff(dense, small, x, exact=True)
    if not diff <= TOLERANCE:
        raise ExportError(f"compact model's outputs differ from the original's by {diff:.3g} > {TOLERANCE}: "
                          "an architecture op mixes channels that torch-pruning treated as independent")
    save_compact(small, Path(out_dir) / COMPACT_FILE, config)
    channels, features = removal_counts(removed)
    latency = median_latency_ms({"dense": dense, "compact": small}, x, warmup, repeats, threads)
    flops_dense, flops_compact = count_flops(dense, x[:1]), count_flops(small, x[:1])
    return {"params/compact": num_params(small), "params/dense": num_params(dense),
            "latency/dense_ms": latency["dense"], "latency/compact_ms": latency["compact"],
            "latency/speedup": latency["dense"] / latency["compact"], "latency/batch": batch,
            "latency/threads": threads, "flops/dense": flops_dense, "flops/compact": flops_compact,
            "export/max_abs_diff": diff, "export/max_abs_diff_fp32": max_abs_diff(dense, small, x),
            "export/channels_removed": channels, "export/features_gathered": features}


def export_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `export` config node with defaults filled in, checked."""
    node = cfg.get("export") or {}
    settings = {**EXPORT_DEFAULTS, **(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)}
    unknown = set(settings) - set(EXPORT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown key(s) export.{sorted(unknown)}; allowed: {sorted(EXPORT_DEFAULTS)}")
    if settings["enabled"] not in ("auto", True, False):
        raise ValueError(f"export.enabled must be one of ['auto', true, false], got {settings['enabled']!r}")
    return settings


def export_after_training(cfg: DictConfig, model: nn.Module, structured: bool, input_shape: Sequence[int],
                          run_dir: str | Path) -> dict[str, Any]:
    """Export at the end of `train.run` when `export.enabled` is true, or auto and the method is structured.

    In auto mode a failure is logged and recorded as `export/error` instead of failing the finished run.
    """
    settings = export_settings(cfg)
    enabled = settings.pop("enabled")
    if enabled is False or (enabled == "auto" and not structured):
        return {}
    try:
        metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)), **settings)
    except Exception as err:  # noqa: BLE001 - auto export must not lose a finished training run
        if enabled is True:
            raise
        log.warning("export failed (%s: %s); the trained checkpoints are unaffected", type(err).__name__, err)
        return {"export/error": f"{type(err).__name__}: {err}"}
    log.info("export: %d → %d params, CPU latency %.3g → %.3g ms (batch %d) → %s", metrics["params/dense"],
             metrics["params/compact"], metrics["latency/dense_ms"], metrics["latency/compact_ms"],
             metrics["latency/batch"], Path(run_dir) / COMPACT_FILE)
    return metrics


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """`best` (the val/select checkpoint; last.ckpt when the run kept none) or `last`."""
    ckpt_dir = run_dir / "checkpoints"
    if which == "best":
        best = sorted(ckpt_dir.glob("best-*.ckpt"))
        if best:
            return best[-1]
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        raise ExportError(f"no {'best-*.ckpt or ' if which == 'best' else ''}last.ckpt under {ckpt_dir}: "
                          "is this a finished training run dir?")
    return last


def model_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The model's weights from a Lightning checkpoint of MultiTaskModule, with masks folded in."""
    state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    if not state:
        raise ExportError("checkpoint holds no 'model.*' weights (not a MultiTaskModule checkpoint)")
    for key in [k for k in state if k.endswith(f".{MASK}")]:
        mask = state.pop(key)
        weight_key = key[: -len(MASK)] + "weight"
        state[weight_key] = state[weight_key] * mask
    return state


def export_run(run_dir: str | Path, ckpt: str = "best", batch: int | None = None, repeats: int | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """Export a finished run: compact its checkpoint, save it and merge the numbers into metrics.json."""
    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory")
    if not config_file.is_file():
        raise ExportError(f"{config_file} not found: pass a training run dir (one holding .hydra/ and checkpoints/)")
    cfg = OmegaConf.load(config_file)
    settings = export_settings(cfg)
    settings.pop("enabled")
    for key, value in (("batch", batch), ("repeats", repeats), ("threads", threads)):
        if value is not None:
            settings[key] = value
    path = find_checkpoint(run_dir, ckpt)
    model, input_shape = build_run_model(cfg)
    model.load_state_dict(model_state(torch.load(path, map_location="cpu", weights_only=False)), strict=True)
    metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)), **settings)
    metrics["export/checkpoint"] = path.name
    update_metrics(run_dir / "metrics.json", metrics)
    return metrics


def update_metrics(path: Path, new: dict[str, Any]) -> None:
    """Merge `new` into metrics.json (created if missing), keeping every existing key; atomic write."""
    current = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**current, **new})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlsparse export", description=(
        "Physically remove all-zero channel groups of a trained run's model, check its outputs, save "
        f"<run_dir>/{COMPACT_FILE} and add params/compact and CPU latency/* to <run_dir>/metrics.json."))
    parser.add_argument("run_dir", type=Path, help="a training run dir (holds .hydra/ and checkpoints/)")
    parser.add_argument("--ckpt", choices=("best", "last"), default="best", help="checkpoint to export")
    parser.add_argument("--batch", type=int, default=None, help="batch size for latency (default: export.batch)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for latency")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """`mtlsparse export ...`: 0 on success, 2 on a clear error (message on stderr)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        metrics = export_run(args.run_dir, args.ckpt, args.batch, args.repeats, args.threads)
    except (ExportError, ValueError) as err:
        print(f"mtlsparse export: error: {err}", file=sys.stderr)
        return 2
    print(f"{metrics['export/checkpoint']}: params {metrics['params/dense']} → {metrics['params/compact']}, "
          f"FLOPs/sample {metrics['flops/dense']:.4g} → {metrics['flops/compact']:.4g}, CPU latency "
          f"(batch {metrics['latency/batch']}, {metrics['latency/threads']} thread(s)) "
          f"{metrics['latency/dense_ms']:.3g} → {metrics['latency/compact_ms']:.3g} ms, "
          f"max |Δout| {metrics['export/max_abs_diff']:.2g}")
    print(f"saved {args.run_dir / COMPACT_FILE}; metrics added to {args.run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
