"""Per-task gradients: the one service behind gradient balancers and gradient-based sparsity.

A gradient balancer differentiates each task loss L_t separately, w.r.t. the shared
parameters (`mode=params`) or the shared representation z (`mode=representation`, a
backward through the heads only), combines the rows g_t by its own rule into a direction
d, and turns d into a surrogate scalar whose gradient is d (pulled back through the
trunk, Jᵀ_z d, in representation mode). SNIP / DiSparse read the same per-task gradients
of the prunable weights. Everything here uses `torch.autograd.grad`, so nothing
accumulates in `.grad`. This is a leaf module (torch only): balancers and sparsity
methods both import it, neither imports the other.

The Gramian path (`balancer.path=gramian`) of the rules whose weights depend on the task
gradients only through G = J Jᵀ computes G without J: `AutogramGramian` runs torchjd's
autogram engine on the modules that own the shared parameters (one backward, vectorised over
the m losses, each module's [m, n_module] block reduced to its m×m Gramian and dropped), and
the balancer back-propagates Σ_t w_t L_t once (docs/methods/balancers.md, "Gramian path").
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlsparse.errors import ConfigError

#: what a gradient balancer differentiates: the shared parameters, or the shared representation z
MODES = ("params", "representation")
#: how a Gramian-based rule gets G: from the per-task Jacobian (one backward per task), from autogram
#: (J never materialised, Σ w_t L_t back-propagated once), or the Gramian path wherever the rule allows it
PATHS = ("jacobian", "gramian", "auto")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ modes and capability
def check_mode(mode: str) -> str:
    """`mode` if it is one of MODES; a ValueError naming the choices otherwise."""
    if mode not in MODES:
        raise ValueError(f"balancer.mode must be one of {MODES}, got {mode!r}")
    return mode


def check_path(path: str) -> str:
    """`path` if it is one of PATHS; a ValueError naming the choices otherwise."""
    if path not in PATHS:
        raise ValueError(f"balancer.path must be one of {PATHS}, got {path!r}")
    return path


def resolve_path(path: str, balancer: str, needs_jacobian: str | None) -> str:
    """The path a rule runs, `gramian` or `jacobian`; `needs_jacobian` says why the rule needs J (None: it does not).

    `auto` is the Gramian path wherever the rule allows it; `gramian` for a rule that needs J is
    a one-line ConfigError.
    """
    check_path(path)
    if needs_jacobian is None:
        return "jacobian" if path == "jacobian" else "gramian"
    if path == "gramian":
        raise ConfigError(f"{balancer} needs the per-task Jacobian ({needs_jacobian}), so balancer.path=gramian "
                          "is not available for it: use balancer.path=jacobian (or auto)")
    return "jacobian"


def no_representation_error(balancer: str, model_name: str) -> ConfigError:
    """The error for representation mode on a model without a shared representation; it names the fix."""
    return ConfigError(f"balancer {balancer} with mode=representation needs a model with a shared representation "
                       f"(`encode(x)` and `decode(z)`, has_representation=True); {model_name} has none. "
                       "Use balancer.mode=params (gradients w.r.t. the shared parameters) instead.")


def require_representation(balancer: str, model: nn.Module) -> None:
    """Fail at setup when `model` does not declare a shared representation (`has_representation`)."""
    if not getattr(model, "has_representation", False):
        raise no_representation_error(balancer, type(model).__name__)


def representation_of(z: Tensor | None, balancer: str) -> Tensor:
    """The step's shared representation, or the representation-mode error when the step has none."""
    if z is None:
        raise no_representation_error(balancer, "the model")
    return z


def trainable_shared(params: Sequence[nn.Parameter], balancer: str) -> list[nn.Parameter]:
    """The shared parameters that require a gradient; a ConfigError when there are none."""
    wrt = [p for p in params if p.requires_grad]
    if not wrt:  # the balancer's setup(model) catches this for models that declare their shared parameters
        raise ConfigError(f"{balancer} combines per-task gradients of the shared parameters, but the model has "
                          "none: use balancer=linear (or another loss-weighting balancer)")
    return wrt


# ------------------------------------------------------------------ per-task gradients
def task_gradients(losses: Sequence[Tensor], wrt: Sequence[Tensor],
                   retain_graph: bool = True) -> Iterator[tuple[Tensor | None, ...]]:
    """Per loss, in order, its gradients w.r.t. `wrt` (None where a tensor is unused or the loss is constant).

    One backward per loss, yielded one at a time so only one loss's gradients are alive
    besides what the caller keeps. `retain_graph=False` frees the graph after the last loss.
    """
    last = len(losses) - 1
    for i, loss in enumerate(losses):
        if not loss.requires_grad:
            yield (None,) * len(wrt)
            continue
        yield torch.autograd.grad(loss, wrt, retain_graph=retain_graph or i < last, allow_unused=True)


