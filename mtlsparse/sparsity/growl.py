"""GrOWL sparsification and parameter tying in two phases (MDMTN, Hotegni et al.; docs/methods/growl_mdmtn.md).

Phase lengths are fractions of the run: phase 1 takes M1/(M1 + M2) of trainer.max_epochs
(round(·), at least 1 epoch and, when M2 > 0, at most N − 1 so phase 2 runs), split
into M1 equal outer iterations; with the recipe's budget (M1 + M2)·p that is M1 iterations
of p epochs. An explicit `phase1_epochs` replaces the fraction and must leave a phase-2
epoch (or fit in the run when M2 = 0).

Phase 1 (M1 outer iterations): the differentiable
penalty f0 = f0_scale·Σ_layers G_θ(W), with the paper's θ, is the sparsity objective L0
handed to the balancer, and at the end of every epoch each layer gets the exact GrOWL
prox of strength λ: its step is λ·θ times the sum of the learning rates of the optimizer
steps since the last prox, so the epoch-end prox is the lazy form of proximal SGD on
Σ k_t L_t + λ·G_θ (the same λ convention as `l1` and `group_lasso`). The two knobs are
separate: λ sets how hard the prox zeroes rows, f0_scale how much f0 weighs in the balancer
(next to k0; in the Chebyshev constraints f0 also enters every task's ε-term). At outer
iteration j a layer may have at most ⌊j·s_lmax/M1 · #rows⌋ zero rows; past that cap the
rows with the smallest norms stay zero and the others get their pre-prox values back (as
the reference code does). After each validation the model is kept if it is the best so far
(selection score) among those with sparsity/param >= 100·s_min (Algorithm 1, step 7).

Phase 2 starts before the first step of the epoch after phase 1 (so the last phase-1 model
was validated): by default (`phase2_from=best`) the kept best phase-1 model is restored
(`last`: the model phase 1 ended with), the non-zero rows of each layer are clustered by
affinity propagation and tied (each cluster's rows replaced by their mean), and with
`phase2_optimizer=restart` (default) the optimizer and its lr schedule start afresh, as
Algorithm 1 repeats its steps for phase 2 and the reference code re-creates its optimizer.
From then on the zero rows stay exactly zero after every optimizer step and the rows are
tied again after every epoch, so every model validated in phase 2 is sparse and tied.
Phase and iteration follow from the epoch number; the clusters, the pending prox step and
the best phase-1 model are module state, so checkpoints and resumed runs carry them.

`couple_norms: true` makes each row also hold the producing BatchNorm's γ_c, β_c (see
`norm_coupling`), so the prox and its cap act on whole channels of a BN trunk.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from mtlsparse.channel_groups import ChannelGroups
from mtlsparse.errors import ConfigError
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.base import SparsityMethod, param_state
from mtlsparse.sparsity.budget import epoch_count, finite_budget
from mtlsparse.sparsity.dead_rows import check_tolerance
from mtlsparse.sparsity.layers import PrunableLayer, group_norms, group_shape
from mtlsparse.sparsity.norm_coupling import GroupCoupling
from mtlsparse.sparsity.owl import cap_zero_rows_, growl_prox_, owl_value, spike_weights
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.sparsity.tying import ZERO_ROW, AffinitySettings, cluster_rows, tie_rows_, zero_rows_
from mtlsparse.training_state import PhaseStarted, TrainingState

log = logging.getLogger(__name__)


#: which phase-1 model phase 2 retrains: the best by validation with sparsity >= s_min (the paper), or the last
PHASE2_SOURCES = ("best", "last")
#: phase 2 starts a fresh optimizer and lr schedule (as Algorithm 1 repeats its steps, and the reference code
#: does), or continues the phase-1 ones
PHASE2_OPTIMIZER = ("restart", "continue")


def cluster_buffer_name(layer_name: str) -> str:
    """Buffer name holding a layer's cluster ids ('.' is not allowed in buffer names)."""
    return "clusters_" + layer_name.replace(".", "_")


