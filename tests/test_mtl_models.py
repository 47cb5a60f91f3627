"""MDMTN, MTAN and KDMTL: output shapes, the model contract, learned fusion/attention, distillation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtlsparse.models.kdmtl import KDMTL
from mtlsparse.models.mdmtn import MDMTN
from mtlsparse.models.mtan import MTAN
from mtlsparse.sparsity.layers import prunable_layers
from mtlsparse.tasks import Task

TASKS = {"a": Task("a", num_classes=10), "b": Task("b", num_classes=4)}
CIFAR10MNIST = {"channels": (16, 32), "kernel_size": 3, "hidden": 32, "batch_norm": True}
SHAPES = [((1, 36, 36), {}), ((1, 28, 28), {}), ((3, 32, 32), CIFAR10MNIST)]


def build(cls: type, in_shape=(1, 16, 16), **kwargs):
    if cls is KDMTL:
        kwargs.setdefault("allow_untrained_teachers", True)
    if cls is MDMTN and kwargs.get("batch_norm"):
        kwargs.setdefault("monitor_channels", 32)
    return cls(TASKS, in_shape, **kwargs)


@pytest.mark.parametrize("cls", [MDMTN, MTAN, KDMTL])
@pytest.mark.parametrize("in_shape, kwargs", SHAPES)
def test_outputs_have_one_logit_row_per_sample_and_task(cls, in_shape, kwargs):
    model = build(cls, in_shape, **kwargs)
    out = model(torch.randn(3, *in_shape))
    assert {n: tuple(v.shape) for n, v in out.items()} == {"a": (3, 10), "b": (3, 4)}


@pytest.mark.parametrize("cls", [MDMTN, MTAN, KDMTL])
def test_shared_and_task_parameters_partition_the_model(cls):
    model = build(cls)
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in model.task_parameters(t)} for t in TASKS]
    assert shared and all(per_task)
    assert not shared & per_task[0] and not shared & per_task[1] and not per_task[0] & per_task[1]
    assert shared | per_task[0] | per_task[1] == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("cls", [MDMTN, MTAN, KDMTL])
def test_sparsity_methods_see_backbones_without_input_layers_and_heads(cls):
    model = build(cls)
    layers = {id(layer.module) for layer in prunable_layers(model)}
    assert layers
    assert not layers & {id(m) for m in model.input_layers()}
    assert not layers & {id(m) for m in model.head_modules()}


def test_mdmtn_monitor_matches_the_paper_and_is_sparsified():
    model = MDMTN(TASKS, (1, 28, 28))
    assert model.monitors["a"][-2].in_features == 2880  # Conv(1→20,k5)-pool → 20·12·12
    cifar = MDMTN(TASKS, (3, 32, 32), monitor_channels=32, **CIFAR10MNIST)
    assert cifar.monitors["a"][-2].in_features == 7200  # Conv(3→32,k3)-pool → 32·15·15
    names = [layer.name for layer in prunable_layers(model)]
    assert "monitors.a.4" in names and "trunk.7" in names
    assert len(model.input_layers()) == 3  # trunk + one monitor per task


def test_mdmtn_alphas_are_registered_and_trained():
    model = MDMTN(TASKS, (1, 16, 16))
    assert {"alphas.a", "alphas.b"} <= set(model.state_dict())
    torch.testing.assert_close(model.state_dict()["alphas.a"], torch.tensor([0.5, 0.5]))
    assert any(p is model.alphas["a"] for p in model.task_parameters("a"))
    out = model(torch.randn(4, 1, 16, 16))
    (out["a"].square().mean() + out["b"].square().mean()).backward()
    for name in TASKS:
        assert model.alphas[name].grad is not None and torch.all(model.alphas[name].grad != 0)
    assert any(p is model.alphas["a"] for p in model.parameters())


def test_mdmtn_fusion_is_alpha_weighted_sum_of_trunk_and_monitor():
    model = MDMTN(TASKS, (1, 16, 16), alpha_init=(1.0, 0.0))
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](model.trunk(x)))
    with torch.no_grad():
        model.alphas["a"].copy_(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(model(x)["a"], model.heads["a"](2 * model.monitors["a"](x)))


def test_mtan_attention_is_per_task_and_every_part_is_trained():
    model = MTAN(TASKS, (1, 16, 16))
    a, b = (list(model.attention[t].parameters()) for t in TASKS)
    assert len(a) == len(b) > 0
    assert not {id(p) for p in a} & {id(p) for p in b}
    assert len(model.attention["a"]) == 3  # one stage per conv block + one for the FC layer
    out = model(torch.randn(4, 1, 16, 16))
    (out["a"].square().mean() + out["b"].square().mean()).backward()
    for p in [*a, *b, *model.trunk.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_mtan_task_output_depends_only_on_its_own_attention():
    model = MTAN(TASKS, (1, 16, 16))
    out = model(torch.randn(4, 1, 16, 16))
    out["a"].sum().backward()
    assert all(p.grad is None for p in model.attention["b"].parameters())


def test_kdmtl_distillation_loss_trains_trunk_and_adaptors_not_teachers():
    from mtlsparse.balancers import Linear
    from mtlsparse.module import MultiTaskModule
    from mtlsparse.sparsity import Dense

    model = build(KDMTL)
    teachers = [p for t in model._teachers.values() for p in t.parameters()]
    model.train()
    model(torch.randn(8, 1, 16, 16))
    aux = model.auxiliary_loss()
    assert aux is not None and aux.grad_fn is not None and float(aux.detach()) > 0
    aux.backward()
    for p in [*model.trunk.parameters(), *model.adaptors.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teachers)
    assert not {id(p) for p in teachers} & {id(p) for p in model.parameters()}
    assert not any(k.startswith("_teachers") for k in model.state_dict())
    module = MultiTaskModule(model, Linear(list(TASKS)), Dense(), optimizer=lambda groups: torch.optim.Adam(groups))
    optimizer = module.configure_optimizers()
    assert not {id(p) for p in teachers} & {id(p) for g in optimizer.param_groups for p in g["params"]}
    model.eval()
    model(torch.randn(2, 1, 16, 16))
    assert model.auxiliary_loss() is None
    assert all(not t.training for t in model._teachers.values())


def test_kdmtl_loss_is_zero_when_adaptors_reproduce_the_teacher_features():
    model = build(KDMTL, kd_weight=2.0)
    for name, teacher in model._teachers.items():
        teacher.load_state_dict(model.trunk.state_dict())
        torch.nn.init.eye_(model.adaptors[name].weight)
        torch.nn.init.zeros_(model.adaptors[name].bias)
    model.train()
    model(torch.randn(4, 1, 16, 16))
    assert float(model.auxiliary_loss()) == pytest.approx(0.0, abs=1e-10)


def test_kdmtl_without_teachers_tells_how_to_train_them():
    with pytest.raises(ValueError, match=r"model=stl.*model\.teacher_ckpt="):
        KDMTL(TASKS, (1, 16, 16))
    with pytest.raises(FileNotFoundError, match="no such file"):
        KDMTL(TASKS, (1, 16, 16), teacher_ckpt="/nonexistent/best.ckpt")


@pytest.fixture(scope="module")
def stl_checkpoint(tmp_path_factory) -> Path:
    """A real STL run's best checkpoint on the tiny synthetic data (tasks t0, t1; 1×16×16)."""
    from mtlsparse.train import run

    from conftest import TINY, compose_cfg

    root = tmp_path_factory.mktemp("stl")
    run(compose_cfg(TINY + ["model=stl"], data_root=root / "data"), root / "run")
    return next((root / "run" / "checkpoints").glob("best-*.ckpt"))


