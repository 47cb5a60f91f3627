"""CGC, PLE, DSelect-k and LTB (issue #18): output shapes, the model contract checked against
autograd, the gates' defining properties, LTB's search → fixed tree, checkpoints, and end-to-end
runs of every architecture × {linear, upgrad} × {dense, group_lasso} through the training entry."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mtlsparse.balancers.gradnorm import last_shared_weight
from mtlsparse.builders import build_run_model
from mtlsparse.compaction.surgery import TOLERANCE, compact, max_abs_diff, num_params
from mtlsparse.errors import ConfigError
from mtlsparse.models.cgc import CGC
from mtlsparse.models.dselect_k import DSelectK, DSelectKGate, binary_codes, selector_weights, smooth_step
from mtlsparse.models.ltb import LTB, LTBResNet, search_end_epoch
from mtlsparse.models.mmoe import MMoE
from mtlsparse.models.ple import PLE, level_slices
from mtlsparse.sparsity.layers import prunable_layers
from mtlsparse.tasks import Task
from mtlsparse.train import run
from mtlsparse.training_state import TrainingState

from conftest import REPO, compose_cfg
from fakes_dense import write_fake_dense_datasets

TASKS = {"a": Task("a", num_classes=10), "b": Task("b", num_classes=4)}
THREE = {**TASKS, "c": Task("c", num_classes=3)}
SHAPE = (1, 16, 16)
DENSE = {"seg": Task("seg", kind="segmentation", num_classes=5, ignore_index=-1), "depth": Task("depth", kind="depth"),
         "normal": Task("normal", kind="normal"), "male": Task("male", kind="binary")}
RESNET_TINY = {"depth": 18, "width": 1 / 16}

BUILDERS = {
    "cgc": lambda tasks, shape: CGC(tasks, shape),
    "cgc_2_2": lambda tasks, shape: CGC(tasks, shape, shared_experts=2, task_experts=2),
    "ple": lambda tasks, shape: PLE(tasks, shape),
    "ple_3": lambda tasks, shape: PLE(tasks, shape, num_levels=3),
    "dselect_k": lambda tasks, shape: DSelectK(tasks, shape),
    "dselect_k_per_example_3": lambda tasks, shape: DSelectK(tasks, shape, gate="per_example", num_experts=3),
    "ltb": lambda tasks, shape: LTB(tasks, shape),
    "ltb_resnet": lambda tasks, shape: LTBResNet(tasks, (3, *shape[1:]), **RESNET_TINY),
}


def build(name: str, tasks=TASKS, shape=SHAPE):
    torch.manual_seed(0)
    return BUILDERS[name](tasks, shape)


def inputs(model, n: int = 4, shape=SHAPE) -> torch.Tensor:
    channels = 3 if isinstance(model, LTBResNet) else shape[0]
    return torch.randn(n, channels, *shape[1:], generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("shape", [(1, 36, 36), (1, 28, 28)])
def test_one_output_row_per_sample_and_task(name, shape):
    model = build(name, shape=shape)
    for training in (True, False):
        model.train(training)
        out = model(inputs(model, 3, shape))
        assert {t: tuple(v.shape) for t, v in out.items()} == {"a": (3, 10), "b": (3, 4)}


def test_ltb_resnet_gives_each_dense_task_a_map_at_input_size():
    model = LTBResNet(DENSE, (3, 32, 32), **RESNET_TINY)
    for training in (True, False):
        model.train(training)
        out = model(torch.randn(2, 3, 32, 32))
        assert {t: tuple(v.shape) for t, v in out.items()} == {
            "seg": (2, 5, 32, 32), "depth": (2, 1, 32, 32), "normal": (2, 3, 32, 32), "male": (2, 1)}


# ------------------------------------------------------------------ contract
def reached(model, x: torch.Tensor, tasks) -> dict[str, set[int]]:
    """Per task, the ids of the parameters its output's gradient reaches (non-zero somewhere)."""
    params = list(model.parameters())
    out = model(x)
    deps = {}
    for t in tasks:
        grads = torch.autograd.grad(out[t].square().sum(), params, retain_graph=True, allow_unused=True)
        deps[t] = {id(p) for p, g in zip(params, grads) if g is not None and bool(g.abs().sum() > 0)}
    return deps


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("tasks", [TASKS, THREE], ids=["2tasks", "3tasks"])
def test_shared_and_task_parameters_partition_the_model_as_autograd_sees_it(name, tasks):
    """Declared shared ⇔ every task's output reaches it; declared task t's ⇔ only task t's does."""
    model = build(name, tasks).train()
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in tasks}
    assert shared and all(per_task.values())
    everything = [shared, *per_task.values()]
    assert sum(len(s) for s in everything) == len(set().union(*everything)), "the sets overlap"
    assert set().union(*everything) == {id(p) for p in model.parameters()}
    torch.manual_seed(2)  # LTB's Gumbel samples
    deps = reached(model, inputs(model), tasks)
    for pid in shared:
        assert all(pid in deps[t] for t in tasks)
    for t, own in per_task.items():
        assert own <= deps[t]
        assert not own & set().union(*(deps[s] for s in tasks if s != t))


