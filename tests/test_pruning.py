"""Prune-and-finetune methods: magnitude (one-shot, gradual), reweighted ℓ1 stages, SNIP, DiSparse static."""
from __future__ import annotations

import pytest
import torch

from mtlsparse.sparsity.allocation import union_topk
from mtlsparse.sparsity.magnitude import Magnitude
from mtlsparse.sparsity.masks import mask_of
from mtlsparse.sparsity.reweighted_l1 import ReweightedL1
from mtlsparse.sparsity.schedules import cubic_sparsity
from mtlsparse.sparsity.snip import SNIP, DiSparseStatic, task_gradient_magnitudes
from mtlsparse.train import run

from test_masks import TASKS, attach, fit_state, train_steps


def mask_sparsity(method) -> float:
    masks = [mask_of(layer) for layer in method.layers]
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def test_magnitude_one_shot_prunes_the_smallest_weights_at_prune_epoch():
    method, _ = attach(Magnitude(sparsity=0.8, prune_epoch=2))
    method.set_budget(30)
    before = [layer.weight.detach().clone() for layer in method.layers]
    for epoch in range(2):
        method.on_train_epoch_end(fit_state(None, epoch))
    assert mask_sparsity(method) == 0
    method.on_train_epoch_end(fit_state(None, 2))
    assert mask_sparsity(method) == pytest.approx(0.8, abs=1e-3)
    kept = torch.cat([w[mask_of(layer)].abs() for w, layer in zip(before, method.layers)])
    pruned = torch.cat([w[~mask_of(layer)].abs() for w, layer in zip(before, method.layers)])
    assert pruned.max() <= kept.min()  # one global |w| threshold
    assert all(torch.all(layer.weight[~mask_of(layer)] == 0) for layer in method.layers)


def test_magnitude_gradual_follows_the_cubic_schedule_and_never_revives():
    method, _ = attach(Magnitude(sparsity=0.9, schedule="gradual", start_epoch=1, end_epoch=4, allocation="uniform"))
    method.set_budget(30)
    assert method.target_after(0) is None and method.target_after(5) is None
    previous = torch.ones(0, dtype=torch.bool)
    for epoch in range(1, 5):
        expected = 0.9 * (1 - (1 - epoch / 4) ** 3)
        assert method.target_after(epoch) == pytest.approx(expected)
        assert cubic_sparsity(epoch / 4, 0.9) == pytest.approx(expected)
        method.on_train_epoch_end(fit_state(None, epoch))
        assert mask_sparsity(method) == pytest.approx(expected, abs=1e-3)
        current = torch.cat([mask_of(layer).flatten() for layer in method.layers])
        assert not previous.numel() or not torch.any(current & ~previous)  # pruned weights stay pruned
        previous = current


