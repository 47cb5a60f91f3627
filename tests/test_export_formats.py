"""Export formats: ONNX and torch.export files of compact models (group-lasso HPS, BN-coupled
HPS, ResNet trunk) reload with one named output per task and a dynamic batch axis, and equal
the masked torch model; formats are chosen in one place (unknown names and missing packages
are one line); metrics.json gains per-format max |Δ| and per-runtime latency, and a failed
export leaves it and earlier files as they were; an unstructured model is written dense with
no speed-up claimed; the real `python -m mtlsparse export RUN --format onnx` works from outside
the checkout on a tiny trained run."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mtlsparse import export
from mtlsparse.compaction import formats
from mtlsparse.compaction.errors import ExportError
from mtlsparse.compaction.formats import (
    UNSTRUCTURED_NOTE,
    FormatChoice,
    OnnxRunner,
    check_runtime,
    choose_formats,
    parse_formats,
)
from mtlsparse.compaction.surgery import TOLERANCE, compact, num_params, strip_masks_
from mtlsparse.config import compose_config
from mtlsparse.errors import ConfigError
from mtlsparse.export import NothingToRemove, export_after_training, export_model, export_run, main
from mtlsparse.latency import latency_samples_ms
from mtlsparse.models.hps import HPS
from mtlsparse.sparsity.masks import add_mask
from mtlsparse.tasks import Task
from mtlsparse.train import run

from conftest import REPO, TINY
from test_export import save_run_config, tiny_resnet

TASKS = {"a": Task("a", num_classes=4), "b": Task("b", num_classes=3)}
CHEAP = {"batch": 4, "repeats": 2, "warmup": 1}
EXPORT_CHEAP = ["export.batch=4", "export.repeats=2", "export.warmup=1"]
MISSING = "--format onnx needs the 'deploy' extra: pip install \"mtlsparse[deploy]\""


def group_lasso_hps() -> tuple[nn.Module, tuple[int, ...]]:
    """LeNet HPS as group lasso leaves it: conv2 ignores conv1 channels, the FC ignores scattered features."""
    torch.manual_seed(0)
    model = HPS(TASKS, (1, 28, 28)).eval()
    with torch.no_grad():
        model.trunk[3].weight[:, [1, 4, 7]] = 0
        model.trunk[7].weight[:, torch.randperm(320)[:100]] = 0  # single FC features: gathered inputs
    return model, (1, 28, 28)


def bn_coupled_hps() -> tuple[nn.Module, tuple[int, ...]]:
    """HPS with BN after each conv: conv1 → BN1 channels go together when conv2 ignores them."""
    from test_export import randomise_bn_

    torch.manual_seed(0)
    model = HPS(TASKS, (1, 28, 28), batch_norm=True).eval()
    randomise_bn_(model)
    with torch.no_grad():
        model.trunk[4].weight[:, :6] = 0
    return model, (1, 28, 28)


def resnet_trunk() -> tuple[nn.Module, tuple[int, ...]]:
    """Torchvision BasicBlocks with BN: residual-stream and inner channels unread."""
    model = tiny_resnet()
    blocks = model.trunk[3], model.trunk[4], model.trunk[5]
    with torch.no_grad():
        blocks[0].conv2.weight[:, [0, 5]] = 0
        for conv in (blocks[0].conv1, blocks[1].conv1, blocks[2].conv1, blocks[2].downsample[0]):
            conv.weight[:, [2, 6]] = 0
    return model, (3, 16, 16)


MODELS = {"group_lasso_hps": group_lasso_hps, "bn_coupled_hps": bn_coupled_hps, "resnet_trunk": resnet_trunk}


def initializer_numel(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize("which", sorted(MODELS))
def test_onnx_and_torch_export_round_trip_equals_the_masked_model(tmp_path, which):
    model, shape = MODELS[which]()
    metrics = export_model(model, shape, tmp_path, formats="onnx,torch_export", **CHEAP)
    assert metrics["params/compact"] < metrics["params/dense"]
    for fmt in ("onnx", "torch_export"):
        assert metrics[f"export/{fmt}/max_abs_diff"] <= TOLERANCE
        assert metrics[f"export/{fmt}/dense_max_abs_diff"] <= TOLERANCE
        assert metrics[f"latency/{fmt}/dense_ms"] > 0 and metrics[f"latency/{fmt}/compact_ms"] > 0
        assert isinstance(metrics[f"latency/{fmt}/measurable"], bool)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact_model.onnx", "compact_model.pt2"], \
        "the dense comparison files and the staging dir are not kept; no state_dict was asked for"

    session = ort.InferenceSession(str(tmp_path / "compact_model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == list(TASKS), "one named output per task"
    small, _ = compact(model, torch.randn(2, *shape))
    compact_numel = sum(t.numel() for t in small.state_dict().values())
    # the compact weights (and a few shape constants), far fewer than the dense model's
    assert initializer_numel(tmp_path / "compact_model.onnx") <= compact_numel + 64 < num_params(model)
    program = torch.export.load(tmp_path / "compact_model.pt2").module()
    for batch in (1, 5):  # the batch axis is dynamic in both files
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            expected = model(x)
            reloaded = program(x)
        outs = dict(zip(list(TASKS), session.run(None, {"input": x.numpy()})))
        for task in TASKS:
            assert outs[task].shape == (batch, TASKS[task].out_dim)
            assert np.abs(outs[task] - expected[task].numpy()).max() <= TOLERANCE
            assert (reloaded[task] - expected[task]).abs().max() <= TOLERANCE


def test_formats_are_parsed_in_one_place_with_one_line_errors():
    assert parse_formats("onnx") == ("onnx",)
    assert parse_formats(["onnx,state_dict", "torch_export", "onnx"]) == ("state_dict", "torch_export", "onnx")
    assert parse_formats(None) is None and parse_formats("auto") is None and parse_formats(["auto"]) is None
    assert parse_formats(OmegaConf.create({"f": ["torch_export"]}).f) == ("torch_export",)
    for bad, message in (("onxx", "unknown export format 'onxx' in --format; choose from state_dict, "
                                  "torch_export, onnx or auto"),
                         ("", "--format names no format"), ("auto,onnx", "cannot be combined"),
                         (3, "takes format names")):
        with pytest.raises(ConfigError) as err:
            parse_formats(bad)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="in export.formats"):
        export.export_settings(compose_config(TINY + ["export.formats=[onnx,tflite]"]))
    assert export.export_settings(compose_config(TINY))["formats"] == ["state_dict"]


def test_auto_takes_every_installed_format():
    choice = choose_formats(None)
    assert choice == FormatChoice(("state_dict", "torch_export", "onnx"), {}, False)
    assert choose_formats("onnx").explicit and choose_formats("onnx").deploy == ("onnx",)


def without_onnxscript(monkeypatch) -> None:
    real = formats.importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    without_onnxscript(monkeypatch)
    with pytest.raises(ConfigError) as err:
        choose_formats("torch_export,onnx")
    assert str(err.value) == MISSING
    with pytest.raises(ConfigError, match=r"^export.formats=onnx needs the 'deploy' extra"):
        choose_formats(["onnx"], "export.formats")
    auto = choose_formats("auto")
    assert auto.formats == ("state_dict", "torch_export") and not auto.explicit
    assert auto.skipped_line() == ("skipped format onnx: onnxscript not installed (the 'deploy' extra: "
                                   "pip install \"mtlsparse[deploy]\")")
    # the command checks before it reads the run dir: the one line, exit 2
    assert main([str(tmp_path), "--format", "onnx"]) == 2
    assert capsys.readouterr().err == f"mtlsparse export: error: {MISSING}\n"


def test_unknown_format_from_the_command_line_and_the_config(tmp_path, capsys):
    assert main([str(tmp_path), "--format", "onxx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown export format 'onxx' in --format" in err
    model, shape = bn_coupled_hps()
    cfg = compose_config(TINY + EXPORT_CHEAP + ["export.formats=[onxx]", f"data_root={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown export format 'onxx' in export.formats"):
        export_after_training(cfg, model, True, shape, tmp_path)  # the node is checked wherever it is read


def test_config_formats_choose_the_files_written_after_training(tmp_path, caplog):
    model, shape = bn_coupled_hps()
    cfg = compose_config(TINY + EXPORT_CHEAP + ["export.formats=[torch_export]", f"data_root={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="mtlsparse"):
        metrics = export_after_training(cfg, model, True, shape, tmp_path)
    assert metrics["export/formats"] == "torch_export" and metrics["export/torch_export/max_abs_diff"] <= TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("data")) == ["compact_model.pt2"]
    assert "torch_export: compact_model.pt2 max |Δout|" in caplog.text and "torch.export latency" in caplog.text


def test_a_failed_check_leaves_metrics_and_earlier_files_as_they_were(tmp_path, monkeypatch, capsys):
    run_dir = exported_run_dir(tmp_path)
    assert main([str(run_dir), "--format", "state_dict", "--repeats", "2", "--batch", "4"]) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert {"metrics.json", "compact_model.pt"} <= set(before)
    assert json.loads(before["metrics.json"])["export/state_dict/max_abs_diff"] <= TOLERANCE

    def wrong(self, x):  # an ONNX runtime whose outputs are off by 1
        return [out + 1 for out in self.session.run(None, {self.input: x.numpy()})]

    monkeypatch.setattr(OnnxRunner, "__call__", wrong)
    capsys.readouterr()
    assert main([str(run_dir), "--format", "state_dict,onnx", "--repeats", "2", "--batch", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from the torch model by max |Δout| 1 > " in err
    assert "(0.0001 × max(1, largest |output|" in err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before, "metrics.json and compact_model.pt untouched, no ONNX file"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".export-")], "the staging dir is removed"


def test_an_unreadable_metrics_json_stops_export_before_any_work(tmp_path, capsys):
    run_dir = exported_run_dir(tmp_path)
    (run_dir / "metrics.json").write_text("{not json")
    assert main([str(run_dir), "--format", "state_dict"]) == 2
    assert "metrics.json is not valid JSON" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_text() == "{not json" and not (run_dir / "compact_model.pt").exists()


def exported_run_dir(tmp_path: Path, model: nn.Module | None = None) -> Path:
    """A run dir as training leaves it (config + last.ckpt, a metrics.json) for the BN-coupled HPS."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = compose_config(TINY + ["model.channels=[10,20]", "model.hidden=50", f"data_root={tmp_path / 'data'}"])
    save_run_config(cfg, run_dir)
    from mtlsparse.builders import build_model
    from mtlsparse.config import build

    if model is None:
        model = build_model(cfg, build(cfg, "dataset")).eval()
        with torch.no_grad():
            model.trunk[4].weight[:, :6] = 0
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "metrics.json").write_text(json.dumps({"test/mean_acc": 0.5}))
    return run_dir