@pytest.mark.parametrize("name, representation", [("cgc", False), ("ple", False), ("dselect_k", True),
                                                  ("dselect_k_per_example_3", False), ("ltb", True),
                                                  ("ltb_resnet", True)])
def test_representation_capability_is_declared_and_decode_of_encode_is_forward(name, representation):
    model = build(name)
    assert model.has_representation is representation
    x = inputs(model)
    for training in (True, False):
        model.train(training)
        torch.manual_seed(3)
        out = model(x)
        if not representation:
            with pytest.raises(NotImplementedError, match="no shared representation"):
                model.encode(x)
            continue
        torch.manual_seed(3)
        z = model.encode(x)
        decoded = model.decode(z)
        for t in TASKS:  # the same function; float32 round-off only (LTB's eval path may sum one-hot weighted nodes)
            torch.testing.assert_close(decoded[t], out[t], rtol=1e-5, atol=1e-6)
        assert z.shape[:2] == (4, 4 if name == "dselect_k" else 2)  # experts / last-layer nodes, stacked


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gradnorm_measures_at_the_last_shared_layer_not_at_a_gate_or_branching_logits(name):
    model = build(name)
    weight = last_shared_weight(list(model.shared_parameters()))
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight is weight]
    assert layers and not any(layers[0] is m for m in model.input_layers())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sparsity_methods_see_backbones_without_input_layers_and_heads(name):
    model = build(name)
    layers = {id(layer.module) for layer in prunable_layers(model)}
    assert layers
    assert not layers & {id(m) for m in model.input_layers()}
    assert not layers & {id(m) for head in model.head_modules() for m in head.modules()}


def test_input_layers_are_exactly_the_layers_reading_the_raw_input():
    ple = build("ple_3")
    bottom = ple.levels[0]
    assert len(ple.input_layers()) == 3 + 2 + 1  # first convs of 3 level-1 experts, 2 task gates, the shared gate
    assert bottom.shared_gate in ple.input_layers() and ple.levels[1].shared_gate not in ple.input_layers()
    assert ple.levels[1].shared_gate in {layer.module for layer in prunable_layers(ple)}
    per_example = build("dselect_k_per_example_3")
    assert len(per_example.input_layers()) == 3 + 2 * 2  # 3 experts' first convs, each gate's z and α maps
    assert len(build("dselect_k").input_layers()) == 4  # static gates hold parameters, no layers


