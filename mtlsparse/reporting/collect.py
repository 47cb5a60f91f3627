"""Collecting a (multi)run dir into rows: one per job dir, its overrides as columns, its metrics or error."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from mtlsparse.run_dir import RunDir

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

Row = dict[str, object]


def find_job_dirs(root: Path) -> list[Path]:
    """Job dirs under `root` (itself when it is a run dir), in natural order.

    A job dir holds `.hydra/` or `metrics.json`; dirs nested inside another job dir
    (e.g. checkpoints that happen to hold a metrics.json) are not jobs of their own.
    Symlinked dirs are followed (a view dir of links to runs kept elsewhere), each real
    dir once, so a link cycle ends.
    """
    found, seen = [], set()
    for current, subdirs, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            subdirs.clear()
            continue
        seen.add(real)
        if RunDir(Path(current)).is_job():
            found.append(Path(current))
            subdirs.clear()  # what lies inside a job dir belongs to that job
    return sorted(found, key=_natural_key)


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
    path = RunDir(job_dir).overrides_file
    if not path.is_file():
        return []
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def error_line(job_dir: Path) -> str:
    """Last log line mentioning 'Error' or 'Exception' (else the last non-empty one)."""
    lines = [
        line.strip()
        for log in RunDir(job_dir).log_files()
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
    metrics_path = RunDir(job_dir).metrics_file
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
