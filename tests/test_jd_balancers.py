"""Gradient-manipulation (torchjd) and learned-weighting (GradNorm, FAMO) balancers; cross-stitch and MMoE.

Toy problems with known gradients check each rule against its definition; tiny Lightning
runs check they train with every sparsity family and keep masks / prox zeros intact.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torchjd.aggregation as tja
import yaml
from torch import nn

from mtlsparse.balancers import FAMO, JD, BalanceContext, GradNorm
from mtlsparse.balancers.jd import AGGREGATORS, MissingSolverError, build_aggregator
from mtlsparse.config import CONF_DIR, ConfigError, build
from mtlsparse.models import HPS, STL, CrossStitch, MMoE
from mtlsparse.sparsity.layers import group_norms, prunable_layers
from mtlsparse.sparsity.masks import mask_of
from mtlsparse.sparsity.scope import Scope
from mtlsparse.tasks import Task
from mtlsparse.train import build_module, run

from conftest import TINY, compose_cfg

TASKS = {"a": Task("a", num_classes=3), "b": Task("b", num_classes=4)}
ALIASES = ["upgrad", "pcgrad", "cagrad", "nashmtl", "imtl_g", "aligned_mtl", "graddrop", "dualproj", "gradvac", "rlw"]
ALL_BALANCERS = sorted(p.stem for p in Path(CONF_DIR, "balancer").glob("*.yaml"))
ALL_METHODS = sorted(p.stem for p in Path(CONF_DIR, "method").glob("*.yaml"))


# ------------------------------------------------------------------ toy problems
class Toy(nn.Module):
    """Shared trunk Linear(4→3)-tanh, one Linear(3→1) head per task; losses are smooth and positive."""

    has_representation = True

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})

    def shared_parameters(self):
        return self.trunk.parameters()

    def encode(self, x):
        return torch.tanh(self.trunk(x))

    def decode(self, z):
        return {t: h(z) for t, h in self.heads.items()}

    def losses(self, z):
        out = self.decode(z)
        return {"a": (out["a"] - 1).square().mean(), "b": (out["b"] + 2).square().mean()}


def toy_batch():
    torch.manual_seed(1)
    return torch.randn(8, 4)


def jacobian(losses, params):
    """Rows = tasks, the per-task gradients of `params`, flattened (computed independently of the balancer)."""
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], params, retain_graph=True)])
            for t in ("a", "b")]
    return torch.stack(rows)


def unflatten(vector, like):
    return [v.view_as(p) for v, p in zip(vector.split([p.numel() for p in like]), like)]


def two_task_linear(g1, g2):
    """Shared w; L_a = g1·w, L_b = g2·w: the task gradients are exactly g1 and g2."""
    w = nn.Parameter(torch.zeros(1, len(g1)))
    holder = nn.Module()
    holder.w = w
    losses = {"a": (w * torch.tensor(g1)).sum(), "b": (w * torch.tensor(g2)).sum()}
    return holder, w, losses


def direction(aggregator, g1, g2, **options):
    """w.grad after one step of JD(aggregator) on the linear two-task problem."""
    holder, w, losses = two_task_linear(g1, g2)
    bal = JD(["a", "b"], aggregator=aggregator, **options)
    bal.setup(holder)
    bal(losses, None, BalanceContext(shared_params=[w])).backward()
    return w.grad.flatten()


# ------------------------------------------------------- surrogate: exact gradients
@pytest.mark.parametrize("aggregator", ["upgrad", "pcgrad", "imtl_g", "aligned_mtl", "dualproj", "mgda", "cagrad",
                                        "nashmtl", "gradvac", "config", "graddrop"])
def test_shared_grad_is_exactly_the_aggregated_direction_and_heads_get_their_task_gradient(aggregator):
    model = Toy()
    bal = JD(["a", "b"], aggregator=aggregator)
    bal.setup(model)
    shared = list(model.trunk.parameters())
    losses = model.losses(model.encode(toy_batch()))
    jac = jacobian(losses, shared)
    head_grads = {t: torch.autograd.grad(losses[t], list(model.heads[t].parameters()), retain_graph=True)
                  for t in ("a", "b")}
    torch.manual_seed(3)
    loss = bal(losses, None, BalanceContext(shared_params=shared))
    torch.manual_seed(3)  # graddrop draws random numbers: replay them for the reference
    reference = build_aggregator(aggregator, 2, torch.tensor([0.5, 0.5]), {})
    expected = reference(jac)
    loss.backward()
    for p, d in zip(shared, unflatten(expected, shared)):
        assert torch.equal(p.grad, d), aggregator
    for t in ("a", "b"):
        for p, g in zip(model.heads[t].parameters(), head_grads[t]):
            assert torch.equal(p.grad, g)
    assert float(loss.detach()) == pytest.approx(0.5 * float(losses["a"] + losses["b"]))  # logged value Σ k_t L_t


def test_sparsity_objective_adds_k0_times_its_gradient():
    model = Toy()
    shared = list(model.trunk.parameters())
    bal = JD(["a", "b"], k0=0.3, aggregator="pcgrad")
    bal.setup(model)
    losses = model.losses(model.encode(toy_batch()))
    expected = tja.PCGrad()(jacobian(losses, shared))
    penalty = model.trunk.weight.abs().sum()  # an l1-like L0
    bal(losses, penalty, BalanceContext(shared_params=shared)).backward()
    torch.testing.assert_close(model.trunk.weight.grad,
                               unflatten(expected, shared)[0] + 0.3 * model.trunk.weight.detach().sign())
    torch.testing.assert_close(model.trunk.bias.grad, unflatten(expected, shared)[1])


def test_representation_mode_pulls_the_aggregated_representation_gradient_back_through_the_trunk():
    model = Toy()
    shared = list(model.trunk.parameters())
    bal = JD(["a", "b"], aggregator="upgrad", mode="representation")
    bal.setup(model)
    assert bal.needs_representation
    z = model.encode(toy_batch())
    losses = model.losses(z)
    d_z = tja.UPGrad()(jacobian(losses, [z])).view_as(z)
    expected = torch.autograd.grad(z, shared, grad_outputs=d_z, retain_graph=True)
    bal(losses, None, BalanceContext(shared_params=shared, representation=z)).backward()
    for p, g in zip(shared, expected):
        torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------- aggregators vs definitions
def test_pcgrad_projects_conflicting_gradients_off_each_other():
    # g1·g2 = −1 < 0: g1' = g1 − (g1·g2/‖g2‖²) g2 = (0.5, 0.5), g2' = g2 − (g1·g2/‖g1‖²) g1 = (0, 1)
    torch.testing.assert_close(direction("pcgrad", [1.0, 0.0], [-1.0, 1.0]), torch.tensor([0.5, 1.5]))
    # no conflict: plain sum
    torch.testing.assert_close(direction("pcgrad", [1.0, 0.0], [1.0, 1.0]), torch.tensor([2.0, 1.0]))


def test_upgrad_matches_torchjd_documented_output_and_the_two_task_projection():
    # torchjd's documented example: J = [[-4, 1, 1], [6, 1, 1]] → [0.2929, 1.9004, 1.9004]
    torch.testing.assert_close(direction("upgrad", [-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]),
                               torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4, rtol=0)
    # two tasks: the mean of each gradient projected onto the half-space of the other = PCGrad / 2
    torch.testing.assert_close(direction("upgrad", [1.0, 0.0], [-1.0, 1.0]), torch.tensor([0.25, 0.75]),
                               atol=1e-3, rtol=0)
    # no conflict: the mean gradient
    torch.testing.assert_close(direction("upgrad", [1.0, 0.0], [1.0, 1.0]), torch.tensor([1.0, 0.5]),
                               atol=1e-3, rtol=0)


def cagrad_reference(g1: torch.Tensor, g2: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad by its definition: w* = argmin_{w∈[0,1]} g_w·g0 + c‖g0‖‖g_w‖ (fine grid), d = g0 + c‖g0‖/‖g_w*‖ g_w*."""
    g0 = (g1 + g2) / 2
    w = torch.linspace(0, 1, 200_001, dtype=torch.float64)[:, None]
    gw = w * g1 + (1 - w) * g2
    best = gw[torch.argmin(gw @ g0 + c * g0.norm() * gw.norm(dim=1))]
    return g0 + c * g0.norm() / best.norm() * best


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_matches_its_definition(seed):
    torch.manual_seed(seed)
    g1, g2 = torch.randn(2, 4, dtype=torch.float64)
    got = direction("cagrad", g1.tolist(), g2.tolist(), c=0.4)
    torch.testing.assert_close(got.double(), cagrad_reference(g1, g2, 0.4), atol=1e-4, rtol=0)


