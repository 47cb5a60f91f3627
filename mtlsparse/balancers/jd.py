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

`path=gramian` (or `auto`) skips J for the rules whose direction is d = Σ_t w_t g_t with w a
function of the Gramian G = J Jᵀ alone (every rule but `graddrop` and `config`): G comes from
torchjd's autogram engine (params mode) or from the cheap rows ∂L_t/∂z (representation mode),
and the surrogate back-propagates the losses once: Σ_t w_t L_t on the shared parameters, plus a
correction so every other parameter still gets Σ_t ∇L_t. Same update as the Jacobian path, up
to rounding (docs/methods/balancers.md, "Gramian path").
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
    GramianPath,
    check_mode,
    from_rank0_,
    gramian,
    jacobian,
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


class MinNormGramianWeighting(tja.Weighting):
    """MinNormWeighting from the Gramian itself (the Gramian path)."""

    def forward(self, gram: Tensor, /) -> Tensor:
        return min_norm_weights_of_gram(gram).to(gram)


def gram_factor(gram: Tensor) -> Tensor:
    """R [m, m] with R Rᵀ = G (eigendecomposition, negative rounding clamped): rows with the tasks' Gramian."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0).sqrt()


class FactorWeighting(tja.Weighting):
    """A weighting that reads the matrix only through J Jᵀ and ‖wᵀJ‖ (Nash-MTL), applied to G's factor R.

    R has the same Gramian as J, so every quantity the weighting forms (R Rᵀ = J Jᵀ,
    ‖wᵀR‖² = wᵀGw) is J's: the same weights, up to rounding.
    """

    def __init__(self, weighting: tja.Weighting) -> None:
        super().__init__()
        self.matrix_weighting = weighting

    def forward(self, gram: Tensor, /) -> Tensor:
        return self.matrix_weighting(gram_factor(gram))


#: why the rules that stay on the Jacobian path need J (the Gramian path refuses them)
NEEDS_JACOBIAN = {
    "graddrop": "its direction keeps or drops each coordinate by the signs of the task gradients",
    "config": "its direction is a pseudo-inverse of the normalised task gradients, with no Gramian weighting in "
              "torchjd",
}


def gramian_weighting(aggregator: tja.Aggregator) -> tja.Weighting | None:
    """The weighting G → w of an aggregator whose direction is wᵀJ with w a function of G alone; None otherwise."""
    if isinstance(aggregator, tja.GramianWeightedAggregator):
        return aggregator.gramian_weighting
    if isinstance(aggregator, ExactMGDA):
        return MinNormGramianWeighting()
    if isinstance(aggregator, tja.NashMTL):
        return FactorWeighting(aggregator.weighting)
    return None


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
    `path` (`jacobian` | `gramian` | `auto`) says how the weights' Gramian is formed (module docstring).
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 aggregator: str = "upgrad", mode: str = "params", path: str = "jacobian", **options: Any) -> None:
        super().__init__(tasks, k0, k)
        check_mode(mode)
        built = build_aggregator(aggregator, len(self.tasks), self.k.clone(), dict(options))
        # a plain attribute, not a submodule: stateful aggregators' lazily created buffers would break strict loading
        object.__setattr__(self, "aggregator", built)
        self.aggregator_name, self.mode, self.spec = aggregator, mode, AGGREGATORS[aggregator]
        self.needs_representation = mode == "representation" and not self.spec.gradient_free
        weighting = None if self.spec.gradient_free else gramian_weighting(built)
        needs_jacobian = None if self.spec.gradient_free or weighting is not None else NEEDS_JACOBIAN.get(
            aggregator, "torchjd gives it no Gramian weighting")
        # plain attributes, as the aggregator: the weighting is the aggregator's own (its state is checkpointed there)
        object.__setattr__(self, "gramian_weighting", weighting)
        object.__setattr__(self, "grad_path", GramianPath(path, f"balancer={aggregator} (balancer=jd)",
                                                          needs_jacobian))
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
        self.grad_path.setup(model, self.needs_representation)

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
        if self.grad_path.gramian_path:
            surrogate = self._gramian_surrogate(losses, stacked, ctx, value)
            if surrogate is not None:
                return self.add_penalty(surrogate, penalty)
        return self.add_penalty(linear_surrogate(self._directions(losses, ctx), value), penalty)

    def _gramian_surrogate(self, losses: dict[str, Tensor], stacked: Tensor, ctx: BalanceContext,
                           value: Tensor) -> Tensor | None:
        """The Gramian path's scalar: gradient d = Σ_t w_t g_t on the shared parameters, Σ_t ∇L_t on the others.

        Params mode: w from autogram's G, then Σ_t w_t L_t plus ⟨q, Σ_t (1 − w_t) ∇_q L_t⟩ on
        every other parameter q (a backward from the losses to those parameters only, e.g. the
        heads), plus a zero term on each shared parameter so one that no loss reaches still gets
        a zero gradient, as on the Jacobian path. Representation mode: w from the rows ∂L_t/∂z,
        then Σ_t L_t plus ⟨z, d_z − Σ_t ∂L_t/∂z⟩, so z's cotangent is d_z (pulled back through the
        trunk by the one backward) and the heads get Σ_t ∇L_t. None where `auto` fell back to J.
        """
        task_losses = [losses[t] for t in self.tasks]
        shared_ids = {id(p) for p in ctx.shared_params}
        others = [p for p in self._params if p.requires_grad and id(p) not in shared_ids]
        if self.needs_representation:
            z = representation_of(ctx.representation, self.name)
            if not self.grad_path.check_split(z, task_losses, ctx.shared_params, others):
                return None
            rows = jacobian(task_losses, [z])
            weights = self._weights_of(gramian(rows), rows.dtype, global_rows=False)
            work = rows.to(weights.dtype)
            direction = (weights @ work).to(rows.dtype)
            if not torch.isfinite(direction).all():
                raise FloatingPointError(f"balancer {self.name} produced a non-finite update direction from task "
                                         f"gradients of norms {rows.norm(dim=1).tolist()}")
            correction = (direction - rows.sum(dim=0)).detach()
            surrogate = stacked.sum() + (z * correction.view_as(z)).sum()
            return surrogate - surrogate.detach() + value.detach()
        shared = trainable_shared(ctx.shared_params, f"balancer {self.name}")
        gram = self.grad_path.gramian(task_losses, shared)
        if gram is None:
            return None
        weights = self._weights_of(gram, shared[0].dtype, global_rows=True).to(stacked)
        surrogate = (weights * stacked).sum() + torch.stack([p.sum() for p in shared]).sum() * 0
        rest = (1 - weights) * stacked
        if others and rest.requires_grad:
            grads = torch.autograd.grad(rest.sum(), others, retain_graph=True, allow_unused=True)
            terms = [(p * g.detach()).sum() for p, g in zip(others, grads) if g is not None]
            if terms:
                surrogate = surrogate + torch.stack(terms).sum()
        return surrogate - surrogate.detach() + value.detach()

    @torch.no_grad()
    def _weights_of(self, gram: Tensor, dtype: torch.dtype, global_rows: bool) -> Tensor:
        """Task weights from a float64 Gramian, in the dtype the Jacobian path's aggregator would work in.

        `global_rows` (params mode): rank 0's weights for every rank, as the Jacobian path uses rank 0's d.
        """
        work = gram.to(torch.float64 if dtype == torch.float64 else torch.float32)
        pref = self.aggregator.pref_vector if self.spec.preference else None
        if pref is not None and (pref.device, pref.dtype) != (work.device, work.dtype):
            self.aggregator.pref_vector = self.k.to(work)
        with torch.autocast(work.device.type, enabled=False):
            weights = self.gramian_weighting(work).to(work)
        if global_rows:
            from_rank0_(weights)
        if not torch.isfinite(weights).all():
            raise FloatingPointError(f"balancer {self.name} produced non-finite task weights from the task-gradient "
                                     f"Gramian with diagonal {gram.diagonal().tolist()}")
        self.weights.copy_(weights)
        return weights

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
