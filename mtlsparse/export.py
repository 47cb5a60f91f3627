"""`mtlsparse export <run_dir>`: compact a trained channel-sparse run's model and measure it.

`main` rebuilds a run's model from `.hydra/config.yaml`, loads a checkpoint, compacts it
(`mtlsparse.compaction`), checks max |Δoutput| ≤ 1e-4, saves `compact_model.pt` and adds
`params/compact` and the CPU batch-inference latency of both models (median and
interquartile range, `latency/measurable` false when the ranges overlap) to metrics.json.
`export_after_training` does the same at the end of `train.run`.

Export is decided up front: an architecture declared not compactable is refused at once
with one line (`NotCompactable`), and a model with no all-zero channel group (e.g. a λ = 0
run) is skipped (`NothingToRemove`): no compact file, no export metrics.
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
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mtlsparse.builders import build_run_model
from mtlsparse.compaction.errors import BudgetExceeded, ExportError, NotCompactable
from mtlsparse.compaction.graph import BUDGET_S, Budget, check_compactable, zero_channel_groups
from mtlsparse.compaction.serialise import load_compact, save_compact
from mtlsparse.compaction.surgery import TOLERANCE, compact, max_abs_diff, num_params, removal_counts, strip_masks_
from mtlsparse.io import write_json
from mtlsparse.latency import count_flops, latency_spread_ms, measurable_difference
from mtlsparse.run_dir import BEST_CHECKPOINTS, COMPACT_FILE, LAST_CHECKPOINT, MODEL_PREFIX, RunDir
from mtlsparse.sparsity.masks import MASK

# what users and tests import from here: the compaction API, the command's entry points and errors
__all__ = ["COMPACT_FILE", "BudgetExceeded", "ExportError", "NotCompactable", "NothingToRemove", "compact",
           "export_after_training", "export_model", "export_run", "load_compact", "main"]

log = logging.getLogger("mtlsparse")

EXPORT_DEFAULTS = {"enabled": "auto", "batch": 8, "warmup": 2, "repeats": 10, "threads": 1, "budget_s": BUDGET_S}
NO_ZERO_GROUP = "no channel group is zero, nothing to remove; skipped"


class NothingToRemove(Exception):
    """The model has no channel group export could remove: there is nothing to export (not an error)."""


def export_model(model: nn.Module, input_shape: Sequence[int], out_dir: str | Path,
                 config: DictConfig | dict | None = None, batch: int = 8, warmup: int = 2,
                 repeats: int = 10, threads: int = 1, seed: int = 0, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Compact `model`, check its outputs, save it to `out_dir`, and time both (CPU).

    Returns the metrics to merge into metrics.json. Raises `NotCompactable` for a declared
    architecture and `NothingToRemove` (nothing saved) when no channel group is zero or none
    of the zero ones can go, both before the latency measurement.
    """
    if batch < 1:
        raise ValueError(f"export batch must be >= 1, got {batch}")
    check_compactable(model)
    if zero_channel_groups(model) == 0:
        raise NothingToRemove(NO_ZERO_GROUP)
    budget = Budget(budget_s)
    dense = strip_masks_(copy.deepcopy(model)).cpu().eval()
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    small, removed = compact(dense, x[:2], budget)
    if not removed:
        raise NothingToRemove("every zero channel group is still read by another layer or reaches an output, "
                              "nothing to remove; skipped")
    diff = max_abs_diff(dense, small, x, exact=True)
    if not diff <= TOLERANCE:
        raise ExportError(f"compact model's outputs differ from the original's by {diff:.3g} > {TOLERANCE}: "
                          "an architecture op mixes channels that torch-pruning treated as independent")
    save_compact(small, RunDir(Path(out_dir)).compact_model, config)
    channels, features = removal_counts(removed)
    spreads, samples = latency_spread_ms({"dense": dense, "compact": small}, x, warmup, repeats, threads)
    flops_dense, flops_compact = count_flops(dense, x[:1]), count_flops(small, x[:1])
    return {"params/compact": num_params(small), "params/dense": num_params(dense),
            **{f"latency/{name}_{key}": value for name, s in spreads.items()
               for key, value in (("ms", s.median), ("iqr_ms", s.iqr), ("min_ms", s.low), ("max_ms", s.high))},
            "latency/speedup": spreads["dense"].median / spreads["compact"].median,
            "latency/measurable": measurable_difference(samples["dense"], samples["compact"]),
            "latency/batch": batch, "latency/threads": threads, "latency/repeats": repeats,
            "flops/dense": flops_dense, "flops/compact": flops_compact,
            "export/max_abs_diff": diff, "export/max_abs_diff_fp32": max_abs_diff(dense, small, x),
            "export/channels_removed": channels, "export/features_gathered": features}