def test_cagrad_on_agreeing_tasks_scales_the_common_gradient_by_one_plus_c():
    torch.testing.assert_close(direction("cagrad", [1.0, 2.0], [1.0, 2.0], c=0.5), torch.tensor([1.5, 3.0]),
                               atol=1e-4, rtol=0)


def test_gradient_free_weightings_skip_the_jacobian():
    holder, w, losses = two_task_linear([1.0, 0.0], [0.0, 1.0])
    bal = JD(["a", "b"], aggregator="rlw")
    bal.setup(holder)
    torch.manual_seed(0)
    bal(losses, None, BalanceContext(shared_params=[w])).backward()
    torch.manual_seed(0)
    expected = torch.softmax(torch.randn(2), dim=-1)  # RLW: softmax of a standard normal draw
    torch.testing.assert_close(bal.weights, expected)
    torch.testing.assert_close(w.grad.flatten(), expected)  # d = Σ w_t g_t with g = e_1, e_2


def test_preference_k_is_upgrads_pref_vector():
    g1, g2 = [1.0, 0.0], [0.0, 1.0]  # orthogonal: UPGrad = Σ k_t g_t
    holder, w, losses = two_task_linear(g1, g2)
    bal = JD(["a", "b"], k=[0.2, 0.8], aggregator="upgrad")
    bal.setup(holder)
    bal(losses, None, BalanceContext(shared_params=[w])).backward()
    torch.testing.assert_close(w.grad.flatten(), torch.tensor([0.2, 0.8]), atol=1e-3, rtol=0)
    assert bal.state_summary() == pytest.approx({"w/a": 0.2, "w/b": 0.8}, abs=1e-3)


