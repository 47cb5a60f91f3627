"""tools/table_drift.py: the verdict that says whether a README row can have moved."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "table_drift.py"
spec = importlib.util.spec_from_file_location("table_drift", TOOL)
table_drift = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table_drift)


def test_identical_metrics_say_identical():
    m = {"test/left/acc": 0.5, "sparsity/group": 10.0}
    assert table_drift._compare(m, dict(m)) == "identical (2 metrics)"


def test_a_differing_metric_is_named_with_the_largest_change():
    old = {"test/left/acc": 0.5, "test/left/loss": 1.0, "sparsity/group": 10.0}
    new = {"test/left/acc": 0.5001, "test/left/loss": 1.2, "sparsity/group": 10.0, "test/new_metric": 3.0}
    verdict = table_drift._compare(old, new)
    assert verdict.startswith("2 of 3 differ")  # a metric the old tree did not write is not compared
    assert "test/left/loss: 1.0 → 1.2" in verdict


@pytest.mark.parametrize("old, new", [("boom", {"test/a": 1.0}), ({"test/a": 1.0}, "boom")])
def test_a_failed_run_is_a_failure_not_a_match(old, new):
    assert table_drift._compare(old, new) == "failed: boom"


def test_no_shared_metric_is_not_a_match():
    assert table_drift._compare({"test/a": 1.0}, {"test/b": 1.0}) == "no shared metrics"


def test_every_case_names_a_dataset_free_override_list():
    for commit, cases in table_drift.TABLES.values():
        assert len(commit) >= 7
        for spec in cases.values():
            overrides = spec[1] if isinstance(spec, tuple) else spec
            assert all("=" in o and not o.startswith("dataset=") for o in overrides)


def test_an_unknown_table_is_refused_with_the_usage_line(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "out"), "no_such_table"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "usage: python tools/table_drift.py OUT_DIR [default_and_group_lasso" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing run, nothing written