class GrOWL(SparsityMethod):
    """GrOWL-Spike prox with a growing per-layer cap (phase 1), then affinity-propagation tying (phase 2)."""

    structured = True

    def __init__(self, lam: float = 1.0, f0_scale: float = 1.0, beta1: float = 0.8, beta2: float = 0.2,
                 epochs_per_iteration: int = 3,
                 phase1_iterations: int = 3, phase2_iterations: int = 10, phase1_epochs: int | None = None,
                 s_lmax: float = 0.8, s_min: float = 0.2, preference: float = 0.7,
                 scope: ScopeLike = None, couple_norms: bool = False, ap_damping: float = 0.5,
                 ap_max_iter: int = 200, ap_convergence_iter: int = 15, ap_fallback: str = "retry",
                 phase2_from: str = "best", phase2_optimizer: str = "restart", dead_tol: float = 0.0) -> None:
        super().__init__(scope)
        self.dead_tol = check_tolerance(dead_tol)
        for key, value, ok, allowed in (
                ("lam", lam, lam >= 0, ">= 0"), ("f0_scale", f0_scale, f0_scale >= 0, ">= 0"),
                ("beta1", beta1, beta1 >= 0, ">= 0"),
                ("beta2", beta2, beta2 >= 0, ">= 0"),
                ("epochs_per_iteration", epochs_per_iteration, epochs_per_iteration >= 1, ">= 1"),
                ("phase1_iterations", phase1_iterations, phase1_iterations >= 1, ">= 1"),
                ("phase2_iterations", phase2_iterations, phase2_iterations >= 0, ">= 0"),
                ("s_lmax", s_lmax, 0 <= s_lmax <= 1, "in [0, 1]"), ("s_min", s_min, 0 <= s_min < 1, "in [0, 1)")):
            if not ok:
                raise ValueError(f"method.{key} must be {allowed}, got {value}")
        self.lam, self.f0_scale = float(lam), float(f0_scale)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.epochs_per_iteration = epochs_per_iteration
        self.phase1_iterations, self.phase2_iterations = phase1_iterations, phase2_iterations
        if phase1_epochs is not None and (isinstance(phase1_epochs, bool) or not isinstance(phase1_epochs, int)
                                          or phase1_epochs < 1):
            raise ConfigError(f"method.phase1_epochs must be null (phase 1 = M1/(M1 + M2) of the run) or an integer "
                              f"number of epochs >= 1, got {phase1_epochs!r}")
        self.explicit_phase1 = phase1_epochs
        self.phases: tuple[int, int | None] | None = None  # (phase-1 epochs, run epochs), set by set_budget
        self.s_lmax, self.s_min = float(s_lmax), float(s_min)
        self.affinity = AffinitySettings(float(preference), float(ap_damping), ap_max_iter, ap_convergence_iter,
                                         ap_fallback)
        for key, value, allowed in (("phase2_from", phase2_from, PHASE2_SOURCES),
                                    ("phase2_optimizer", phase2_optimizer, PHASE2_OPTIMIZER)):
            if value not in allowed:
                raise ConfigError(f"method.{key} must be one of {', '.join(allowed)}, got {value!r}")
        self.phase2_from, self.phase2_optimizer = phase2_from, phase2_optimizer
        self.register_buffer("tied", torch.tensor(False))
        self.register_buffer("phase2_source_epoch", torch.tensor(-1))  # phase-1 epoch phase 2 retrained (−1: none)
        self.coupling = GroupCoupling(couple_norms)
        self._best: dict | None = None  # best phase-1 model so far: {"epoch", "score", "state"} (extra state)

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        names = [cluster_buffer_name(layer.name) for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"GrOWL: layer names collide as buffer names: {names}")
        self.register_buffer("prox_step", torch.zeros(len(self.layers)))
        # AP convergence per layer at the first tie: 1 / 0, −1 before it (checkpointed: resumed runs report it)
        self.register_buffer("tying_converged", self._unknown_convergence())
        for name, layer in zip(names, self.layers):
            self.register_buffer(name, torch.full((layer.num_groups,), ZERO_ROW, dtype=torch.long))

    def _unknown_convergence(self) -> Tensor:
        return torch.full((len(self.layers),), -1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Checkpoints from before `tying_converged`, `phase2_source_epoch` and the best phase-1 model
        were kept load with them unknown (−1) or absent."""
        state_dict.setdefault(prefix + "tying_converged", self._unknown_convergence())
        state_dict.setdefault(prefix + "phase2_source_epoch", torch.tensor(-1))
        state_dict.setdefault(prefix + "_extra_state", {"best": None})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict:
        """The best phase-1 model (a copy of the model's state) until phase 2 has used it: resumed runs keep it."""
        return {"best": self._best}

    def set_extra_state(self, state: dict) -> None:
        self._best = state.get("best")

    @property
    def min_sparsity(self) -> float:
        """Checkpoint floor (% sparsity/param): 100·s_min for tied models.

        While phase 2 is still to come the floor is 100%, which no epoch reaches, so the
        selected model is a tied one, the output of the paper's Algorithm 1 (the sparsest
        wins meanwhile).
        """
        return 100.0 * self.s_min if (self.tied or self.phase2_iterations == 0) else 100.0

    # ------------------------------------------------------------ schedule
    def set_budget(self, max_epochs: int | None) -> None:
        super().set_budget(max_epochs)
        budget = finite_budget(max_epochs)
        last_phase1 = budget if budget is None or self.phase2_iterations == 0 else budget - 1
        if self.explicit_phase1 is not None:
            if last_phase1 is not None and self.explicit_phase1 > max(last_phase1, 0):
                room = "leaves no phase-2 epoch" if self.phase2_iterations else "is past the end"
                raise ConfigError(
                    f"method.phase1_epochs={self.explicit_phase1} {room} of trainer.max_epochs={budget} (at most "
                    f"{last_phase1}): lower method.phase1_epochs or drop it (method.phase1_epochs=null) to split "
                    "the run as method.phase1_iterations : method.phase2_iterations")
            self.phases = (self.explicit_phase1, budget)
        elif budget is None:
            raise ConfigError("GrOWL's phases are fractions of trainer.max_epochs, which is unbounded here: "
                              "set trainer.max_epochs or give method.phase1_epochs explicitly")
        else:
            share = self.phase1_iterations / (self.phase1_iterations + self.phase2_iterations)
            self.phases = (epoch_count(share, budget, low=1, high=max(last_phase1, 1)), budget)

    @property
    def phase1_epochs(self) -> int:
        """Epochs of phase 1 in this run (set_budget resolves it)."""
        if self.phases is None:
            raise RuntimeError("GrOWL: call set_budget(trainer.max_epochs) before the schedule is used")
        return self.phases[0]

    @property
    def total_epochs(self) -> int:
        """The recipe's epoch budget (M1 + M2)·p, the default trainer.max_epochs of method=growl."""
        return (self.phase1_iterations + self.phase2_iterations) * self.epochs_per_iteration

    def phase(self, epoch: int) -> int:
        """1 (sparsify) for the first phase-1 epochs, 2 (tie) after."""
        return 1 if epoch < self.phase1_epochs else 2

    def iteration(self, epoch: int) -> int:
        """1-based outer iteration within the epoch's phase: the phase split into M equal iterations.

        Epoch e (0-based within the phase of E epochs) ends in iteration ⌈(e + 1)·M/E⌉, so the
        phase's last epoch ends iteration M; with E = M·p that is ⌊e/p⌋ + 1. Phase 2 without a
        finite budget or with M2 = 0 counts iterations of p epochs.
        """
        phase1, budget = self.phase1_epochs, self.phases[1]
        if self.phase(epoch) == 1:
            start, count, length = 0, self.phase1_iterations, phase1
        elif budget is not None and self.phase2_iterations and budget > phase1:
            start, count, length = phase1, self.phase2_iterations, budget - phase1
        else:
            return (epoch - phase1) // self.epochs_per_iteration + 1
        return min(-(-(epoch - start + 1) * count // length), count)

    def cap(self, epoch: int) -> float:
        """Max fraction of zero rows per layer: j·s_lmax/M1 at phase-1 iteration j, s_lmax after."""
        j = self.iteration(epoch) if self.phase(epoch) == 1 else self.phase1_iterations
        return j * self.s_lmax / self.phase1_iterations

    # ------------------------------------------------------------ hooks
    def spike(self, layer: PrunableLayer) -> Tensor:
        """The paper's GrOWL-Spike weights θ for one layer's rows (θ_1 = β1 + β2, θ_i = β2), unscaled."""
        return spike_weights(layer.num_groups, self.beta1, self.beta2).to(layer.weight)

    def theta(self, layer: PrunableLayer) -> Tensor:
        """The prox's weights λ·θ: a row norm shrinks by Σlr·λ·θ_i per epoch-end prox."""
        return self.lam * self.spike(layer)

    def channel_groups(self) -> list[ChannelGroups]:
        return [self.coupling.groups(layer) for layer in self.layers]

    def penalty(self) -> Tensor | None:
        """f0 = f0_scale · Σ_layers G_θ(W), the sparsity objective handed to the balancer (independent of λ)."""
        return self.f0_scale * sum(owl_value(group_norms(self.coupling.groups(layer).stacked()), self.spike(layer))
                                   for layer in self.layers)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Phase 1: add this step's lr to the pending prox step. Phase 2: re-zero the fixed zero rows."""
        if self.tied:
            for layer in self.layers:
                groups = self.coupling.groups(layer)
                rows = groups.stacked()  # coupled BN (γ, β) of a zero row stays zero too
                zero_rows_(rows, self._ids(layer))
                groups.write_back_(rows)
            return
        state = param_state(optimizer)
        self.prox_step += torch.tensor([state[id(layer.weight)][0]["lr"] for layer in self.layers]).to(self.prox_step)

    def on_fit_start(self, state: TrainingState) -> None:
        """Couple BN groups if asked, then resolve the phases from the run's budget."""
        self.coupling.couple_at_fit_start(state, self.layers, type(self).__name__)
        super().on_fit_start(state)
        log.info("GrOWL: phase 1 = epochs 0..%d (%d iterations), phase 2 = the rest", self.phase1_epochs - 1,
                 self.phase1_iterations)

    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Phase 1: prox + cap. Phase 2: tie. Without a phase 2 (M2 = 0) the last epoch clusters and ties."""
        epoch = state.epoch
        if self.phase(epoch) == 1:
            self._prox(self.cap(epoch))
        if self.tied or (self.phase2_iterations == 0 and epoch + 1 >= self.phase1_epochs):
            self._tie()
        state.log({"growl/phase": float(self.phase(epoch)), "growl/iteration": float(self.iteration(epoch)),
                   "growl/cap": self.cap(epoch)})

    def on_validated(self, state: TrainingState, score: float, param_sparsity: float) -> None:
        """Phase 1: keep the model if it is the best so far with sparsity/param >= 100·s_min (Algorithm 1, step 7)."""
        if self.tied or self.phase(state.epoch) != 1 or self.phase2_from != "best":
            return
        if param_sparsity >= 100.0 * self.s_min and (self._best is None or score > self._best["score"]):
            copy = {name: value.detach().clone() for name, value in state.model.state_dict().items()}
            self._best = {"epoch": state.epoch, "score": float(score), "state": copy}

    def on_train_epoch_start(self, state: TrainingState) -> None:
        """The first phase-2 epoch: retrain the best phase-1 model (or the last), clustered and tied.

        Runs before the epoch's first step, so the last phase-1 epoch was validated (and could be
        the best). Announces `PhaseStarted(2)`: Algorithm 1 repeats its steps 2–10 for phase 2, so
        the Chebyshev balancer restarts its augmented Lagrangian and, with
        `phase2_optimizer=restart`, the loop restarts the optimizer and its lr schedule.
        """
        if self.tied or self.phase2_iterations == 0 or state.epoch < self.phase1_epochs:
            return
        if self._best is not None:
            state.model.load_state_dict(self._best["state"])
            self.phase2_source_epoch.fill_(self._best["epoch"])
            log.info("GrOWL: phase 2 retrains the best phase-1 model (epoch %d, score %.4f)", self._best["epoch"],
                     self._best["score"])
        else:
            self.phase2_source_epoch.fill_(state.epoch - 1)
            if self.phase2_from == "best":
                log.warning("GrOWL: no phase-1 epoch reached sparsity/param >= %.0f%% (method.s_min=%g); phase 2 "
                            "retrains the last phase-1 model", 100 * self.s_min, self.s_min)
        self._best = None  # used: checkpoints from here on do not carry a second model
        self._tie()
        state.announce(PhaseStarted(phase=2, epoch=state.epoch - 1,
                                    restart_optimizer=self.phase2_optimizer == "restart"))

    def masks(self) -> dict[str, Tensor] | None:
        """Support of the non-zero rows, broadcast to each weight's shape (phase 2 only)."""
        if not self.tied:
            return None
        return {layer.name: (self._ids(layer) != ZERO_ROW).view(group_shape(layer.weight)).expand_as(layer.weight)
                for layer in self.layers}

    def report(self) -> dict[str, float]:
        """Per layer once tied: `tying/<layer>/clusters` (non-zero rows' clusters), `/rows`, `/zero_rows`
        and `/converged` (1/0: whether AP converged at the tie)."""
        if not self.tied:
            return {}
        out: dict[str, float] = {}
        if self.phase2_iterations:
            out["growl/phase2_source_epoch"] = float(self.phase2_source_epoch)
        for layer, converged in zip(self.layers, self.tying_converged.tolist()):
            ids = self._ids(layer)
            key = f"tying/{layer.name}"
            out[f"{key}/rows"] = float(ids.numel())
            out[f"{key}/zero_rows"] = float((ids == ZERO_ROW).sum())
            out[f"{key}/clusters"] = float(torch.unique(ids[ids != ZERO_ROW]).numel())
            if converged >= 0:  # unknown in checkpoints written before it was recorded
                out[f"{key}/converged"] = converged
        return out

    def clusters(self) -> dict[str, Tensor] | None:
        """Cluster ids per layer (−1: zero row) once phase 2 has fixed them, else None."""
        if not self.tied:
            return None
        return {layer.name: self._ids(layer) for layer in self.layers}

    # ------------------------------------------------------------ steps
    def _ids(self, layer: PrunableLayer) -> Tensor:
        return getattr(self, cluster_buffer_name(layer.name))

    @torch.no_grad()
    def _prox(self, cap: float) -> None:
        """GrOWL prox of step Σ lr (since the last prox) on every layer, then the per-layer zero-row cap."""
        for step, layer in zip(self.prox_step.tolist(), self.layers):
            if step == 0:
                continue
            groups = self.coupling.groups(layer)
            rows = groups.stacked()  # the weight, or weight + coupled BN (γ, β) stacked
            before = rows.detach().clone()
            growl_prox_(rows, step * self.theta(layer))
            cap_zero_rows_(rows, before, math.floor(cap * layer.num_groups + 1e-9))  # guard j·s/M1 round-off
            groups.write_back_(rows)
        self.prox_step.zero_()

    @torch.no_grad()
    def _tie(self) -> None:
        """Share one value per cluster; the first call fixes the support and the clusters."""
        for index, layer in enumerate(self.layers):
            if not self.tied:
                ids, converged = cluster_rows(layer.weight, self.affinity, layer.name)
                self._ids(layer).copy_(ids)
                self.tying_converged[index] = float(converged)
            tie_rows_(layer.weight, self._ids(layer))
        self.tied.fill_(True)
