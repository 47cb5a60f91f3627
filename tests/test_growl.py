"""GrOWL (MDMTN): exact prox, penalty, per-layer cap, AP tying on a fixed support, the
two-phase schedule, the config (Chebyshev by default) and a tiny two-phase training."""
from __future__ import annotations

import logging

import pytest
import torch

from mtlsparse import train
from mtlsparse.config import ConfigError
from mtlsparse.models import HPS
from mtlsparse.sparsity import tying
from mtlsparse.sparsity.growl import GrOWL, cluster_buffer_name
from mtlsparse.sparsity.layers import group_norms, group_view
from mtlsparse.sparsity.owl import cap_zero_rows_, growl_prox_, owl_prox, owl_value, spike_weights
from mtlsparse.sparsity.tying import AffinitySettings, cluster_rows, tie_rows_
from mtlsparse.tasks import Task
from mtlsparse.training_state import PhaseStarted, TrainingState

from conftest import compose_cfg


def growl_objective(w: torch.Tensor, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """½‖W − Z‖² + G_θ(W), the function the prox minimises."""
    return 0.5 * ((w - z) ** 2).sum() + owl_value(group_norms(w), theta)


def at_epoch(epoch: int, events: list | None = None) -> TrainingState:
    """The state GrOWL's epoch-end hook receives; announced events go to `events`."""
    return TrainingState(epoch=epoch, announce=(events if events is not None else []).append)


def tiny_hps() -> HPS:
    """HPS on 16×16 inputs: GrOWL layers trunk.3 (conv, 10 rows) and trunk.7 (linear, 20 rows)."""
    torch.manual_seed(0)
    return HPS({"a": Task("a", num_classes=3)}, in_shape=(1, 16, 16))


def bound_growl(**kwargs) -> GrOWL:
    """GrOWL on a tiny HPS, its budget the recipe's (M1 + M2)·p epochs (phase-1 iterations of p epochs)."""
    method = GrOWL(**kwargs)
    method.setup(tiny_hps())
    method.set_budget(method.total_epochs)
    return method


# ------------------------------------------------------------------ OWL / GrOWL prox
def test_owl_prox_with_equal_weights_is_soft_thresholding_of_the_norms():
    v = torch.tensor([3.0, 0.5, 2.0, 1.0])
    assert torch.equal(owl_prox(v, torch.ones(4)), torch.tensor([2.0, 0.0, 1.0, 0.0]))


def test_owl_prox_pools_violators_and_keeps_the_input_order():
    # sorted v − θ = [3 − 1, 2.9 − .2, 1 − .2, .1 − .2] = [2, 2.7, .8, −.1]: PAVA pools the first two (2.35)
    v = torch.tensor([2.9, 0.1, 3.0, 1.0], dtype=torch.float64)
    theta = spike_weights(4, 0.8, 0.2).double()
    torch.testing.assert_close(owl_prox(v, theta), torch.tensor([2.35, 0.0, 2.35, 0.8], dtype=torch.float64))


@pytest.mark.parametrize("second", [-0.9, -0.4, -0.2])  # norms pooled / shrunk apart / second row zeroed
def test_growl_prox_matches_a_grid_search_on_two_scalar_rows(second):
    z = torch.tensor([[1.3, second]], dtype=torch.float64)  # Linear (out=1, in=2): two rows of one weight
    theta = torch.tensor([0.7, 0.3], dtype=torch.float64)
    prox = growl_prox_(z.clone(), theta)
    best = z.clone()
    for span, step in ((3.0, 1e-2), (2e-2, 1e-4)):  # coarse grid, then a fine one around its minimum
        axis = torch.arange(-span, span + step / 2, step, dtype=torch.float64)
        a, b = torch.meshgrid(best[0, 0] + axis, best[0, 1] + axis, indexing="ij")
        norms = torch.stack([a.abs(), b.abs()])
        values = 0.5 * ((a - z[0, 0]) ** 2 + (b - z[0, 1]) ** 2) + theta[0] * norms.max(0).values \
            + theta[1] * norms.min(0).values
        i = int(values.argmin())
        best = torch.stack([a.flatten()[i], b.flatten()[i]]).view(1, 2)
    torch.testing.assert_close(prox, best, atol=2e-4, rtol=0)
    assert growl_objective(prox, z, theta) <= growl_objective(best, z, theta) + 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_growl_prox_matches_numeric_minimisation(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 5, generator=g, dtype=torch.float64)  # 5 rows of 3 weights
    z[:, 1] *= 0.05  # one small row that the prox must zero
    theta = 1.5 * spike_weights(5, 0.8, 0.2).double()
    prox = growl_prox_(z.clone(), theta)
    assert group_norms(prox)[1] == 0 and (group_norms(prox) > 0).sum() >= 3
    # subgradient descent with steps 1/k on the 1-strongly convex objective; keep the best iterate
    w, best, best_value = z.clone(), z.clone(), growl_objective(z, z, theta)
    for k in range(1, 2001):
        w.requires_grad_(True)
        value = growl_objective(w, z, theta)
        (grad,) = torch.autograd.grad(value, w)
        if value < best_value:
            best, best_value = w.detach().clone(), value.detach()
        w = (w - grad / k).detach()
    assert growl_objective(prox, z, theta) <= best_value + 1e-12
    assert (prox - best).norm() < 1e-3


def test_growl_rows_are_input_channels_of_a_conv():
    w = torch.ones(2, 3, 1, 1)
    w[:, 1] = 0.01  # input channel 1: W[:, 1, :, :]; weight.view(3, -1) would mix it with channels 0 and 2
    theta = spike_weights(3, 0.8, 0.2)
    expected = (0.8 + 0.2) * 2**0.5 + 0.2 * 2**0.5 + 0.2 * 0.01 * 2**0.5
    torch.testing.assert_close(owl_value(group_norms(w), theta), torch.tensor(expected))
    growl_prox_(w, theta)
    assert torch.all(w[:, 1] == 0) and torch.all(w[:, [0, 2]] != 0)


def test_cap_keeps_only_the_smallest_rows_zero_and_restores_the_others():
    before = torch.arange(1.0, 11.0).repeat(4, 1)  # Linear (4, 10): row i has norm 2·(i+1)
    weight = before.clone()
    growl_prox_(weight, torch.full((10,), 15.0))  # would zero rows 0..6
    assert int((group_norms(weight) == 0).sum()) == 7
    cap_zero_rows_(weight, before, max_zero=3)
    zero = group_norms(weight) == 0
    assert torch.equal(torch.nonzero(zero).flatten(), torch.tensor([0, 1, 2]))
    assert torch.equal(weight[:, 3:7], before[:, 3:7])  # restored to their pre-prox values


def test_penalty_is_f0_scale_times_the_growl_value_independent_of_the_prox_strength():
    method = bound_growl(lam=7.0, f0_scale=0.5)
    expected = 0.0
    for layer in method.layers:
        norms = sorted(group_norms(layer.weight.detach()).tolist(), reverse=True)
        expected += 0.5 * ((0.8 + 0.2) * norms[0] + 0.2 * sum(norms[1:]))
    penalty = method.penalty()
    torch.testing.assert_close(penalty, torch.tensor(expected))
    penalty.backward()
    fc = method.layers[1].weight
    norms = group_norms(fc.detach())
    top = int(norms.argmax())
    other = (top + 1) % len(norms)
    torch.testing.assert_close(fc.grad[:, top], 0.5 * 1.0 * fc.detach()[:, top] / norms[top])
    torch.testing.assert_close(fc.grad[:, other], 0.5 * 0.2 * fc.detach()[:, other] / norms[other])
    # the prox strength is λ·θ, whatever f0_scale is
    torch.testing.assert_close(method.theta(method.layers[0]), 7.0 * method.spike(method.layers[0]))


# ------------------------------------------------------------------ the two phases
def test_schedule_cap_and_checkpoint_floor_follow_the_epoch():
    method = GrOWL(epochs_per_iteration=3, phase1_iterations=3, phase2_iterations=10, s_lmax=0.6, s_min=0.2)
    method.set_budget(39)  # the recipe's budget: phase 1 = 3 iterations of 3 epochs
    assert [method.phase(e) for e in (0, 8, 9, 38)] == [1, 1, 2, 2]
    assert [method.iteration(e) for e in (0, 2, 3, 8, 9, 12)] == [1, 1, 2, 3, 1, 2]
    assert [round(method.cap(e), 6) for e in (0, 3, 6, 9)] == [0.2, 0.4, 0.6, 0.6]
    assert method.total_epochs == 39
    # unreachable floor: untied phase-1 models are never "best" when phase 2 follows
    assert method.min_sparsity == 100.0
    method.tied.fill_(True)
    assert method.min_sparsity == pytest.approx(20.0)
    assert GrOWL(phase2_iterations=0, s_min=0.1).min_sparsity == pytest.approx(10.0)


def test_epoch_end_prox_respects_the_growing_cap():
    method = bound_growl(lam=1e4, epochs_per_iteration=1, phase1_iterations=3, s_lmax=0.6)
    optimizer = torch.optim.SGD([p for layer in method.layers for p in layer.module.parameters()], lr=1e-3)
    for epoch, cap in ((0, 0.2), (1, 0.4)):
        norms = {layer.name: group_norms(layer.weight.detach()) for layer in method.layers}
        method.after_optimizer_step(optimizer)
        method.on_train_epoch_end(at_epoch(epoch))
        for layer in method.layers:
            zero = group_norms(layer.weight) == 0
            allowed = int(cap * layer.num_groups + 1e-9)
            assert int(zero.sum()) == allowed  # λ is huge: the prox alone would zero every row
            smallest = torch.argsort(norms[layer.name])[:allowed]
            assert torch.equal(torch.nonzero(zero).flatten(), smallest.sort().values)
    assert not method.tied and method.masks() is None


def test_cluster_rows_groups_similar_rows_and_marks_zero_rows():
    a, b = torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([0.0, -1.0, 3.0, 0.5])
    w = torch.stack([a, 1.01 * a, torch.zeros(4), b, 0.99 * b, a + 0.01], dim=1)  # Linear (4, 6)
    ids, converged = cluster_rows(w, AffinitySettings(preference=0.7))
    assert converged and ids[2] == -1
    assert ids[0] == ids[1] == ids[5] and ids[3] == ids[4] and ids[0] != ids[3]
    tie_rows_(w, ids)
    rows = group_view(w)
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[5]) and torch.equal(rows[3], rows[4])
    torch.testing.assert_close(rows[3], (b + 0.99 * b) / 2)
    assert torch.all(rows[2] == 0)