@pytest.mark.parametrize("aggregator, options, steps", [("gradvac", {"beta": 0.5}, 2),
                                                        ("nashmtl", {"update_weights_every": 2}, 1)])
def test_stateful_aggregators_resume_from_a_state_dict(aggregator, options, steps):
    """Run, save, load into a fresh balancer: the next direction is the uninterrupted run's (GradVac's
    similarity EMA; Nash-MTL's weights cached between updates)."""
    def step(bal, model, seed):
        torch.manual_seed(seed)
        losses = model.losses(model.encode(torch.randn(8, 4)))
        model.zero_grad()
        bal(losses, None, BalanceContext(shared_params=list(model.trunk.parameters()))).backward()
        return model.trunk.weight.grad.clone()

    def new_balancer(model):
        bal = JD(["a", "b"], aggregator=aggregator, **options)
        bal.setup(model)
        return bal

    model = Toy()
    bal = new_balancer(model)
    for seed in range(steps):
        step(bal, model, seed)
    state = bal.state_dict()
    assert state["_extra_state"]
    resumed, fresh = new_balancer(model), new_balancer(model)
    resumed.load_state_dict(state)
    expected = step(bal, model, 10)
    torch.testing.assert_close(step(resumed, model, 10), expected)
    assert not torch.allclose(step(fresh, model, 10), expected)  # the state matters


def test_distributed_code_path_gives_the_same_update_in_a_one_process_group(tmp_path):
    """All-reduce of the Jacobian / losses and the broadcast of d run under a gloo group (world size 1)."""
    import torch.distributed as dist

    def grads_and_state():
        model = Toy()
        shared = list(model.trunk.parameters())
        jd, gradnorm, famo = JD(["a", "b"], aggregator="upgrad"), GradNorm(["a", "b"]), FAMO(["a", "b"])
        jd.setup(model)
        for step in range(2):
            losses = model.losses(model.encode(toy_batch() + step))
            ctx = BalanceContext(shared_params=shared)
            (jd(losses, None, ctx) + gradnorm(losses, None, ctx) + famo(losses, None, ctx)).backward()
        return [p.grad.clone() for p in shared] + [gradnorm.weights.grad.clone(), famo.logits.clone()]

    plain = grads_and_state()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        distributed = grads_and_state()
    finally:
        dist.destroy_process_group()
    for a, b in zip(plain, distributed):
        torch.testing.assert_close(a, b)


