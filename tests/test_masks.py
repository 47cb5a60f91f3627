"""Masks as model state: exact zeros under Adam, fresh optimizer state on regrow, checkpoints and
resume; layer allocations (uniform, global, ERK); per-task mask IoU analysis."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mtlsparse.config import build
from mtlsparse.data.synthetic import Synthetic
from mtlsparse.models.hps import HPS
from mtlsparse.models.stl import STL
from mtlsparse.sparsity.allocation import erk_densities, global_masks, kept_counts, layer_counts, score_masks
from mtlsparse.sparsity.mask_analysis import layer_iou, mask_iou, write_mask_report
from mtlsparse.sparsity.masks import MaskedMethod, TaskMasks, layer_tasks, mask_of, set_mask_
from mtlsparse.train import build_module, build_trainer, run
from mtlsparse.training_state import TrainingState

TASKS = Synthetic(num_tasks=2).tasks
IN_SHAPE = (1, 16, 16)


def hps_model(seed: int = 0, model=HPS) -> HPS:
    """The tiny LeNet HPS the smoke runs train (prunable: conv 20×10×5×5 and fc 50×20)."""
    torch.manual_seed(seed)
    return model(TASKS, IN_SHAPE)


def attach(method, model=None):
    """Set `method` up on `model` (default: a fresh tiny HPS); returns (method, model)."""
    model = hps_model() if model is None else model
    method.setup(model)
    return method, model


def fit_state(model, epoch: int = 0, datamodule=None, max_epochs: int = 30, total_steps: int = 1000):
    """A TrainingState as the training loop builds it, batches from `datamodule` (if given)."""
    source = datamodule.train_dataloader if datamodule is not None else TrainingState().batch_source
    return TrainingState(model=model, epoch=epoch, max_epochs=max_epochs, steps_source=lambda: total_steps,
                         batch_source=lambda: iter(source()))


def train_steps(model, method, optimizer, steps: int) -> None:
    """Optimizer steps on a fixed random batch, with the method's after-step hook."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, *IN_SHAPE, generator=gen), torch.randint(4, (16,), generator=gen)
    for _ in range(steps):
        optimizer.zero_grad()
        sum(F.cross_entropy(out, y) for out in model(x).values()).backward()
        optimizer.step()
        method.after_optimizer_step(optimizer)


def test_masked_weights_stay_exactly_zero_under_adam_and_regrow_with_fresh_state():
    method, model = attach(MaskedMethod(sparsity=0.5))
    layer = method.layers[0]
    mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask_(layer, mask)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, method, optimizer, 5)
    assert layer.weight.grad[~mask].abs().sum() > 0  # masked weights do get gradients...
    assert torch.all(layer.weight[~mask] == 0)  # ...but stay exactly zero
    state = optimizer.state[layer.weight]
    assert torch.all(state["exp_avg"][~mask] == 0) and torch.all(state["exp_avg_sq"][~mask] == 0)

    regrown = (~mask).nonzero()[0].tolist()
    new_mask = mask.clone()
    new_mask[tuple(regrown)] = True
    set_mask_(layer, new_mask)
    assert layer.weight[tuple(regrown)] == 0
    train_steps(model, method, optimizer, 1)
    # first update of the regrown weight is a fresh Adam step: lr·m̂/√v̂ = lr·sign(−g) (bias-corrected)
    grad = layer.weight.grad[tuple(regrown)]
    step = int(state["step"])
    m_hat = (0.1 * grad) / (1 - 0.9**step)
    v_hat = (0.001 * grad**2) / (1 - 0.999**step)
    torch.testing.assert_close(layer.weight[tuple(regrown)], -0.01 * m_hat / (v_hat.sqrt() + 1e-8))


def test_masks_are_model_buffers_in_the_state_dict():
    method, model = attach(MaskedMethod(sparsity=0.5))
    state = model.state_dict()
    names = {f"{layer.name}.weight_mask" for layer in method.layers}
    assert names <= set(state) and all(state[n].dtype == torch.bool for n in names)
    assert set(method.masks()) == {layer.name for layer in method.layers}


def _masks(state_dict):
    return {k: v for k, v in state_dict.items() if k.endswith("weight_mask") or "per_task_masks" in k}


@pytest.mark.parametrize("overrides", [
    ("method=rigl", "sparsity=0.8", "method.update_interval=1", "method.end_step=2"),
    ("method=disparse_static", "sparsity=0.8", "method.num_batches=2"),
])
def test_checkpoint_reloads_masks_into_a_fresh_module(tiny_cfg, tmp_path, overrides):
    cfg = tiny_cfg(*overrides)
    run(cfg, tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    fresh = build_module(cfg, build(cfg, "dataset"))
    assert _masks(fresh.state_dict()).keys() == _masks(saved).keys() != set()
    assert any(not torch.equal(v, saved[k]) for k, v in _masks(fresh.state_dict()).items())
    fresh.load_state_dict(saved, strict=True)
    for key, mask in _masks(fresh.state_dict()).items():
        assert torch.equal(mask, saved[key]), key
    if hasattr(fresh.method, "task_masks"):  # the per-task masks feed the IoU report
        layers = {layer.name for layer in fresh.method.layers}
        assert set(write_mask_report(fresh.method, tmp_path / "report")) == layers
    weights = [layer.weight for layer in fresh.method.layers]
    assert 100 * sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) >= 80 - 0.5