def test_affinity_propagation_failure_falls_back_to_one_cluster_per_row(caplog):
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    w[:, 0] = 0
    with caplog.at_level(logging.WARNING):
        ids, converged = cluster_rows(w, AffinitySettings(max_iter=1, fallback="singletons"), name="trunk.7")
    assert not converged and torch.equal(ids, torch.tensor([-1, 0, 1, 2, 3]))
    assert "did not converge on layer 'trunk.7'" in caplog.text and "ap_fallback=singletons" in caplog.text


def test_retry_reruns_ap_with_more_damping_and_iterations(monkeypatch):
    runs = []

    def fake_run(similarity, settings, damping, max_iter):
        runs.append((damping, max_iter))
        return None if len(runs) == 1 else torch.zeros(similarity.shape[0], dtype=torch.long)

    monkeypatch.setattr(tying, "_affinity_run", fake_run)
    ids, converged = cluster_rows(torch.randn(3, 4), AffinitySettings(max_iter=50))
    assert runs == [(0.5, 50), (0.7, 200)] and converged and torch.equal(ids, torch.zeros(4, dtype=torch.long))
    runs.clear()
    monkeypatch.setattr(tying, "_affinity_run", lambda *args: runs.append(args[2:]))  # never converges
    ids, converged = cluster_rows(torch.randn(3, 4), AffinitySettings(max_iter=50))
    assert runs == [(0.5, 50), (0.7, 200), (0.9, 200)] and not converged and torch.equal(ids, torch.arange(4))


