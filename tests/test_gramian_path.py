"""The Gramian path of the gradient balancers (`balancer.path=gramian|jacobian|auto`).

For every rule that has both paths, one training step of `hps` on tiny fake Multi-Fashion
data (float64) gives the same parameter gradients either way, in params and in
representation mode, with the sparsity objective in the loss; under two DDP ranks too (the
Jacobian averaged over ranks, rank 0's weights). Rules that need the Jacobian refuse
`path=gramian` in one line; models autogram cannot see through fall back (`auto`) or refuse.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtlsparse.balancers import JD
from mtlsparse.config import ConfigError, build
from mtlsparse.gradients import GramianPathError, check_path, resolve_path
from mtlsparse.train import build_module, run

from conftest import compose_cfg
from fakes import write_fake_source

#: balancer options with a Gramian path: torchjd's Gramian weightings, exact MGDA, Nash-MTL via G's factor
JD_RULES = ["upgrad", "dualproj", "aligned_mtl", "pcgrad", "imtl_g", "cagrad", "gradvac", "nashmtl", "jd_mgda"]
RULES = [*JD_RULES, "mgda", "mgda_none", "fairgrad"]
NEEDS_SOLVER = {"cagrad", "nashmtl"}
OVERRIDES = {"jd_mgda": ["balancer=jd", "balancer.aggregator=mgda"], "mgda_none": ["balancer=mgda",
                                                                                 "balancer.normalization=none"]}
DATA = ["dataset=multi_fashion", "dataset.train_pairs=64", "dataset.test_pairs=16", "dataset.batch_size=16",
        "model=hps", "trainer=cpu", "export.enabled=false"]
#: the sparsity objective is part of the loss (k0·L0), so its gradient must come out the same as well
PENALTY = ["method=l1", "lam=1e-3", "k0=0.5"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_source(root / "FashionMNIST" / "raw", seed=1)
    return root


def rule_overrides(rule: str) -> list[str]:
    if rule in NEEDS_SOLVER:
        pytest.importorskip("cvxpy")
    return OVERRIDES.get(rule, [f"balancer={rule}"])


def step(overrides: list[str], data_root, seed: int = 0, batch_slice: slice = slice(None)):
    """One training step (MultiTaskModule.training_step + backward) in float64: (gradients by name, loss, weights)."""
    cfg = compose_cfg([*DATA, *overrides], data_root=data_root)
    datamodule = build(cfg, "dataset")
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    x, y = x[batch_slice].double(), {t: v[batch_slice] for t, v in y.items()}
    torch.manual_seed(1234)
    module = build_module(cfg, datamodule).double().train()
    torch.manual_seed(seed)  # the same dropout mask (and PCGrad / GradVac order) on both paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step((x, y), 0)
    loss.backward()
    grads = {name: p.grad for name, p in module.model.named_parameters()}
    weights = getattr(module.balancer, "weights", getattr(module.balancer, "alpha", None))
    return grads, float(loss), None if weights is None else weights.clone(), module


def assert_same_gradients(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    scale = max(float(g.abs().max()) for g in a.values() if g is not None)
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:  # conv biases before BatchNorm have ~1e-17 gradients: tolerance on the global scale
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-9 * scale, msg=name)


# ------------------------------------------------------------------ same update on both paths
@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("rule", RULES)
def test_gramian_path_gives_the_jacobian_paths_gradients(rule, mode, data_root):
    base = [*rule_overrides(rule), f"balancer.mode={mode}", *PENALTY]
    jac, jac_loss, jac_w, _ = step([*base, "balancer.path=jacobian"], data_root)
    gram, gram_loss, gram_w, module = step([*base, "balancer.path=gramian"], data_root)
    assert_same_gradients(jac, gram)
    assert gram_loss == pytest.approx(jac_loss, rel=1e-12)
    torch.testing.assert_close(gram_w, jac_w, rtol=1e-5, atol=1e-9)
    on_gramian = module.balancer.grad_path.gramian_path
    assert on_gramian and (module.balancer.grad_path.autogram is not None) == (mode == "params")


@pytest.mark.parametrize("model", ["mtan", "mdmtn", "mmoe", "kdmtl"])
def test_other_models_get_the_same_update_on_both_paths(model, data_root):
    """Task-specific parameters inside the network (attention, monitors, gates), not only heads."""
    base = ["balancer=upgrad", f"model={model}", *PENALTY]
    if model == "kdmtl":
        base.append("model.allow_untrained_teachers=true")
    assert_same_gradients(step([*base, "balancer.path=jacobian"], data_root)[0],
                          step([*base, "balancer.path=gramian"], data_root)[0])


def test_jd_gramian_path_gives_the_heads_the_plain_sum_of_task_gradients(data_root):
    """Σ_t ∇L_t on the task-specific parameters (jd's contract), not Σ_t w_t ∇L_t of the weighted loss."""
    grads, _, weights, module = step(["balancer=upgrad", "balancer.path=gramian"], data_root)
    assert not torch.allclose(weights, torch.ones_like(weights))
    cfg = compose_cfg([*DATA, "balancer=linear"], data_root=data_root)
    datamodule = build(cfg, "dataset")
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(1234)
    plain = build_module(cfg, datamodule).double().train()
    torch.manual_seed(0)
    out = plain.model(x.double())
    sum(plain.tasks[t].loss(out[t], y[t]) for t in plain.tasks).backward()
    for name, p in plain.model.named_parameters():
        if name.startswith("heads."):
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ choosing the path
def test_jacobian_only_rules_refuse_path_gramian_in_one_line(tmp_path):
    for rule, why in [("graddrop", "signs of the task gradients"), ("jd", "pseudo-inverse")]:
        extra = ["balancer.aggregator=config"] if rule == "jd" else []
        cfg = compose_cfg(["dataset=synthetic", "trainer=cpu", f"balancer={rule}", *extra, "balancer.path=gramian"],
                          data_root=tmp_path)
        with pytest.raises(ConfigError, match=rf"needs the per-task Jacobian \(.*{why}.*\), so "
                                              r"balancer.path=gramian is not available for it: use "
                                              r"balancer.path=jacobian \(or auto\)") as err:
            run(cfg, tmp_path / rule)
        assert "\n" not in str(err.value)


def test_auto_is_the_gramian_path_where_the_rule_allows_it():
    assert JD(["a", "b"], aggregator="upgrad", path="auto").grad_path.path == "gramian"
    assert JD(["a", "b"], aggregator="pcgrad", path="auto").grad_path.path == "gramian"
    assert JD(["a", "b"], aggregator="graddrop", path="auto").grad_path.path == "jacobian"
    assert JD(["a", "b"], aggregator="upgrad").grad_path.path == "jacobian"  # the default: today's path
    assert resolve_path("auto", "x", None) == "gramian" and resolve_path("auto", "x", "why") == "jacobian"
    with pytest.raises(ValueError, match=r"balancer.path must be one of \('jacobian', 'gramian', 'auto'\)"):
        check_path("gram")


def test_a_model_autogram_cannot_see_through_refuses_gramian_and_auto_falls_back(data_root, caplog):
    """Cross-stitch reads its stitch units' parameters without calling them: autogram would miss them."""
    base = ["balancer=upgrad", "model=cross_stitch"]
    with pytest.raises(GramianPathError, match=r"reads the shared parameters of stitches.0, stitches.1 without "
                                               r"calling the module.*balancer.path=jacobian"):
        step([*base, "balancer.path=gramian"], data_root)
    jac = step([*base, "balancer.path=jacobian"], data_root)[0]
    with caplog.at_level("WARNING"):
        auto, _, _, module = step([*base, "balancer.path=auto"], data_root)
    assert "balancer.path=auto keeps the Jacobian path" in caplog.text
    assert module.balancer.grad_path.path == "jacobian" and module.balancer.grad_path.autogram is None
    assert_same_gradients(jac, auto)
    # representation mode needs no autogram: cross-stitch's z splits shared from task-specific parameters
    rep = [*base, "balancer.mode=representation"]
    assert_same_gradients(step([*rep, "balancer.path=jacobian"], data_root)[0],
                          step([*rep, "balancer.path=gramian"], data_root)[0])


def test_the_model_carries_no_autogram_hooks_between_steps(data_root):
    """Only the pre-hook stays; eval forwards, deep copies (export) and checkpoints are as on the Jacobian path."""
    _, _, _, module = step(["balancer=upgrad", "balancer.path=gramian"], data_root)
    model = module.model
    assert not any(m._forward_hooks for m in model.modules())
    assert len(model._forward_pre_hooks) == 1
    copied = copy.deepcopy(model).eval()
    with torch.no_grad():
        x = torch.randn(2, 1, 36, 36, dtype=torch.float64)
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x).values(), copied(x).values()))
    _, _, _, jac_module = step(["balancer=upgrad", "balancer.path=jacobian"], data_root)
    assert module.state_dict().keys() == jac_module.state_dict().keys()