def test_every_aggregator_in_the_registry_builds():
    for name in AGGREGATORS:
        assert isinstance(build_aggregator(name, 3, torch.full((3,), 1 / 3), {}), tja.Aggregator), name


# --------------------------------------------------------------------- errors
def test_unknown_aggregator_and_option_name_the_allowed_values(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"balancer.aggregator must be one of \[.*'pcgrad'"):
        JD(["a", "b"], aggregator="pcgard")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['c'\] for balancer.aggregator=pcgrad; allowed: \[\]"):
        JD(["a", "b"], aggregator="pcgrad", c=0.5)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['beta'\] for balancer.aggregator=cagrad"):
        run(tiny_cfg("balancer=cagrad", "+balancer.beta=0.5"), tmp_path)


def test_missing_solver_names_the_pip_command(tiny_cfg, tmp_path, monkeypatch):
    import torchjd._mixins

    real = torchjd._mixins.find_spec
    monkeypatch.setattr(torchjd._mixins, "find_spec", lambda name: None if name == "cvxpy" else real(name))
    with pytest.raises(MissingSolverError, match=r'pip install "mtlsparse\[solvers\]"'):
        JD(["a", "b"], aggregator="cagrad")
    with pytest.raises(ConfigError, match=r'nashmtl needs an optional solver.*pip install "mtlsparse\[solvers\]"'):
        run(tiny_cfg("balancer=nashmtl"), tmp_path)


@pytest.mark.parametrize("balancer", [JD(["a", "b"], mode="representation"),
                                      GradNorm(["a", "b"], mode="representation")])
def test_representation_mode_needs_a_shared_representation(balancer):
    with pytest.raises(ValueError, match="mode=representation needs a model with a shared representation"):
        balancer.setup(MMoE(TASKS, (1, 16, 16)))
    balancer.setup(CrossStitch(TASKS, (1, 16, 16)))
    balancer.setup(HPS(TASKS, (1, 16, 16)))


def test_gradient_manipulation_needs_shared_parameters():
    with pytest.raises(ConfigError, match=r"balancer=pcgrad \(balancer=jd\) .* \(STL\) has none.*balancer=linear"):
        JD(["a", "b"], aggregator="pcgrad").setup(STL(TASKS, (1, 16, 16)))


# ------------------------------------------------------------------- GradNorm
def gradnorm_run(alpha: float, scale_a: float, steps: int = 400) -> tuple[GradNorm, torch.Tensor]:
    """Train only GradNorm's weights on L_a = s·10·(W·e1), L_b = W·e2 (gradient norms 10s and 1).

    The first call records L(0) at s = 1; later calls use s = scale_a, so task a's loss ratio
    is scale_a and task b's is 1.
    """
    w = nn.Parameter(torch.ones(1, 2))
    bal = GradNorm(["a", "b"], alpha=alpha)
    opt = torch.optim.Adam(bal.parameters(), lr=0.01)
    for step in range(steps):
        s = 1.0 if step == 0 else scale_a
        losses = {"a": s * 10 * w[0, 0], "b": w[0, 1]}
        opt.zero_grad()
        bal(losses, None, BalanceContext(shared_params=[w])).backward()
        opt.step()
    bal.renormalise_()
    return bal, bal.grad_norms.clone()


def test_gradnorm_weights_move_towards_equal_gradient_norms():
    bal, g = gradnorm_run(alpha=1.5, scale_a=1.0)
    w = bal.state_summary()
    assert w["w/a"] + w["w/b"] == pytest.approx(2.0)
    assert w["w/a"] < 0.3 and w["w/b"] > 1.5  # equilibrium w = (2/11, 20/11)
    assert float(g[0] / g[1]) == pytest.approx(1.0, abs=0.15)  # was 10 at the start


