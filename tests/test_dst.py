"""Dynamic sparse training: constant mask counts, RigL/SET/DiSparse regrowth, cosine drop schedule,
min-max DST epochs, regrown weights at zero with fresh optimizer state, targets end to end."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from mtlsparse.sparsity.dst import SET, DiSparseDynamic, MinMaxDST, RigL, drop_smallest
from mtlsparse.sparsity.masks import mask_of
from mtlsparse.train import run

from test_masks import attach, fit_state, train_steps


def counts(method) -> list[int]:
    return [int(mask_of(layer).sum()) for layer in method.layers]


def masks(method) -> list[torch.Tensor]:
    return [mask_of(layer).clone() for layer in method.layers]


def hand_made_grads(method, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in method.layers:
        layer.weight.grad = torch.randn(layer.weight.shape, generator=gen)


@pytest.mark.parametrize("init", ["erk", "uniform"])
def test_initial_masks_hit_the_target(init):
    method, _ = attach(RigL(sparsity=0.9, init=init))
    total = sum(layer.weight.numel() for layer in method.layers)
    assert sum(counts(method)) == round(0.1 * total)
    assert all(torch.all(layer.weight[~mask_of(layer)] == 0) for layer in method.layers)


@pytest.mark.parametrize("cls", [SET, RigL])
def test_mask_counts_per_layer_stay_constant_across_rewires(cls):
    method, _ = attach(cls(sparsity=0.8))
    start = counts(method)
    for step in range(4):
        hand_made_grads(method, step)
        method.steps.fill_(step + 1)
        before = masks(method)
        method.rewire(0.3)
        assert counts(method) == start
        assert any(not torch.equal(a, b) for a, b in zip(before, masks(method)))


def test_rigl_regrows_exactly_the_largest_gradient_pruned_positions():
    method, _ = attach(RigL(sparsity=0.8))
    hand_made_grads(method)
    before = masks(method)
    expected = []
    for layer, mask in zip(method.layers, before):
        k = round(0.3 * int(mask.sum()))
        kept = drop_smallest(mask, layer.weight, k)
        active_abs = layer.weight.abs()[mask]
        dropped_abs = layer.weight.abs()[mask & ~kept]
        assert int((mask & ~kept).sum()) == k and dropped_abs.max() <= active_abs.sort().values[k]
        grad = layer.weight.grad.abs().flatten().clone()
        grad[kept.flatten()] = -1
        grow = torch.zeros_like(kept).flatten()
        grow[grad.topk(k).indices] = True
        expected.append(kept | grow.view_as(kept))
    method.rewire(0.3)
    for exp, layer in zip(expected, method.layers):
        assert torch.equal(mask_of(layer), exp)


def test_set_regrowth_is_random_but_the_same_for_the_same_seed_and_step():
    a, _ = attach(SET(sparsity=0.8, seed=3))
    b, _ = attach(SET(sparsity=0.8, seed=3))
    c, _ = attach(SET(sparsity=0.8, seed=4))
    for method in (a, b, c):
        method.steps.fill_(100)
        method.rewire(0.3)
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b)))  # what two DDP ranks compute
    assert any(not torch.equal(x, y) for x, y in zip(masks(a), masks(c)))
    a.steps.fill_(200)
    before = masks(a)
    a.rewire(0.3)
    assert any(not torch.equal(x, y) for x, y in zip(before, masks(a)))


def test_regrown_weights_start_at_zero_with_fresh_optimizer_state():
    method, model = attach(RigL(sparsity=0.8, update_interval=3, end_step=100, drop_fraction=0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, method, optimizer, 2)
    before = masks(method)
    train_steps(model, method, optimizer, 1)  # step 3: rewire after the optimizer step
    for layer, old in zip(method.layers, before):
        new = mask_of(layer)
        regrown = new & ~old
        assert regrown.any() and torch.all(layer.weight[regrown] == 0)
        state = optimizer.state[layer.weight]
        assert torch.all(state["exp_avg"][regrown] == 0) and torch.all(state["exp_avg_sq"][regrown] == 0)
        assert torch.all(layer.weight[~new] == 0) and torch.all(state["exp_avg"][~new] == 0)


def test_drop_fraction_follows_cosine_decay_on_update_steps():
    method, _ = attach(RigL(sparsity=0.8, drop_fraction=0.3, update_interval=10, end_step=100))
    for step in range(0, 120, 5):
        expected = 0.15 * (1 + math.cos(math.pi * step / 100)) if step % 10 == 0 and step < 100 else 0.0
        assert method.fraction_at(step) == pytest.approx(expected)


def test_end_fraction_sets_the_last_rewire_step():
    method, model = attach(SET(sparsity=0.5, end_fraction=0.75))
    method.on_fit_start(fit_state(model, total_steps=400))
    assert method.rewire_until == 300 and method.end_step is None


def test_minmax_dst_rewires_at_the_configured_epochs_only():
    method, model = attach(MinMaxDST(sparsity=0.8, regrow_fraction=0.2, update_every=2, end_epoch=4))
    method.set_budget(8)
    start = counts(method)
    changed = []
    for epoch in range(8):
        hand_made_grads(method, epoch)
        before = masks(method)
        method.on_train_epoch_end(fit_state(model, epoch))
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, masks(method))))
        assert counts(method) == start
    assert changed == [False, True, False, True, False, False, False, False]


def test_disparse_dynamic_regrows_the_or_of_per_task_gradient_tops(datamodule):
    method, model = attach(DiSparseDynamic(sparsity=0.8, num_batches=1))
    method.on_fit_start(fit_state(model, datamodule=datamodule))  # it keeps the state's batch source
    start = counts(method)
    kept = mask_of(method.layers[0]).clone()
    kept[kept.nonzero()[:40].unbind(1)] = False  # pretend 40 were dropped
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(2, *kept.shape, generator=gen)
    grow = method.regrow(0, kept, score, 40)
    assert int(grow.sum()) == 40 and not torch.any(grow & kept)
    candidates = [torch.where(kept, -1.0, s).flatten() for s in score]

    def union_of_tops(n: int) -> set[int]:
        return set().union(*(set(c.topk(n).indices.tolist()) for c in candidates))

    # the OR of both tasks' top-n regrow sets, n (the same for both) where the OR reaches 40
    n = next(n for n in range(1, 41) if len(union_of_tops(n)) >= 40)
    assert union_of_tops(n - 1) <= set(grow.flatten().nonzero().flatten().tolist()) <= union_of_tops(n)
    task_masks = method.task_masks()[method.layers[0].name]
    assert torch.equal(task_masks["t0"] | task_masks["t1"], kept | grow)

    method.rewire(0.3)  # with real per-task gradients from a training batch
    assert counts(method) == start
    assert all(layer.weight.grad is None for layer in method.layers)


TINY_DST = {
    "set": ["method.update_interval=1", "method.end_step=2", "method.drop_fraction=0.1", "test_ckpt=last"],
    "rigl": ["method.update_interval=1", "method.end_step=2", "test_ckpt=last"],
    "disparse_dynamic": ["method.update_interval=1", "method.end_step=2", "test_ckpt=last"],
    "minmax_dst": ["method.update_every=1", "method.end_epoch=0", "test_ckpt=last"],
}


@pytest.mark.parametrize("method", sorted(TINY_DST))
def test_dst_methods_hold_the_target_end_to_end(tiny_cfg, tmp_path, method):
    cfg = tiny_cfg(f"method={method}", "sparsity=0.9", "trainer.max_epochs=2", *TINY_DST[method])
    metrics = run(cfg, tmp_path)
    assert metrics["sparsity/param"] == pytest.approx(90, abs=0.5)


def test_a_run_too_short_for_any_rewire_says_so(caplog):
    method, model = attach(RigL(sparsity=0.8, update_interval=100))
    with caplog.at_level(logging.WARNING):
        method.on_fit_start(fit_state(model, total_steps=1000))  # rewires until step 750
    assert "does no rewire" not in caplog.text
    method, model = attach(RigL(sparsity=0.8, update_interval=100))
    with caplog.at_level(logging.WARNING):
        method.on_fit_start(fit_state(model, total_steps=40))  # rewiring ends at step 30
    assert "RigL does no rewire" in caplog.text and "method.update_interval=100" in caplog.text
    caplog.clear()
    minmax = MinMaxDST(sparsity=0.8, update_every=2)
    with caplog.at_level(logging.WARNING):
        minmax.set_budget(30)
    assert "does no rewire" not in caplog.text
    with caplog.at_level(logging.WARNING):
        minmax.set_budget(2)  # last rewire epoch 0, first due after epoch 1
    assert "MinMaxDST does no rewire" in caplog.text and "method.update_every=2" in caplog.text