# ------------------------------------------------------------------ DDP
DDP_CASES = [("upgrad", "params"), ("pcgrad", "params"), ("mgda", "params"), ("fairgrad", "params"),
             ("upgrad", "representation"), ("mgda", "representation")]


def _ddp_worker(rank: int, world: int, init: str, data_root: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for rule, mode in DDP_CASES:
            for path in ("jacobian", "gramian"):
                # each rank its own half of the batch and its own RNG stream (dropout, PCGrad's order)
                grads, _, weights, _ = step([f"balancer={rule}", f"balancer.mode={mode}", f"balancer.path={path}",
                                             *PENALTY], data_root, seed=rank, batch_slice=slice(8 * rank, 8 * rank + 8))
                flat = torch.cat([g.flatten() for g in grads.values() if g is not None])
                dist.all_reduce(flat)  # what DDP's reducer does to .grad
                results[rule, mode, path] = (flat / world, weights)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_the_same_update_on_both_paths(data_root, tmp_path):
    """Params mode: J averaged over ranks inside autogram's per-module blocks, rank 0's weights; rep mode: per rank."""
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", str(data_root), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rule, mode in DDP_CASES:
        jac, jac_w = ranks[0][rule, mode, "jacobian"]
        for rank in ranks:
            gram, gram_w = rank[rule, mode, "gramian"]
            torch.testing.assert_close(gram, jac, rtol=1e-5, atol=1e-9 * float(jac.abs().max()),
                                       msg=f"{rule} {mode}")
            if mode == "params":  # one global Gramian, one set of weights on every rank
                torch.testing.assert_close(gram_w, jac_w, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(ranks[1][rule, mode, "jacobian"][0], jac)  # the reduced update agrees