# ------------------------------------------------------------------ CGC / PLE gates
@pytest.mark.parametrize("name", ["cgc", "cgc_2_2", "ple", "ple_3"])
def test_gate_weights_are_a_distribution_over_own_and_shared_experts(name):
    model = build(name)
    records = model.gate_weights(inputs(model))
    records = records if isinstance(records, list) else [records]
    experts = {"cgc": (1, 1), "cgc_2_2": (2, 2), "ple": (1, 1), "ple_3": (1, 1)}[name]
    for level, weights in enumerate(records):
        for key, w in weights.items():
            width = experts[0] * len(TASKS) + experts[1] if key == "shared" else sum(experts)
            assert w.shape == (4, width), key
            assert bool((w > 0).all())
            torch.testing.assert_close(w.sum(1), torch.ones(4))
        assert ("shared" in weights) == (level < len(records) - 1), "a shared gate below the top level only"


def test_cgc_mixture_is_the_gate_weighted_sum_of_own_and_shared_experts():
    model = build("cgc_2_2")
    x = inputs(model)
    w = model.gate_weights(x)["a"]
    experts = [*model.layer.experts["a"], *model.layer.shared]
    expected = sum(w[:, e:e + 1] * expert(x) for e, expert in enumerate(experts))
    torch.testing.assert_close(model(x)["a"], model.heads["a"](expected))


def test_one_level_ple_is_cgc():
    cgc, ple = build("cgc"), PLE(TASKS, SHAPE, num_levels=1)
    ple.load_state_dict({k.replace("layer.", "levels.0.", 1): v for k, v in cgc.state_dict().items()})
    x = inputs(cgc)
    assert all(torch.equal(cgc(x)[t], ple(x)[t]) for t in TASKS)


def test_ple_levels_split_the_trunk_stages_lower_first_and_refuse_too_many():
    assert level_slices(3, 2) == [slice(0, 2), slice(2, 3)]
    assert level_slices(3, 3) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert level_slices(4, 3) == [slice(0, 2), slice(2, 3), slice(3, 4)]
    with pytest.raises(ValueError, match=r"model.num_levels must be an integer in 1..3"):
        PLE(TASKS, SHAPE, num_levels=4)
    with pytest.raises(ValueError, match="model.task_experts"):
        CGC(TASKS, SHAPE, task_experts=-1)


# ------------------------------------------------------------------ DSelect-k
@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step_is_exactly_0_and_1_outside_the_cubic_region_and_c1_at_its_ends(gamma):
    t = torch.linspace(-2 * gamma, 2 * gamma, 4001, dtype=torch.float64)
    s = smooth_step(t, gamma)
    assert bool((s[t <= -gamma / 2] == 0).all()) and bool((s[t >= gamma / 2] == 1).all())
    inside = t.abs() < 0.499 * gamma  # (at the very ends the cubic rounds to 0 / 1)
    assert bool(((s[inside] > 0) & (s[inside] < 1)).all())
    assert bool((s.diff() >= 0).all())  # non-decreasing
    ends = torch.tensor([-gamma / 2, gamma / 2], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(ends, gamma).sum(), ends)
    assert grad.abs().max() < 1e-12
    cubic = -2 / gamma ** 3 * ends ** 3 + 3 / (2 * gamma) * ends + 0.5
    torch.testing.assert_close(cubic.detach(), torch.tensor([0.0, 1.0], dtype=torch.float64))  # continuous
    (slope,) = torch.autograd.grad(cubic.sum(), ends)
    assert slope.abs().max() < 1e-12  # the cubic's slope is 0 where it meets the constants