@pytest.mark.parametrize("key, value", [("ap_damping", 1.0), ("ap_max_iter", 0), ("ap_convergence_iter", 0),
                                        ("ap_fallback", "labels"), ("preference", float("nan"))])
def test_bad_affinity_knobs_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"method.{key} must be"):
        GrOWL(**{key: value})


def test_phase_two_ties_rows_and_keeps_zero_rows_zero_after_optimizer_steps():
    method = bound_growl(lam=1e4, epochs_per_iteration=1, phase1_iterations=1, s_lmax=0.5, preference=-1.0)
    model_params = [p for layer in method.layers for p in layer.module.parameters()]
    optimizer = torch.optim.Adam(model_params, lr=0.1)
    method.after_optimizer_step(optimizer)
    method.on_train_epoch_end(at_epoch(0))  # last phase-1 epoch: prox, cap
    assert not method.tied
    method.on_train_epoch_start(at_epoch(1))  # phase 2 starts: cluster, tie
    assert method.tied and method.masks() is not None
    for _ in range(3):  # gradients reach every row; the fixed support must survive each step
        optimizer.zero_grad()
        sum((layer.weight ** 2).sum() + layer.weight.sum() for layer in method.layers).backward()
        optimizer.step()
        method.after_optimizer_step(optimizer)
        for layer, mask in zip(method.layers, method.masks().values()):
            assert torch.all(layer.weight[~mask] == 0) and (~mask).any() and layer.weight[mask].abs().min() > 0
    method.on_train_epoch_end(at_epoch(1))  # phase 2 epoch end: tie again
    for layer, ids in zip(method.layers, method.clusters().values()):
        rows = group_view(layer.weight.detach())
        assert 0 < int((ids >= 0).sum()) and int(ids.max()) + 1 < int((ids >= 0).sum())  # some rows share
        for c in ids.unique():
            members = rows[ids == c]
            assert torch.all(members == members[0]) and (c >= 0 or torch.all(members == 0))


