"""A sweep dir's multirun.yaml: an earlier, different record is kept aside, never overwritten."""
from __future__ import annotations

from omegaconf import OmegaConf

from mtlsparse.sweep_record import KeepSweepRecord, archived_records, keep_earlier_record


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