def test_unstructured_sparsity_is_written_dense_with_no_speed_up_claimed(tmp_path):
    """Masks zero 70% of the weights one by one: no channel group is zero, nothing to compact."""
    torch.manual_seed(0)
    model = HPS(TASKS, (1, 28, 28)).eval()
    for layer in (model.trunk[0], model.trunk[3], model.trunk[7]):
        add_mask(layer).copy_(torch.rand(layer.weight.shape) > 0.7)
    with pytest.raises(NothingToRemove, match=f"^{UNSTRUCTURED_NOTE} "):
        export_model(model, (1, 28, 28), tmp_path, formats="auto", **CHEAP)  # no format named: skipped
    assert list(tmp_path.iterdir()) == []
    metrics = export_model(model, (1, 28, 28), tmp_path, formats="onnx,state_dict", **CHEAP)
    assert metrics["export/note"].startswith(UNSTRUCTURED_NOTE) and 65 < metrics["export/zero_weights_pct"] < 75
    assert metrics["export/onnx/file"] == "dense_model.onnx" and metrics["export/onnx/max_abs_diff"] <= TOLERANCE
    assert metrics["export/formats"] == "onnx", "no state_dict: the checkpoint already is the dense model"
    assert not [k for k in metrics if "compact" in k or "speedup" in k or k.endswith("/measurable")]
    assert "no compact model: no speed-up" in export.latency_line(metrics, "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense_model.onnx"]
    session = OnnxRunner(tmp_path / "dense_model.onnx")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = strip_masks_(model)(x)  # masks are applied to the weights, not in forward
    assert all(np.abs(out - expected[t].numpy()).max() <= TOLERANCE for out, t in zip(session(x), TASKS))