def test_clusters_live_in_the_state_dict():
    method = bound_growl(epochs_per_iteration=1, phase1_iterations=1)
    method.on_train_epoch_end(at_epoch(0))
    method.on_train_epoch_start(at_epoch(1))
    restored = bound_growl(epochs_per_iteration=1, phase1_iterations=1)
    restored.load_state_dict(method.state_dict())
    assert restored.tied and cluster_buffer_name("trunk.7") == "clusters_trunk_7"
    for name, ids in method.clusters().items():
        assert torch.equal(restored.clusters()[name], ids)
    assert restored.report() == method.report() and any(k.endswith("/converged") for k in method.report())
    old = {k: v for k, v in method.state_dict().items()  # a checkpoint from before these were kept
           if k not in ("tying_converged", "phase2_source_epoch", "_extra_state")}
    from_old = bound_growl(epochs_per_iteration=1, phase1_iterations=1)
    from_old.load_state_dict(old)  # strict: loads, convergence unknown
    assert not any(k.endswith("/converged") for k in from_old.report())


# ------------------------------------------------------------------ config and training
def test_growl_selects_the_chebyshev_balancer_unless_one_is_given():
    cfg = compose_cfg(["method=growl"])
    assert cfg.hydra.runtime.choices.balancer == "chebyshev"
    assert cfg.balancer._target_.endswith("Chebyshev")
    assert cfg.method.epochs_per_iteration == cfg.balancer.epochs_per_iteration == 3
    for overrides in (["method=growl", "balancer=linear"], ["balancer=linear", "method=growl"]):
        cfg = compose_cfg(overrides)
        assert cfg.hydra.runtime.choices.balancer == "linear" and cfg.method.epochs_per_iteration == 3


def test_growl_default_budget_is_the_whole_recipe():
    cfg = compose_cfg(["method=growl"])
    m = cfg.method
    assert cfg.trainer.max_epochs == (m.phase1_iterations + m.phase2_iterations) * m.epochs_per_iteration == 39


def test_bad_growl_values_fail_with_the_key(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"method.s_lmax must be in \[0, 1\], got 1.5"):
        train.run(tiny_cfg("method=growl", "method.s_lmax=1.5"), tmp_path)


@pytest.mark.parametrize("couple", [False, True])
def test_two_phase_training_prunes_and_ties(tiny_cfg, tmp_path, monkeypatch, couple):
    original, built = train.build_module, []

    def keep_module(*args):
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(train, "build_module", keep_module)
    cfg = tiny_cfg("method=growl", "k0=1e-3", "balancer.epochs_per_iteration=1", "method.phase1_iterations=1",
                   "method.phase2_iterations=1", "trainer.max_epochs=2", f"method.lam={20000 if couple else 2000}",
                   "method.preference=-1", "test_ckpt=last", f"method.couple_norms={str(couple).lower()}")
    metrics = train.run(cfg, tmp_path)
    assert metrics["sparsity/sr"] > 0 and metrics["sparsity/cr"] > 1 and metrics["sparsity/ps"] > 1
    assert metrics["sparsity/param"] >= 20
    method = built[0].method
    assert method.tied
    for layer in method.layers:
        rows, ids = group_view(layer.weight.detach()), method.clusters()[layer.name]
        for c in ids.unique():
            members = rows[ids == c]
            assert torch.all(members == members[0]) and (c >= 0 or torch.all(members == 0))
        key = f"tying/{layer.name}"  # per-layer tying lands in metrics.json
        assert metrics[f"{key}/clusters"] == len(ids[ids >= 0].unique()) and metrics[f"{key}/rows"] == len(ids)
        assert metrics[f"{key}/zero_rows"] == int((ids < 0).sum()) and metrics[f"{key}/converged"] in (0.0, 1.0)
    best = torch.load(next((tmp_path / "checkpoints").glob("best-*.ckpt")), weights_only=False)["state_dict"]
    assert best["method.tied"]  # only tied (post-phase-1) models are selected
    # the default hps has BN after each conv: conv2's and fc1's rows couple (BN's γ ≈ 1 then dominates a
    # row's norm, hence the larger λ above)
    assert bool(method.coupling.norms) == couple
    for name, norm in method.coupling.norms.items():
        zero_rows = method.clusters()[name] < 0
        assert zero_rows.any() and torch.all(norm.weight[zero_rows] == 0)