def test_selectors_are_distributions_over_binary_codes_and_one_hot_once_binary():
    codes = binary_codes(8)
    assert codes.shape == (8, 3) and len({tuple(c.tolist()) for c in codes}) == 8
    s = torch.rand(5, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(selector_weights(s, codes).sum(-1), torch.ones(5, 2))
    binary = torch.tensor([[1.0, 0.0, 1.0]])  # code 101 = expert 5
    assert selector_weights(binary, codes).squeeze().tolist() == [0, 0, 0, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("num_experts, k", [(4, 1), (4, 2), (8, 3), (5, 2)])
def test_binary_gates_select_at_most_k_experts_and_their_weights_sum_to_one(num_experts, k):
    gate = DSelectKGate(num_experts, k, gamma=1.0, in_features=None)
    g = torch.Generator().manual_seed(num_experts + k)
    for _ in range(20):
        with torch.no_grad():
            codes = torch.randint(0, num_experts, (k,), generator=g)
            gate.z.copy_((binary_codes(num_experts)[codes].float() * 2 - 1) * (0.5 + torch.rand(k, 1, generator=g)))
            gate.alpha.normal_(generator=g)
        q, r = gate()
        assert bool(((r == 0) | (r == 1)).all()) and bool((r.sum(-1) == 1).all())
        assert int((q > 0).sum()) <= k
        torch.testing.assert_close(q.sum(), torch.tensor(1.0))
        assert set(torch.nonzero(q).flatten().tolist()) == set(codes.tolist())


def test_entropy_regulariser_drives_the_selectors_to_binary_and_at_most_k_experts():
    """Training a gate on λ·Σ h(r) alone: every selector reaches a corner (exactly one-hot) and stays."""
    torch.manual_seed(0)
    for gate in (DSelectKGate(8, 2, 1.0, None), DSelectKGate(8, 2, 1.0, 6)):
        optimizer = torch.optim.Adam(gate.parameters(), lr=0.02)
        x = torch.randn(16, 6)
        for _ in range(400):
            q, r = gate(None if gate.static else x)
            optimizer.zero_grad()
            gate.regulariser(r, 1e-3).backward()
            optimizer.step()
        q, r = gate(None if gate.static else x)
        assert bool(((r == 0) | (r == 1)).all())
        assert int((q > 0).sum(-1).max()) <= 2


def test_regulariser_is_the_entropy_plus_the_reachability_term_only_when_n_is_not_a_power_of_2():
    model = DSelectK(TASKS, SHAPE, num_experts=4, entropy_reg=0.0).train()
    model(inputs(model))
    assert model.auxiliary_loss() is None  # nothing to add
    model = DSelectK(TASKS, SHAPE, num_experts=4, entropy_reg=0.5).train()
    model(inputs(model))
    expected = sum(0.5 * -(r * torch.log(r + 1e-6)).sum() for r in (g()[1] for g in model.gates.values()))
    torch.testing.assert_close(model.auxiliary_loss(), expected)
    model.eval()
    model(inputs(model))
    assert model.auxiliary_loss() is None
    odd = DSelectK(TASKS, SHAPE, num_experts=3, gate="per_example", entropy_reg=0.0).train()
    x = inputs(odd)
    odd(x)
    r = {t: g(x)[1] for t, g in odd.gates.items()}
    torch.testing.assert_close(odd.auxiliary_loss(), sum((1 / v.sum(-1)).sum(-1).mean() for v in r.values()))
    assert float(odd.auxiliary_loss().detach()) > 2 * 2  # ≥ 1 per selector, 2 selectors per task


def test_dselect_k_bad_values_name_the_key():
    for kwargs, key in [({"k": 5}, "model.k"), ({"gamma": 0}, "model.gamma"), ({"gate": "topk"}, "model.gate"),
                        ({"entropy_reg": -1.0}, "model.entropy_reg"), ({"num_experts": 0}, "model.num_experts")]:
        with pytest.raises(ValueError, match=key):
            DSelectK(TASKS, SHAPE, **kwargs)


@pytest.mark.parametrize("model", [MMoE, DSelectK])
@pytest.mark.parametrize("num_experts", [0, 2.5, True])
def test_both_expert_mixtures_refuse_a_bad_expert_count_with_one_message(model, num_experts):
    with pytest.raises(ValueError, match=rf"model.num_experts must be an integer >= 1, got {num_experts!r}"):
        model(TASKS, SHAPE, num_experts=num_experts)


# ------------------------------------------------------------------ LTB
def end_epoch(model, epoch: int, max_epochs: int) -> None:
    model.on_train_epoch_end(TrainingState(model=model, epoch=epoch, max_epochs=max_epochs))


def test_branching_probabilities_are_softmaxes_and_samples_are_distributions():
    model = build("ltb", THREE)
    with torch.no_grad():
        for logits in [*model.branch_logits.values(), *model.head_logits.values()]:
            logits.normal_()
    probs = model.branching_probabilities()
    assert set(probs) == {"1", "2", "head/a", "head/b", "head/c"}
    for key, p in probs.items():
        logits = model.branch_logits[key] if key.isdigit() else model.head_logits[key.split("/")[1]]
        torch.testing.assert_close(p, torch.softmax(logits, -1))
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    torch.manual_seed(0)
    soft = model._sample(model.branch_logits["1"])
    assert bool((soft > 0).all()) and torch.allclose(soft.sum(-1), torch.ones(3))
    model.hard = True
    hard = model._sample(model.branch_logits["1"])
    assert sorted(hard.flatten().tolist()).count(1.0) == 3 and torch.allclose(hard.sum(-1), torch.ones(3))


def is_tree(model) -> bool:
    """The fixed architecture: every used node has exactly one parent, and every path leads to the input."""
    arch = model.architecture()
    layers = len(model.nodes)
    used = [set() for _ in range(layers)]
    used[-1] = set(arch["heads"].values())
    edges = len(arch["heads"])
    for layer in range(layers - 1, 0, -1):
        parents = arch[f"layer{layer}"]
        assert all(0 <= p < len(model.nodes[layer - 1]) for p in parents)
        used[layer - 1] = {parents[i] for i in used[layer]}
        edges += len(used[layer])
    vertices = 1 + sum(len(u) for u in used) + len(arch["heads"])  # input + used nodes + heads
    return edges + len(used[0]) == vertices - 1  # a connected graph with |V| − 1 edges: a tree


def test_ltb_fixes_the_most_probable_parents_into_a_tree_at_the_scheduled_epoch():
    model = build("ltb", THREE)
    model.set_budget(10)  # search_fraction 0.5 → fixed at the end of epoch 4
    with torch.no_grad():
        model.branch_logits["1"].copy_(torch.tensor([[2.0, 0, 0], [0, 0, 3], [0, 0, 3]]))
        model.branch_logits["2"].copy_(torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1]]))
        for name, parent in zip("abc", [0, 1, 2]):
            model.head_logits[name][parent] = 1.0
    taus = []
    for epoch in range(4):
        end_epoch(model, epoch, 10)
        taus.append(float(model.tau))
        assert not bool(model.fixed)
    assert taus == sorted(taus, reverse=True) and taus[-1] == pytest.approx(0.5)
    end_epoch(model, 4, 10)
    assert bool(model.fixed)
    assert model.architecture() == {"layer1": [0, 2, 2], "layer2": [0, 2, 2], "heads": {"a": 0, "b": 1, "c": 2}}
    assert is_tree(model)
    with torch.no_grad():  # θ no longer matters
        for logits in model.branch_logits.values():
            logits.normal_()
    assert model.architecture()["layer1"] == [0, 2, 2]