def test_every_runtime_is_timed_by_the_same_interleaved_loop():
    calls = []
    model = nn.Linear(3, 2)

    def callable_runtime(x):
        calls.append(x.shape)
        return x

    samples = latency_samples_ms({"torch": model, "other": callable_runtime}, torch.randn(2, 3), warmup=1,
                                 repeats=4)
    assert [len(v) for v in samples.values()] == [4, 4] and len(calls) == 5
    metrics = export.runtime_latency({"torch/dense": model, "onnx/dense": callable_runtime}, torch.randn(2, 3),
                                     1, 5, 1)
    assert {"latency/dense_ms", "latency/onnx/dense_ms", "latency/onnx/dense_vs_torch",
            "latency/onnx/dense_vs_torch_measurable"} <= set(metrics)
    assert "latency/onnx/speedup" not in metrics, "no compact model, no speed-up"


def test_export_run_merges_per_format_keys_into_metrics_json(tmp_path):
    run_dir = exported_run_dir(tmp_path)
    metrics = export_run(run_dir, "last", batch=4, repeats=2, formats=["onnx", "torch_export"])
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test/mean_acc"] == 0.5, "existing keys kept"
    for key in ("export/onnx/max_abs_diff", "export/torch_export/max_abs_diff", "latency/onnx/compact_ms",
                "latency/onnx/dense_ms", "latency/onnx/speedup", "latency/onnx/measurable",
                "latency/torch_export/compact_ms", "latency/dense_ms", "latency/compact_ms", "params/compact"):
        assert saved[key] == metrics[key]
    assert saved["export/formats"] == "torch_export,onnx" and not (run_dir / "compact_model.pt").exists()


