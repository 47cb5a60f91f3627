"""The report's tables: which columns, how cells print, summary.csv / pareto.csv and summary.md."""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

from mtlsparse.pareto import parse_objective
from mtlsparse.reporting.collect import Row, parse_override
from mtlsparse.reporting.optuna import COLUMN as OPTUNA_COLUMN

RESERVED = ("job", "status", "overrides", "error")
SPARSITY_KEYS = ("sparsity/param", "sparsity/group", "sparsity/sr", "sparsity/cr", "sparsity/ps")
TIME_KEYS = ("time/train_s",)
_TASK_METRIC = re.compile(r"test/[^/]+/[^/]+")


# ---------------------------------------------------------------- choosing columns


def override_keys(rows: Sequence[Row]) -> list[str]:
    """Override keys of all rows, in first-seen order."""
    keys = (parse_override(o)[0] for row in rows for o in row["overrides"])
    return list(dict.fromkeys(keys))


def swept_knobs(rows: Sequence[Row]) -> list[str]:
    """Override keys whose value differs between jobs."""
    return [k for k in override_keys(rows) if len({cell(row.get(k)) for row in rows}) > 1]


def fixed_overrides(rows: Sequence[Row]) -> list[str]:
    """Raw overrides shared by every job."""
    first = rows[0]["overrides"] if rows else []
    return [o for o in first if all(o in row["overrides"] for row in rows)]


def present(rows: Sequence[Row], keys: Sequence[str]) -> list[str]:
    """The `keys` that some row has a value for, in the given order."""
    return [k for k in keys if any(row.get(k) is not None for row in rows)]


def task_metric_keys(rows: Sequence[Row]) -> list[str]:
    """`test/<task>/<metric>` keys present in rows, sorted by task then metric."""
    keys = {k for row in rows for k in row if _TASK_METRIC.fullmatch(k)}
    return sorted(keys)


def loss_objectives(rows: Sequence[Row]) -> list[str]:
    """Default objectives: every `test/<task>/loss` key."""
    return [k for k in task_metric_keys(rows) if k.endswith("/loss")]


def table_columns(rows: Sequence[Row], knobs: Sequence[str]) -> list[str]:
    """Columns of the Markdown tables: job, knobs, Optuna's verdict (Optuna sweeps), test metrics, sparsity, time."""
    overall = sorted({k for row in rows for k in row if k.startswith("test/") and k.count("/") == 1})
    metrics = [*task_metric_keys(rows), *overall, *SPARSITY_KEYS, *TIME_KEYS]
    return ["job", *knobs, *present(rows, [OPTUNA_COLUMN, *metrics])]


def csv_columns(rows: Sequence[Row]) -> list[str]:
    """Every column: job, status, override keys, Optuna's verdict (Optuna sweeps), metrics (first-seen order), error."""
    head = ["job", "status", *override_keys(rows), *present(rows, [OPTUNA_COLUMN])]
    rest = dict.fromkeys(k for row in rows for k in row if k not in head and k not in RESERVED)
    return [*head, *rest, "overrides", "error"]


def front_columns(rows: Sequence[Row], keys: Sequence[str], knobs: Sequence[str]) -> list[str]:
    """Table columns with the objectives moved right after the knobs."""
    head = ["job", *knobs, *keys]
    return [*head, *(c for c in table_columns(rows, knobs) if c not in head)]


# ---------------------------------------------------------------- writing tables


def cell(value: object) -> str:
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

    body = [line([cell(row.get(c)) for c in columns]) for row in rows]
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


def optuna_note(rows: Sequence[Row]) -> list[str]:
    """The paragraph on Optuna's own best trials, for sweeps that have them ([] otherwise)."""
    if not any(OPTUNA_COLUMN in row for row in rows):
        return []
    best = [str(row["job"]) for row in rows if row.get(OPTUNA_COLUMN)]
    jobs = ", ".join(f"`{job}`" for job in best) or "none of these jobs"
    return [f"`{OPTUNA_COLUMN}`: the trials Optuna itself found best on the sweep's validation objective(s) "
            f"(its optimization_results.yaml; several objectives: its Pareto set): {jobs}. The Pareto front "
            "below is computed from the test metrics."]


def summary_markdown(
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
        *optuna_note(rows),
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
            markdown_table(front["front"], front_columns(front["front"], keys, knobs)),
            *(f"![{f}]({f})" for f in files if f.startswith("front")),
        ]
    plots = [f"![{f}]({f})" for f in files if f.startswith("knob_")]
    if plots:
        parts += ["## Metrics against swept knobs", *plots]
    if failed:
        shown = [{**row, "overrides": " ".join(row["overrides"])} for row in failed]
        parts += ["## Failed jobs", markdown_table(shown, ["job", "overrides", "error"])]
    return "\n\n".join(parts) + "\n"