def test_random_searched_trees_are_trees():
    for seed in range(20):
        torch.manual_seed(seed)
        model = LTB(THREE, SHAPE, nodes=[3, 2, 4])
        with torch.no_grad():
            for p in [*model.branch_logits.values(), *model.head_logits.values()]:
                p.normal_()
        model.fix_()
        assert is_tree(model)


def test_fixed_tree_trains_deterministically_only_where_a_task_reaches():
    model = build("ltb", THREE)
    with torch.no_grad():
        model.branch_logits["1"][:, 0] = 5.0  # every conv2 node reads conv1 node 0
        model.head_logits["a"][1] = 5.0
    model.fix_()
    model.train()
    x = inputs(model)
    out = model(x)
    assert all(torch.equal(out[t], model(x)[t]) for t in THREE), "no Gumbel noise once fixed"
    sum(v.square().sum() for v in out.values()).backward()
    unused = [*model.nodes[0][1].parameters(), *model.nodes[0][2].parameters(),
              *model.branch_logits.parameters(), *model.head_logits.parameters()]
    assert all(p.grad is not None for p in model.parameters()), "DDP's default strategy needs every gradient"
    assert all(not p.grad.any() for p in unused), "unused nodes and θ: exactly zero"
    assert all(p.grad.any() for p in model.nodes[0][0].parameters())
    model.eval()
    assert all(torch.equal(v, w) for v, w in zip(model(x).values(), out.values())), "the tie adds an exact 0"


