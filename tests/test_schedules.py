"""Epoch schedules as fractions of the run: resolution for any budget, the default budget's epochs
unchanged, unreachable explicit epochs as config errors, and every pruning / DST method ending at
its target in a 2-epoch run."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_class
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from mtlsparse.config import build
from mtlsparse.errors import ConfigError
from mtlsparse.sparsity.budget import epoch_count, point_epoch
from mtlsparse.sparsity.dst import MinMaxDST, RigL
from mtlsparse.sparsity.group_lasso import GroupLasso
from mtlsparse.sparsity.growl import GrOWL
from mtlsparse.sparsity.l1 import L1
from mtlsparse.sparsity.magnitude import Magnitude
from mtlsparse.sparsity.masks import MaskedMethod
from mtlsparse.sparsity.reweighted_l1 import ReweightedL1
from mtlsparse.train import run

from conftest import REPO, compose_cfg
from test_masks import attach, fit_state

METHOD_DIR = Path(REPO, "conf", "method")


def method_class(name: str) -> type:
    """The class a conf/method option builds (growl's yaml is global: its target sits under `method`)."""
    yaml = OmegaConf.load(METHOD_DIR / f"{name}.yaml")
    return get_class(yaml.get("_target_") or yaml.method._target_)


#: every option of conf/method that prunes or trains sparse to a target
TARGETED = sorted(p.stem for p in METHOD_DIR.glob("*.yaml") if issubclass(method_class(p.stem), MaskedMethod))
budgets = st.integers(min_value=1, max_value=400)
fractions = st.floats(min_value=0.0, max_value=1.0)
FAST = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------ the resolution rule
@FAST
@given(budgets, fractions, fractions)
def test_points_lie_in_the_run_are_monotone_and_mark_the_fraction_done(n, f, g):
    lo, hi = sorted((f, g))
    assert 0 <= point_epoch(lo, n) <= point_epoch(hi, n) <= n - 1
    epoch = point_epoch(f, n)
    if 1 <= f * n <= n:  # unclamped: the point's epoch ends with ≈ f of the run done
        assert abs((epoch + 1) - f * n) <= 0.5 + 1e-9
    assert point_epoch(1.0, n) == n - 1


@FAST
@given(budgets, fractions, fractions)
def test_lengths_lie_in_the_run_and_are_monotone(n, f, g):
    lo, hi = sorted((f, g))
    assert 0 <= epoch_count(lo, n) <= epoch_count(hi, n) <= n
    assert abs(epoch_count(f, n) - f * n) <= 0.5 + 1e-9


# ------------------------------------------------------------------ per method, any budget
def magnitude_epochs(n: int, **fractions) -> dict[str, int]:
    method = Magnitude(sparsity=0.5, **fractions)
    method.set_budget(n)
    return method.epochs


@FAST
@given(budgets, fractions, fractions)
def test_magnitude_points_lie_in_the_run_and_are_monotone(n, f, g):
    lo, hi = sorted((f, g))
    one, other = magnitude_epochs(n, prune_fraction=lo)["prune"], magnitude_epochs(n, prune_fraction=hi)["prune"]
    assert 0 <= one <= other <= n - 1
    gradual = magnitude_epochs(n, schedule="gradual", start_fraction=lo, end_fraction=hi)
    assert 0 <= gradual["start"] <= gradual["end"] <= n - 1


def reweighted_stages(n: int, pretrain: float, reweight: float) -> tuple[int, int]:
    method = ReweightedL1(sparsity=0.5, pretrain_fraction=pretrain, reweight_fraction=reweight)
    method.set_budget(n)
    return method.stages


@FAST
@given(budgets, fractions, fractions, fractions)
def test_reweighted_l1_prunes_within_the_run_and_later_for_larger_fractions(n, a, b, reweight):
    pretrain, later = sorted((a, b))
    reweight = min(reweight, 1 - later)  # pretrain + reweight <= 1 for both pretrain fractions
    p, r = reweighted_stages(n, pretrain, reweight)
    assert 0 <= p <= p + r <= n  # the prune: at the end of epoch p + r − 1 <= n − 1 (at fit start when 0)
    p2, r2 = reweighted_stages(n, later, reweight)
    assert p2 >= p and p2 + r2 >= p + r
    p3, r3 = reweighted_stages(n, pretrain, min(1 - pretrain, 2 * reweight))
    assert p3 == p and r3 >= r


@FAST
@given(budgets, fractions, fractions)
def test_minmax_dst_last_rewire_lies_in_the_run_and_is_monotone(n, f, g):
    lo, hi = sorted((f, g))
    ends = []
    for fraction in (lo, hi):
        method = MinMaxDST(sparsity=0.5, end_fraction=fraction)
        method.set_budget(n)
        ends.append(method.last_rewire_epoch)
    assert 0 <= ends[0] <= ends[1] <= n - 1


@FAST
@given(budgets, fractions, fractions)
def test_refit_leaves_a_prox_epoch_and_is_monotone(n, f, g):
    lo, hi = sorted((f, g))
    refits = []
    for fraction in (lo, hi):
        method = L1(lam=0.1, finetune_fraction=fraction)
        method.set_budget(n)
        refits.append(method.refit_epochs)
    assert 0 <= refits[0] <= refits[1] <= max(n - 1, 0)
    if lo > 0 and n > 1:
        assert refits[0] >= 1  # a refit asked for happens, however short the run


@FAST
@given(st.integers(min_value=2, max_value=400), st.integers(1, 20), st.integers(1, 20), st.integers(1, 20))
def test_growl_runs_both_phases_and_phase_one_grows_with_its_share(n, m1, m2, more):
    lengths = []
    for phase2 in (m2 + more, m2):  # a smaller M2: a larger share for phase 1
        method = GrOWL(phase1_iterations=m1, phase2_iterations=phase2)
        method.set_budget(n)
        assert 1 <= method.phase1_epochs <= n - 1
        assert method.phase(n - 1) == 2  # phase 2 trains at least one epoch
        assert method.cap(method.phase1_epochs - 1) == pytest.approx(method.s_lmax)  # phase 1 ends at the full cap
        caps = [method.cap(e) for e in range(method.phase1_epochs)]
        assert caps == sorted(caps)
        lengths.append(method.phase1_epochs)
    assert lengths[0] <= lengths[1]


# ------------------------------------------------------------------ the default budget keeps today's epochs
#: the explicit epochs conf/method held before schedules became fractions (at the default budget)
TODAY = {
    "magnitude": {"epochs": {"prune": 9}},
    "magnitude method.schedule=gradual": {"epochs": {"start": 2, "end": 19}},
    "reweighted_l1": {"stages": (5, 10)},
    "minmax_dst": {"last_rewire_epoch": 21},
    "group_lasso": {"refit_epochs": 0},
    "l1": {"refit_epochs": 0},
    "growl": {"phase1_epochs": 9},  # M1·p of the 39-epoch recipe
}


@pytest.mark.parametrize("option", sorted(TODAY))
def test_default_budget_resolves_to_the_former_explicit_epochs(option):
    name, *extra = option.split()
    cfg = compose_cfg([f"method={name}", "sparsity=0.9", *extra])
    method = build(cfg, "method")
    method.set_budget(cfg.trainer.max_epochs)
    assert {key: getattr(method, key) for key in TODAY[option]} == TODAY[option]


def test_growl_phases_at_the_default_budget_are_iterations_of_p_epochs():
    cfg = compose_cfg(["method=growl"])
    method = build(cfg, "method")
    method.set_budget(cfg.trainer.max_epochs)
    p = method.epochs_per_iteration
    assert [method.iteration(e) for e in range(method.phase1_epochs)] == [e // p + 1 for e in range(9)]
    assert [method.iteration(e) for e in range(9, 39)] == [(e - 9) // p + 1 for e in range(9, 39)]


# ------------------------------------------------------------------ explicit epochs the run cannot reach
UNREACHABLE = [
    (Magnitude, {"prune_epoch": 9}, "method.prune_epoch=9", "method.prune_fraction"),
    (Magnitude, {"schedule": "gradual", "end_epoch": 19}, "method.end_epoch=19", "method.end_fraction"),
    (Magnitude, {"schedule": "gradual", "start_epoch": 2, "end_epoch": 3}, "method.start_epoch=2",
     "method.start_fraction"),
    (MinMaxDST, {"end_epoch": 21}, "method.end_epoch=21", "method.end_fraction"),
    (ReweightedL1, {"pretrain_epochs": 5}, "method.pretrain_epochs=5", "method.pretrain_fraction"),
    (ReweightedL1, {"pretrain_epochs": 1, "reweight_epochs": 2}, "method.reweight_epochs=2",
     "method.reweight_fraction"),
    (GroupLasso, {"finetune_epochs": 18}, "method.finetune_epochs=18", "method.finetune_fraction"),
    (L1, {"finetune_epochs": 2}, "method.finetune_epochs=2", "method.finetune_fraction"),
    (GrOWL, {"phase1_epochs": 2}, "method.phase1_epochs=2", "method.phase1_iterations"),
]


@pytest.mark.parametrize(("cls", "kwargs", "key", "alternative"), UNREACHABLE,
                         ids=[f"{c.__name__}-{k}" for c, _, k, _ in UNREACHABLE])
def test_an_explicit_epoch_past_the_run_names_both_keys(cls, kwargs, key, alternative):
    method = cls(**kwargs)
    with pytest.raises(ConfigError) as err:
        method.set_budget(2)
    message = str(err.value)
    assert key in message and "trainer.max_epochs=2" in message and alternative in message


def test_an_explicit_epoch_inside_the_run_is_taken_as_given():
    method = Magnitude(sparsity=0.5, prune_epoch=1, prune_fraction=0.0)
    method.set_budget(2)
    assert method.epochs == {"prune": 1}


def test_a_fraction_in_an_epoch_key_or_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method.prune_epoch must be null or an integer.*method.prune_fraction"):
        Magnitude(prune_epoch=0.5)
    with pytest.raises(ConfigError, match=r"method.end_fraction must be a fraction .* got 1.5"):
        MinMaxDST(end_fraction=1.5)


def test_fractions_need_a_finite_budget():
    with pytest.raises(ConfigError, match="method.prune_fraction.*unbounded.*method.prune_epoch"):
        Magnitude().set_budget(-1)
    Magnitude(prune_epoch=3).set_budget(None)  # explicit epochs need no budget


def test_rigl_end_step_past_the_run_is_a_config_error():
    method, model = attach(RigL(sparsity=0.8, end_step=500))
    with pytest.raises(ConfigError, match=r"method.end_step=500 is past .*\(400 steps.*method.end_fraction"):
        method.on_fit_start(fit_state(model, total_steps=400))


def test_the_run_rejects_an_unreachable_epoch_before_training(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=magnitude", "sparsity=0.9", "method.prune_epoch=9", "trainer.max_epochs=2")
    with pytest.raises(ConfigError, match=r"method.prune_epoch=9 .* trainer.max_epochs=2"):
        run(cfg, tmp_path)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------ tiny budgets end at the target
@pytest.mark.parametrize("method", TARGETED)
def test_two_epochs_end_at_the_target_with_the_default_schedule(tiny_cfg, tmp_path, method):
    metrics = run(tiny_cfg(f"method={method}", "sparsity=0.9", "trainer.max_epochs=2"), tmp_path)
    assert metrics["sparsity/param"] == pytest.approx(90, abs=0.5)


def test_targeted_methods_cover_every_pruning_and_dst_option():
    assert {"magnitude", "reweighted_l1", "snip", "disparse_static", "rigl", "set", "disparse_dynamic",
            "minmax_dst"} <= set(TARGETED)
