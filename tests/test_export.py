"""Export: channel removal is exact (outputs unchanged), removes exactly the unused channels
(LeNet, residual ResNet blocks with BN, every model option), reloads, and `mtlsparse export`
records params/latency in metrics.json after a tiny group-lasso run. Export is bounded and
honest: cross-stitch is refused at once, a model with nothing to remove is skipped, the
dependency analysis stays within its time/index budget, and a latency difference inside the
noise is reported as no measurable change."""
from __future__ import annotations

import json
import logging
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.resnet import BasicBlock

from mtlsparse import cli
from mtlsparse.builders import build_model
from mtlsparse.compaction.graph import Budget, check_compactable, coupled_group, dependency_graph, plan_removal
from mtlsparse.compaction.serialise import shrink_to_
from mtlsparse.compaction.surgery import TOLERANCE, max_abs_diff, num_params, removal_counts
from mtlsparse.config import CONF_DIR, build, compose_config
from mtlsparse.export import (
    COMPACT_FILE,
    BudgetExceeded,
    NotCompactable,
    NothingToRemove,
    compact,
    export_after_training,
    export_model,
    latency_line,
    load_compact,
)
from mtlsparse.latency import MIN_SAMPLES, count_flops, measurable_difference, median_latency_ms, spread
from mtlsparse.models.hps import HPS, SharedTrunkModel
from mtlsparse.sparsity.layers import prunable_layers
from mtlsparse.tasks import Task
from mtlsparse.train import run

from conftest import TINY

TASKS = {"a": Task("a", num_classes=4), "b": Task("b", num_classes=3)}
EXPORT_CHEAP = ["export.batch=4", "export.repeats=2", "export.warmup=1"]


def lenet_params(c1: int, c2: int, fc_in: int, hidden: int = 50) -> int:
    """Parameter count of HPS on 1×28×28 with the given conv widths and FC input size."""
    return (c1 * 25 + c1) + (c2 * c1 * 25 + c2) + (fc_in * hidden + hidden) + (hidden * 4 + 4) + (hidden * 3 + 3)