def test_gradnorm_gives_slower_training_tasks_larger_gradients_by_alpha():
    # task a's loss fell to 1/4 of L(0), task b's did not: r = (0.4, 1.6), target G_b/G_a = 4^α
    _, g = gradnorm_run(alpha=1.5, scale_a=0.25)
    assert float(g[1] / g[0]) == pytest.approx(4**1.5, rel=0.15)
    _, g = gradnorm_run(alpha=0.0, scale_a=0.25)
    assert float(g[1] / g[0]) == pytest.approx(1.0, rel=0.15)


def test_gradnorm_model_gradient_uses_the_current_weights_and_l_grad_moves_only_the_weights():
    w = nn.Parameter(torch.ones(1, 2))
    bal = GradNorm(["a", "b"])
    with torch.no_grad():
        bal.weights.copy_(torch.tensor([1.5, 0.5]))
    loss = bal({"a": 3 * w[0, 0], "b": w[0, 1]}, None, BalanceContext(shared_params=[w]))
    assert float(loss.detach()) == pytest.approx(1.5 * 3 + 0.5 * 1)  # L_grad adds no value
    loss.backward()
    torch.testing.assert_close(w.grad, torch.tensor([[4.5, 0.5]]))  # Σ w_t ∇L_t: no L_grad term
    # G = w ⊙ (3, 1) = (4.5, 0.5), target Ḡ = 2.5 (first step: r = 1): ∂L_grad/∂w = (3·sign(2), 1·sign(−2))
    torch.testing.assert_close(bal.weights.grad, torch.tensor([3.0, -1.0]))


# ----------------------------------------------------------------------- FAMO
def test_famo_one_sgd_step_on_the_logits_matches_the_update_rule():
    bal = FAMO(["a", "b"], beta=0.1, gamma=0.0, update="sgd")
    bal({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}, None, BalanceContext())
    bal({"a": torch.tensor(0.5), "b": torch.tensor(0.9)}, None, BalanceContext())
    delta = torch.tensor([math.log(1 / 0.5), math.log(1 / 0.9)])
    z = torch.tensor([0.5, 0.5])
    expected_logits = -0.1 * z * (delta - (z * delta).sum())  # ξ ← ξ − β ∇_ξ zᵀδ from ξ = 0
    torch.testing.assert_close(bal.logits, expected_logits)
    w = bal.state_summary()
    assert w["w/b"] > w["w/a"] and w["w/a"] + w["w/b"] == pytest.approx(1.0)


@pytest.mark.parametrize("slow", ["a", "b"])
def test_famo_task_whose_loss_decreases_slower_gains_weight(slow):
    bal = FAMO(["a", "b"])  # Adam on ξ, as in the authors' code
    history = []
    for step in range(30):
        fast, slower = 2.0 * 0.9**step, 2.0 * 0.99**step
        losses = {"a": slower, "b": fast} if slow == "a" else {"a": fast, "b": slower}
        bal({k: torch.tensor(v) for k, v in losses.items()}, None, BalanceContext())
        history.append(bal.state_summary()[f"w/{slow}"])
    assert history[0] == pytest.approx(0.5)
    assert history[-1] > 0.6 and history[-1] > history[10] > history[1]


def test_famo_model_gradient_is_the_normalised_inverse_loss_weighting():
    w = nn.Parameter(torch.tensor([2.0, 3.0]))
    bal = FAMO(["a", "b"])
    with torch.no_grad():
        bal.logits.copy_(torch.tensor([0.3, -0.2]))
    z = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    bal.train(False)  # no logit update in this call
    bal({"a": w[0] ** 2, "b": 5 * w[1]}, None, BalanceContext()).backward()
    ell = torch.tensor([4.0, 15.0])
    c = 1 / (z / ell).sum()
    torch.testing.assert_close(w.grad, torch.stack([c * z[0] / ell[0] * 4.0, c * z[1] / ell[1] * 5.0]))


# ---------------------------------------------------------- cross-stitch, MMoE
@pytest.mark.parametrize("cls", [CrossStitch, MMoE])
@pytest.mark.parametrize("in_shape", [(1, 16, 16), (1, 36, 36), (3, 32, 32)])
def test_new_models_output_one_logit_row_per_sample_and_task(cls, in_shape):
    kwargs = {"kernel_size": 3} if in_shape[1] == 16 else {}
    out = cls(TASKS, in_shape, **kwargs)(torch.randn(5, *in_shape))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"a": (5, 3), "b": (5, 4)}