def flat_gradient(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """One flat vector of gradients (zeros where a tensor got none)."""
    return torch.cat([(torch.zeros_like(t) if g is None else g).flatten() for g, t in zip(grads, like)])


def split_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """A flat vector cut into tensors shaped like `like` (the inverse of `flat_gradient`)."""
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in like]), like)]


def task_jacobian(losses: Sequence[Tensor], wrt: Sequence[Tensor],
                  summed: Sequence[Tensor] = ()) -> tuple[Tensor, list[Tensor | None]]:
    """J, one row ∇_wrt L_t (flat) per loss, and Σ_t ∇L_t of each tensor in `summed`, from one backward per loss.

    `summed` are the parameters a gradient balancer leaves to plain summation (heads,
    attention, fusion weights); None where no loss reaches one.
    """
    rows: list[Tensor] = []
    totals: list[Tensor | None] = [None] * len(summed)
    for grads in task_gradients(losses, [*wrt, *summed]):
        rows.append(flat_gradient(grads[:len(wrt)], wrt))
        for i, g in enumerate(grads[len(wrt):]):
            if g is not None:
                totals[i] = g if totals[i] is None else totals[i] + g
    return torch.stack(rows), totals


def jacobian(losses: Sequence[Tensor], wrt: Sequence[Tensor]) -> Tensor:
    """J [m, Σ numel(wrt)]: row t is the flat gradient of loss t w.r.t. `wrt`."""
    return task_jacobian(losses, wrt)[0]


def gramian(rows: Tensor, chunk: int = 1 << 20) -> Tensor:
    """Float64 Gramian J Jᵀ of the rows of an [m, …] tensor, outside autocast.

    Cast to float64 a chunk of columns at a time, so the extra memory is O(m·chunk) rather
    than a float64 copy of every gradient; mixed precision never rounds the Gramian.
    """
    flat = rows.detach().flatten(1)
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    with torch.autocast(flat.device.type, enabled=False):
        for block in flat.split(chunk, dim=1):
            block = block.double()
            gram += block @ block.T
    return gram


def batch_gramian(losses: Sequence[Tensor], shared_params: Sequence[nn.Parameter], representation: Tensor | None,
                  use_representation: bool, balancer: str) -> Tensor:
    """Gramian of the per-task gradients over the global batch, for Gramian-based balancer rules.

    Params mode averages J over the DDP ranks (the global batch's gradients); representation
    mode sums the ranks' Gramians (each rank's z covers only its own samples). `balancer`
    names the rule in the errors for a missing representation or no shared parameters.
    """
    if use_representation:
        wrt = [representation_of(representation, balancer)]
    else:
        wrt = trainable_shared(shared_params, f"balancer={balancer}")
    grads = jacobian(losses, wrt)
    if not use_representation:
        rank_mean_(grads)
    gram = gramian(grads)
    return rank_sum_(gram) if use_representation else gram


# ------------------------------------------------------------------ the Gramian path
class GramianPathError(ConfigError):
    """The model does not allow the Gramian path (autogram would miss part of the shared parameters' gradients)."""


