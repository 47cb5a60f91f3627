"""`mtlsparse export <run_dir>`: compact a trained channel-sparse run's model, write it, measure it.

`main` rebuilds a run's model from `.hydra/config.yaml`, loads a checkpoint, compacts it
(`mtlsparse.compaction`), checks max |Δoutput| ≤ 1e-4, and writes it in each requested
format (`--format`, `export.formats`): `compact_model.pt` (state_dict), `compact_model.pt2`
(torch.export), `compact_model.onnx` (onnxruntime); each file is reloaded in its runtime and
checked against the masked torch model. It adds `params/compact`, each file's measured
max |Δ| (`export/<format>/max_abs_diff`) and the CPU batch-inference latency of dense and
compact in every runtime (torch eager: `latency/dense_ms`, ...; `latency/onnx/dense_ms`, ...;
median and interquartile range, all timed interleaved, a speed-up `measurable` only when
the ranges do not overlap) to metrics.json. `export_after_training` does the same at the end
of `train.run` with the config's `export.formats`.

Export is decided up front: an architecture declared not compactable is refused at once
with one line (`NotCompactable`), and a model with no all-zero channel group (e.g. a λ = 0
or an unstructured-sparsity run) is skipped (`NothingToRemove`): no compact file, no export
metrics. When deploy formats were named explicitly, such a model is written as
`dense_model.onnx` / `.pt2` instead, checked and timed, and reported as what it is: zeros in
dense tensors, no runtime gain.
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
from mtlsparse.compaction.formats import (
    UNSTRUCTURED_NOTE,
    FormatChoice,
    Staging,
    choose_formats,
    parse_formats,
    write_formats,
)
from mtlsparse.compaction.graph import BUDGET_S, Budget, check_compactable, zero_channel_groups
from mtlsparse.compaction.serialise import load_compact
from mtlsparse.compaction.surgery import (
    TOLERANCE,
    compact,
    max_abs_diff,
    num_params,
    removal_counts,
    strip_masks_,
    unreached_modules,
    unreached_params,
)
from mtlsparse.errors import exit_code
from mtlsparse.io import write_json
from mtlsparse.latency import Runnable, count_flops, latency_spread_ms, measurable_difference
from mtlsparse.run_dir import BEST_CHECKPOINTS, COMPACT_FILE, LAST_CHECKPOINT, MODEL_PREFIX, RunDir
from mtlsparse.sparsity.masks import MASK

# what users and tests import from here: the compaction API, the command's entry points and errors
__all__ = ["COMPACT_FILE", "BudgetExceeded", "ExportError", "NotCompactable", "NothingToRemove", "compact",
           "export_after_training", "export_model", "export_run", "load_compact", "main"]

log = logging.getLogger("mtlsparse")

EXPORT_DEFAULTS = {"enabled": "auto", "batch": 8, "warmup": 2, "repeats": 10, "threads": 1, "budget_s": BUDGET_S,
                   "formats": ["state_dict"]}
NO_ZERO_GROUP = "no channel group is zero, nothing to remove; skipped"
STILL_READ = ("every zero channel group is still read by another layer or reaches an output, nothing to remove; "
              "skipped")
#: how each runtime is named in the log
RUNTIME_LABELS = {"torch": "CPU", "onnx": "onnxruntime", "torch_export": "torch.export"}


class NothingToRemove(Exception):
    """The model has no channel group export could remove: there is nothing to export (not an error)."""


def zero_weight_percent(model: nn.Module) -> float:
    """% of conv/linear weights that are exactly zero (masks folded in): unstructured sparsity."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    total = sum(w.numel() for w in weights)
    return 100.0 * sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def nothing_to_remove(reason: str, zero_pct: float) -> str:
    """The skip line: `reason`, or, when weights are zero one by one, the unstructured-sparsity note."""
    if zero_pct == 0 or reason != NO_ZERO_GROUP:
        return reason
    return f"{UNSTRUCTURED_NOTE} ({zero_pct:.1f}% of weights zero, no channel group zero); nothing to remove; skipped"


def dense_note(reason: str, zero_pct: float) -> str:
    """What a dense deploy file of a model with nothing to compact is (`export/note`)."""
    if reason == NO_ZERO_GROUP and zero_pct > 0:
        return f"{UNSTRUCTURED_NOTE} ({zero_pct:.1f}% of weights zero)"
    why = "no channel group is zero" if reason == NO_ZERO_GROUP else "every zero channel group is still read"
    return f"{why}: the dense model, no runtime gain"