@pytest.mark.parametrize("cls", [CrossStitch, MMoE])
def test_new_models_partition_parameters_into_shared_and_task_specific(cls):
    model = cls(TASKS, (1, 16, 16))
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in model.task_parameters(t)} for t in TASKS]
    assert shared and all(per_task)
    assert not shared & per_task[0] and not shared & per_task[1] and not per_task[0] & per_task[1]
    assert shared | per_task[0] | per_task[1] == {id(p) for p in model.parameters()}
    # task-specific really means it: task b's loss gives no gradient to task a's parameters
    out = model(torch.randn(4, 1, 16, 16))
    grads = torch.autograd.grad(out["b"].sum(), list(model.task_parameters("a")), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in grads)
    # ...and every shared parameter reaches both tasks
    for task in TASKS:
        grads = torch.autograd.grad(model(torch.randn(4, 1, 16, 16))[task].square().sum(),
                                    list(model.shared_parameters()), allow_unused=True)
        assert all(g is not None and torch.any(g != 0) for g in grads), task


@pytest.mark.parametrize("cls", [CrossStitch, MMoE])
def test_sparsity_layers_of_new_models_exclude_input_layers_and_heads(cls):
    model = cls(TASKS, (1, 16, 16))
    layers = {id(layer.module) for layer in prunable_layers(model)}
    convs_and_fcs = {id(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    inputs = {id(m) for m in model.input_layers()}
    heads = {id(m) for m in model.head_modules()}
    assert layers == convs_and_fcs - inputs - heads
    expected_inputs = 2 if cls is CrossStitch else 3 + 2  # first conv per column / per expert (+ gates)
    assert len(inputs) == expected_inputs
    with_inputs = {id(layer.module) for layer in prunable_layers(model, Scope(input_layers=True))}
    assert inputs <= with_inputs and not with_inputs & heads


def test_cross_stitch_starts_as_paper_init_and_identity_stitch_gives_separate_columns():
    model = CrossStitch(TASKS, (1, 16, 16))
    torch.testing.assert_close(model.stitches[0]["a"].detach(), torch.tensor([0.9, 0.1]))
    identity = CrossStitch(TASKS, (1, 16, 16), self_weight=1.0)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(identity(x)["b"], identity.heads["b"](identity.columns["b"](x)))
    torch.testing.assert_close(identity.decode(identity.encode(x))["a"], identity(x)["a"])


def test_mmoe_mixture_is_gate_weighted_sum_of_experts():
    model = MMoE(TASKS, (1, 16, 16), num_experts=2)
    x = torch.randn(3, 1, 16, 16)
    g = model.gate_weights(x)["a"]
    torch.testing.assert_close(g.sum(1), torch.ones(3))
    mixture = g[:, :1] * model.experts[0](x) + g[:, 1:] * model.experts[1](x)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](mixture))


# ------------------------------------------------------------- config smoke runs
@pytest.mark.parametrize("alias", ALIASES)
def test_alias_configs_are_jd_with_their_aggregator(alias):
    node = compose_cfg([f"balancer={alias}"]).balancer
    assert node._target_ == "mtlsparse.balancers.jd.JD" and node.aggregator == alias and node.mode == "params"
    jd = compose_cfg(["balancer=jd", f"balancer.aggregator={alias}"]).balancer
    assert jd.aggregator == alias


def test_balancer_sweep_crosses_the_balancers_with_dense_and_group_lasso():
    text = (Path(CONF_DIR) / "sweep" / "balancers.yaml").read_text()
    assert text.startswith("# @package _global_") and "+sweep=balancers" in text
    params = yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    assert params["method"].split(",") == ["dense", "group_lasso"]
    balancers = params["balancer"].split(",")
    assert set(ALIASES) | {"gradnorm", "famo", "linear", "mgda"} <= set(balancers) <= set(ALL_BALANCERS)
    # every balancer option is in it but the generic `jd` (its presets are) and the two with tables of
    # their own (chebyshev: MDMTN preference sweeps; minmax: the pruning × min–max table)
    options = {p.stem for p in (Path(CONF_DIR) / "balancer").glob("*.yaml")}
    assert set(balancers) == options - {"jd", "chebyshev", "minmax"} and len(balancers) == len(set(balancers))
    assert compose_cfg(["+sweep=balancers"]).lam == 8e-4


