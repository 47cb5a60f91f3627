"""Gradient-manipulation balancers built on torchjd's aggregators (UPGrad, PCGrad, CAGrad, Nash-MTL, ...).

Each step, the per-task gradients g_t of the shared parameters (`mode=params`) or of the
shared representation z (`mode=representation`: a backward through the heads only, as
in MGDA-UB) form a Jacobian J with one row per task (`mtlsparse.gradients`); a torchjd
aggregator maps J to one update direction d. The balancer then returns a surrogate
scalar whose gradient is exactly d on the shared parameters (Jᵀ_z d, pulled back through
the trunk, in representation mode), Σ_t ∇L_t on every other parameter (heads, attention,
fusion weights), plus k0·∇L0. So Lightning's backward, gradient clipping, the optimizer step and
the sparsity hooks (prox, mask re-application, RigL's reading of `.grad`) run unchanged.
Weightings that ignore the gradients (`rlw`, `mean`, `sum`) skip J: Σ_t w_t L_t.
Aggregators run in float32 (float64 for a float64 Jacobian) outside autocast, whatever the
training precision; d is cast back to the gradients' dtype. `mgda` uses the project's exact
min-norm solver (torchjd's MGDA is Frank–Wolfe with a loose stopping rule).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchjd.aggregation as tja
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer, require_shared_parameters
from mtlsparse.balancers.min_norm import min_norm_weights_of_gram
from mtlsparse.gradients import (
    check_mode,
    from_rank0_,
    gramian,
    linear_surrogate,
    pull_back,
    rank_mean_,
    representation_of,
    require_representation,
    split_like,
    task_jacobian,
    trainable_shared,
)

SOLVERS_HINT = 'pip install "mtlsparse[solvers]"'


@dataclass(frozen=True)
class AggregatorSpec:
    """How to build one torchjd aggregator: constructor, default options, what it needs."""

    factory: Callable[..., tja.Aggregator]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    preference: bool = False      # takes the task preference k as its `pref_vector`
    gradient_free: bool = False   # its weights ignore the gradients (loss weighting, no Jacobian)
    extra: str | None = None      # torchjd extra holding its optional solver


class MinNormWeighting(tja.Weighting):
    """MGDA's weights from the Jacobian: the exact min-norm point of the rows' convex hull (float64 Gramian)."""

    def forward(self, matrix: Tensor, /) -> Tensor:
        return min_norm_weights_of_gram(gramian(matrix)).to(matrix)


class ExactMGDA(tja.WeightedAggregator):
    """MGDA with the exact min-norm solver: d = Σ α_t g_t, every g_t·d ≥ ‖d‖² (no task's loss rises)."""

    def __init__(self) -> None:
        super().__init__(MinNormWeighting())


def _nash_mtl(n_tasks: int, **options: Any) -> tja.Aggregator:
    return tja.NashMTL(n_tasks=n_tasks, **options)


AGGREGATORS: dict[str, AggregatorSpec] = {
    "upgrad": AggregatorSpec(tja.UPGrad, preference=True),
    "dualproj": AggregatorSpec(tja.DualProj, preference=True),
    "aligned_mtl": AggregatorSpec(tja.AlignedMTL, {"scale_mode": "min"}, preference=True),
    "config": AggregatorSpec(tja.ConFIG, preference=True),
    "mgda": AggregatorSpec(ExactMGDA),
    "pcgrad": AggregatorSpec(tja.PCGrad),
    "imtl_g": AggregatorSpec(tja.IMTLG),
    "cagrad": AggregatorSpec(tja.CAGrad, {"c": 0.4}, extra="cagrad"),
    "nashmtl": AggregatorSpec(_nash_mtl, {"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20},
                              extra="nash-mtl"),
    "graddrop": AggregatorSpec(tja.GradDrop, {"leak": None}),
    "gradvac": AggregatorSpec(tja.GradVac, {"beta": 0.5}),
    "rlw": AggregatorSpec(tja.Random, gradient_free=True),
    "mean": AggregatorSpec(tja.Mean, gradient_free=True),
    "sum": AggregatorSpec(tja.Sum, gradient_free=True),
}


class MissingSolverError(ImportError, ValueError):
    """An aggregator's optional solver (cvxpy, ...) is not installed; the message names the pip command.

    A ValueError too, so config building reports it as a one-line configuration error.
    """


def aggregator_options(name: str) -> list[str]:
    """Keyword options of aggregator `name` that a config may set."""
    params = inspect.signature(AGGREGATORS[name].factory).parameters
    return [p for p in params if p not in ("pref_vector", "n_tasks", "options")] + [
        k for k in AGGREGATORS[name].defaults if k not in params]


def build_aggregator(name: str, num_tasks: int, preference: Tensor | None,
                     options: Mapping[str, Any]) -> tja.Aggregator:
    """The torchjd aggregator `name` with its defaults overridden by `options` (lists become tensors)."""
    if name not in AGGREGATORS:
        raise ValueError(f"balancer.aggregator must be one of {sorted(AGGREGATORS)}, got {name!r}")
    spec = AGGREGATORS[name]
    allowed = aggregator_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for balancer.aggregator={name}; allowed: {allowed}")
    kwargs = {**spec.defaults, **options}
    kwargs = {k: torch.tensor([float(x) for x in v]) if isinstance(v, Sequence) and not isinstance(v, str) else v
              for k, v in kwargs.items()}
    if spec.preference:
        kwargs["pref_vector"] = preference
    if spec.factory is _nash_mtl:
        kwargs["n_tasks"] = num_tasks
    try:
        return spec.factory(**kwargs)
    except ImportError as err:
        raise MissingSolverError(f"balancer.aggregator={name} needs an optional solver ({err}). Install it with: "
                                 f'{SOLVERS_HINT} (or pip install "torchjd[{spec.extra}]")') from err


class JD(Balancer):
    """Jacobian-descent balancer: per-task gradients → torchjd aggregator → update direction d.

    `aggregator` picks the rule (`upgrad` default; `pcgrad`, `cagrad`, `nashmtl`, `imtl_g`,
    `aligned_mtl`, `graddrop`, `dualproj`, `gradvac`, `mgda`, `config`, `rlw`, `mean`, `sum`);
    further keyword options go to its torchjd constructor (e.g. `c` for cagrad). The
    preference `k` is the `pref_vector` of aggregators that take one (upgrad, dualproj,
    aligned_mtl, config) and unused by the others. Under DDP in params mode every rank
    aggregates the rank-averaged Jacobian and uses rank 0's d (random aggregators agree);
    representation mode aggregates each rank's own batch. The state of the stateful
    aggregators (GradVac's similarity EMA, Nash-MTL's last weights) is saved in checkpoints.
    The returned value is Σ k_t L_t (+ k0·L0), for logging; its gradient is the direction above.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 aggregator: str = "upgrad", mode: str = "params", **options: Any) -> None:
        super().__init__(tasks, k0, k)
        check_mode(mode)
        built = build_aggregator(aggregator, len(self.tasks), self.k.clone(), dict(options))
        # a plain attribute, not a submodule: stateful aggregators' lazily created buffers would break strict loading
        object.__setattr__(self, "aggregator", built)
        self.aggregator_name, self.mode, self.spec = aggregator, mode, AGGREGATORS[aggregator]
        self.needs_representation = mode == "representation" and not self.spec.gradient_free
        self.register_buffer("weights", torch.full((len(self.tasks),), float("nan")), persistent=False)
        self._params: list[nn.Parameter] | None = None

    @property
    def name(self) -> str:
        return f"jd/{self.aggregator_name}"

    def setup(self, model: nn.Module) -> None:
        """Remember the model's parameters (non-shared ones get Σ_t ∇L_t); check the mode fits the model."""
        self._params = list(model.parameters())
        if self.spec.gradient_free:
            return
        require_shared_parameters(f"balancer={self.aggregator_name} (balancer=jd)", model)
        if self.needs_representation:
            require_representation(self.name, model)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        value = (self.k * stacked).sum()
        if self.spec.gradient_free:
            with torch.no_grad():
                weights = self.aggregator.weighting(stacked.detach().reshape(-1, 1)).to(stacked)
                self.weights.copy_(weights)
            return self.add_penalty((weights * stacked).sum(), penalty)
        if self._params is None:
            raise RuntimeError(f"balancer {self.name}: call setup(model) before training (MultiTaskModule does)")
        return self.add_penalty(linear_surrogate(self._directions(losses, ctx), value), penalty)

    def _directions(self, losses: dict[str, Tensor], ctx: BalanceContext) -> list[tuple[Tensor, Tensor]]:
        """(parameter, gradient) pairs: d on the shared parameters, Σ_t ∇L_t on the others."""
        shared_ids = {id(p) for p in ctx.shared_params}
        others = [p for p in self._params if p.requires_grad and id(p) not in shared_ids]
        if self.needs_representation:
            z = representation_of(ctx.representation, self.name)
            shared_params = [p for p in ctx.shared_params if p.requires_grad]
            rows_of = [z]
        else:
            shared_params = rows_of = trainable_shared(ctx.shared_params, f"balancer {self.name}")
        jac, other_grads = task_jacobian([losses[t] for t in self.tasks], rows_of, others)
        direction = self._aggregate(jac)
        if self.needs_representation:  # pull d back through the trunk: Jᵀ_z d on the shared parameters
            shared_pairs = pull_back(z, direction, shared_params)
        else:
            shared_pairs = list(zip(shared_params, split_like(direction, shared_params)))
        return shared_pairs + [(p, g) for p, g in zip(others, other_grads) if g is not None]

    @torch.no_grad()
    def _aggregate(self, jacobian: Tensor) -> Tensor:
        """Direction d from the Jacobian (rows = tasks); records the task weights when the rule has them.

        torchjd's solvers and its float32 preference vector need float32 or float64 (bf16/fp16
        gradients come from representation mode under mixed precision), so J is promoted and
        autocast is off here; d comes back in J's dtype.
        """
        global_rows = not self.needs_representation
        if global_rows:
            rank_mean_(jacobian)
        work = jacobian.to(torch.float64 if jacobian.dtype == torch.float64 else torch.float32)
        with torch.autocast(work.device.type, enabled=False):
            direction = self._aggregate_in(work).to(jacobian.dtype)
        if global_rows:
            from_rank0_(direction)
        if not torch.isfinite(direction).all():
            raise FloatingPointError(f"balancer {self.name} produced a non-finite update direction from task "
                                     f"gradients of norms {jacobian.norm(dim=1).tolist()}")
        return direction

    def _aggregate_in(self, jacobian: Tensor) -> Tensor:
        """The aggregator applied to a float32/float64 Jacobian, its preference vector in the same dtype."""
        pref = self.aggregator.pref_vector if self.spec.preference else None
        if pref is not None and (pref.device, pref.dtype) != (jacobian.device, jacobian.dtype):
            self.aggregator.pref_vector = self.k.to(jacobian)
        if isinstance(self.aggregator, tja.WeightedAggregator):
            weights = self.aggregator.weighting(jacobian).to(jacobian)
            self.weights.copy_(weights)
            return weights @ jacobian
        return self.aggregator(jacobian)

    def get_extra_state(self) -> dict[str, Any]:
        """Checkpointed state of stateful aggregators (tensors and ints only, so weights_only loading works).

        It reaches into torchjd 0.18's GradVac / Nash-MTL attributes (the version is pinned in pyproject).
        """
        weighting = getattr(self.aggregator, "gramian_weighting", None) or getattr(self.aggregator, "weighting", None)
        if isinstance(weighting, tja.GradVacWeighting) and weighting._phi_t is not None:
            return {"phi": weighting._phi_t.clone()}
        if isinstance(self.aggregator, tja.NashMTL):
            return {"step": int(weighting.step), "alpha": torch.from_numpy(weighting.prvs_alpha.copy())}
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        weighting = getattr(self.aggregator, "gramian_weighting", None) or getattr(self.aggregator, "weighting", None)
        if "phi" in state and isinstance(weighting, tja.GradVacWeighting):
            weighting._phi_t = state["phi"].clone()
            weighting._state_key = (state["phi"].shape[0], state["phi"].dtype)
        if "alpha" in state and isinstance(self.aggregator, tja.NashMTL):
            weighting.prvs_alpha = state["alpha"].numpy().copy()
            weighting.step = float(state["step"])
            if weighting.step > 0:
                weighting._init_optim_problem()  # normally built by the first call, which a resumed run skips

    def state_summary(self) -> dict[str, float]:
        if torch.isnan(self.weights).any():
            return {}
        return {f"w/{t}": float(w) for t, w in zip(self.tasks, self.weights)}
