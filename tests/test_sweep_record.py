"""A sweep dir's records (multirun.yaml, a search's optimization_results.yaml): earlier ones are kept."""
from __future__ import annotations

from omegaconf import OmegaConf

from mtlsparse.sweep_record import (
    SEARCH_RESULTS,
    KeepSweepRecord,
    archived_records,
    keep_earlier_record,
    keep_search_results,
)


def sweep_config(sweep_dir, lam: str):
    return OmegaConf.create({"lam": lam, "hydra": {"sweep": {"dir": str(sweep_dir)}}})


def test_a_different_sweep_moves_the_earlier_record_aside_byte_for_byte(tmp_path):
    first = OmegaConf.to_yaml(sweep_config(tmp_path, "0,1e-3"))
    (tmp_path / "multirun.yaml").write_text(first)
    KeepSweepRecord().on_multirun_start(config=sweep_config(tmp_path, "0,2e-3"))
    assert not (tmp_path / "multirun.yaml").exists()  # the sweeper writes the new one next
    assert (tmp_path / "multirun.1.yaml").read_text() == first


def test_the_same_sweep_keeps_its_record_in_place(tmp_path):
    record = OmegaConf.to_yaml(sweep_config(tmp_path, "0,1e-3"))
    (tmp_path / "multirun.yaml").write_text(record)
    KeepSweepRecord().on_multirun_start(config=sweep_config(tmp_path, "0,1e-3"))
    assert (tmp_path / "multirun.yaml").read_text() == record
    assert archived_records(tmp_path) == []


def test_records_are_numbered_after_the_ones_already_kept(tmp_path):
    for number in (1, 2, 10):
        (tmp_path / f"multirun.{number}.yaml").write_text(f"sweep {number}\n")
    (tmp_path / "multirun.yaml").write_text("sweep 11\n")
    kept = keep_earlier_record(tmp_path, "sweep 12\n")
    assert kept == tmp_path / "multirun.11.yaml"
    assert [p.name for p in archived_records(tmp_path)] == [f"multirun.{n}.yaml" for n in (1, 2, 10, 11)]
    assert all(p.read_text() == f"sweep {p.name.split('.')[1]}\n" for p in archived_records(tmp_path))


def test_a_new_sweep_dir_has_nothing_to_keep(tmp_path):
    assert keep_earlier_record(tmp_path / "new", "anything\n") is None
    assert keep_earlier_record(tmp_path, "anything\n") is None


def test_names_that_only_look_numbered_are_not_records(tmp_path):
    for name in ("multirun.x.yaml", "multirun.1.2.yaml", "multirun.3.yml", "multirun.4.yaml"):
        (tmp_path / name).write_text(name)
    assert [p.name for p in archived_records(tmp_path)] == ["multirun.4.yaml"]


def test_an_earlier_search_verdict_is_copied_before_a_sweep_starts(tmp_path):
    verdict = "name: optuna\nbest_params:\n  lam: 0.001\nbest_value: 0.25\n"
    (tmp_path / SEARCH_RESULTS).write_text(verdict)
    KeepSweepRecord().on_multirun_start(config=sweep_config(tmp_path, "interval(0, 1e-2)"))
    # the verdict stays in place (a sweep that fails before its end leaves it as it was) and a copy is kept
    assert (tmp_path / SEARCH_RESULTS).read_text() == verdict
    assert [p.read_text() for p in archived_records(tmp_path, SEARCH_RESULTS)] == [verdict]
    (tmp_path / SEARCH_RESULTS).write_text("name: optuna\nbest_value: 0.5\n")  # the re-run's verdict
    assert (tmp_path / "optimization_results.1.yaml").read_text() == verdict


def test_a_verdict_already_kept_is_not_copied_again(tmp_path):
    (tmp_path / SEARCH_RESULTS).write_text("best_value: 0.25\n")
    assert keep_search_results(tmp_path) == tmp_path / "optimization_results.1.yaml"
    assert keep_search_results(tmp_path) is None  # the same sweep again: nothing new to keep
    (tmp_path / SEARCH_RESULTS).write_text("best_value: 0.5\n")
    assert keep_search_results(tmp_path) == tmp_path / "optimization_results.2.yaml"
    assert [p.read_text() for p in archived_records(tmp_path, SEARCH_RESULTS)] == ["best_value: 0.25\n",
                                                                                  "best_value: 0.5\n"]
    assert keep_search_results(tmp_path / "new") is None