def owner_modules(model: nn.Module, params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the fewest modules whose trainable parameters are exactly the trainable `params`.

    The modules autogram hooks: each owns only shared parameters (recursively). A module whose
    own direct parameters mix shared and task-specific ones cannot be split: GramianPathError.
    """
    shared = {id(p) for p in params if p.requires_grad}
    found: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable or not any(id(p) in shared for p in trainable):
            return
        if all(id(p) in shared for p in trainable):
            found.append((name, module))
            return
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if any(id(p) in shared for p in direct):
            raise GramianPathError(f"balancer.path=gramian: module {name or type(module).__name__} holds both shared "
                                   "and task-specific parameters of its own, so autogram cannot take the shared "
                                   "ones alone; use balancer.path=jacobian")
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    covered = {id(p) for _, module in found for p in module.parameters() if p.requires_grad}
    if covered != shared:  # a shared parameter outside the model's modules
        raise GramianPathError("balancer.path=gramian: some shared parameters do not belong to the model's modules; "
                               "use balancer.path=jacobian")
    return found


class AutogramGramian:
    """G = J̄ J̄ᵀ (float64) of the per-task gradients of the shared parameters, J never materialised.

    `attach(model, shared)` finds the modules owning the shared parameters and registers a
    forward pre-hook on the model: every forward in training mode with grad enabled gets a
    fresh torchjd autogram `Engine` on those modules (so forwards the balancer never sees,
    e.g. a sparsity method's data-driven scoring, leave no state behind). `gramian(losses,
    shared)` then runs the engine's one backward, vectorised over the m losses: each module's
    Jacobian block [m, n_module] (summed over the module's calls) is averaged over DDP ranks
    (the global batch's J̄, as `batch_gramian`), turned into its float64 m×m Gramian and dropped,
    and the blocks' Gramians are summed. The engine's hooks are removed right after.

    Autogram sees a parameter only through its module's forward, so the first step checks that
    no hooked module the losses depend on went uncalled (cross-stitch's `nn.ParameterDict`
    units are read, never called) and that ‖Σ_t v_t g_t‖² (one plain backward) equals vᵀGv
    (weights tied across modules, a parameter also read outside its module); either failure is a
    GramianPathError.
    """

    #: relative tolerance of the first-step check (float32 rounding of vectorised vs plain backward)
    CHECK_RTOL = 1e-3

    def __init__(self) -> None:
        self._owners: list[nn.Module] = []
        self._names: dict[nn.Module, str] = {}
        self._engine = None
        self._handle = None
        self._checked = False

    def attach(self, model: nn.Module, shared: Sequence[nn.Parameter]) -> None:
        """Hook `model` so its training forwards are recorded for the Gramian of `shared`."""
        self.detach()
        self._owners = [module for _, module in owner_modules(model, shared)]
        self._names = {module: name for name, module in model.named_modules()}
        self._handle = model.register_forward_pre_hook(_ArmAutogram(self))

    def detach(self) -> None:
        """Remove every hook (the model's pre-hook and an armed engine's)."""
        self._disarm()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _arm(self) -> None:
        self._disarm()
        self._engine = _block_engine_class()(*self._owners, batch_dim=None)

    def _disarm(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            _remove_hooks(engine)

    def gramian(self, losses: Sequence[Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        """Float64 Gramian [m, m] of the losses' gradients w.r.t. the shared parameters (rank-averaged J)."""
        engine, self._engine = self._engine, None
        if engine is None:
            raise GramianPathError("balancer.path=gramian: the model's forward of this step was not recorded (it "
                                   "must run in training mode with grad enabled, after the balancer's setup); use "
                                   "balancer.path=jacobian")
        try:
            with torch.enable_grad():  # balancers call this under no_grad; stacking and autogram need grad mode
                stacked = torch.stack(list(losses))
                if not stacked.requires_grad:
                    return torch.zeros(len(losses), len(losses), dtype=torch.float64, device=stacked.device)
                try:
                    gram = engine.compute_gramian(stacked)
                except (ValueError, RuntimeError) as err:
                    raise GramianPathError(f"balancer.path=gramian: autogram failed on this model ({err}); use "
                                           "balancer.path=jacobian") from err
                if not self._checked:
                    self._check(gram, engine, losses, shared)
                    self._checked = True
            return gram
        finally:
            _remove_hooks(engine)

    def _check(self, gram: Tensor, engine, losses: Sequence[Tensor], shared: Sequence[nn.Parameter]) -> None:
        """No shared gradient was missed: no hooked module the losses depend on went uncalled, ‖Σ v_t g_t‖² = vᵀGv."""
        reached = {id(t) for t in leaf_tensors(losses)}
        silent = [self._names.get(module, type(module).__name__)
                  for module, computer in engine._gramian_computers.items()
                  if computer.calls == 0 and any(id(p) in reached for p in module.parameters())]
        if silent:
            raise GramianPathError(f"balancer.path=gramian: the model reads the shared parameters of "
                                   f"{', '.join(silent)} without calling the module, which autogram cannot see; use "
                                   "balancer.path=jacobian")
        v = torch.linspace(1.0, 2.0, len(losses), dtype=torch.float64, device=gram.device)
        combined = sum(float(v[t]) * loss for t, loss in enumerate(losses) if loss.requires_grad)
        grads = torch.autograd.grad(combined, list(shared), retain_graph=True, allow_unused=True)
        direct = float(gramian(rank_mean_(flat_gradient(grads, shared)).unsqueeze(0)))
        via_gramian = float(v @ gram @ v)
        scale = max(float((torch.outer(v, v) * gram.abs()).sum()), direct, torch.finfo(torch.float64).tiny)
        if abs(direct - via_gramian) > self.CHECK_RTOL * scale:
            raise GramianPathError(f"balancer.path=gramian: autogram misses part of the shared parameters' gradients "
                                   f"(‖Σ v_t g_t‖² = {direct:.6g} but vᵀGv = {via_gramian:.6g}): the model uses shared "
                                   "parameters outside their modules' forward or ties them across modules; use "
                                   "balancer.path=jacobian")

    def __getstate__(self) -> dict:
        """Pickles and deep copies carry the module list, never a live engine or hook handle."""
        return {**self.__dict__, "_engine": None, "_handle": None}


class GramianPath:
    """A Gramian-based balancer's path (PATHS) and, on the Gramian path in params mode, its autogram recorder.

    `needs_jacobian` (None, or why the rule needs J) decides what `auto` means. Where the
    model does not allow autogram (`GramianPathError`, at setup or at the first step), an
    explicit `gramian` raises it and `auto` logs it once and stays on the Jacobian path.
    """

    def __init__(self, path: str, balancer: str, needs_jacobian: str | None = None) -> None:
        self.requested, self.balancer = check_path(path), balancer
        self.path = resolve_path(path, balancer, needs_jacobian)
        self.autogram: AutogramGramian | None = None
        self._split_checked = False

    @property
    def gramian_path(self) -> bool:
        return self.path == "gramian"

    def setup(self, model: nn.Module, use_representation: bool) -> None:
        """Attach autogram to `model` when the Gramian path runs in params mode."""
        self.release()
        if not self.gramian_path or use_representation:
            return
        shared = getattr(model, "shared_parameters", None)
        try:
            if not callable(shared):
                raise GramianPathError("balancer.path=gramian in params mode needs a model that declares "
                                       "shared_parameters(); use balancer.path=jacobian")
            recorder = AutogramGramian()
            recorder.attach(model, list(shared()))
            self.autogram = recorder
        except GramianPathError as err:
            self._unavailable(err)

    def release(self) -> None:
        """Detach autogram from the model."""
        if self.autogram is not None:
            self.autogram.detach()
            self.autogram = None

    def gramian(self, losses: Sequence[Tensor], shared: Sequence[nn.Parameter]) -> Tensor | None:
        """The autogram Gramian of this step (params mode), or None where the Jacobian path must compute it."""
        if self.autogram is None:
            return None
        try:
            return self.autogram.gramian(losses, shared)
        except GramianPathError as err:
            self._unavailable(err)
            return None

    def batch_gramian(self, losses: Sequence[Tensor], shared_params: Sequence[nn.Parameter],
                      representation: Tensor | None, use_representation: bool, balancer: str) -> Tensor:
        """`batch_gramian` by this path: autogram's in params mode on the Gramian path, the Jacobian's otherwise.

        Representation mode forms G from the rows ∂L_t/∂z on both paths (they are only m × |z|).
        """
        if not use_representation and self.autogram is not None:
            gram = self.gramian(losses, trainable_shared(shared_params, f"balancer={balancer}"))
            if gram is not None:
                return gram
        return batch_gramian(losses, shared_params, representation, use_representation, balancer)

    def check_split(self, z: Tensor, losses: Sequence[Tensor], shared: Sequence[nn.Parameter],
                    others: Sequence[nn.Parameter]) -> bool:
        """Representation mode, first step: may one backward of a surrogate on z replace the pull-back?

        It may when z depends on shared parameters only and the losses reach no shared parameter
        except through z (true of every model with a shared representation here); otherwise
        GramianPathError (`gramian`) or False, and the Jacobian path from now on (`auto`).
        """
        if self._split_checked:
            return self.gramian_path
        self._split_checked = True
        encoder, decoder = params_upstream(z, losses)
        shared_ids, other_ids = {id(p) for p in shared}, {id(p) for p in others}
        problems = [f"{len([p for p in encoder if id(p) in other_ids])} task-specific parameter(s) before z"
                    if any(id(p) in other_ids for p in encoder) else "",
                    f"{len([p for p in decoder if id(p) in shared_ids])} shared parameter(s) after z"
                    if any(id(p) in shared_ids for p in decoder) else ""]
        if any(problems):
            self._unavailable(GramianPathError(
                f"balancer.path=gramian in representation mode needs a model whose encode uses only shared parameters "
                f"and whose decode only task-specific ones; this one has {' and '.join(filter(None, problems))}; "
                "use balancer.path=jacobian"))
        return self.gramian_path

    def _unavailable(self, err: GramianPathError) -> None:
        self.release()
        if self.requested == "gramian":
            raise err
        log.warning("balancer %s: %s. balancer.path=auto keeps the Jacobian path", self.balancer, err)
        self.path = "jacobian"


def leaf_tensors(roots: Sequence[Tensor], stop: Tensor | None = None) -> list[Tensor]:
    """The leaf tensors (parameters) the autograd graphs of `roots` reach, not walking past `stop`'s node."""
    stop_node = None if stop is None else stop.grad_fn
    seen, found = set(), {}
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen or node is stop_node:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found[id(variable)] = variable
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return list(found.values())


def params_upstream(z: Tensor, losses: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The leaf tensors z depends on, and those the losses reach other than through z."""
    return leaf_tensors([z]), leaf_tensors(losses, stop=z)


def _remove_hooks(engine) -> None:
    """Remove an autogram engine's forward hooks now (its finalizer, torchjd 0.18)."""
    engine._module_hook_manager._finalizer()


class _ArmAutogram:
    """Forward pre-hook of the model: arm a fresh autogram engine for a training forward with grad enabled."""

    def __init__(self, owner: AutogramGramian) -> None:
        self.owner = owner

    def __call__(self, model: nn.Module, args) -> None:
        if model.training and torch.is_grad_enabled():
            self.owner._arm()


@functools.cache
def _block_engine_class():
    """torchjd's Engine whose per-module Gramian computer averages the block over ranks, in float64 (torchjd 0.18)."""
    from torchjd.autogram import Engine
    from torchjd.autogram._gramian_computer import JacobianBasedGramianComputerWithCrossTerms
    from torchjd.autogram._jacobian_computer import AutogradJacobianComputer

    class RankMeanBlock(JacobianBasedGramianComputerWithCrossTerms):
        """One module's Jacobian block, summed over its calls, averaged over DDP ranks → its float64 Gramian."""

        def __init__(self, jacobian_computer) -> None:
            super().__init__(jacobian_computer)
            self.calls = 0

        def track_forward_call(self) -> None:
            super().track_forward_call()
            self.calls += 1

        def __call__(self, rg_outputs, grad_outputs, args, kwargs):
            block = self.jacobian_computer(rg_outputs, grad_outputs, args, kwargs)
            self.summed_jacobian = block if self.summed_jacobian is None else self.summed_jacobian + block
            self.remaining_counter -= 1
            if self.remaining_counter > 0:
                return None
            block, self.summed_jacobian = self.summed_jacobian, None
            return gramian(rank_mean_(block))

    class BlockEngine(Engine):
        def _make_gramian_computer(self, module: nn.Module):
            return RankMeanBlock(AutogradJacobianComputer(module))

    return BlockEngine




# ------------------------------------------------------------------ direction → update
def pull_back(z: Tensor, direction: Tensor, params: Sequence[nn.Parameter]) -> list[tuple[nn.Parameter, Tensor]]:
    """(p, Jᵀ_z d) for the parameters z depends on: a representation-space direction d on the trunk's parameters."""
    grads = torch.autograd.grad(z, params, grad_outputs=direction.view_as(z), retain_graph=True, allow_unused=True)
    return [(p, g) for p, g in zip(params, grads) if g is not None]


def linear_surrogate(pairs: Sequence[tuple[Tensor, Tensor]], value: Tensor) -> Tensor:
    """A scalar equal to `value` whose gradient w.r.t. each tensor p of `pairs` is exactly its paired g.

    Σ ⟨p, g⟩ − (the same, detached) + value: the gradient of ⟨p, g⟩ w.r.t. p is g bit for bit,
    so Lightning's backward, clipping and the sparsity hooks see the balancer's direction.
    """
    terms = [(p * g.detach()).sum() for p, g in pairs]
    if not terms:
        return value.detach()
    surrogate = torch.stack(terms).sum()
    return surrogate - surrogate.detach() + value.detach()


# ------------------------------------------------------------------ DDP
def distributed() -> bool:
    """Whether a torch.distributed process group is running (DDP)."""
    return dist.is_available() and dist.is_initialized()


def rank_sum_(t: Tensor) -> Tensor:
    """`t` summed over DDP ranks, in place (unchanged without a process group)."""
    if distributed():
        dist.all_reduce(t)
    return t


def rank_mean_(t: Tensor) -> Tensor:
    """`t` averaged over DDP ranks, in place (unchanged without a process group): e.g. the global batch's J."""
    if distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def from_rank0_(t: Tensor) -> Tensor:
    """`t` replaced by rank 0's, in place, so every rank steps along the same direction."""
    if distributed():
        dist.broadcast(t, src=0)
    return t
