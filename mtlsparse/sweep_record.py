"""Keep a sweep dir's earlier record when a re-run of a different sweep rewrites it.

Hydra's basic sweeper saves the sweep's config as `<sweep dir>/multirun.yaml` at the start of
every multirun, over whatever was there. Re-running the same sweep writes the same text; a
different sweep into the same dir (other values, a typo) would leave the finished jobs of the
first one next to a record that no longer describes them. Before the sweeper writes, an earlier
record that differs moves to `multirun.<n>.yaml` (n = 1, 2, ...: oldest first), so every sweep
that ran there keeps its config.

hydra-optuna-sweeper writes no multirun.yaml; it writes its verdict, `optimization_results.yaml`,
when a sweep ends, over the earlier sweep's. So at the start of every multirun an existing verdict
is also copied to `optimization_results.<n>.yaml` (unless the newest copy already holds it): the
earlier verdict survives a re-run, and stays in place if that re-run fails before it ends.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
RECORD = "multirun.yaml"
SEARCH_RESULTS = "optimization_results.yaml"


def _number(path: Path) -> int | None:
    """n of `<stem>.<n>.yaml`, None for any other name."""
    middle = path.name.split(".")[1:-1]
    return int(middle[0]) if len(middle) == 1 and middle[0].isdigit() else None


def archived_records(sweep_dir: Path, record: str = RECORD) -> list[Path]:
    """The earlier copies `<stem>.<n>.yaml` of a sweep dir's record, oldest first."""
    stem = record.removesuffix(".yaml")
    numbered = [p for p in sweep_dir.glob(f"{stem}.*.yaml") if _number(p) is not None]
    return sorted(numbered, key=_number)


def _next_copy(sweep_dir: Path, record: str, earlier: list[Path]) -> Path:
    """The name after the newest of `earlier` (the record's `archived_records`)."""
    number = _number(earlier[-1]) + 1 if earlier else 1
    return sweep_dir / f"{record.removesuffix('.yaml')}.{number}.yaml"


def keep_earlier_record(sweep_dir: Path, new_record: str) -> Path | None:
    """Move `sweep_dir/multirun.yaml` aside when it differs from `new_record`; returns where it went."""
    record = sweep_dir / RECORD
    if not record.is_file() or record.read_text() == new_record:
        return None
    target = _next_copy(sweep_dir, RECORD, archived_records(sweep_dir))
    record.rename(target)
    return target


def keep_search_results(sweep_dir: Path) -> Path | None:
    """Copy `sweep_dir/optimization_results.yaml` to its next numbered name, unless the newest copy holds
    the same text; returns the copy made."""
    results = sweep_dir / SEARCH_RESULTS
    if not results.is_file():
        return None
    earlier = archived_records(sweep_dir, SEARCH_RESULTS)
    if earlier and earlier[-1].read_bytes() == results.read_bytes():
        return None
    target = _next_copy(sweep_dir, SEARCH_RESULTS, earlier)
    shutil.copy2(results, target)
    return target


class KeepSweepRecord(Callback):
    """On multirun start, before the sweeper writes: keep an earlier, different multirun.yaml and
    an earlier search verdict."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep_dir is None:
            return
        sweep_dir = Path(str(sweep_dir))
        kept = keep_earlier_record(sweep_dir, OmegaConf.to_yaml(config))
        if kept is not None:
            log.warning("%s holds a different sweep's config: kept it as %s", sweep_dir / RECORD, kept.name)
        copied = keep_search_results(sweep_dir)
        if copied is not None:
            log.warning("%s holds an earlier search's verdict, which this sweep rewrites when it ends: "
                        "kept a copy as %s", sweep_dir / SEARCH_RESULTS, copied.name)