METHOD_EXTRA = {"rigl": ["sparsity=0.5", "method.update_interval=1"], "group_lasso": ["lam=1e-3"]}


@pytest.mark.parametrize("method", ["dense", "group_lasso", "rigl"])
@pytest.mark.parametrize("balancer", ALL_BALANCERS)
def test_every_balancer_trains_with_each_sparsity_family(tiny_cfg, tmp_path, balancer, method):
    metrics = run(tiny_cfg(f"balancer={balancer}", f"method={method}", "k0=0.01", *METHOD_EXTRA.get(method, [])),
                  tmp_path)
    assert metrics["config/balancer"] == balancer and metrics["config/method"] == method
    assert 0 <= metrics["test/mean_acc"] <= 1 and math.isfinite(metrics["test/t0/loss"])
    if method == "rigl":
        assert metrics["sparsity/param"] == pytest.approx(50, abs=1)


@pytest.mark.parametrize("model", ["cross_stitch", "mmoe"])
@pytest.mark.parametrize("method", ["group_lasso", "rigl"])
@pytest.mark.parametrize("balancer", ["linear", "pcgrad", "mgda", "gradnorm"])
def test_new_models_train_with_group_lasso_and_rigl(tiny_cfg, tmp_path, model, method, balancer):
    metrics = run(tiny_cfg(f"model={model}", f"balancer={balancer}", f"method={method}",
                           *METHOD_EXTRA.get(method, [])), tmp_path)
    assert metrics["config/model"] == model
    if method == "rigl":
        assert metrics["sparsity/param"] == pytest.approx(50, abs=1)


@pytest.mark.parametrize("model", ["cross_stitch", "mmoe"])
@pytest.mark.parametrize("index", range(len(ALL_BALANCERS)))
def test_new_models_train_with_every_balancer_and_every_method(tiny_cfg, tmp_path, model, index):
    """Balancers and methods paired round-robin, so each of both meets each new model."""
    balancer, method = ALL_BALANCERS[index], ALL_METHODS[index % len(ALL_METHODS)]
    metrics = run(tiny_cfg(f"model={model}", f"balancer={balancer}", f"method={method}",
                           "sparsity=0.5", "lam=1e-3", "k0=0.01"), tmp_path)
    assert (metrics["config/balancer"], metrics["config/method"]) == (balancer, method)


def test_mgda_ub_runs_on_cross_stitch_and_fails_clearly_on_mmoe(tiny_cfg, tmp_path):
    run(tiny_cfg("model=cross_stitch", "balancer=mgda", "balancer.mode=representation"), tmp_path / "cs")
    with pytest.raises(ValueError, match="MMoE has none"):
        run(tiny_cfg("model=mmoe", "balancer=mgda", "balancer.mode=representation"), tmp_path / "mmoe")
    with pytest.raises(ValueError, match="MMoE has none"):
        run(tiny_cfg("model=mmoe", "balancer=pcgrad", "balancer.mode=representation"), tmp_path / "mmoe2")


# ------------------------------------------------- sparsity invariants with JD
def tiny_module(tmp_path, *overrides):
    cfg = compose_cfg(TINY + list(overrides), data_root=tmp_path / "data")
    datamodule = build(cfg, "dataset")
    return build_module(cfg, datamodule), datamodule


def test_module_training_step_leaves_exactly_the_pcgrad_direction_in_grad(tmp_path):
    module, datamodule = tiny_module(tmp_path, "balancer=pcgrad", "method=rigl", "sparsity=0.5", "model.dropout=0")
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    shared = list(module.model.shared_parameters())
    out = module.model(x)
    losses = {t: task.loss(out[t], y[t]) for t, task in module.tasks.items()}
    expected = unflatten(tja.PCGrad()(jacobian({"a": losses["t0"], "b": losses["t1"]}, shared)), shared)
    module.training_step((x, y), 0).backward()
    for p, d in zip(shared, expected):
        torch.testing.assert_close(p.grad, d, rtol=1e-5, atol=1e-7)  # dense: masked entries included
    assert any(torch.any(layer.weight.grad[~mask_of(layer)] != 0) for layer in module.method.layers)