def test_kdmtl_loads_teachers_from_an_stl_checkpoint(stl_checkpoint, tiny_cfg, tmp_path):
    from mtlsparse.train import run

    tasks = {t: Task(t, num_classes=4) for t in ("t0", "t1")}
    model = KDMTL(tasks, (1, 16, 16), teacher_ckpt=str(stl_checkpoint))
    state = torch.load(stl_checkpoint, weights_only=True)["state_dict"]
    for task, teacher in model._teachers.items():
        for key, value in teacher.state_dict().items():
            torch.testing.assert_close(value, state[f"model.trunks.{task}.{key}"])
    metrics = run(tiny_cfg("model=kdmtl", f"model.teacher_ckpt='{stl_checkpoint}'"), tmp_path)
    assert 0 <= metrics["test/mean_acc"] <= 1


def test_kdmtl_checkpoint_mismatch_is_a_clear_error(stl_checkpoint):
    tasks = {t: Task(t, num_classes=4) for t in ("t0", "t1")}
    with pytest.raises(ValueError, match="does not match this model's architecture"):
        KDMTL(tasks, (1, 16, 16), hidden=30, teacher_ckpt=str(stl_checkpoint))
    with pytest.raises(ValueError, match="no STL trunk for task 'left'"):
        KDMTL({"left": Task("left", num_classes=4)}, (1, 16, 16), teacher_ckpt=str(stl_checkpoint))


@pytest.mark.parametrize("balancer", ["balancer=linear", "balancer=mgda", "balancer=mgda balancer.mode=representation",
                                      "balancer=upgrad", "balancer=upgrad balancer.mode=representation",
                                      "balancer=gradnorm balancer.mode=representation", "balancer=uncertainty"])
def test_kdmtl_distillation_reaches_the_optimiser_in_every_balancer_mode(balancer, tiny_cfg, monkeypatch):
    """The adaptors learn only from the distillation term: they get a gradient iff it reached the loss."""
    from hydra.utils import instantiate

    from mtlsparse.train import build_module

    cfg = tiny_cfg("model=kdmtl", "model.allow_untrained_teachers=true", *balancer.split())
    datamodule = instantiate(cfg.dataset)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    module.train()
    module.zero_grad()
    loss = module.training_step(next(iter(datamodule.train_dataloader())), 0)
    loss.backward()
    grads = [p.grad for p in module.model.adaptors.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), balancer