def export_model(model: nn.Module, input_shape: Sequence[int], out_dir: str | Path,
                 config: DictConfig | dict | None = None, batch: int = 8, warmup: int = 2,
                 repeats: int = 10, threads: int = 1, seed: int = 0, budget_s: float = BUDGET_S,
                 formats: Any = ("state_dict",)) -> dict[str, Any]:
    """Compact `model`, check its outputs, write it to `out_dir` in `formats`, and time every runtime (CPU).

    `formats` is a `FormatChoice` or anything `choose_formats` reads (names, a comma list,
    `auto`). Returns the metrics to merge into metrics.json. Raises `NotCompactable` for a
    declared architecture and `NothingToRemove` (nothing written) when no channel group is
    zero or none of the zero ones can go, both before any file is written; except that
    with deploy formats named explicitly such a model is written as `dense_model.*`
    (`export_dense`). Files are written only once every format passed its check.
    """
    choice = formats if isinstance(formats, FormatChoice) else choose_formats(formats, "formats")
    if batch < 1:
        raise ValueError(f"export batch must be >= 1, got {batch}")
    check_compactable(model)
    # the standard layout, whatever `memory_format` the run trained in: the compact model is built
    # from it, deployment formats expect it, and dense and compact are then timed alike
    dense = strip_masks_(copy.deepcopy(model)).cpu().to(memory_format=torch.contiguous_format).eval()
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    reason = NO_ZERO_GROUP
    if zero_channel_groups(model) > 0 or unreached_modules(model):
        small, removed = compact(dense, x[:2], Budget(budget_s))
        reason = STILL_READ if not removed else ""
    if reason:
        zero_pct = zero_weight_percent(dense)
        if not (choice.explicit and choice.deploy):
            raise NothingToRemove(nothing_to_remove(reason, zero_pct))
        return export_dense(dense, x, out_dir, choice, dense_note(reason, zero_pct), warmup, repeats, threads)
    diff = max_abs_diff(dense, small, x, exact=True)
    if not diff <= TOLERANCE:
        raise ExportError(f"compact model's outputs differ from the original's by {diff:.3g} > {TOLERANCE}: "
                          "an architecture op mixes channels that torch-pruning treated as independent")
    channels, features = removal_counts(removed)
    with Staging(Path(out_dir)) as staging:
        files, runtimes = write_formats(dense, small, x, staging, choice.formats, config, threads)
        latency = runtime_latency({"torch/dense": dense, "torch/compact": small, **runtimes}, x, warmup, repeats,
                                  threads)
        staging.commit()
    flops_dense, flops_compact = count_flops(dense, x[:1]), count_flops(small, x[:1])
    return {"params/compact": num_params(small), "params/dense": num_params(dense), **latency,
            "flops/dense": flops_dense, "flops/compact": flops_compact,
            "export/max_abs_diff": diff, "export/max_abs_diff_fp32": max_abs_diff(dense, small, x),
            "export/channels_removed": channels, "export/features_gathered": features,
            "export/unreached_params": unreached_params(removed),
            "export/formats": ",".join(choice.formats), **files}


def export_dense(dense: nn.Module, x: Tensor, out_dir: str | Path, choice: FormatChoice, note: str,
                 warmup: int = 2, repeats: int = 10, threads: int = 1) -> dict[str, Any]:
    """A model with nothing to compact, written in the named deploy formats as `dense_model.*`.

    Each file is checked and timed against torch like a compact one, but there is no compact
    model: no speed-up is reported, and `export/note` says why (zeros in dense tensors run
    as fast as any other weights in onnxruntime and torch). The state_dict format is not
    written: the checkpoint already is that model.
    """
    with Staging(Path(out_dir)) as staging:
        files, runtimes = write_formats(dense, None, x, staging, choice.deploy, threads=threads)
        latency = runtime_latency({"torch/dense": dense, **runtimes}, x, warmup, repeats, threads)
        staging.commit()
    return {"params/dense": num_params(dense), **latency, "export/formats": ",".join(choice.deploy),
            "export/note": note, "export/zero_weights_pct": zero_weight_percent(dense), **files}


