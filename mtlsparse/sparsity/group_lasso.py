"""Channel-wise group lasso (Upadhyay et al., seed 003) solved by proximal Adam.

Objective Σ k_t L_t + λ Σ_g √|g| ‖W_g‖₂ with one group per input channel of each
prunable conv/linear weight. After every optimizer step each group gets the prox of
τ‖·‖₂, τ = lr·λ·√|g|: either the plain Euclidean prox (`prox: plain`) or the prox in
Adam's own metric D = √v̂ + eps (`prox: adam`), which matches the preconditioned step.
The penalty's subgradient is not added to the loss (unless the balancer's k0 > 0).

`couple_norms: true` adds each group's producer BatchNorm γ_c, β_c to the group (see
`norm_coupling`): without it BN's free scale keeps a conv's input groups alive, so only
FC features and whole conv outputs go, and the compute-heavy early channels stay.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsparse.sparsity.base import param_state
from mtlsparse.sparsity.layers import PrunableLayer, group_norms
from mtlsparse.sparsity.norm_coupling import coupled_params, input_norms, stack_groups, unstack_groups_
from mtlsparse.sparsity.prox import group_prox_, group_prox_metric_
from mtlsparse.sparsity.prox_method import ProxMethod

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L

log = logging.getLogger("mtlsparse")
PROX_VARIANTS = ("plain", "adam")


def adam_metric(group: dict, state: dict) -> Tensor:
    """Adam's diagonal preconditioner D = √(v / (1 − β₂ᵗ)) + eps for one parameter."""
    if "exp_avg_sq" not in state:
        raise ValueError("method.prox=adam needs an Adam-family optimizer (optimizer=adam or adamw); "
                         "use method.prox=plain with other optimizers")
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    step = float(state["step"])
    return (v / (1 - group["betas"][1] ** step)).sqrt() + group["eps"]


class GroupLasso(ProxMethod):
    """Proximal-Adam channel group lasso on the prunable layers (shared trunk by default)."""

    structured = True

    def __init__(self, lam: float = 0.0, prox: str = "adam", finetune_epochs: int = 0,
                 include_input_layers: bool = False, include_heads: bool = False,
                 couple_norms: bool = False) -> None:
        super().__init__(lam, finetune_epochs, include_input_layers, include_heads)
        if prox not in PROX_VARIANTS:
            raise ValueError(f"method.prox must be one of {PROX_VARIANTS}, got '{prox}'")
        self.prox = prox
        self.couple_norms = couple_norms
        self.norms: dict[str, torch.nn.Module] = {}  # layer name → coupled BatchNorm (set in on_fit_start)

    def on_fit_start(self, module: L.LightningModule) -> None:
        if not self.couple_norms:
            return
        datamodule = getattr(module.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "input_shape"):
            raise ValueError("method.couple_norms=true traces the model on the datamodule's input_shape; "
                             "fit with a datamodule that has one, or set method.couple_norms=false")
        self.couple(module.model, datamodule.input_shape)

    def couple(self, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
        """Find each layer's producer BatchNorm; its γ, β join the layer's input groups."""
        self.norms = input_norms(model, self.layers, input_shape)
        uncoupled = [layer.name for layer in self.layers if layer.name not in self.norms]
        log.info("group lasso: BN-coupled groups in %s; uncoupled (no one-to-one BatchNorm): %s",
                 sorted(self.norms) or "none", uncoupled or "none")

    def group_tensors(self, layer: PrunableLayer) -> list[Tensor]:
        return coupled_params(layer, self.norms.get(layer.name))

    def group_size(self, layer: PrunableLayer) -> int:
        return sum(t.numel() for t in self.group_tensors(layer)) // layer.num_groups

    def penalty(self) -> Tensor | None:
        return self.lam * sum(math.sqrt(self.group_size(layer)) * self.group_norms(layer).sum() for layer in self.layers)

    def group_norms(self, layer: PrunableLayer) -> Tensor:
        """‖group‖₂ per input channel, the BN pair included when coupled."""
        tensors = self.group_tensors(layer)
        return group_norms(tensors[0] if len(tensors) == 1 else stack_groups(tensors))

    def prox_(self, optimizer: torch.optim.Optimizer) -> None:
        state = param_state(optimizer)
        for layer in self.layers:
            group = state[id(layer.weight)][0]
            tau = group["lr"] * self.lam * math.sqrt(self.group_size(layer))
            tensors = self.group_tensors(layer)
            if len(tensors) == 1:
                self._prox_tensor_(layer.weight, tau, state)
                continue
            stacked = stack_groups(tensors)
            self._prox_tensor_(stacked, tau, state, tensors)
            unstack_groups_(stacked, tensors)

    def _prox_tensor_(self, target: Tensor, tau: float, state: dict, tensors: list[Tensor] | None = None) -> None:
        """Group prox of `target` (a weight, or the stacked groups of `tensors`) in place."""
        if self.prox == "plain":
            group_prox_(target, tau)
            return
        if tensors is None:
            metric = adam_metric(*state[id(target)])
        else:
            metric = stack_groups([adam_metric(*state[id(t)]) for t in tensors])
        group_prox_metric_(target, tau, metric)