def test_real_cli_exports_onnx_of_a_tiny_trained_run_from_outside_the_checkout(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("method=group_lasso", "lam=10", "optimizer.lr=0.05", "trainer.limit_train_batches=4",
                   *EXPORT_CHEAP)
    trained = run(cfg, run_dir)
    assert trained["sparsity/group"] > 50 and (run_dir / "compact_model.pt").is_file()
    save_run_config(cfg, run_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert REPO not in elsewhere.parents
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}
    proc = subprocess.run([sys.executable, "-m", "mtlsparse", "export", str(run_dir), "--format", "onnx",
                           "--ckpt", "last", "--batch", "4", "--repeats", "5"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "onnx: compact_model.onnx max |Δout|" in proc.stdout and "onnxruntime latency (batch 4" in proc.stdout
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test/mean_acc"] == trained["test/mean_acc"] and saved["export/onnx/max_abs_diff"] <= TOLERANCE
    assert saved["latency/onnx/compact_ms"] > 0 and saved["export/checkpoint"] == "last.ckpt"
    assert OnnxRunner(run_dir / "compact_model.onnx").output_names == saved_task_names(run_dir)


def saved_task_names(run_dir: Path) -> list[str]:
    """The task names of a run, from its compact state_dict's head keys."""
    state = torch.load(run_dir / "compact_model.pt", weights_only=True)["state_dict"]
    return list(dict.fromkeys(k.split(".")[1] for k in state if k.startswith("heads.")))


@pytest.mark.slow  # the CLI export itself is in the fast suite (test_real_cli_exports_onnx_...)
def test_deploy_benchmark_makes_a_run_the_cli_exports_and_tables_it(tmp_path):
    pytest.importorskip("mtlsparse.models.deeplab")
    from mtlsparse.benchmarks import export as bench

    run_dir = tmp_path / "deeplab"
    made = bench.make_run(run_dir, depth=18, width=0.0625, size=32, sparsity=0.7, heads=True)
    assert 60 < made["sparsity/group"] < 80
    assert main([str(run_dir), "--format", "onnx", "--ckpt", "last", "--batch", "2", "--repeats", "2"]) == 0
    bench.main(["--deploy-table", str(run_dir), "--out", str(tmp_path / "bench")])
    rows = json.loads((tmp_path / "bench" / "export_deploy.json").read_text())["rows"]
    assert [r["runtime"] for r in rows] == ["torch eager", "onnxruntime (.onnx)"]
    assert all(r["max_abs_diff"] <= TOLERANCE and r["flop_ratio"] > 2 for r in rows)
    table = (tmp_path / "bench" / "export_deploy.md").read_text()
    assert "| deeplab_resnet-18 width 0.0625, 32×32 | 2 |" in table and "onnxruntime (.onnx)" in table


def test_a_bad_export_node_fails_before_training(tiny_cfg, tmp_path):
    from mtlsparse.errors import ConfigError
    from mtlsparse.train import run

    with pytest.raises(ConfigError, match="export.formats"):
        run(tiny_cfg("method=group_lasso", "lam=1e-2", "export.formats=[onnx,tflite]"), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("scale, error, passes", [
    (100.0, 5e-3, True),    # float32 rounding of large logits: within 1e-4 × 100
    (100.0, 2e-2, False),   # past it
    (0.5, 5e-5, True),      # small outputs: the absolute 1e-4
    (0.5, 2e-4, False),
])
def test_a_runtime_is_checked_relative_to_the_size_of_its_outputs(scale, error, passes):
    reference = nn.Linear(4, 3)
    with torch.no_grad():
        reference.weight.zero_()
        reference.bias.copy_(torch.tensor([scale, -scale / 2, 0.0]))
    xs = [torch.randn(5, 4), torch.randn(1, 4)]

    def run(x):
        return reference(x) + error

    if passes:
        assert check_runtime(reference, run, xs, "the runtime") == pytest.approx(error, rel=1e-3)
    else:
        with pytest.raises(ExportError, match=rf"the runtime differs .* > {1e-4 * max(1.0, scale):.3g} "):
            check_runtime(reference, run, xs, "the runtime")