def test_the_default_recipe_runs_both_phases_in_a_two_epoch_budget(tiny_cfg, tmp_path, monkeypatch):
    """M1 = 3, M2 = 10, p = 3 (39-epoch recipe) squeezed into 2 epochs: phase 1 = epoch 0 at the full cap, then ties."""
    original, built = train.build_module, []

    def keep_module(*args):
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(train, "build_module", keep_module)
    cfg = tiny_cfg("method=growl", "k0=1e-3", "trainer.max_epochs=2", "method.lam=2000", "method.preference=-1",
                   "test_ckpt=last")
    assert (cfg.method.phase1_iterations, cfg.method.phase2_iterations, cfg.method.epochs_per_iteration) == (3, 10, 3)
    metrics = train.run(cfg, tmp_path)
    method = built[0].method
    assert method.tied and [method.phase(e) for e in range(2)] == [1, 2]
    assert method.cap(0) == pytest.approx(method.s_lmax)
    assert metrics["sparsity/sr"] > 0 and metrics["sparsity/cr"] > 1


# ------------------------------------------------------------------ phase 2 starts from the best phase-1 model
def test_phase_two_retrains_the_best_phase_one_model_above_s_min():
    model = tiny_hps()
    method = GrOWL(epochs_per_iteration=1, phase1_iterations=3, phase2_iterations=1, s_min=0.2, preference=-1.0)
    method.setup(model)
    method.set_budget(4)
    events: list = []
    weight = method.layers[0].weight
    marks = {}
    # epoch 0 scores best but is below s_min; epoch 1 is the best above it; epoch 2 is worse
    for epoch, (score, sparsity) in enumerate([(0.9, 10.0), (0.7, 30.0), (0.6, 50.0)]):
        with torch.no_grad():
            weight.fill_(float(epoch + 1))
        marks[epoch] = weight.detach().clone()
        state = TrainingState(model=model, epoch=epoch, announce=events.append)
        method.on_train_epoch_end(state)
        method.on_validated(state, score, sparsity)
    assert not method.tied and events == []
    method.on_train_epoch_start(TrainingState(model=model, epoch=3, announce=events.append))
    assert method.tied and torch.equal(weight.detach(), marks[1])  # restored epoch 1, then tied (equal rows)
    assert events == [PhaseStarted(phase=2, epoch=2, restart_optimizer=True)]
    assert method.report()["growl/phase2_source_epoch"] == 1.0
    assert method.get_extra_state() == {"best": None}  # the copy is dropped once used


def test_phase_two_from_last_and_continue_keeps_the_last_model_and_the_optimizer():
    model = tiny_hps()
    method = GrOWL(epochs_per_iteration=1, phase1_iterations=1, phase2_iterations=1, phase2_from="last",
                   phase2_optimizer="continue", preference=-1.0)
    method.setup(model)
    method.set_budget(2)
    events: list = []
    state = TrainingState(model=model, epoch=0, announce=events.append)
    method.on_train_epoch_end(state)
    method.on_validated(state, 0.9, 90.0)
    assert method.get_extra_state() == {"best": None}  # `last` keeps no copy
    method.on_train_epoch_start(TrainingState(model=model, epoch=1, announce=events.append))
    assert method.tied and method.report()["growl/phase2_source_epoch"] == 0.0
    assert events == [PhaseStarted(phase=2, epoch=0, restart_optimizer=False)]


def test_the_best_phase_one_model_survives_a_checkpoint():
    model = tiny_hps()
    method = GrOWL(epochs_per_iteration=1, phase1_iterations=2, phase2_iterations=1)
    method.setup(model)
    method.set_budget(3)
    method.on_validated(TrainingState(model=model, epoch=0), 0.5, 50.0)
    restored = GrOWL(epochs_per_iteration=1, phase1_iterations=2, phase2_iterations=1)
    restored.setup(tiny_hps())
    restored.load_state_dict(method.state_dict())
    best = restored.get_extra_state()["best"]
    assert best["epoch"] == 0 and best["score"] == 0.5
    for name, value in model.state_dict().items():
        assert torch.equal(best["state"][name], value)


@pytest.mark.parametrize("key, value", [("phase2_from", "first"), ("phase2_optimizer", "reset")])
def test_bad_phase_two_options_name_the_choices(key, value):
    with pytest.raises(ConfigError, match=f"method.{key} must be one of"):
        GrOWL(**{key: value})
