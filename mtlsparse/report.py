"""Aggregate a Hydra run or multirun dir into tables, a Pareto front and plots.

`mtlsparse report <sweep_dir>` reads every job dir (a dir holding `.hydra/` or
`metrics.json`), writes `summary.csv` / `summary.md`, one PNG per swept knob, and
the ε-non-dominated runs with their hypervolume (`pareto.csv`, `front.png`,
`front3d.png`, `report.json`) into `<sweep_dir>/report/`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from mtlsparse import pareto

RESERVED = ("job", "status", "overrides", "error")
SPARSITY_KEYS = ("sparsity/param", "sparsity/group", "sparsity/sr", "sparsity/cr", "sparsity/ps")
TIME_KEYS = ("time/train_s",)
DEFAULT_REF = {"min": 2.0, "max": 0.0}
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TASK_METRIC = re.compile(r"test/[^/]+/[^/]+")

Row = dict[str, object]


# ---------------------------------------------------------------- collecting runs


def find_job_dirs(root: Path) -> list[Path]:
    """Job dirs under `root` (itself when it is a run dir), in natural order.

    A job dir holds `.hydra/` or `metrics.json`; dirs nested inside another job dir
    (e.g. checkpoints that happen to hold a metrics.json) are not jobs of their own.
    """
    if _is_job_dir(root):
        return [root]
    found = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    found |= {p.parent for p in root.rglob("metrics.json") if p.is_file()}
    return sorted((d for d in found if not any(a in found for a in d.parents)), key=_natural_key)


def _is_job_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "metrics.json").is_file()


def _natural_key(path: Path) -> tuple:
    """Sort key that orders `2/` before `10/`."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def parse_value(text: str) -> object:
    """A Hydra override value as a Python value: YAML scalar/list, numbers like 1e-5 as floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _numbers_to_float(value)


def _numbers_to_float(value: object) -> object:
    """Recursively turn number-looking strings (YAML 1.1 reads `1e-5` as str) into floats."""
    if isinstance(value, list):
        return [_numbers_to_float(v) for v in value]
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    return value


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` override → (key without +/++/~ prefix, parsed value)."""
    key, _, value = text.partition("=")
    return key.lstrip("+~"), parse_value(value)