def test_search_schedule_follows_the_fraction_convention_and_refuses_unreachable_epochs():
    assert search_end_epoch(10, 0.5, None) == 4
    assert search_end_epoch(1, 0.5, None) == 0
    assert search_end_epoch(10, 0.0, None) == 0 and search_end_epoch(10, 1.0, None) == 9
    assert search_end_epoch(None, 0.5, 3) == 3
    with pytest.raises(ConfigError, match=r"model.search_epoch=5 is past the last epoch of trainer.max_epochs=5"):
        search_end_epoch(5, 0.5, 5)
    with pytest.raises(ConfigError, match="model.search_fraction is a fraction .* unbounded"):
        search_end_epoch(-1, 0.5, None)
    with pytest.raises(ConfigError, match="model.search_fraction"):
        LTB(TASKS, SHAPE, search_fraction=1.5)
    with pytest.raises(ValueError, match="model.nodes"):
        LTB(TASKS, SHAPE, nodes=[2, 2])


def test_fixed_ltb_compacts_exactly_without_its_unused_nodes():
    model = LTB(TASKS, (1, 28, 28), batch_norm=True)
    with torch.no_grad():
        model.branch_logits["1"].copy_(torch.tensor([[1.0, 0], [1.0, 0]]))  # branch after conv1 node 0
        model.head_logits["b"][1] = 1.0
        for layer in prunable_layers(model):
            layer.weight[:, ::2] = 0
    model.fix_()
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    small, _ = compact(model, x)
    assert max_abs_diff(model, small, x) <= TOLERANCE
    assert num_params(small) < num_params(model)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_dict_round_trip_gives_the_same_outputs(name, tmp_path):
    model = build(name).eval()
    if isinstance(model, LTB):
        with torch.no_grad():
            model.head_logits["b"][1] = 1.0
        model.fix_()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(123)
    fresh = BUILDERS[name](TASKS, SHAPE).eval()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    x = inputs(model)
    assert all(torch.equal(model(x)[t], fresh(x)[t]) for t in TASKS)
    if isinstance(model, LTB):
        assert bool(fresh.fixed) and fresh.architecture() == model.architecture()


