"""Report on fake Hydra run/multirun dirs, its CLI, and the sweep definitions."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from mtlsparse.pareto import hypervolume, objectives
from mtlsparse.report import main, write_report
from mtlsparse.reporting.collect import collect, parse_override
from mtlsparse.reporting.plots import x_scale

SWEEPS = Path(__file__).resolve().parents[1] / "multirun_sweeps"
ERROR = "RuntimeError: loss is NaN at epoch 3"
LOSSES = {"0": (0.3, 0.5), "1": (0.35, 0.42), "2": (0.5, 0.6)}  # job 2 is dominated by job 0


def make_job(job_dir: Path, overrides: list[str], metrics: dict | None = None, log: str | None = None):
    """A Hydra job dir: .hydra/overrides.yaml, and metrics.json or a job log."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / ".hydra" / "config.yaml").write_text("lam: 0\n")
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps(metrics))
    if log is not None:
        (job_dir / "mtlsparse.log").write_text(log)


def metrics(left_loss: float, right_loss: float, sparsity: float) -> dict:
    return {
        "test/left/acc": 1 - left_loss,
        "test/right/acc": 1 - right_loss,
        "test/left/loss": left_loss,
        "test/right/loss": right_loss,
        "test/mean_acc": 1 - (left_loss + right_loss) / 2,
        "sparsity/param": sparsity,
        "sparsity/group": sparsity / 2,
        "sparsity/sr": sparsity,
        "time/train_s": 12.5,
        "config/k": [0.5, 0.5],
        "config/method": "group_lasso",
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """3 successful λ jobs and 1 failed one, laid out like `python -m mtlsparse -m`."""
    root = tmp_path_factory.mktemp("multirun")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for job, lam, sparsity in [("0", "0", 0.0), ("1", "1e-5", 40.0), ("2", "1e-3", 80.0)]:
        make_job(root / job, [f"lam={lam}", "+sweep=lambda_group_lasso"], metrics(*LOSSES[job], sparsity))
    log = f"[INFO] - start\nTraceback (most recent call last):\n  File 'x.py'\n{ERROR}\n[INFO] - shutdown\n\n"
    make_job(root / "3", ["lam=1e-2", "+sweep=lambda_group_lasso"], log=log)
    return root


@pytest.fixture(scope="module")
def report(sweep) -> dict:
    return write_report(sweep)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_collect_rows_hold_overrides_metrics_and_status(sweep):
    rows = collect(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert [r["lam"] for r in rows] == [0, 1e-5, 1e-3, 1e-2]
    assert rows[1]["test/right/loss"] == 0.42 and rows[1]["config/k"] == [0.5, 0.5]
    assert rows[3]["error"] == ERROR and "test/left/loss" not in rows[3]


def test_collect_finds_jobs_nested_one_level_deeper_in_natural_order(tmp_path):
    for job in ["10", "2", "1"]:
        make_job(tmp_path / job / "lam_sweep", [f"seed={job}"], metrics(0.1, 0.2, 0.0))
    assert [r["job"] for r in collect(tmp_path)] == ["1/lam_sweep", "2/lam_sweep", "10/lam_sweep"]


def test_collect_follows_symlinked_job_dirs_once_and_ends_link_cycles(sweep, tmp_path):
    """A view dir of links to runs kept elsewhere reports those runs; a link back up does not loop."""
    view = tmp_path / "view"
    view.mkdir()
    (view / "small_lam").symlink_to(sweep / "1", target_is_directory=True)
    (view / "big_lam").symlink_to(sweep / "2", target_is_directory=True)
    (view / "loop").symlink_to(tmp_path, target_is_directory=True)
    rows = collect(view)
    assert [(r["job"], r["lam"]) for r in rows] == [("big_lam", 1e-3), ("small_lam", 1e-5)]
    assert rows[1]["test/right/loss"] == 0.42


def test_parse_override_reads_yaml_values_and_strips_prefixes():
    assert parse_override("lam=1e-5") == ("lam", 1e-5)
    assert parse_override("+sweep=lambda_l1") == ("sweep", "lambda_l1")
    assert parse_override("pref=[1e-3,0.2,0.799]") == ("pref", [1e-3, 0.2, 0.799])
    assert parse_override("trainer.max_epochs=3") == ("trainer.max_epochs", 3)


def test_summary_csv_has_one_row_per_job_and_all_columns(sweep, report):
    rows = read_csv(sweep / "report" / "summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert {"lam", "sweep", "test/left/loss", "sparsity/param", "config/k", "error"} <= set(rows[0])
    assert float(rows[2]["test/right/loss"]) == 0.6
    assert rows[3]["error"] == ERROR and rows[3]["test/left/loss"] == ""


def test_summary_md_has_runs_front_and_failed_job_error(sweep, report):
    md = (sweep / "report" / "summary.md").read_text()
    assert "4 jobs: 3 ok, 1 failed" in md and "`+sweep=lambda_group_lasso`" in md
    runs = md.split("## Runs")[1].split("## Pareto front")[0]
    assert "| job | lam | test/left/acc |" in runs and "sparsity/sr" in runs and "time/train_s" in runs
    assert "## Failed jobs" in md and ERROR in md.split("## Failed jobs")[1]
    assert f"{report['hypervolume']:.6g}" in md


def test_pngs_exist_and_are_png(sweep, report):
    for name in ["knob_lam.png", "front.png", "front3d.png"]:
        data = (sweep / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name
    assert "knob_sweep.png" not in report["files"]  # a fixed override is not a swept knob


def test_report_json_hypervolume_matches_rows(sweep, report):
    saved = json.loads((sweep / "report" / "report.json").read_text())
    assert saved == report
    rows = read_csv(sweep / "report" / "summary.csv")
    ok = [{k: float(v) for k, v in r.items() if k.startswith("test/")} for r in rows if r["status"] == "ok"]
    expected = hypervolume(objectives(ok, ["test/left/loss", "test/right/loss"]), [2.0, 2.0])
    assert saved["hypervolume"] == pytest.approx(expected)
    assert saved["hypervolume"] == pytest.approx(1.7 * 1.5 + 1.65 * 1.58 - 1.65 * 1.5)
    assert saved["front"] == ["0", "1"]
    assert [r["job"] for r in read_csv(sweep / "report" / "pareto.csv")] == ["0", "1"]


def test_cli_prints_table_and_hypervolume(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--ref", "1,1", "--eps", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "| job | lam |" in out and "hypervolume:" in out
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["ref"] == [1.0, 1.0] and saved["eps"] == 0.1
    assert saved["front"] == ["0"]  # job 1 is within ε = 0.1 of job 0


def test_cli_max_objective_uses_its_own_ref(sweep, tmp_path):
    objectives = "test/left/loss,max:sparsity/param"
    argv = [str(sweep), "--out", str(tmp_path), "--objectives", objectives, "--ref", "1,0"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "report.json").read_text())
    # all three trade loss for sparsity: boxes (0.3..1)x(0..0) + (0.35..1)x(0..40) + (0.5..1)x(40..80)
    assert saved["front"] == ["0", "1", "2"]
    assert saved["hypervolume"] == pytest.approx(0.65 * 40 + 0.5 * 40)


def test_cli_empty_or_missing_dir_fails_with_message(tmp_path, capsys):
    assert main([str(tmp_path)]) != 0
    assert "no job dirs" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) != 0
    assert "not a directory" in capsys.readouterr().err


def test_cli_rejects_ref_of_wrong_length(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path), "--ref", "1,1,1"]) != 0
    assert "ref has 3 values for 2 objectives" in capsys.readouterr().err


def test_single_run_dir_gives_one_row_report(tmp_path, capsys):
    make_job(tmp_path, ["method=l1"], metrics(0.5, 0.5, 10.0))
    assert main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "report" / "summary.csv")
    assert [(r["job"], r["status"], r["method"]) for r in rows] == [(".", "ok", "l1")]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["hypervolume"] == pytest.approx(1.5 * 1.5) and saved["front"] == ["."]