def read_overrides(job_dir: Path) -> list[str]:
    """The task overrides Hydra recorded for a job ([] when there are none)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def error_line(job_dir: Path) -> str:
    """Last log line mentioning 'Error' or 'Exception' (else the last non-empty one)."""
    lines = [
        line.strip()
        for log in sorted(job_dir.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if line.strip()
    ]
    if not lines:
        return "no metrics.json, and no job log (or an empty one)"
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines)[-1]


def read_job(job_dir: Path, root: Path) -> Row:
    """One report row: job path, status, overrides (raw and as columns), metrics or error."""
    overrides = read_overrides(job_dir)
    row: Row = {
        "job": job_dir.relative_to(root).as_posix(),
        "status": "ok",
        "overrides": overrides,
        "error": "",
    }
    row.update(parse_override(o) for o in overrides)
    metrics_path = job_dir / "metrics.json"
    try:
        row.update(json.loads(metrics_path.read_text()))
    except FileNotFoundError:
        row.update(status="failed", error=error_line(job_dir))
    except json.JSONDecodeError as exc:
        row.update(status="failed", error=f"unreadable metrics.json: {exc}")
    return row


def collect(sweep_dir: str | Path) -> list[Row]:
    """One row per job dir of a run or multirun dir (empty list when there is none)."""
    root = Path(sweep_dir)
    return [read_job(job, root) for job in find_job_dirs(root)]


# ---------------------------------------------------------------- choosing columns


def override_keys(rows: Sequence[Row]) -> list[str]:
    """Override keys of all rows, in first-seen order."""
    keys = (parse_override(o)[0] for row in rows for o in row["overrides"])
    return list(dict.fromkeys(keys))


def swept_knobs(rows: Sequence[Row]) -> list[str]:
    """Override keys whose value differs between jobs."""
    return [k for k in override_keys(rows) if len({_cell(row.get(k)) for row in rows}) > 1]


def fixed_overrides(rows: Sequence[Row]) -> list[str]:
    """Raw overrides shared by every job."""
    first = rows[0]["overrides"] if rows else []
    return [o for o in first if all(o in row["overrides"] for row in rows)]


def _present(rows: Sequence[Row], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if any(row.get(k) is not None for row in rows)]


def task_metric_keys(rows: Sequence[Row]) -> list[str]:
    """`test/<task>/<metric>` keys present in rows, sorted by task then metric."""
    keys = {k for row in rows for k in row if _TASK_METRIC.fullmatch(k)}
    return sorted(keys)


def loss_objectives(rows: Sequence[Row]) -> list[str]:
    """Default objectives: every `test/<task>/loss` key."""
    return [k for k in task_metric_keys(rows) if k.endswith("/loss")]


def table_columns(rows: Sequence[Row], knobs: Sequence[str]) -> list[str]:
    """Columns of the Markdown tables: job, knobs, test metrics, sparsity, time."""
    overall = sorted({k for row in rows for k in row if k.startswith("test/") and k.count("/") == 1})
    metrics = [*task_metric_keys(rows), *overall, *SPARSITY_KEYS, *TIME_KEYS]
    return ["job", *knobs, *_present(rows, metrics)]


def csv_columns(rows: Sequence[Row]) -> list[str]:
    """Every column: job, status, override keys, metrics (first-seen order), error."""
    head = ["job", "status", *override_keys(rows)]
    rest = dict.fromkeys(k for row in rows for k in row if k not in head and k not in RESERVED)
    return [*head, *rest, "overrides", "error"]


# ---------------------------------------------------------------- writing tables


def _cell(value: object) -> str:
    """Compact text for a table cell: 4 significant digits, lists as JSON."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """GitHub Markdown table of `columns` over `rows`."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    body = [line([_cell(row.get(c)) for c in columns]) for row in rows]
    return "\n".join([line(columns), line(["---"] * len(columns)), *body])


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    """CSV of `columns` over `rows`; lists written as JSON, floats at full precision."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


# ---------------------------------------------------------------- Pareto front


def parse_objective(spec: str) -> tuple[str, str]:
    """`key` (minimised) or `max:key` (maximised) → (key, direction)."""
    return (spec[4:], "max") if spec.startswith("max:") else (spec, "min")


def pareto_front(
    rows: Sequence[Row], specs: Sequence[str], ref: Sequence[float] | None, eps: float | Sequence[float]
) -> dict:
    """ε-non-dominated rows over `specs` and their hypervolume w.r.t. `ref` (metric units).

    Returns {"front": rows, "hypervolume": float | None, "ref": list, "note": str}; the
    note says why the front was skipped or which runs were left out.
    """
    keys, directions = zip(*map(parse_objective, specs)) if specs else ((), ())
    ref_list = list(ref) if ref is not None else [DEFAULT_REF[d] for d in directions]
    if len(ref_list) == 1 and len(keys) > 1:
        ref_list *= len(keys)
    if len(ref_list) != len(keys):
        raise ValueError(f"ref has {len(ref_list)} values for {len(keys)} objectives {list(specs)}")
    skipped = {"front": [], "hypervolume": None, "ref": ref_list}
    ok = [row for row in rows if row["status"] == "ok"]
    if not ok:
        return skipped | {"note": "Pareto front skipped: no run succeeded."}
    if len(keys) < 2:
        return skipped | {"note": f"Pareto front skipped: needs at least 2 objectives, got {list(specs)}."}
    points = pareto.objectives(ok, keys, directions)
    complete = np.all(np.isfinite(points), axis=1)
    if not complete.any():
        return skipped | {"note": f"Pareto front skipped: no successful run has all of {list(keys)}."}
    mask = pareto.non_dominated(points, eps)
    ref_point = pareto.objectives([dict(zip(keys, map(float, ref_list)))], keys, directions)[0]
    hv = pareto.hypervolume(points[mask], ref_point)
    missing = int((~complete).sum())
    note = f"{missing} successful run(s) lack an objective and are left out." if missing else ""
    return {"front": [row for row, m in zip(ok, mask) if m], "hypervolume": hv, "ref": ref_list, "note": note}


# ---------------------------------------------------------------- plots


def _is_numeric(values: Sequence[object]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def x_scale(values: Sequence[float]) -> str:
    """'log' when positive values span more than a decade, 'symlog' when 0 is swept too
    (λ sweeps start at 0), else 'linear'."""
    positive = [v for v in values if v > 0]
    if min(values) < 0 or len(positive) < 2 or max(positive) <= 10 * min(positive):
        return "linear"
    return "log" if len(positive) == len(values) else "symlog"


def plot_knob(path: Path, rows: Sequence[Row], knob: str, metrics: Sequence[str]) -> None:
    """One panel per metric against `knob`; every run is its own point."""
    rows = [row for row in rows if row.get(knob) is not None]
    values = [row[knob] for row in rows]
    numeric = _is_numeric(values)
    labels = list(dict.fromkeys(_cell(v) for v in values))
    xs = values if numeric else [labels.index(_cell(v)) for v in values]
    scale = x_scale(values) if numeric else "linear"
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = [(x, pareto.as_float(row.get(metric))) for x, row in zip(xs, rows)]
        ax.plot(*zip(*pts), "o", alpha=0.7)
        ax.set(title=metric, xlabel=knob)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
            ax.tick_params(axis="x", labelrotation=45 if len(labels) > 4 else 0)
        elif scale == "symlog":
            ax.set_xscale(scale, linthresh=min(v for v in values if v > 0))
        else:
            ax.set_xscale(scale)
        if numeric:
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels collide on short ranges
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _xy(rows: Sequence[Row], keys: Sequence[str]) -> list[list[float]]:
    return [[pareto.as_float(row.get(k)) for row in rows] for k in keys]


def plot_front(path: Path, rows: Sequence[Row], front: Sequence[Row], keys: Sequence[str], hv: float) -> None:
    """All successful runs grey, the non-dominated ones highlighted and connected."""
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(*_xy(rows, keys[:2]), "o", color="0.7", label="runs")
    ordered = sorted(front, key=lambda row: pareto.as_float(row.get(keys[0])))
    ax.plot(*_xy(ordered, keys[:2]), "o-", color="C3", label="non-dominated")
    ax.set(xlabel=keys[0], ylabel=keys[1], title=f"Pareto front (HV {hv:.4g})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def plot_front3d(path: Path, rows: Sequence[Row], front: Sequence[Row], keys: Sequence[str]) -> None:
    """Sparsity (z) against the first two objectives, non-dominated runs highlighted."""
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    ax.scatter(*_xy(rows, keys), color="0.6", label="runs")
    ax.scatter(*_xy(front, keys), color="C3", s=40, label="non-dominated")
    ax.set(xlabel=keys[0], ylabel=keys[1], zlabel=keys[2])
    ax.legend()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- the report


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
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    ok = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] == "failed"]
    knobs = swept_knobs(rows)
    specs = list(objectives) if objectives is not None else loss_objectives(ok)
    front = pareto_front(rows, specs, ref, eps)
    files = ["summary.csv", "summary.md"]

    write_csv(out / "summary.csv", rows, csv_columns(rows))
    plotted = [*task_metric_keys(ok), *_present(ok, SPARSITY_KEYS[:2])]
    for knob in _present(ok, knobs) if plotted else []:
        name = f"knob_{re.sub(r'[^A-Za-z0-9_.-]', '_', knob)}.png"
        plot_knob(out / name, ok, knob, plotted)
        files.append(name)
    if front["hypervolume"] is not None:
        files += _write_front_files(out, ok, front, [parse_objective(s)[0] for s in specs], knobs)

    md = _summary_markdown(Path(sweep_dir), rows, ok, failed, knobs, specs, eps, front, files)
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
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _write_front_files(out: Path, ok: list[Row], front: dict, keys: list[str], knobs: list[str]) -> list[str]:
    """pareto.csv, front.png and (when a sparsity metric exists) front3d.png."""
    rows = front["front"]
    write_csv(out / "pareto.csv", rows, _front_columns(rows, keys, knobs))
    plot_front(out / "front.png", ok, rows, keys, front["hypervolume"])
    files = ["pareto.csv", "front.png"]
    sparsity = _present(ok, ("sparsity/param", "sparsity/sr"))
    if sparsity:
        plot_front3d(out / "front3d.png", ok, rows, [*keys[:2], sparsity[0]])
        files.append("front3d.png")
    return files


def _front_columns(rows: Sequence[Row], keys: Sequence[str], knobs: Sequence[str]) -> list[str]:
    """Table columns with the objectives moved right after the knobs."""
    head = ["job", *knobs, *keys]
    return [*head, *(c for c in table_columns(rows, knobs) if c not in head)]


def _summary_markdown(
    root: Path,
    rows: list[Row],
    ok: list[Row],
    failed: list[Row],
    knobs: list[str],
    specs: list[str],
    eps: float | Sequence[float],
    front: dict,
    files: list[str],
) -> str:
    """summary.md: counts and fixed overrides, runs table, Pareto front, plots, failures."""
    fixed = ", ".join(f"`{o}`" for o in fixed_overrides(rows)) or "none"
    parts = [
        f"# Report: {root.resolve().name}",
        f"{len(rows)} jobs: {len(ok)} ok, {len(failed)} failed. Fixed overrides: {fixed}.",
        "## Runs",
        markdown_table(ok, table_columns(ok, knobs)) if ok else "No run succeeded.",
        "## Pareto front",
    ]
    if front["hypervolume"] is None:
        parts.append(front["note"])
    else:
        keys = [parse_objective(s)[0] for s in specs]
        parts += [
            f"Objectives: {', '.join(f'`{s}`' for s in specs)} (minimised unless `max:`); "
            f"ref {front['ref']}; eps {eps}.",
            f"Hypervolume: **{front['hypervolume']:.6g}** "
            f"({len(front['front'])} of {len(ok)} successful runs non-dominated). {front['note']}".rstrip(),
            markdown_table(front["front"], _front_columns(front["front"], keys, knobs)),
            *(f"![{f}]({f})" for f in files if f.startswith("front")),
        ]
    plots = [f"![{f}]({f})" for f in files if f.startswith("knob_")]
    if plots:
        parts += ["## Metrics against swept knobs", *plots]
    if failed:
        shown = [{**row, "overrides": " ".join(row["overrides"])} for row in failed]
        parts += ["## Failed jobs", markdown_table(shown, ["job", "overrides", "error"])]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- CLI


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