def test_reweighted_l1_stage_boundaries():
    """pretrain 1 epoch, reweight epochs 1–3 (R refreshed every 2), prune at the end of epoch 3, retrain."""
    method, model = attach(ReweightedL1(sparsity=0.75, c=1e-3, pretrain_epochs=1, reweight_epochs=3, refresh_every=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.on_fit_start(fit_state(model, max_epochs=6))
    stages = [method.stage(e) for e in range(6)]
    assert stages == ["pretrain", "reweight", "reweight", "reweight", "retrain", "retrain"]

    # pretrain: no penalty, no shrinkage, R untouched
    assert method.penalty() is None
    weights = [layer.weight.detach().clone() for layer in method.layers]
    method.after_optimizer_step(optimizer)
    assert all(torch.equal(w, layer.weight) for w, layer in zip(weights, method.layers))
    assert all(torch.all(r == 1) for r in method.reweights())

    def end_epoch(epoch):
        method.on_train_epoch_end(fit_state(model, epoch, max_epochs=6))

    def expected_r():
        return [1 / (layer.weight.detach().abs() + method.delta) for layer in method.layers]

    end_epoch(0)  # reweight stage starts: R from the current weights
    torch.testing.assert_close(method.reweights(), expected_r())
    assert method.penalty() is not None
    weights = [layer.weight.detach().clone() for layer in method.layers]
    r = [x.clone() for x in method.reweights()]
    method.after_optimizer_step(optimizer)  # prox of lr·c·R|w|
    for w, x, layer in zip(weights, r, method.layers):
        torch.testing.assert_close(layer.weight.detach(), torch.sign(w) * (w.abs() - 0.1 * 1e-3 * x).clamp_min(0))
    assert any(torch.any(layer.weight == 0) for layer in method.layers)

    end_epoch(1)  # one reweight epoch done: no refresh
    assert all(torch.equal(a, b) for a, b in zip(method.reweights(), r))
    end_epoch(2)  # two reweight epochs done: refresh
    torch.testing.assert_close(method.reweights(), expected_r())
    assert mask_sparsity(method) == 0
    end_epoch(3)  # last reweight epoch: hard prune per layer to the target
    assert mask_sparsity(method) == pytest.approx(0.75, abs=1e-3)
    assert all(abs(1 - int(mask_of(layer).sum()) / layer.weight.numel() - 0.75) < 1e-3 for layer in method.layers)
    assert method.penalty() is None

    # retrain: masked weights stay zero, no more shrinkage
    train_steps(model, method, torch.optim.Adam(model.parameters(), lr=1e-2), 3)
    assert all(torch.all(layer.weight[~mask_of(layer)] == 0) for layer in method.layers)
    assert all(torch.all(layer.weight[mask_of(layer)] != 0) for layer in method.layers)


def test_snip_keeps_the_top_summed_task_sensitivities(datamodule):
    method, model = attach(SNIP(sparsity=0.9, num_batches=2))
    module = fit_state(model, datamodule=datamodule)
    weights = [layer.weight.detach().clone() for layer in method.layers]
    datamodule._shuffle_generator.manual_seed(0)
    grads = task_gradient_magnitudes(module, method.layers, 2)
    datamodule._shuffle_generator.manual_seed(0)
    method.on_fit_start(module)
    assert all(layer.weight.grad is None for layer in method.layers)  # autograd.grad: nothing left in .grad
    scores = [w.abs() * (g0 + g1) for w, g0, g1 in zip(weights, grads["t0"], grads["t1"])]
    flat = torch.cat([s.flatten() for s in scores])
    kept = torch.cat([mask_of(layer).flatten() for layer in method.layers])
    assert int(kept.sum()) == round(0.1 * flat.numel())
    assert flat[~kept].max() <= flat[kept].min()
    assert bool(method.initialized)
    # per-task SNIP masks for the analysis: each task's own top 10%
    for task, g in grads.items():
        own = torch.cat([(w.abs() * x).flatten() for w, x in zip(weights, g)])
        mask = torch.cat([m[task].flatten() for m in method.task_masks().values()])
        assert own[~mask].max() <= own[mask].min() and int(mask.sum()) == int(kept.sum())


def test_union_topk_keeps_what_any_task_keeps_at_one_keep_ratio():
    a = torch.tensor([6.0, 5, 4, 3, 2, 1, 9, 8, -torch.inf, -torch.inf])  # last four: task-specific entries
    b = torch.tensor([1.0, 2, 3, 4, 5, 6, -torch.inf, -torch.inf, 7, 0])
    keep, (keep_a, keep_b), q = union_topk([a, b], 6)
    # each task keeps its top 3 of 8 scored entries (q = 3/8): a → {6, 7, 0}, b → {8, 5, 4}
    assert q == pytest.approx(3 / 8)
    assert keep_a.nonzero().flatten().tolist() == [0, 6, 7]
    assert keep_b.nonzero().flatten().tolist() == [4, 5, 8]
    assert torch.equal(keep, keep_a | keep_b)


def test_disparse_static_union_semantics_on_known_scores():
    """Shared weights: kept iff any task keeps them; heads: their own task's mask."""
    method, _ = attach(DiSparseStatic(sparsity=0.5, scope={"heads": True}))
    gen = torch.Generator().manual_seed(0)
    shapes = [layer.weight.shape for layer in method.layers]  # conv, fc (shared), head t0, head t1
    scores = {t: [torch.rand(s, generator=gen) for s in shapes] for t in TASKS}
    scores["t0"][3].zero_()  # t0's loss does not depend on t1's head (and vice versa)
    scores["t1"][2].zero_()
    masks, task_masks = method.select(scores)
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == total // 2
    q = float(method.keep_ratio)
    for task, own_layers in (("t0", [0, 1, 2]), ("t1", [0, 1, 3])):
        flat = torch.cat([scores[task][i].flatten() for i in own_layers])
        keep = torch.cat([task_masks[i][list(method.per_task_masks.tasks[i]).index(task)].flatten()
                          for i in own_layers])
        assert abs(int(keep.sum()) - q * flat.numel()) <= 1  # every task keeps the same top share q
        assert flat[~keep].max() <= flat[keep].min()  # ...of its own scores
    for i in (0, 1):
        assert torch.equal(masks[i], task_masks[i][0] | task_masks[i][1])  # shared: OR
    assert torch.equal(masks[2], task_masks[2][0]) and torch.equal(masks[3], task_masks[3][0])  # heads: own


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_disparse_keep_ratio_search_hits_the_target(sparsity):
    method, _ = attach(DiSparseStatic(sparsity=sparsity))
    gen = torch.Generator().manual_seed(1)
    scores = {t: [torch.rand(layer.weight.shape, generator=gen) for layer in method.layers] for t in TASKS}
    masks, _ = method.select(scores)
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert abs((1 - kept) - sparsity) * 100 <= 0.1
    assert 1 - sparsity > float(method.keep_ratio) >= (1 - sparsity) / 2 - 1e-12  # union of 2 tasks' top-q sets


TINY_PRUNING = {
    "magnitude": ["method.prune_epoch=0"],
    "reweighted_l1": ["method.pretrain_epochs=0", "method.reweight_epochs=1"],
    "snip": ["method.num_batches=2"],
    "disparse_static": ["method.num_batches=2"],
}


@pytest.mark.parametrize("method", sorted(TINY_PRUNING))
def test_pruning_methods_reach_the_target_end_to_end(tiny_cfg, tmp_path, method):
    cfg = tiny_cfg(f"method={method}", "sparsity=0.9", "trainer.max_epochs=2", *TINY_PRUNING[method])
    metrics = run(cfg, tmp_path)
    assert metrics["sparsity/param"] == pytest.approx(90, abs=0.5)