def test_pareto_part_is_skipped_with_a_note(sweep, tmp_path):
    one = write_report(sweep, tmp_path / "one", objectives=["test/left/loss"])
    assert one["hypervolume"] is None and "at least 2 objectives" in one["note"]
    assert "Pareto front skipped" in (tmp_path / "one" / "summary.md").read_text()
    assert not (tmp_path / "one" / "front.png").exists()
    unknown = write_report(sweep, tmp_path / "unknown", objectives=["test/left/loss", "test/nope/loss"])
    assert unknown["hypervolume"] is None and "test/nope/loss" in unknown["note"]

    failed = tmp_path / "failed"
    make_job(failed / "0", ["lam=1"], log="ValueError: bad lam\n")
    none_ok = write_report(failed)
    assert none_ok["hypervolume"] is None and "no run succeeded" in none_ok["note"]
    assert "ValueError: bad lam" in (failed / "report" / "summary.md").read_text()


def test_categorical_knob_gets_a_plot(tmp_path):
    for i, pref in enumerate(["[0,0.2,0.8]", "[0.001,0.5,0.499]"]):
        make_job(tmp_path / str(i), [f"pref={pref}"], metrics(0.2 + i / 10, 0.3 - i / 10, 5.0))
    report = write_report(tmp_path)
    assert "knob_pref.png" in report["files"]
    assert (tmp_path / "report" / "knob_pref.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("values", "scale"),
    [([0, 1e-6, 1e-5, 1e-3], "symlog"), ([1e-6, 1e-3], "log"), ([0, 1, 2], "linear"), ([0.1, 0.5], "linear")],
)
def test_x_scale(values, scale):
    assert x_scale(values) == scale