def test_ltb_run_fixes_its_tree_in_the_checkpoint_and_logs_the_schedule(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=ltb", "trainer.max_epochs=2")
    run(cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert bool(state["model.fixed"]) and float(state["model.tau"]) == pytest.approx(5.0)  # 1 search epoch
    model, _ = build_run_model(cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    assert bool(model.fixed) and is_tree(model)
    log = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "ltb/fixed" in log.splitlines()[0] and "ltb/tau" in log.splitlines()[0]
    with pytest.raises(ConfigError, match="model.search_epoch=2 is past the last epoch"):
        run(tiny_cfg("model=ltb", "trainer.max_epochs=2", "model.search_epoch=2"), tmp_path / "bad")


# ------------------------------------------------------------------ end to end
NEW_MODELS = ["cgc", "ple", "dselect_k", "ltb", "ltb_resnet"]
SMALL = {"ltb_resnet": ["model.depth=18", "model.width=0.0625"]}


@pytest.mark.parametrize("model", NEW_MODELS)
@pytest.mark.parametrize("balancer", ["linear", "upgrad"])
@pytest.mark.parametrize("method", ["dense", "group_lasso"])
def test_every_new_model_trains_with_linear_and_upgrad_dense_and_group_lasso(tiny_cfg, tmp_path, model, balancer,
                                                                          method):
    cfg = tiny_cfg(f"model={model}", f"balancer={balancer}", f"method={method}", "lam=1e-3", *SMALL.get(model, []))
    metrics = run(cfg, tmp_path)
    assert (metrics["config/model"], metrics["config/balancer"], metrics["config/method"]) == (model, balancer, method)
    assert 0 <= metrics["test/mean_acc"] <= 1 and math.isfinite(metrics["test/t0/loss"])
    assert json.loads((tmp_path / "metrics.json").read_text())["params/total"] == metrics["params/total"]


@pytest.mark.parametrize("model, overrides, works", [
    ("dselect_k", [], True), ("ltb", [], True), ("cgc", [], False), ("ple", [], False),
    ("dselect_k", ["model.gate=per_example"], False)])
def test_representation_mode_runs_where_declared_and_refuses_clearly_elsewhere(tiny_cfg, tmp_path, model, overrides,
                                                                               works):
    cfg = tiny_cfg(f"model={model}", *overrides, "balancer=upgrad", "balancer.mode=representation")
    if works:
        assert 0 <= run(cfg, tmp_path)["test/mean_acc"] <= 1
        return
    with pytest.raises(ConfigError, match=r"mode=representation needs a model with a shared representation.*"
                                          r"(CGC|PLE|DSelectK) has none.*balancer.mode=params"):
        run(cfg, tmp_path)


@pytest.mark.parametrize("model", NEW_MODELS)
def test_group_lasso_runs_export_a_compact_model(tiny_cfg, tmp_path, model):
    """A strong λ zeroes channel groups; the end-of-run export removes them with outputs within tolerance."""
    cfg = tiny_cfg(f"model={model}", "method=group_lasso", "lam=10", "optimizer.lr=0.05", "export.batch=4",
                   "export.repeats=2", "export.warmup=1", *SMALL.get(model, []))
    metrics = run(cfg, tmp_path)
    assert metrics["sparsity/group"] > 0 and "export/refused" not in metrics
    assert metrics["params/compact"] < metrics["params/dense"]
    assert metrics["export/max_abs_diff"] <= TOLERANCE


def test_ltb_resnet_trains_on_dense_tasks(tmp_path):
    root = write_fake_dense_datasets(tmp_path / "data")
    cfg = compose_cfg(["dataset=nyuv2", "dataset.image_size=[32,32]", "model=ltb_resnet", "model.depth=18",
                       "model.width=0.0625", "method=group_lasso", "lam=1e-3", "trainer=cpu", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                       "trainer.enable_progress_bar=false", "dataset.batch_size=2", "dataset.eval_batch_size=2",
                       "++export.enabled=false"], data_root=root)
    metrics = run(cfg, tmp_path / "run")
    assert 0 <= metrics["test/seg/miou"] <= 1 and math.isfinite(metrics["test/depth/abs_err"])
    assert math.isfinite(metrics["test/normal/mean_angle"])


BALANCERS = sorted(p.stem for p in (REPO / "conf" / "balancer").glob("*.yaml"))
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("index", range(len(BALANCERS)))
def test_every_balancer_and_method_meets_a_new_model(tiny_cfg, tmp_path, index):
    """Round-robin: balancer i with method i and new model i (mod their counts), so each meets each kind."""
    balancer, method = BALANCERS[index], METHODS[index % len(METHODS)]
    model = NEW_MODELS[index % len(NEW_MODELS)]
    cfg = tiny_cfg(f"model={model}", f"balancer={balancer}", f"method={method}", "sparsity=0.5", "lam=1e-3",
                   "k0=0.01", *SMALL.get(model, []))
    metrics = run(cfg, tmp_path)
    assert (metrics["config/model"], metrics["config/balancer"], metrics["config/method"]) == (model, balancer, method)