class StepProbe(L.Callback):
    """Calls `check(module)` after every training step (after the optimizer step and the method's hooks)."""

    def __init__(self, check) -> None:
        self.check = check

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.check(module)


def fit(module, datamodule, steps: int, probe: StepProbe) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[probe])
    trainer.fit(module, datamodule=datamodule)


def test_rigl_with_pcgrad_keeps_masked_weights_exactly_zero_while_rewiring(tmp_path):
    module, datamodule = tiny_module(tmp_path, "balancer=pcgrad", "method=rigl", "sparsity=0.7",
                                     "method.update_interval=1", "method.end_step=4", "optimizer.lr=0.05")
    layers = module.method.layers
    counts = [int(mask_of(layer).sum()) for layer in layers]
    masks = []

    def check(m):
        for layer, count in zip(layers, counts):
            assert torch.all(layer.weight[~mask_of(layer)] == 0)
            assert int(mask_of(layer).sum()) == count
        masks.append(torch.cat([mask_of(layer).flatten() for layer in layers]).clone())

    fit(module, datamodule, 5, StepProbe(check))
    assert len(masks) == 5
    assert any(not torch.equal(a, b) for a, b in itertools.pairwise(masks))  # RigL did rewire


def test_group_lasso_with_upgrad_keeps_zero_groups_zero_below_the_prox_threshold(tmp_path):
    """Adam-metric prox after every step: a zero group stays zero iff its Adam momentum RMS ‖m̂_g‖/√|g| ≤ λ."""
    lam = 5e-3
    module, datamodule = tiny_module(tmp_path, "balancer=upgrad", "method=group_lasso", f"lam={lam}",
                                     "optimizer.lr=0.01", "k0=0.01")
    layers = module.method.layers
    history: list[list[torch.Tensor]] = []
    checked = []

    def check(m):
        zero = [group_norms(layer.weight.detach()) == 0 for layer in layers]
        if history:
            optimizer = m.trainer.optimizers[0]
            beta1 = optimizer.param_groups[0]["betas"][0]
            for layer, before, after in zip(layers, history[-1], zero):
                state = optimizer.state[layer.weight]
                m_hat = state["exp_avg"] / (1 - beta1 ** float(state["step"]))
                rms = group_norms(m_hat) / math.sqrt(layer.group_size)
                clear = (rms - lam).abs() > 1e-6 * lam  # leave out float ties at the threshold
                assert torch.equal(after[before & clear], (rms <= lam)[before & clear])
                checked.append(int((before & clear).sum()))
        history.append(zero)

    fit(module, datamodule, 8, StepProbe(check))
    counts = [int(torch.cat(z).sum()) for z in history]
    assert counts[-1] > counts[0] and sum(checked) > 0  # the prox zeroed groups, and zero groups were followed


def test_bench_times_balancers_relative_to_linear(tmp_path):
    from mtlsparse.benchmarks.balancers import main

    main(["--steps", "2", "--warmup", "1", "--repeats", "1", "--balancers", "pcgrad,famo", "--settings", "2",
          "--overrides", "dataset=synthetic", "dataset.batch_size=32", "--out", str(tmp_path / "bench"),
          "--data-root", str(tmp_path / "data")])
    results = yaml.safe_load((tmp_path / "bench" / "balancers.json").read_text())["settings"]["2"]
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) == {"linear", "pcgrad (jacobian)", "pcgrad (gramian)", "famo"} and results["batch_size"] == 32
    assert all(row["ms_per_step"] > 0 for row in rows.values()) and rows["linear"]["vs_linear"] == 1.0
    assert rows["pcgrad (gramian)"]["speedup"] > 0  # Jacobian-path time over Gramian-path time
    table = (tmp_path / "bench" / "balancers.md").read_text()
    assert "| linear |" in table and "load average" in table and "torch threads" in table
