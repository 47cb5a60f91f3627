"""Keep a sweep dir's earlier record when a re-run of a different sweep rewrites it.

Hydra's basic sweeper saves the sweep's config as `<sweep dir>/multirun.yaml` at the start of
every multirun, over whatever was there. Re-running the same sweep writes the same text; a
different sweep into the same dir (other values, a typo) would leave the finished jobs of the
first one next to a record that no longer describes them. Before the sweeper writes, an earlier
record that differs moves to `multirun.<n>.yaml` (n = 1, 2, ...: oldest first), so every sweep
that ran there keeps its config.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
RECORD = "multirun.yaml"


def archived_records(sweep_dir: Path) -> list[Path]:
    """The earlier records `multirun.<n>.yaml` of a sweep dir, oldest first."""
    numbered = (p for p in sweep_dir.glob("multirun.*.yaml") if p.name.split(".")[1].isdigit())
    return sorted(numbered, key=lambda p: int(p.name.split(".")[1]))


def keep_earlier_record(sweep_dir: Path, new_record: str) -> Path | None:
    """Move `sweep_dir/multirun.yaml` aside when it differs from `new_record`; returns where it went."""
    record = sweep_dir / RECORD
    if not record.is_file() or record.read_text() == new_record:
        return None
    earlier = archived_records(sweep_dir)
    number = int(earlier[-1].name.split(".")[1]) + 1 if earlier else 1
    target = sweep_dir / f"multirun.{number}.yaml"
    record.rename(target)
    return target


class KeepSweepRecord(Callback):
    """On multirun start, before the sweeper saves multirun.yaml: keep an earlier, different one."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep_dir is None:
            return
        kept = keep_earlier_record(Path(str(sweep_dir)), OmegaConf.to_yaml(config))
        if kept is not None:
            log.warning("%s holds a different sweep's config: kept it as %s", Path(str(sweep_dir)) / RECORD,
                        kept.name)