def runtime_latency(models: dict[str, Runnable], x: Tensor, warmup: int, repeats: int,
                    threads: int) -> dict[str, Any]:
    """Latency metrics of models named `<runtime>/<dense|compact>`, all timed interleaved on `x`.

    torch eager keeps the plain keys (`latency/dense_ms`, `latency/speedup`, ...); another
    runtime's are `latency/<runtime>/...`, plus its ratio to torch eager on the same model
    (`latency/<runtime>/<dense|compact>_vs_torch`: > 1 is faster than torch) with its own
    `..._measurable`. A dense → compact speed-up comes with `measurable`, false when the two
    interquartile ranges overlap.
    """
    spreads, samples = latency_spread_ms(models, x, warmup, repeats, threads)
    metrics: dict[str, Any] = {}
    for runtime in dict.fromkeys(name.split("/")[0] for name in models):
        prefix = "latency/" if runtime == "torch" else f"latency/{runtime}/"
        roles = [role for role in ("dense", "compact") if f"{runtime}/{role}" in spreads]
        for role in roles:
            s = spreads[f"{runtime}/{role}"]
            metrics.update({f"{prefix}{role}_ms": s.median, f"{prefix}{role}_iqr_ms": s.iqr,
                            f"{prefix}{role}_min_ms": s.low, f"{prefix}{role}_max_ms": s.high})
            if runtime != "torch":
                metrics[f"{prefix}{role}_vs_torch"] = spreads[f"torch/{role}"].median / s.median
                metrics[f"{prefix}{role}_vs_torch_measurable"] = measurable_difference(
                    samples[f"torch/{role}"], samples[f"{runtime}/{role}"])
        if len(roles) == 2:
            metrics[f"{prefix}speedup"] = spreads[f"{runtime}/dense"].median / spreads[f"{runtime}/compact"].median
            metrics[f"{prefix}measurable"] = measurable_difference(samples[f"{runtime}/dense"],
                                                                   samples[f"{runtime}/compact"])
    return {**metrics, "latency/batch": len(x), "latency/threads": threads, "latency/repeats": repeats}


def latency_line(metrics: dict[str, Any], runtime: str = "torch") -> str:
    """'CPU latency (batch B, T thread(s), median [IQR] of N) dense → compact ms: verdict' from export metrics.

    `runtime` `onnx` / `torch_export` gives the same line for that runtime's files; with no
    compact model (`export_dense`) it reads 'dense D ms, no compact model: no speed-up'.
    """
    p = "latency/" if runtime == "torch" else f"latency/{runtime}/"
    head = (f"{RUNTIME_LABELS.get(runtime, runtime)} latency (batch {metrics['latency/batch']}, "
            f"{metrics['latency/threads']} thread(s), median [IQR] of {metrics['latency/repeats']})")
    dense = f"{metrics[p + 'dense_ms']:.3g} [{metrics[p + 'dense_iqr_ms']:.2g}]"
    if p + "compact_ms" not in metrics:
        return f"{head} dense {dense} ms, no compact model: no speed-up"
    verdict = f"{metrics[p + 'speedup']:.2f}× speed-up" if metrics[p + "measurable"] else \
        "no measurable change (the interquartile ranges overlap)"
    return f"{head} {dense} → {metrics[p + 'compact_ms']:.3g} [{metrics[p + 'compact_iqr_ms']:.2g}] ms: {verdict}"