# ---------------------------------------------------------------- sweep definitions


def sweep_params(name: str) -> dict[str, list]:
    """Sweeper params of a sweep file, each expanded by Hydra's override grammar."""
    config = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    parser = OverridesParser.create()
    params = config["hydra"]["sweeper"]["params"]
    return {k: list(parser.parse_overrides([f"{k}={v}"])[0].sweep_iterator()) for k, v in params.items()}


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_file_is_global_package_with_usage_comment(path):
    text = path.read_text()
    assert text.startswith("# @package _global_")
    assert f"+sweep={path.stem}" in text
    config = yaml.safe_load(text)
    # a sweep either lists its own values or extends another sweep file (e.g. the slurm_* variants)
    bases = [entry for entry in config.get("defaults", []) if isinstance(entry, str)]
    own = config.get("hydra", {}).get("sweeper", {}).get("params")
    assert own or (bases and all((SWEEPS / f"{base}.yaml").exists() for base in bases))


def test_lambda_and_seed_sweeps():
    assert sweep_params("lambda_group_lasso") == {"lam": [0, 5e-4, 1e-3, 2e-3, 2.5e-3, 2.75e-3, 3e-3]}
    assert sweep_params("lambda_l1") == {"lam": [0, 1e-3, 1e-2, 1e-1, 1]}
    assert sweep_params("seeds") == {"seed": [0, 1, 2]}


@pytest.mark.parametrize(("name", "count", "k0s"), [
    ("mdmtn_preferences", 93, {0, 1e-1, 1e-2, 1e-3, 1e-4}),
    ("mdmtn_preferences_quick", 8, {0, 1e-3, 1e-2}),
])
def test_preference_vectors(name, count, k0s):
    prefs = sweep_params(name)["pref"]
    assert len(prefs) == count and len({tuple(p) for p in prefs}) == count
    assert all(len(p) == 3 and min(p) >= 0 for p in prefs)
    assert all(math.isclose(sum(p), 1, abs_tol=1e-9) for p in prefs)
    assert {p[0] for p in prefs} == k0s
    assert [1e-3, 0.2, 0.799] in prefs and [1e-2, 0.8, 0.19] in prefs  # the paper's published vectors
    splits = np.array([p[1] for p in prefs if p[0] == 0])
    assert np.all((splits > 0) & (splits < 1))