def test_resume_keeps_data_driven_masks(tiny_cfg, tmp_path):
    """SNIP masks come from the checkpoint on resume; on_fit_start must not recompute them."""
    cfg = tiny_cfg("method=snip", "sparsity=0.7", "method.num_batches=1")
    run(cfg, tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    trainer, _ = build_trainer(cfg, tmp_path / "resumed")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt))  # max_epochs already reached: restore only
    for key, mask in _masks(module.state_dict()).items():
        assert torch.equal(mask.cpu(), saved[key]), key


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.8])
def test_erk_counts_sum_to_target_and_densities_are_capped(density):
    shapes = [(20, 10, 5, 5), (50, 20), (4, 50), (64, 32, 3, 3)]
    numels = [math.prod(s) for s in shapes]
    densities = erk_densities(shapes, density)
    assert max(densities) <= 1
    assert sum(d * n for d, n in zip(densities, numels)) == pytest.approx(density * sum(numels))
    uncapped = [i for i, d in enumerate(densities) if d < 1]
    raw = [sum(s) / math.prod(s) for s in shapes]
    ratios = [densities[i] / raw[i] for i in uncapped]  # ER-kernel: density ∝ Σ shape / Π shape
    assert ratios == pytest.approx([ratios[0]] * len(ratios))
    counts = layer_counts(shapes, density, "erk")
    assert sum(counts) == round(density * sum(numels))
    assert all(0 <= c <= n for c, n in zip(counts, numels))
    assert all(abs(c - d * n) <= 1 for c, d, n in zip(counts, densities, numels))


def test_erk_makes_small_layers_dense_when_needed():
    densities = erk_densities([(20, 10, 5, 5), (50, 20), (4, 50)], 0.3)
    assert densities[2] == 1.0 and densities[1] == 1.0 and densities[0] < 0.3


def test_kept_counts_round_to_the_exact_total_without_overfilling_a_layer():
    assert kept_counts([10, 1000], [1.0, 0.5], 0.51) == [10, 505]  # the full layer gets none of the shortfall


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_allocations_hit_the_target(allocation):
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(shape, generator=gen) for shape in ((20, 10, 5, 5), (50, 20), (7, 3))]
    masks = score_masks(scores, 0.1, allocation)
    total = sum(s.numel() for s in scores)
    assert sum(int(m.sum()) for m in masks) == round(0.1 * total)
    if allocation == "uniform":
        assert all(abs(int(m.sum()) - 0.1 * m.numel()) <= 1 for m in masks)


def test_global_allocation_keeps_the_top_scores_across_layers():
    scores = [torch.tensor([[0.9, 0.1], [0.5, 0.2]]), torch.tensor([0.8, 0.3, 0.7, 0.05])]
    masks = global_masks(scores, 0.5)
    assert masks[0].tolist() == [[True, False], [True, False]] and masks[1].tolist() == [True, False, True, False]


def test_layer_tasks_know_shared_and_task_specific_layers():
    method, hps = attach(MaskedMethod(scope={"heads": True}))
    assert layer_tasks(hps, method.layers) == [("t0", "t1"), ("t0", "t1"), ("t0",), ("t1",)]
    method, stl = attach(MaskedMethod(), hps_model(model=STL))
    assert layer_tasks(stl, method.layers) == [("t0",), ("t0",), ("t1",), ("t1",)]


def test_mask_iou_and_pairwise_layer_mean():
    a, b, c = (torch.tensor(v, dtype=torch.bool) for v in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]))
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    ious = layer_iou({"conv": {"t0": a, "t1": b, "t2": c}, "head": {"t0": a}})
    assert ious == {"conv": pytest.approx((1 / 3 + 1 + 1 / 3) / 3)}  # single-task layers are skipped


def test_write_mask_report_writes_json_and_plot(tmp_path):
    method, model = attach(MaskedMethod())
    store = TaskMasks(method.layers, layer_tasks(model, method.layers))
    store.set_(0, torch.stack([mask_of(method.layers[0]), ~mask_of(method.layers[0])]))
    method.task_masks = store.as_dict
    ious = write_mask_report(method, tmp_path)
    assert ious == {method.layers[0].name: 0.0, method.layers[1].name: 1.0}
    assert json.loads((tmp_path / "mask_iou.json").read_text()) == ious
    assert (tmp_path / "mask_iou.png").stat().st_size > 0
    assert write_mask_report(MaskedMethod(), tmp_path / "none") is None