def runtime_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per written deploy format: its file, its max |Δ| against torch and its latency line."""
    return [f"{fmt}: {metrics[f'export/{fmt}/file']} max |Δout| {metrics[f'export/{fmt}/max_abs_diff']:.2g}, "
            f"{latency_line(metrics, fmt)}"
            for fmt in str(metrics.get("export/formats", "")).split(",") if f"latency/{fmt}/dense_ms" in metrics]


def export_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `export` config node with defaults filled in, checked."""
    node = cfg.get("export") or {}
    settings = {**EXPORT_DEFAULTS, **(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)}
    unknown = set(settings) - set(EXPORT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown key(s) export.{sorted(unknown)}; allowed: {sorted(EXPORT_DEFAULTS)}")
    if settings["enabled"] not in ("auto", True, False):
        raise ValueError(f"export.enabled must be one of ['auto', true, false], got {settings['enabled']!r}")
    parse_formats(settings["formats"], "export.formats")  # unknown names: one line, wherever the node is read
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
        choice = choose_formats(settings.pop("formats"), "export.formats")
        if choice.skipped_line():
            log.info("export: %s", choice.skipped_line())
        metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)),
                               formats=choice, **settings)
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
    log.info("export: %s", summary(metrics))
    for line in runtime_lines(metrics):
        log.info("export: %s", line)
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    """One line on what export did: params, FLOPs, torch latency, max |Δout|, the files written."""
    files = ", ".join(str(metrics[f"export/{fmt}/file"]) for fmt in str(metrics["export/formats"]).split(",")
                      if f"export/{fmt}/file" in metrics)
    if "params/compact" not in metrics:
        return f"{metrics['export/note']}; wrote {files}; {latency_line(metrics)}"
    return (f"params {metrics['params/dense']} → {metrics['params/compact']}, FLOPs/sample "
            f"{metrics['flops/dense']:.4g} → {metrics['flops/compact']:.4g}, {latency_line(metrics)}, "
            f"max |Δout| {metrics['export/max_abs_diff']:.2g}; wrote {files or 'no file'}")


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
               threads: int | None = None, budget_s: float | None = None, formats: Any = None) -> dict[str, Any]:
    """Export a finished run: compact its checkpoint, write it in `formats` and merge the numbers into metrics.json.

    `formats`: what `--format` gave (names, comma lists, a list of them); None or `auto`:
    every installed format. A model declared not compactable is refused from the config,
    and a requested format whose packages are missing or an unreadable metrics.json before
    the model is built; on any failure metrics.json and earlier export files are left as
    they were.
    """
    choice = choose_formats(formats, "--format")
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
    read_metrics(layout.metrics_file)  # a metrics.json export could not merge into: stop before the work
    settings = export_settings(cfg)
    settings.pop("enabled")
    settings.pop("formats")
    if choice.skipped_line():
        log.info("export: %s", choice.skipped_line())
    for key, value in (("batch", batch), ("repeats", repeats), ("threads", threads), ("budget_s", budget_s)):
        if value is not None:
            settings[key] = value
    path = find_checkpoint(run_dir, ckpt)
    model, input_shape = build_run_model(cfg)
    model.load_state_dict(model_state(torch.load(path, map_location="cpu", weights_only=False)), strict=True)
    metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)), formats=choice,
                           **settings)
    metrics["export/checkpoint"] = path.name
    update_metrics(layout.metrics_file, metrics)
    return metrics


def read_metrics(path: Path) -> dict[str, Any]:
    """metrics.json as a dict ({} when missing); `ExportError` when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        current = json.loads(path.read_text())
    except ValueError as err:
        raise ExportError(f"{path} is not valid JSON ({err}); export merges into it, so it is left as it is") \
            from err
    if not isinstance(current, dict):
        raise ExportError(f"{path} holds no JSON object; export merges into it, so it is left as it is")
    return current


def update_metrics(path: Path, new: dict[str, Any]) -> None:
    """Merge `new` into metrics.json (created if missing), keeping every existing key; atomic write."""
    write_json(path, {**read_metrics(path), **new})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlsparse export", description=(
        "Physically remove all-zero channel groups of a trained run's model, check its outputs, write it in "
        f"each format (<run_dir>/{COMPACT_FILE}, compact_model.pt2, compact_model.onnx), reload and check each, "
        "and add params/compact, export/<format>/max_abs_diff and the CPU latency/* of every runtime to "
        "<run_dir>/metrics.json."))
    parser.add_argument("run_dir", type=Path, help="a training run dir (holds .hydra/ and checkpoints/)")
    parser.add_argument("--ckpt", choices=("best", "last"), default="best", help="checkpoint to export")
    parser.add_argument("--batch", type=int, default=None, help="batch size for latency (default: export.batch)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for latency")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"wall-clock budget of the dependency analysis (default: export.budget_s, {BUDGET_S:g})")
    parser.add_argument("--format", dest="formats", action="append", metavar="FORMAT", default=None,
                        help="state_dict (compact_model.pt), torch_export (.pt2) or onnx (.onnx, the 'deploy' "
                             "extra); repeatable or a comma list (default: every installed format)")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """`mtlsparse export ...`: 0 on success or nothing to remove, 2 on a clear error (one line on stderr)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        metrics = export_run(args.run_dir, args.ckpt, args.batch, args.repeats, args.threads, args.budget_s,
                             args.formats)
    except NothingToRemove as skip:
        print(f"mtlsparse export: {skip}")
        return 0
    except (ExportError, ValueError) as err:
        print(f"mtlsparse export: error: {err}", file=sys.stderr)
        return exit_code(err) or 2
    print(f"{metrics['export/checkpoint']}: {summary(metrics)}")
    for line in runtime_lines(metrics):
        print(line)
    skipped = choose_formats(args.formats, "--format").skipped_line()
    if skipped:
        print(skipped)
    print(f"metrics added to {RunDir(args.run_dir).metrics_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
