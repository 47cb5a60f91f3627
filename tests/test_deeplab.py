"""DeepLab-ResNet multi-task model: torchvision-equivalent dilation, one trunk pass for all heads,
local pretrained weights, structured sparsity on the ResNet trunk, and 2-step trainings of the
dense datasets and the dense paper presets on tiny fakes."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from torch import nn

from mtlsparse.balancers.linear import Linear
from mtlsparse.config import compose_config
from mtlsparse.models.deeplab import DeepLabResNet, ResNetTrunk
from mtlsparse.module import MultiTaskModule
from mtlsparse.sparsity.base import Dense
from mtlsparse.sparsity.group_lasso import GroupLasso
from mtlsparse.sparsity.growl import GrOWL
from mtlsparse.tasks import Task
from mtlsparse.train import run

from conftest import compose_cfg
from fakes_dense import write_fake_dense_datasets

TASKS = {"seg": Task("seg", kind="segmentation", num_classes=5, ignore_index=-1),
         "depth": Task("depth", kind="depth"), "normal": Task("normal", kind="normal"),
         "male": Task("male", kind="binary"), "digit": Task("digit", num_classes=7)}
TINY = {"width": 1 / 16}
# 2 training steps on 32x32 fake data; export (physical compaction + CPU latency) has its own tests
TRAIN_TINY = ["model=deeplab_resnet", "model.width=0.0625", "model.depth=18", "trainer=cpu", "trainer.max_epochs=1",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
              "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "dataset.batch_size=2",
              "dataset.eval_batch_size=2", "dataset.num_workers=0", "++export.enabled=false"]


def conv_config(module: nn.Module) -> dict[str, tuple]:
    return {name: (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.dilation, m.padding)
            for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("output_stride, dilate", [(8, [False, True, True]), (16, [False, False, True])])
def test_resnet50_trunk_matches_torchvision_dilation(output_stride, dilate):
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate)
    assert conv_config(ResNetTrunk(50, output_stride=output_stride)) == conv_config(reference)


@pytest.mark.parametrize("depth", [18, 34])
def test_basic_block_trunks_are_dilated_to_output_stride_8(depth):
    trunk = ResNetTrunk(depth, width=1 / 16, output_stride=8)
    assert trunk(torch.randn(2, 3, 64, 48)).shape[-2:] == (8, 6)
    assert ResNetTrunk(depth, width=1 / 16, output_stride=16)(torch.randn(2, 3, 64, 48)).shape[-2:] == (4, 3)
    first, rest = trunk.layer4[0], trunk.layer4[1]
    assert first.conv1.stride == (1, 1) and first.conv1.dilation == (2, 2) and first.downsample[0].stride == (1, 1)
    assert first.conv2.dilation == (4, 4) and rest.conv1.dilation == rest.conv1.padding == (4, 4)
    assert trunk.layer3[1].conv2.dilation == (2, 2) and trunk.layer2[0].conv1.stride == (2, 2)


def test_heads_give_each_task_kind_its_output_shape():
    model = DeepLabResNet(TASKS, (3, 40, 36), depth=18, **TINY)
    out = model(torch.randn(2, 3, 40, 36))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "seg": (2, 5, 40, 36), "depth": (2, 1, 40, 36), "normal": (2, 3, 40, 36), "male": (2, 1), "digit": (2, 7)}
    grey = DeepLabResNet({"seg": TASKS["seg"]}, (1, 16, 16), depth=18, **TINY)
    assert grey(torch.randn(2, 1, 16, 16))["seg"].shape == (2, 5, 16, 16) and grey.trunk.conv1.in_channels == 1


def test_trunk_runs_once_per_batch_for_all_heads():
    model = DeepLabResNet(TASKS, (3, 32, 32), depth=18, **TINY)
    calls = []
    model.trunk.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1
    z = model.encode(torch.randn(2, 3, 24, 32))  # MGDA-UB path: representation, then decode
    assert model.decode(z)["seg"].shape[-2:] == (24, 32) and len(calls) == 2


def test_trunk_per_task_reproduces_the_reference_design_with_equal_outputs():
    torch.manual_seed(0)
    shared = DeepLabResNet(TASKS, (3, 32, 32), depth=18, **TINY).eval()
    per_task = DeepLabResNet(TASKS, (3, 32, 32), depth=18, trunk_per_task=True, **TINY).eval()
    per_task.load_state_dict(shared.state_dict())
    calls = []
    per_task.trunk.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = shared(x), per_task(x)
    assert len(calls) == len(TASKS)
    for name in TASKS:
        torch.testing.assert_close(a[name], b[name])


def test_non_boolean_trunk_per_task_is_a_clear_error():
    with pytest.raises(ValueError, match="model.trunk_per_task must be true or false"):
        DeepLabResNet(TASKS, (3, 32, 32), depth=18, trunk_per_task="yes", **TINY)


def test_trunk_benchmark_trains_both_designs_and_writes_its_table(tmp_path):
    from mtlsparse.benchmarks import trunk as bench_trunk

    bench_trunk.main(["--depth", "18", "--width", "0.0625", "--height", "32", "--image-width", "40", "--batch", "2",
                      "--steps", "1", "--warmup", "1", "--rounds", "2", "--device", "cpu", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "trunk.json").read_text())["row"]
    assert row["shared_images_per_s"] > 0 and row["per_task_images_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["shared_images_per_s"] / row["per_task_images_per_s"])
    assert "once per task (reference code)" in (tmp_path / "trunk.md").read_text()


def test_trunk_benchmark_step_lowers_the_loss_under_mixed_precision():
    from mtlsparse.benchmarks.trunk import Trainer, build_model, nyu_batch

    trainer = Trainer(build_model(18, 0.0625, 32, 32, trunk_per_task=False), torch.device("cpu"), "mixed")
    trainer.optimizer.param_groups[0]["lr"] = 1e-2
    x, targets = nyu_batch(2, 32, 32, torch.device("cpu"))
    losses = [trainer.step(x, targets) for _ in range(8)]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_contract_parameters_and_layers():
    model = DeepLabResNet(TASKS, (3, 32, 32), depth=18, **TINY)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.trunk.parameters()}
    for task in TASKS:
        own = {id(p) for p in model.task_parameters(task)}
        assert own and not own & shared
    assert model.input_layers() == [model.trunk.conv1]
    assert len(model.head_modules()) == len(TASKS)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = DeepLabResNet({"seg": TASKS["seg"]}, (3, 32, 32), depth=18, pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.trunk.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(model.trunk.bn1.running_var, reference.bn1.running_var)
    with pytest.raises(ValueError, match="does not fit this trunk"):
        DeepLabResNet({"seg": TASKS["seg"]}, (3, 32, 32), depth=18, width=0.5,
                      pretrained=str(tmp_path / "resnet18.pth"))


@pytest.mark.parametrize("method", [GroupLasso(lam=1.0), GrOWL()])
def test_structured_groups_are_the_trunk_convs_input_channels(method):
    model = DeepLabResNet(TASKS, (3, 32, 32), depth=18, **TINY)
    method.setup(model)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    expected = [n for n in convs if n.startswith("trunk.") and n != "trunk.conv1"]
    assert [layer.name for layer in method.layers] == expected  # stem and every head layer excluded
    assert "trunk.layer2.0.downsample.0" in expected and len(expected) == 19  # 16 block convs + 3 shortcuts
    for layer in method.layers:
        assert layer.num_groups == layer.module.in_channels
        assert layer.group_size == layer.module.out_channels * layer.module.kernel_size[0] * layer.module.kernel_size[1]


def make_module(tasks: dict[str, Task], reference=None) -> MultiTaskModule:
    model = DeepLabResNet(tasks, (3, 16, 16), depth=18, **TINY)
    return MultiTaskModule(model, Linear(list(tasks)), Dense(), torch.optim.Adam, reference=reference)


def test_checkpoint_score_without_reference_is_scale_free_for_mixed_directions():
    module = make_module({"seg": TASKS["seg"], "normal": TASKS["normal"]})
    score = module._selection_score
    assert score({"val/seg/miou": 0.2, "val/normal/mean_angle": 40.0}) == pytest.approx(0, abs=1e-5)  # first val
    # normals 10% better (36°) outweighs mIoU 5% worse (0.19): degrees do not swamp mIoU, nor the reverse
    assert score({"val/seg/miou": 0.19, "val/normal/mean_angle": 36.0}) == pytest.approx(2.5, abs=1e-5)
    assert score({"val/seg/miou": 0.3, "val/normal/mean_angle": 40.0}) == pytest.approx(25.0, abs=1e-4)
    assert "select_reference" in module.state_dict()  # checkpoints and resumed runs keep the scale
    accuracy_only = make_module({"seg": TASKS["seg"], "male": TASKS["male"]})
    assert accuracy_only._selection_score({"val/seg/miou": 0.5, "val/male/acc": 0.7}) == pytest.approx(0.6)
    assert "select_reference" not in accuracy_only.state_dict()
    referenced = make_module({"seg": TASKS["seg"], "normal": TASKS["normal"]}, reference={"seg/miou": 0.25})
    assert referenced._selection_score({"val/delta_m": 3.0}) == 3.0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fake_dense_datasets(tmp_path_factory.mktemp("dense_data"))


EXPECTED_KEYS = {
    "nyuv2": ["test/seg/miou", "test/seg/pix_acc", "test/depth/abs_err", "test/depth/rel_err",
              "test/normal/mean_angle", "test/normal/median_angle", "test/normal/within_11_25",
              "test/normal/within_22_5", "test/normal/within_30", "test/normal/loss"],
    "celeba_mask": ["test/seg/miou", "test/male/acc", "test/smile/acc", "test/mean_acc"],
    "cityscapes": ["test/seg/miou", "test/depth/abs_err", "test/depth/rel_err"],
}


@pytest.mark.parametrize("dataset", sorted(EXPECTED_KEYS))
def test_dense_datasets_train_two_steps(data_root, tmp_path, dataset):
    extra = ["dataset.image_size=[16,32]"] if dataset == "cityscapes" else ["dataset.image_size=[32,32]"]
    metrics = run(compose_cfg([f"dataset={dataset}", *TRAIN_TINY, *extra], data_root=data_root), tmp_path)
    assert metrics["config/dataset"] == dataset and metrics["config/model"] == "deeplab_resnet"
    for key in EXPECTED_KEYS[dataset]:
        assert key in metrics, key
    assert 0 <= metrics["test/seg/miou"] <= 1 and "test/delta_m" not in metrics


@pytest.mark.parametrize("method", ["group_lasso", "growl"])
def test_structured_methods_train_on_the_resnet_trunk(data_root, tmp_path, method):
    """2 steps of deeplab_resnet on 32x32 fake NYUv2; a large λ zeroes channel groups of the trunk only."""
    strong = ["lam=10", "optimizer.lr=0.05"] if method == "group_lasso" else ["method.lam=100", "optimizer.lr=0.05"]
    cfg = compose_cfg(["dataset=nyuv2", *TRAIN_TINY, f"method={method}", *strong], data_root=data_root)
    metrics = run(cfg, tmp_path)
    assert metrics["sparsity/group"] > 0 and metrics["config/method"] == method
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert (state["model.trunk.conv1.weight"] != 0).all()  # the stem is not sparsified
    assert all((v != 0).any() for k, v in state.items() if k.startswith("model.heads.") and k.endswith("weight"))
    layers = json.loads((tmp_path / "layer_sparsity.json").read_text())
    assert list(layers)[0] == "trunk.layer1.0.conv1" and "trunk.conv1" not in layers
    assert any(v["group"] > 0 for v in layers.values()) and (tmp_path / "layer_sparsity.png").stat().st_size > 0


def test_bn_coupled_group_lasso_kills_block_channels_and_export_removes_them(data_root, tmp_path):
    """With method.couple_norms=true a zero group takes its bn1 (γ, β) along, so export can drop the channel."""
    export = ["++export.enabled=auto", "++export.batch=1", "++export.repeats=1", "++export.warmup=0"]
    cfg = compose_cfg(["dataset=nyuv2", *TRAIN_TINY[:-1], *export, "method=group_lasso", "method.couple_norms=true",
                       "lam=10", "optimizer.lr=0.05"], data_root=data_root)
    metrics = run(cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    conv2, bn1 = state["model.trunk.layer1.0.conv2.weight"], state["model.trunk.layer1.0.bn1.weight"]
    dead = conv2.abs().sum(dim=(0, 2, 3)) == 0
    assert dead.any() and torch.all(bn1[dead] == 0)  # the group and its BN scale went together
    assert metrics["export/channels_removed"] > 0


def test_reference_gives_delta_m_and_selects_by_it(data_root, tmp_path):
    reference = "dataset.reference={seg/miou:0.5,depth/abs_err:1.0,normal/mean_angle:40.0}"
    metrics = run(compose_cfg(["dataset=nyuv2", *TRAIN_TINY, reference], data_root=data_root), tmp_path)
    expected = (100 * (metrics["test/seg/miou"] - 0.5) / 0.5 - 100 * (metrics["test/depth/abs_err"] - 1.0)
                - 100 * (metrics["test/normal/mean_angle"] - 40.0) / 40.0) / 3
    assert metrics["test/delta_m"] == pytest.approx(expected, rel=1e-4)
    log = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "val/delta_m" in log.splitlines()[0]


DENSE_PRESETS = {
    "lessismore_nyuv2": {"dataset": "nyuv2", "method": "group_lasso", "balancer": "uncertainty", "lam": 1e-5,
                         "dataset.seg_classes": 40, "dataset.batch_size": 16, "model.depth": 50,
                         "optimizer.lr": 1e-4, "dataset.image_size": [256, 256], "dataset.depth_loss": "mse"},
    "lessismore_celeba": {"dataset": "celeba_mask", "method": "group_lasso", "balancer": "uncertainty", "lam": 1e-5,
                          "dataset.batch_size": 32, "model.depth": 50, "optimizer.lr": 1e-4,
                          "dataset.split": [0.6, 0.2, 0.2]},
    "disparse_nyuv2": {"dataset": "nyuv2", "method": "disparse_dynamic", "balancer": "linear", "sparsity": 0.9,
                       "model.depth": 34, "dataset.tasks": ["seg", "normal"], "k": [1.0, 20.0],
                       "method.update_interval": 50, "method.drop_fraction": 0.5, "optimizer.lr": 1e-3},
    "minmax_nyuv2": {"dataset": "nyuv2", "method": "minmax_dst", "balancer": "minmax", "sparsity": 0.9,
                     "balancer.beta": 10.0, "balancer.gamma": 5.0, "model.depth": 34},
}


@pytest.mark.parametrize("name", sorted(DENSE_PRESETS))
def test_dense_presets_set_the_recipe_and_train_two_steps(data_root, tmp_path, name):
    from omegaconf import OmegaConf

    cfg = compose_config([f"+experiment={name}"])
    for key, expected in DENSE_PRESETS[name].items():
        if key in ("dataset", "method", "balancer"):
            assert cfg.hydra.runtime.choices[key] == expected
        else:
            value = OmegaConf.select(cfg, key)
            value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
            assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected, key
    small = ["dataset.image_size=[32,32]", "model.depth=18", "model.width=0.0625", "dataset.batch_size=2",
             "dataset.eval_batch_size=2", "dataset.num_workers=0"]
    if name != "lessismore_celeba":
        small.append("dataset.seg_classes=40")
    cfg = compose_cfg([f"+experiment={name}", *TRAIN_TINY, *small], data_root=data_root)
    metrics = run(cfg, tmp_path)
    assert metrics["config/method"] == DENSE_PRESETS[name]["method"]
    assert "test/seg/miou" in metrics
