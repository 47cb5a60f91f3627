"""Aggregate a Hydra run or multirun dir into tables, a Pareto front and plots.

`mtlsparse report <sweep_dir>` reads every job dir (a dir holding `.hydra/` or
`metrics.json`), writes `summary.csv` / `summary.md`, one PNG per swept knob, and
the ε-non-dominated runs with their hypervolume (`pareto.csv`, `front.png`,
`front3d.png`, `report.json`) into `<sweep_dir>/report/`. For an Optuna sweep the
`optuna_pareto` column (tables, pareto.csv, front.png) marks the trials Optuna itself
found best on the validation objectives (its `optimization_results.yaml`), next to the
front of the test objectives. This module is the command and its orchestration; the
rows, tables and plots come from `mtlsparse.reporting`, the front and its hypervolume
from `mtlsparse.pareto`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mtlsparse.pareto import pareto_front, parse_objective
from mtlsparse.reporting.collect import Row, collect
from mtlsparse.reporting.optuna import COLUMN as OPTUNA_COLUMN
from mtlsparse.reporting.optuna import mark_optuna_pareto
from mtlsparse.reporting.plots import plot_front, plot_front3d, plot_knob
from mtlsparse.reporting.tables import (
    SPARSITY_KEYS,
    csv_columns,
    front_columns,
    loss_objectives,
    present,
    summary_markdown,
    swept_knobs,
    task_metric_keys,
    write_csv,
)


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    objectives: Sequence[str] | None = None,
    ref: Sequence[float] | None = None,
    eps: float | Sequence[float] = 0.0,
) -> dict:
    """Write the report of a (multi)run dir into `out_dir` and return report.json's content.

    `objectives`: metric keys, minimised unless prefixed `max:`; default all
    `test/<task>/loss`. `ref`: hypervolume reference point in the metrics' units
    (default 2.0 per minimised, 0.0 per maximised objective). `eps`: additive ε of
    the non-dominance filter (scalar or one per objective).
    """
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no job dirs (dirs holding .hydra/ or metrics.json) under {sweep_dir}")
    optuna_best = mark_optuna_pareto(rows, Path(sweep_dir))
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    ok = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] == "failed"]
    knobs = swept_knobs(rows)
    specs = list(objectives) if objectives is not None else loss_objectives(ok)
    front = pareto_front(ok, specs, ref, eps)  # the successful runs
    files = ["summary.csv", "summary.md"]

    write_csv(out / "summary.csv", rows, csv_columns(rows))
    plotted = [*task_metric_keys(ok), *present(ok, SPARSITY_KEYS[:2])]
    for knob in present(ok, knobs) if plotted else []:
        name = f"knob_{re.sub(r'[^A-Za-z0-9_.-]', '_', knob)}.png"
        plot_knob(out / name, ok, knob, plotted)
        files.append(name)
    if front["hypervolume"] is not None:
        files += _write_front_files(out, ok, front, [parse_objective(s)[0] for s in specs], knobs)

    md = summary_markdown(Path(sweep_dir), rows, ok, failed, knobs, specs, eps, front, files)
    (out / "summary.md").write_text(md)
    report = {
        "sweep_dir": str(sweep_dir),
        "out_dir": str(out),
        "jobs": len(rows),
        "ok": len(ok),
        "failed": len(failed),
        "objectives": specs,
        "ref": front["ref"],
        "eps": eps if isinstance(eps, (int, float)) else list(eps),
        "hypervolume": front["hypervolume"],
        "front": [row["job"] for row in front["front"]],
        "note": front["note"],
        "files": [*files, "report.json"],
    }
    if any(OPTUNA_COLUMN in row for row in rows):
        report["optuna_pareto"] = optuna_best  # Optuna's best trials on the validation objectives
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _write_front_files(out: Path, ok: list[Row], front: dict, keys: list[str], knobs: list[str]) -> list[str]:
    """pareto.csv, front.png and (when a sparsity metric exists) front3d.png."""
    rows = front["front"]
    write_csv(out / "pareto.csv", rows, front_columns(rows, keys, knobs))
    plot_front(out / "front.png", ok, rows, keys, front["hypervolume"])
    files = ["pareto.csv", "front.png"]
    sparsity = present(ok, ("sparsity/param", "sparsity/sr"))
    if sparsity:
        plot_front3d(out / "front3d.png", ok, rows, [*keys[:2], sparsity[0]])
        files.append("front3d.png")
    return files


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mtlsparse report`."""
    parser = argparse.ArgumentParser(
        prog="mtlsparse report",
        description="Summarise a Hydra run/multirun dir: tables, Pareto front, hypervolume, plots.",
    )
    parser.add_argument("sweep_dir", type=Path, help="Hydra run dir or multirun dir")
    parser.add_argument("--out", type=Path, help="output dir (default: <sweep_dir>/report)")
    parser.add_argument(
        "--objectives",
        type=lambda s: s.split(","),
        help="comma-separated metric keys, prefix max: to maximise (default: all test/<task>/loss)",
    )
    parser.add_argument(
        "--ref", type=_floats, help="hypervolume reference point in metric units, e.g. 2,2 (default 2 per loss)"
    )
    parser.add_argument(
        "--eps", type=_floats, default=[0.0], help="additive ε of the front filter, one value or one per objective"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`mtlsparse report ...`: write the report, print its summary; 0 on success, 2 on error."""
    args = build_parser().parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"mtlsparse report: error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    eps = args.eps[0] if len(args.eps) == 1 else args.eps
    try:
        report = write_report(args.sweep_dir, args.out, args.objectives, args.ref, eps)
    except (FileNotFoundError, ValueError) as exc:
        print(f"mtlsparse report: error: {exc}", file=sys.stderr)
        return 2
    print((Path(report["out_dir"]) / "summary.md").read_text())
    hv = report["hypervolume"]
    if hv is None:
        print(f"hypervolume: n/a. {report['note']}")
    else:
        print(f"hypervolume: {hv:.6g} (ref {report['ref']})")
    print(f"report written to {report['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