def latency_line(metrics: dict[str, Any]) -> str:
    """'CPU latency (batch B, T thread(s), median [IQR] of N) dense → compact ms: verdict' from export metrics."""
    verdict = f"{metrics['latency/speedup']:.2f}× speed-up" if metrics["latency/measurable"] else \
        "no measurable change (the interquartile ranges overlap)"
    return (f"CPU latency (batch {metrics['latency/batch']}, {metrics['latency/threads']} thread(s), median [IQR] of "
            f"{metrics['latency/repeats']}) {metrics['latency/dense_ms']:.3g} [{metrics['latency/dense_iqr_ms']:.2g}]"
            f" → {metrics['latency/compact_ms']:.3g} [{metrics['latency/compact_iqr_ms']:.2g}] ms: {verdict}")


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

    Nothing to remove (e.g. λ = 0): one info line, no compact file and no metrics. A model
    declared not compactable: its one-line reason as a warning, recorded as `export/refused`.
    In auto mode a failure is logged and recorded as `export/error` instead of failing the
    finished run.
    """
    settings = export_settings(cfg)
    enabled = settings.pop("enabled")
    if enabled is False or (enabled == "auto" and not structured):
        return {}
    try:
        metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)), **settings)
    except NothingToRemove as skip:
        log.info("export: %s", skip)
        return {}
    except NotCompactable as refused:
        log.warning("export: %s", refused)
        return {"export/refused": str(refused)}
    except Exception as err:  # noqa: BLE001 - auto export must not lose a finished training run
        if enabled is True:
            raise
        log.warning("export failed (%s: %s); the trained checkpoints are unaffected", type(err).__name__, err)
        return {"export/error": f"{type(err).__name__}: {err}"}
    log.info("export: %d → %d params, %s; saved %s", metrics["params/dense"], metrics["params/compact"],
             latency_line(metrics), RunDir(Path(run_dir)).compact_model)
    return metrics


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """`best` (the val/select checkpoint; last.ckpt when the run kept none) or `last`."""
    layout = RunDir(run_dir)
    if which == "best":
        best = layout.best_checkpoints()
        if best:
            return best[-1]
    last = layout.last_checkpoint
    if not last.is_file():
        raise ExportError(f"no {BEST_CHECKPOINTS + ' or ' if which == 'best' else ''}{LAST_CHECKPOINT} under "
                          f"{layout.checkpoint_dir}: is this a finished training run dir?")
    return last


def model_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The model's weights from a Lightning checkpoint of MultiTaskModule, with masks folded in."""
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint.get("state_dict", {}).items()
             if k.startswith(MODEL_PREFIX)}
    if not state:
        raise ExportError(f"checkpoint holds no '{MODEL_PREFIX}*' weights (not a MultiTaskModule checkpoint)")
    for key in [k for k in state if k.endswith(f".{MASK}")]:
        mask = state.pop(key)
        weight_key = key[: -len(MASK)] + "weight"
        state[weight_key] = state[weight_key] * mask
    return state


def export_run(run_dir: str | Path, ckpt: str = "best", batch: int | None = None, repeats: int | None = None,
               threads: int | None = None, budget_s: float | None = None) -> dict[str, Any]:
    """Export a finished run: compact its checkpoint, save it and merge the numbers into metrics.json.

    A model declared not compactable is refused from the config, before the model is built.
    """
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    config_file = layout.config_file
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory")
    if not config_file.is_file():
        raise ExportError(f"{config_file} not found: pass a training run dir (one holding .hydra/ and checkpoints/)")
    cfg = OmegaConf.load(config_file)
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if isinstance(target, str):
        check_compactable(target)
    settings = export_settings(cfg)
    settings.pop("enabled")
    for key, value in (("batch", batch), ("repeats", repeats), ("threads", threads), ("budget_s", budget_s)):
        if value is not None:
            settings[key] = value
    path = find_checkpoint(run_dir, ckpt)
    model, input_shape = build_run_model(cfg)
    model.load_state_dict(model_state(torch.load(path, map_location="cpu", weights_only=False)), strict=True)
    metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)), **settings)
    metrics["export/checkpoint"] = path.name
    update_metrics(layout.metrics_file, metrics)
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
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"wall-clock budget of the dependency analysis (default: export.budget_s, {BUDGET_S:g})")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """`mtlsparse export ...`: 0 on success or nothing to remove, 2 on a clear error (one line on stderr)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        metrics = export_run(args.run_dir, args.ckpt, args.batch, args.repeats, args.threads, args.budget_s)
    except NothingToRemove as skip:
        print(f"mtlsparse export: {skip}")
        return 0
    except (ExportError, ValueError) as err:
        print(f"mtlsparse export: error: {err}", file=sys.stderr)
        return 2
    print(f"{metrics['export/checkpoint']}: params {metrics['params/dense']} → {metrics['params/compact']}, "
          f"FLOPs/sample {metrics['flops/dense']:.4g} → {metrics['flops/compact']:.4g}, {latency_line(metrics)}, "
          f"max |Δout| {metrics['export/max_abs_diff']:.2g}")
    layout = RunDir(args.run_dir)
    print(f"saved {layout.compact_model}; metrics added to {layout.metrics_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