def randomise_bn_(model: nn.Module) -> None:
    """Non-trivial BN statistics/affines, so a removed channel with a BN shift would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=g))


def test_lenet_input_groups_are_removed_exactly():
    torch.manual_seed(0)
    model = HPS(TASKS, (1, 28, 28)).eval()
    with torch.no_grad():
        model.trunk[3].weight[:, [1, 4, 7]] = 0  # conv2 ignores conv1 channels 1, 4, 7
        model.trunk[7].weight[:, 16 * 3:16 * 5] = 0  # FC ignores the 4×4 blocks of conv2 channels 3, 4
        model.trunk[7].weight[:, 16 * 9] = 0  # one column of channel 9's block: channel 9 stays
    x = torch.randn(8, 1, 28, 28)
    small, removed = compact(model, x)
    assert (small.trunk[0].out_channels, small.trunk[3].in_channels, small.trunk[3].out_channels) == (7, 7, 18)
    assert small.trunk[7].in_features == 18 * 16 - 1, "channel 9's zero column is dropped by gathering"
    assert num_params(model) == lenet_params(10, 20, 320)
    assert num_params(small) == lenet_params(7, 18, 18 * 16 - 1)
    assert removal_counts(removed) == (5, 1)
    assert max_abs_diff(model, small, x) <= TOLERANCE
    assert num_params(model) == lenet_params(10, 20, 320), "the original model is left untouched"


@pytest.mark.parametrize("bias, removable", [(0.0, True), (-0.5, True), (0.5, False)])
def test_zero_output_row_is_removed_only_when_the_channel_is_zero(bias, removable):
    """A zero conv row emits its bias; after ReLU that is 0 for bias ≤ 0 (removable), not for bias > 0."""
    torch.manual_seed(0)
    model = HPS(TASKS, (1, 28, 28)).eval()
    with torch.no_grad():
        model.trunk[0].weight[2] = 0
        model.trunk[0].bias[2] = bias
    x = torch.randn(4, 1, 28, 28)
    small, _ = compact(model, x)
    assert small.trunk[0].out_channels == (9 if removable else 10)
    assert max_abs_diff(model, small, x) <= TOLERANCE


def tiny_resnet() -> SharedTrunkModel:
    """Torchvision BasicBlocks at width 8/16: stem, two residual blocks, a strided block with downsample."""
    def downsample(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))

    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=downsample(8, 16)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SharedTrunkModel(TASKS, trunk, {n: nn.Linear(16, t.out_dim) for n, t in TASKS.items()})
    randomise_bn_(model)
    return model.eval()


def test_resnet_residual_channels_are_removed_together_and_only_when_unread():
    model = tiny_resnet()
    block1, block2, block3 = model.trunk[3], model.trunk[4], model.trunk[5]
    stream_readers = [block1.conv1, block2.conv1, block3.conv1, block3.downsample[0]]
    with torch.no_grad():
        block1.conv2.weight[:, [0, 5]] = 0  # block 1's inner channels 0, 5: unread → removed
        for conv in stream_readers:
            conv.weight[:, [2, 6]] = 0  # residual-stream channels 2, 6: unread by every reader → removed
        for conv in stream_readers[:-1]:
            conv.weight[:, 3] = 0  # stream channel 3 is still read by the downsample conv → kept
    x = torch.randn(4, 3, 16, 16)
    small, _ = compact(model, x)
    s1, s2, s3 = small.trunk[3], small.trunk[4], small.trunk[5]
    assert small.trunk[0].out_channels == 6 and small.trunk[1].num_features == 6
    assert (s1.conv1.out_channels, s1.conv2.in_channels, s1.bn1.num_features) == (6, 6, 6)
    assert (s1.conv2.out_channels, s2.conv2.out_channels, s3.conv1.in_channels, s3.downsample[0].in_channels) \
        == (6, 6, 6, 6)
    assert s2.conv1.out_channels == 8 and s3.conv2.out_channels == 16
    def conv_bn(c_in: int, c_out: int, k: int = 3) -> int:
        return c_in * c_out * k * k + 2 * c_out

    def expected(stream: int, inner1: int) -> int:
        """Params with `stream` residual channels in stage 1 and `inner1` inner channels in block 1."""
        return (conv_bn(3, stream) + conv_bn(stream, inner1) + conv_bn(inner1, stream)
                + conv_bn(stream, 8) + conv_bn(8, stream)
                + conv_bn(stream, 16) + conv_bn(16, 16) + conv_bn(stream, 16, k=1) + 16 * 7 + 7)

    assert (num_params(model), num_params(small)) == (expected(8, 8), expected(6, 6))
    assert max_abs_diff(model, small, x) <= TOLERANCE


def test_channels_reaching_an_output_are_kept():
    """A trunk used on its own: its last block's channels are the output, never removed."""
    model = tiny_resnet()
    with torch.no_grad():
        for block in (model.trunk[3], model.trunk[4]):
            block.conv1.weight[:, 1] = 0
        model.trunk[5].conv1.weight[:, 1] = 0
        model.trunk[5].downsample[0].weight[:, 1] = 0
        for head in model.heads.values():
            head.weight[:, 4] = 0  # heads' inputs are not output channels: trunk channel 4 goes
    small_trunk, _ = compact(model.trunk, torch.randn(2, 3, 16, 16))
    assert small_trunk[5].conv2.out_channels == 16, "trunk output channels stay"
    assert small_trunk[0].out_channels == 7, "stream channel 1 is unread inside the trunk"
    small, _ = compact(model, torch.randn(2, 3, 16, 16))
    assert small.trunk[5].conv2.out_channels == 15


