"""CIFAR-100 as 20 superclass tasks (on a tiny fake in torchvision's format) and the VGG-16 multi-task model."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from mtlsparse.data.cifar100_20 import (
    IGNORE_INDEX,
    Cifar100Superclasses,
    locate,
    read_split,
    superclass_mapping,
    superclass_targets,
)
from mtlsparse.models.vgg import VGG16MT
from mtlsparse.sparsity.layers import prunable_layers
from mtlsparse.tasks import Task

from fakes import write_fake_cifar100


@pytest.mark.parametrize("key", [str.encode, str], ids=["bytes_keys", "str_keys"])
def test_reads_the_torchvision_pickles(tmp_path, key):
    superclass_of_fine = write_fake_cifar100(tmp_path, key=key)
    directory = locate(tmp_path)
    split = read_split(directory / "train")
    with open(directory / "train", "rb") as f:
        raw = pickle.load(f)
    data = raw[key("data")]
    assert split.images.dtype == torch.uint8 and split.images.shape == (200, 3, 32, 32)
    assert torch.equal(split.images[3, 1], torch.from_numpy(data[3, 1024:2048].reshape(32, 32)))  # green plane
    assert split.fine.tolist() == raw[key("fine_labels")]
    assert split.coarse.tolist() == superclass_of_fine[split.fine.numpy()].tolist()


def test_superclass_mapping_and_targets_are_derived_from_the_labels(tmp_path):
    superclass_of_fine = write_fake_cifar100(tmp_path)
    split = read_split(locate(tmp_path) / "train")
    mapping = superclass_mapping(split.fine, split.coarse)
    assert mapping.superclass.tolist() == superclass_of_fine.tolist()
    for k in range(20):
        members = np.flatnonzero(superclass_of_fine == k)  # increasing fine labels → indices 0..4
        assert mapping.index[members].tolist() == [0, 1, 2, 3, 4]
    targets = superclass_targets(split.fine, mapping)
    assert targets.shape == (200, 20) and targets.dtype == torch.int64
    valid = targets != IGNORE_INDEX
    assert valid.sum(dim=1).eq(1).all()  # exactly one task per image: its superclass
    rows = torch.arange(200)
    assert torch.equal(valid.float().argmax(dim=1), split.coarse)
    assert torch.equal(targets[rows, split.coarse], mapping.index[split.fine])


def test_inconsistent_or_unbalanced_labels_are_rejected():
    fine = torch.arange(100)
    coarse = torch.arange(100) // 5
    with pytest.raises(ValueError, match="occurs under two coarse labels"):
        superclass_mapping(torch.cat([fine, fine[:1]]), torch.cat([coarse, coarse[:1] + 1]))
    unbalanced = coarse.clone()
    unbalanced[0] = 1  # superclass 0 gets 4 fine labels, superclass 1 gets 6
    with pytest.raises(ValueError, match="5 fine labels each"):
        superclass_mapping(fine, unbalanced)
    with pytest.raises(ValueError, match="expected each fine label 0..99 to occur"):
        superclass_mapping(fine[:-1], coarse[:-1])


def test_missing_data_names_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        locate(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message
    assert "cifar-100-python.tar.gz" in message and "dataset.download=true" in message


def test_datamodule_has_20_five_way_tasks_with_ignored_other_superclasses(tmp_path):
    superclass_of_fine = write_fake_cifar100(tmp_path)
    dm = Cifar100Superclasses(root=str(tmp_path), batch_size=64, val_fraction=0.2, seed=1)
    assert list(dm.tasks) == [f"c{k}" for k in range(20)]
    assert all(t.num_classes == 5 and t.ignore_index == IGNORE_INDEX for t in dm.tasks.values())
    assert dm.input_shape == (3, 32, 32)
    dm.setup()
    assert dm.num_train_samples == 160 and len(dm.datasets["val"]) == 40 and len(dm.datasets["test"]) == 100
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    targets = torch.stack([y[f"c{k}"] for k in range(20)], dim=1)
    assert ((targets != IGNORE_INDEX).sum(dim=1) == 1).all()
    assert dm.superclass_names["c3"] == "super3"
    assert dm.class_names["c3"] == [f"fine{f}" for f in np.flatnonzero(superclass_of_fine == 3)]
    again = Cifar100Superclasses(root=str(tmp_path), val_fraction=0.2, seed=1)
    again.setup()
    assert torch.equal(again.val_indices, dm.val_indices)  # seeded hold-out


def test_datamodule_normalises_per_channel(tmp_path):
    write_fake_cifar100(tmp_path)
    dm = Cifar100Superclasses(root=str(tmp_path), val_fraction=0.0)
    dm.setup()
    x, _ = dm.datasets["train"][torch.arange(200)]
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_tiny_training_run_on_fake_cifar100_with_vgg(tiny_cfg, tmp_path):
    from mtlsparse.train import run

    write_fake_cifar100(tmp_path / "data", n_train=400, n_test=100)
    metrics = run(tiny_cfg("dataset=cifar100_20", "model=vgg16_mt", "model.width=0.125", "dataset.val_fraction=0.25"),
                  tmp_path / "run")
    for k in range(20):
        assert 0 <= metrics[f"test/c{k}/acc"] <= 1 and np.isfinite(metrics[f"test/c{k}/loss"])
    assert 0 <= metrics["test/mean_acc"] <= 1


# ------------------------------------------------------------------ VGG-16 multi-task model
def tasks(*classes: int) -> dict[str, Task]:
    return {f"t{i}": Task(f"t{i}", num_classes=c) for i, c in enumerate(classes)}


def convs(model: VGG16MT) -> list[nn.Conv2d]:
    return [m for m in model.trunk if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("in_shape, pools", [((3, 32, 32), 5), ((1, 16, 16), 4), ((3, 64, 40), 5)])
def test_vgg_outputs_per_task_for_cifar_and_small_inputs(in_shape, pools):
    model = VGG16MT(tasks(5, 3), in_shape, width=0.125)
    out = model(torch.randn(2, *in_shape))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"t0": (2, 5), "t1": (2, 3)}
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.trunk) == pools  # pools stop at a 1-pixel map


def test_vgg_width_scales_the_channels_of_configuration_d():
    full = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert [c.out_channels for c in convs(VGG16MT(tasks(5), (3, 32, 32)))] == full
    quarter = VGG16MT(tasks(5), (3, 32, 32), width=0.25)
    assert [c.out_channels for c in convs(quarter)] == [c // 4 for c in full]
    assert quarter.heads["t0"].in_features == 128
    assert sum(isinstance(m, nn.BatchNorm2d) for m in quarter.trunk) == 13
    plain = VGG16MT(tasks(5), (3, 32, 32), width=0.25, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.trunk)


def test_vgg_hidden_heads():
    model = VGG16MT(tasks(5), (3, 32, 32), width=0.125, head_hidden=32)
    head = model.heads["t0"]
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (64, 32, 5)


def test_vgg_multi_task_model_contract():
    model = VGG16MT(tasks(5, 5), (3, 32, 32), width=0.125).eval()
    x = torch.randn(4, 3, 32, 32)
    rep = model.encode(x)
    assert rep.shape == (4, 64)
    decoded, out = model.decode(rep), model(x)
    assert all(torch.equal(decoded[t], out[t]) for t in out)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.trunk.parameters()}
    assert {id(p) for p in model.task_parameters("t1")} == {id(p) for p in model.heads["t1"].parameters()}
    assert list(model.backbone_modules()) == [model.trunk]
    assert list(model.input_layers()) == [convs(model)[0]]
    assert list(model.head_modules()) == list(model.heads.values())
    layers = [layer.module for layer in prunable_layers(model)]
    assert layers == convs(model)[1:]  # the input conv and the heads are not sparsified by default


@pytest.mark.parametrize("kwargs, message", [({"width": 0}, "width must be > 0"),
                                             ({"head_hidden": 0}, "head_hidden must be a positive int")])
def test_vgg_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VGG16MT(tasks(5), (3, 32, 32), **kwargs)