class Centred(nn.Module):
    """conv1 → subtract the mean over channels (torch-pruning reads it as per-channel) → conv2 → ReLU → conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return self.conv3(torch.relu(self.conv2(h - h.mean(dim=1, keepdim=True))))


def test_cuts_that_change_outputs_are_dropped():
    """Removing an unread conv1 channel would change the channel mean: only the exact cut is kept."""
    model = Centred().eval()
    with torch.no_grad():
        model.conv2.weight[:, 0] = 0
        model.conv3.weight[:, 1] = 0
    x = torch.randn(2, 3, 12, 12)
    small, removed = compact(model, x)
    assert removed == {"conv2": 1}
    assert (small.conv1.out_channels, small.conv2.out_channels) == (8, 7)
    assert max_abs_diff(model, small, x) <= TOLERANCE


def test_fc_features_zeroed_one_by_one_are_gathered_and_reload(tmp_path):
    """Group lasso on an FC after Flatten zeroes single features, not whole conv channels:
    the compact FC keeps exactly its non-zero columns, and params drop by the zeroed ones."""
    torch.manual_seed(0)
    model = HPS(TASKS, (1, 28, 28)).eval()
    fc = model.trunk[7]
    zero = torch.randperm(320)[:200]
    with torch.no_grad():
        fc.weight[:, zero] = 0  # scattered features: every conv2 channel keeps some
    x = torch.randn(8, 1, 28, 28)
    small, removed = compact(model, x)
    assert small.trunk[3].out_channels == 20, "no conv channel is wholly unread"
    assert small.trunk[7].weight.shape == (50, 120)
    assert num_params(model) - num_params(small) == 200 * 50 == (model.trunk[7].weight == 0).sum()
    assert removal_counts(removed) == (0, 200)
    assert max_abs_diff(model, small, x, exact=True) <= TOLERANCE
    path = tmp_path / "compact.pt"
    torch.save({"format": "mtlsparse-compact/1", "state_dict": small.state_dict(), "config": {}}, path)
    reloaded = load_compact(path, HPS(TASKS, (1, 28, 28)))
    assert reloaded.trunk[7].in_features == 120
    assert max_abs_diff(small, reloaded, x) == 0


def test_compact_state_dict_reloads_into_a_fresh_dense_model(tmp_path):
    model = tiny_resnet()
    with torch.no_grad():
        model.trunk[3].conv2.weight[:, :4] = 0
    x = torch.randn(2, 3, 16, 16)
    small, _ = compact(model, x)
    path = tmp_path / "compact.pt"
    torch.save({"format": "mtlsparse-compact/1", "state_dict": small.state_dict(), "config": {}}, path)
    reloaded = load_compact(path, tiny_resnet())
    assert reloaded.trunk[3].conv1.out_channels == 4
    assert max_abs_diff(small, reloaded, x) == 0
    fresh = shrink_to_(tiny_resnet(), small.state_dict())
    assert fresh.trunk[3].conv2.in_channels == 4


def model_options() -> list[str]:
    return sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml"))


# cross-stitch units mix whole columns (stack + tensordot with learned scalars): declared not compactable
NOT_COMPACTED = {"cross_stitch"}
# options that need an extra override to build small (as in test_train's smoke runs)
MODEL_EXTRA = {"kdmtl": ["model.allow_untrained_teachers=true"], "vgg16_mt": ["model.width=0.125"],
               "deeplab_resnet": ["model.width=0.0625"], "ltb_resnet": ["model.width=0.0625", "model.depth=18"]}


@pytest.mark.parametrize("option", model_options())
def test_every_model_option_compacts_exactly(tmp_path, option):
    """~60% of each prunable layer's input groups zeroed at random: fewer params, same outputs."""
    cfg = compose_config(TINY + [f"model={option}", f"data_root={tmp_path}", *MODEL_EXTRA.get(option, [])])
    datamodule = build(cfg, "dataset")
    model = build_model(cfg, datamodule).eval()
    randomise_bn_(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in prunable_layers(model):
            keep = (torch.rand(layer.num_groups, generator=g) > 0.6).to(layer.weight.dtype)
            layer.weight.mul_(keep.view(1, -1, *([1] * (layer.weight.dim() - 2))))
    x = torch.randn(4, *datamodule.input_shape)
    if option in NOT_COMPACTED:
        with pytest.raises(NotCompactable, match=f"model={option} "):
            compact(model, x)
        return
    small, _ = compact(model, x)
    assert max_abs_diff(model, small, x) <= TOLERANCE
    assert num_params(small) < num_params(model)


def test_export_model_saves_a_reloadable_compact_model(tmp_path):
    cfg = compose_config(TINY + ["model=hps_lenet", "model.batch_norm=true", f"data_root={tmp_path / 'data'}"])
    datamodule = build(cfg, "dataset")
    model = build_model(cfg, datamodule).eval()
    with torch.no_grad():
        model.trunk[4].weight[:, :6] = 0
    metrics = export_model(model, datamodule.input_shape, tmp_path, config=cfg, batch=4, repeats=2, warmup=1)
    assert metrics["params/compact"] < metrics["params/dense"] == num_params(model)
    assert metrics["latency/dense_ms"] > 0 and metrics["latency/compact_ms"] > 0
    for name in ("dense", "compact"):  # median with its spread
        low, high = metrics[f"latency/{name}_min_ms"], metrics[f"latency/{name}_max_ms"]
        assert low <= metrics[f"latency/{name}_ms"] <= high and 0 <= metrics[f"latency/{name}_iqr_ms"] <= high - low
    assert metrics["latency/measurable"] is False, "2 repeats cannot show a difference"
    assert "no measurable change" in latency_line(metrics)
    assert 0 < metrics["flops/compact"] < metrics["flops/dense"]
    assert metrics["export/max_abs_diff"] <= TOLERANCE
    reloaded = load_compact(tmp_path / COMPACT_FILE)  # rebuilt from the saved config
    assert reloaded.trunk[0].out_channels == 4
    x = torch.randn(3, *datamodule.input_shape)
    assert max_abs_diff(model, reloaded, x) <= TOLERANCE


@pytest.mark.parametrize("zero_groups", [False, True])
def test_a_fixed_ltb_trees_unreached_nodes_are_removed_whole_and_the_file_reloads(tmp_path, zero_groups):
    """Both heads on one branch of the fixed tree: the other branch's nodes go (and with zero
    groups, their channels too), the outputs stay, and the counts say what went."""
    cfg = compose_config(TINY + ["model=ltb", f"data_root={tmp_path / 'data'}"])
    datamodule = build(cfg, "dataset")
    model = build_model(cfg, datamodule).eval()
    with torch.no_grad():  # every child and head picks node 0 of the layer above: nodes *.1 are unreached
        for logits in [*model.branch_logits.values(), *model.head_logits.values()]:
            logits.zero_()[..., 0] = 1.0
        model.fix_()
        if zero_groups:
            model.nodes[1][0][0].weight[:, :3] = 0  # 3 input channels of the reached conv2
    unreached = model.unreachable_modules()
    assert unreached == [f"nodes.{layer}.1" for layer in range(len(model.nodes))]
    dead = sum(p.numel() for name in unreached for p in model.get_submodule(name).parameters())
    metrics = export_model(model, datamodule.input_shape, tmp_path, config=cfg, batch=4, repeats=2, warmup=1)
    assert metrics["export/unreached_params"] == dead
    assert metrics["export/max_abs_diff"] <= TOLERANCE
    channels = metrics["export/channels_removed"] + metrics["export/features_gathered"]
    assert (channels > 0) == zero_groups
    if not zero_groups:  # only the unreached nodes went
        assert metrics["params/compact"] == metrics["params/dense"] - dead
    assert metrics["params/compact"] <= metrics["params/dense"] - dead
    reloaded = load_compact(tmp_path / COMPACT_FILE)  # rebuilt from the saved config, the same nodes removed
    assert num_params(reloaded) == metrics["params/compact"]
    x = torch.randn(3, *datamodule.input_shape)
    assert max_abs_diff(model, reloaded, x) <= TOLERANCE
    with pytest.raises(Exception, match=r"nodes.0.1 was removed by export"):
        reloaded.encode(x)  # encode computes every node: a removed one says so


def test_masked_models_export_with_masks_folded_in(tmp_path):
    from mtlsparse.sparsity.masks import MASK, add_mask

    model = HPS(TASKS, (1, 28, 28)).eval()
    mask = add_mask(model.trunk[3])
    mask[:, :3] = False  # the mask removes groups the weights still hold
    small, _ = compact(model, torch.randn(2, 1, 28, 28))
    assert small.trunk[0].out_channels == 7 and not hasattr(small.trunk[3], MASK)
    assert hasattr(model.trunk[3], MASK), "the original keeps its mask"


def test_auto_export_only_for_structured_methods(tmp_path):
    cfg = compose_config(TINY + EXPORT_CHEAP + [f"data_root={tmp_path}"])
    model = HPS(TASKS, (1, 16, 16))
    with torch.no_grad():
        model.trunk[3].weight[:, :4] = 0  # conv2 ignores 4 conv1 channels: something to remove
    assert export_after_training(cfg, model, False, (1, 16, 16), tmp_path) == {}
    assert "params/compact" in export_after_training(cfg, model, True, (1, 16, 16), tmp_path)
    off = compose_config(TINY + EXPORT_CHEAP + ["export.enabled=false", f"data_root={tmp_path}"])
    assert export_after_training(off, model, True, (1, 16, 16), tmp_path) == {}
    broken = compose_config(TINY + ["export.batch=0", f"data_root={tmp_path}"])
    assert "export/error" in export_after_training(broken, model, True, (1, 16, 16), tmp_path)


def test_latency_is_a_positive_median_and_restores_threads():
    model = HPS(TASKS, (1, 28, 28))
    threads = torch.get_num_threads()
    result = median_latency_ms({"a": model, "b": model}, torch.randn(2, 1, 28, 28), warmup=1, repeats=3)
    assert set(result) == {"a", "b"} and min(result.values()) > 0
    assert torch.get_num_threads() == threads
    assert count_flops(model, torch.randn(1, 1, 28, 28)) == 2 * (10 * 25 * 24 * 24 + 20 * 250 * 8 * 8 + 320 * 50
                                                                 + 50 * 7)


def cli_export(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["mtlsparse", "export", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code


def test_group_lasso_run_auto_exports_and_cli_export_adds_keys(tiny_cfg, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("method=group_lasso", "lam=10", "optimizer.lr=0.05", "trainer.limit_train_batches=4",
                   *EXPORT_CHEAP)
    metrics = run(cfg, run_dir)
    assert metrics["sparsity/group"] > 50
    assert metrics["params/compact"] < metrics["params/total"]  # exported automatically: structured method
    assert (run_dir / COMPACT_FILE).is_file()

    # what Hydra writes into a run dir; the CLI rebuilds the model from it
    (run_dir / ".hydra").mkdir(exist_ok=True)
    composed = OmegaConf.to_container(cfg, resolve=False)
    composed.pop("hydra")
    OmegaConf.save(OmegaConf.create(composed), run_dir / ".hydra" / "config.yaml")
    (run_dir / COMPACT_FILE).unlink()
    saved = json.loads((run_dir / "metrics.json").read_text())
    saved = {k: v for k, v in saved.items() if k.split("/")[0] not in ("latency", "flops", "export")
             and k not in ("params/compact", "params/dense")}
    (run_dir / "metrics.json").write_text(json.dumps(saved))

    assert cli_export(monkeypatch, run_dir, "--ckpt", "last", "--repeats", "2", "--batch", "4") == 0
    assert "params" in capsys.readouterr().out
    after = json.loads((run_dir / "metrics.json").read_text())
    assert {k: after[k] for k in saved} == saved, "existing keys are kept"
    assert after["params/compact"] < after["params/total"]
    assert after["latency/dense_ms"] > 0 and after["latency/compact_ms"] > 0
    assert after["latency/batch"] == 4 and after["export/checkpoint"] == "last.ckpt"
    reloaded = load_compact(run_dir / COMPACT_FILE)
    assert sum(p.numel() for p in reloaded.parameters()) == after["params/compact"]


def test_bad_run_dirs_give_clear_errors(tmp_path, monkeypatch, capsys):
    assert cli_export(monkeypatch, tmp_path / "missing") == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli_export(monkeypatch, tmp_path) == 2
    assert ".hydra/config.yaml not found" in capsys.readouterr().err
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(compose_config(TINY), tmp_path / ".hydra" / "config.yaml")
    assert cli_export(monkeypatch, tmp_path) == 2
    assert "last.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("depth", [18, 50])
def test_deeplab_resnet_compacts_trunk_and_aspp_concat_exactly(depth):
    deeplab = pytest.importorskip("mtlsparse.models.deeplab")
    from mtlsparse.benchmarks.export import NYU_TASKS, zero_channel_groups_

    tasks = {**NYU_TASKS, "scene": Task("scene", num_classes=5)}
    model = deeplab.DeepLabResNet(tasks, (3, 32, 32), depth=depth, width=0.0625).eval()
    randomise_bn_(model)
    x = torch.randn(2, 3, 32, 32)
    layers = prunable_layers(model)
    zero_channel_groups_(model, x, 0.7, [layer.module for layer in layers])
    project = model.heads["seg"][0].project[0]  # reads the concat of 5 ASPP branches (16 channels each)
    with torch.no_grad():
        project.weight[:, [16 + 2, 16 + 3, 48, 64 + 1]] = 0  # branch 1: 2 channels, branch 3 and pooling: 1 each
    small, _ = compact(model, x)
    assert max_abs_diff(model, small, x) <= TOLERANCE
    aspp = small.heads["seg"][0]
    assert [aspp.convs[i][0].out_channels for i in range(4)] == [16, 14, 16, 15]
    assert aspp.convs[4][1].out_channels == 15 and aspp.project[0].in_channels == 76
    assert num_params(small.trunk) < 0.5 * num_params(model.trunk)
    last = small.trunk.layer4[-1]
    assert (last.conv3 if depth == 50 else last.conv2).out_channels == model.trunk.out_channels, "heads read them"
    fresh = deeplab.DeepLabResNet(tasks, (3, 32, 32), depth=depth, width=0.0625)
    shrink_to_(fresh, small.state_dict()).load_state_dict(small.state_dict())
    assert max_abs_diff(small, fresh, x) == 0


def test_export_benchmark_writes_its_table(tmp_path):
    pytest.importorskip("mtlsparse.models.deeplab")
    from mtlsparse.benchmarks import export as bench_export

    bench_export.main(["--depth", "18", "--width", "0.0625", "--size", "32", "--batch", "2", "--repeats", "1",
                       "--warmup", "0", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "export.json").read_text())["rows"][0]
    assert 60 < row["sparsity_group"] < 80 and row["max_abs_diff"] <= TOLERANCE
    assert row["flop_ratio_trunk"] > 2 and row["params_trunk_compact"] < row["params_trunk_dense"]
    assert "| 18 |" in (tmp_path / "export.md").read_text()


# ------------------------------------------------------------------ refused / skipped / bounded / honest


def save_run_config(cfg, run_dir: Path) -> None:
    """What Hydra writes into a run dir; `mtlsparse export` rebuilds the model from it."""
    (run_dir / ".hydra").mkdir(exist_ok=True)
    composed = OmegaConf.to_container(cfg, resolve=False)
    composed.pop("hydra", None)
    OmegaConf.save(OmegaConf.create(composed), run_dir / ".hydra" / "config.yaml")


def test_cross_stitch_is_refused_at_once_after_training_and_by_the_cli(tiny_cfg, tmp_path, monkeypatch, capsys,
                                                                       caplog):
    """36×36 inputs: where the group search at HEAD ran out of memory. The run still finishes and
    writes its metrics; `mtlsparse export` exits 2 with one line, in well under a second of work."""
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("model=cross_stitch", "dataset.image_size=36", "method=group_lasso", "lam=10",
                   "optimizer.lr=0.05", *EXPORT_CHEAP)
    with caplog.at_level(logging.WARNING, logger="mtlsparse"):
        metrics = run(cfg, run_dir)
    warnings = [r.getMessage() for r in caplog.records if "model=cross_stitch" in r.getMessage()]
    assert len(warnings) == 1 and "compaction is not supported" in warnings[0] and "\n" not in warnings[0]
    assert metrics["sparsity/group"] > 0, "there were zero groups: the refusal is by architecture"
    assert "model=cross_stitch" in metrics["export/refused"] and "params/compact" not in metrics
    assert not (run_dir / COMPACT_FILE).exists()
    assert json.loads((run_dir / "metrics.json").read_text())["export/refused"] == metrics["export/refused"]

    save_run_config(cfg, run_dir)
    capsys.readouterr()
    start = time.perf_counter()
    assert cli_export(monkeypatch, run_dir) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model=cross_stitch" in err and "cross-stitch units" in err
    assert not (run_dir / COMPACT_FILE).exists()


def test_refusal_is_declared_by_the_class_before_any_tracing(tmp_path, monkeypatch):
    from mtlsparse.compaction import graph, surgery
    from mtlsparse.models.cross_stitch import CrossStitch

    def no_tracing(*args, **kwargs):
        raise AssertionError("a refused model must not be traced")

    monkeypatch.setattr(graph, "dependency_graph", no_tracing)
    monkeypatch.setattr(graph, "probe", no_tracing)
    monkeypatch.setattr(surgery, "dependency_graph", no_tracing)
    with pytest.raises(NotCompactable, match="model=cross_stitch"):
        check_compactable("mtlsparse.models.CrossStitch")  # a config's _target_
    with pytest.raises(NotCompactable):
        compact(CrossStitch(TASKS, (1, 16, 16)), torch.randn(2, 1, 16, 16))
    with pytest.raises(NotCompactable):
        export_model(CrossStitch(TASKS, (1, 16, 16)), (1, 16, 16), tmp_path)
    check_compactable(HPS(TASKS, (1, 16, 16)))  # no error for a compactable model


def test_lam0_run_writes_no_compact_model_and_no_export_metrics(tiny_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="mtlsparse"):
        metrics = run(tiny_cfg("method=group_lasso", "lam=0", *EXPORT_CHEAP), run_dir)
    assert metrics["sparsity/group"] == 0
    assert not (run_dir / COMPACT_FILE).exists()
    export_keys = [k for k in metrics if k.split("/")[0] in ("latency", "flops", "export")
                   or k in ("params/compact", "params/dense")]
    assert export_keys == []
    assert "export: no channel group is zero, nothing to remove; skipped" in caplog.text
    assert "test/mean_acc" in json.loads((run_dir / "metrics.json").read_text())


def test_nothing_to_remove_with_export_enabled_true_is_no_error(tmp_path, monkeypatch, capsys):
    cfg = compose_config(TINY + EXPORT_CHEAP + ["export.enabled=true", f"data_root={tmp_path}"])
    dense = HPS(TASKS, (1, 16, 16))  # random weights: no zero group
    assert export_after_training(cfg, dense, False, (1, 16, 16), tmp_path) == {}
    assert not (tmp_path / COMPACT_FILE).exists()
    read = HPS(TASKS, (1, 16, 16))
    with torch.no_grad():
        read.trunk[0].weight[2] = 0
        read.trunk[0].bias[2] = 0.5  # a zero row whose channel is a constant 0.5 after ReLU: still read
    with pytest.raises(NothingToRemove, match="still read"):
        export_model(read, (1, 16, 16), tmp_path, batch=2, repeats=1)
    assert export_after_training(cfg, read, True, (1, 16, 16), tmp_path) == {}
    assert not (tmp_path / COMPACT_FILE).exists()

    run_dir = tmp_path / "run"  # the CLI: one line on stdout, exit 0, nothing written
    (run_dir / "checkpoints").mkdir(parents=True)
    save_run_config(cfg, run_dir)
    trained = build_model(cfg, build(cfg, "dataset"))  # the run's architecture, random (no zero) weights
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}},
               run_dir / "checkpoints" / "last.ckpt")
    assert cli_export(monkeypatch, run_dir) == 0
    assert capsys.readouterr().out.strip() == "mtlsparse export: no channel group is zero, nothing to remove; skipped"
    assert not (run_dir / COMPACT_FILE).exists() and not (run_dir / "metrics.json").exists()


def cross_stitch_graph(size: int = 36):
    """A cross-stitch model on size×size inputs (refusal bypassed), traced: the case that exploded at HEAD."""
    from mtlsparse.models.cross_stitch import CrossStitch

    model = CrossStitch(TASKS, (1, size, size)).eval()
    x = torch.randn(2, 1, size, size)
    return model, x, dependency_graph(model, x)[0]


def test_dependency_analysis_of_cross_stitch_is_bounded_in_time_and_memory():
    """At HEAD the group search for conv2 at 36×36 held >10⁸ channel indices (OOM under 10 GB)."""
    model, x, _ = cross_stitch_graph()
    with torch.no_grad():
        for column in model.columns.values():
            column[3].weight[:, :5] = 0  # zero groups, so every group is searched
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _, plan = plan_removal(model, x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10 and peak < 50 * 2**20
    assert plan == {}, "every channel group passes a cross-stitch unit: all are left whole"


def test_group_search_stops_at_its_index_budget_with_a_clear_error():
    """Without the early stops, the cap on held indices still bounds the search before it allocates."""
    model, _, graph = cross_stitch_graph()
    conv2 = model.columns["a"][3]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(BudgetExceeded, match="exceeded its budget of 20,000 channel indices"):
            coupled_group(graph, conv2, range(conv2.out_channels), Budget(max_indices=20_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 20 * 2**20


def test_the_deadline_stops_export_with_a_clear_error(tmp_path):
    model = HPS(TASKS, (1, 16, 16))
    with torch.no_grad():
        model.trunk[3].weight[:, :4] = 0
    with pytest.raises(BudgetExceeded, match="ran past its .* s budget"):
        compact(model, torch.randn(2, 1, 16, 16), Budget(seconds=1e-9))
    cfg = compose_config(TINY + EXPORT_CHEAP + ["export.budget_s=1e-9", f"data_root={tmp_path}"])
    assert "ran past" in export_after_training(cfg, model, True, (1, 16, 16), tmp_path)["export/error"]
    assert not (tmp_path / COMPACT_FILE).exists()


def group_signature(graph, group) -> set:
    return {(graph._module2name.get(item.dep.target.module, str(item.dep.target)), item.dep.handler.__name__,
             frozenset(zip(item.idxs, item.root_idxs))) for item in group}


@pytest.mark.parametrize("which", ["lenet", "resnet", "deeplab"])
def test_bounded_group_search_finds_torch_prunings_groups(which):
    """Same members, indices and root indices as torch-pruning's own (unbounded) search."""
    if which == "deeplab":
        deeplab = pytest.importorskip("mtlsparse.models.deeplab")
        from mtlsparse.benchmarks.export import NYU_TASKS
        model = deeplab.DeepLabResNet(NYU_TASKS, (3, 32, 32), depth=18, width=0.0625).eval()
        x = torch.randn(2, 3, 32, 32)
    elif which == "resnet":
        model, x = tiny_resnet(), torch.randn(2, 3, 16, 16)
    else:
        model, x = HPS(TASKS, (1, 28, 28)).eval(), torch.randn(2, 1, 28, 28)
    graph, _ = dependency_graph(model, x)
    layers = [m for m in graph.module2node if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        idxs = list(range(0, layer.weight.shape[0], 2))
        ours = coupled_group(graph, layer, idxs, Budget())
        theirs = graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, idxs)
        assert group_signature(graph, ours) == group_signature(graph, theirs)


def test_spread_is_median_quartiles_and_range():
    s = spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.q1, s.q3, s.low, s.high, s.n, s.iqr) == (3.0, 2.0, 4.0, 1.0, 5.0, 5, 2.0)
    assert spread([7.0]).iqr == 0


def test_latency_line_reports_a_speed_up_only_when_measurable():
    metrics = {"latency/batch": 8, "latency/threads": 1, "latency/repeats": 10, "latency/dense_ms": 2.0,
               "latency/dense_iqr_ms": 0.1, "latency/compact_ms": 1.0, "latency/compact_iqr_ms": 0.1,
               "latency/speedup": 2.0, "latency/measurable": True}
    assert "2.00× speed-up" in latency_line(metrics) and "no measurable" not in latency_line(metrics)
    quiet = latency_line({**metrics, "latency/measurable": False})
    assert "no measurable change" in quiet and "speed-up" not in quiet


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    given = None

if given is not None:
    timings = st.lists(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=1, max_size=40)

    @settings(max_examples=300, deadline=None)
    @given(timings, timings)
    def test_measurability_is_symmetric_and_scale_free(a, b):
        assert measurable_difference(a, b) == measurable_difference(b, a)
        assert measurable_difference(a, b) == measurable_difference([2 * v for v in a], [2 * v for v in b])

    @settings(max_examples=300, deadline=None)
    @given(timings, timings)
    def test_overlapping_spreads_are_no_measurable_change(a, b):
        sa = spread(a)
        if sa.q1 <= spread(b).median <= sa.q3 or min(len(a), len(b)) < MIN_SAMPLES:
            assert not measurable_difference(a, b)
        assert not measurable_difference(a, a)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.floats(min_value=1.0, max_value=2.0), min_size=MIN_SAMPLES, max_size=40),
           st.lists(st.floats(min_value=1.0, max_value=2.0), min_size=MIN_SAMPLES, max_size=40),
           st.floats(min_value=1e-3, max_value=10.0))
    def test_separated_timings_are_measurable(a, b, gap):
        assert measurable_difference(a, [v + 1.0 + gap for v in b])  # every b sample above every a sample

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.floats(min_value=0.5, max_value=0.6), min_size=MIN_SAMPLES, max_size=20),
           st.floats(min_value=0.0, max_value=0.05))
    def test_an_unchanged_model_with_noise_is_no_measurable_change(samples, jitter):
        """The observed 0.52× 'speed-up' of an unchanged model: the same timings, shifted by less than their spread."""
        s = spread(samples)
        shifted = [v + min(jitter, s.iqr / 2) for v in samples]
        assert not measurable_difference(samples, shifted)
