"""Couple a layer's input-channel groups with the BatchNorm that produces those channels.

With Conv → BN → (pool, ReLU) → Conv, the second conv's input group c can shrink forever
without reaching zero: BN's free scale γ_c grows to compensate, and the group's gradient
grows with γ_c, so a prox that zeroes it sees it revive. Adding γ_c and β_c to group c
(one group = the conv's input slice W[:, c] plus its producer's BN affine pair) removes
that escape: the whole channel then goes to zero together, and export can drop the
producer's output channel, which is where the compute of a conv trunk is. Which layers
couple is `mtlsparse.channel_groups.producer_norms` (one-to-one chains only).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from mtlsparse.channel_groups import ChannelGroups, producer_norms
from mtlsparse.sparsity.layers import PrunableLayer
from mtlsparse.training_state import TrainingState

log = logging.getLogger("mtlsparse")


class GroupCoupling:
    """The channel groups a group method (group lasso, GrOWL) acts on, with its `couple_norms` option.

    Until `couple` runs (at fit start, when the input shape is known) every layer's groups
    are its weight's own; with `couple_norms` a layer that reads a BatchNorm one-to-one gets
    that norm's γ, β in each group.
    """

    def __init__(self, couple_norms: bool) -> None:
        if not isinstance(couple_norms, bool):
            raise ValueError(f"method.couple_norms must be true or false, got {couple_norms!r}")
        self.enabled = couple_norms
        self.norms: dict[str, nn.Module] = {}  # layer name → coupled BatchNorm

    def couple_at_fit_start(self, state: TrainingState, layers: Sequence[PrunableLayer], method: str) -> None:
        if not self.enabled:
            return
        if state.model is None or state.input_shape is None:
            raise ValueError("method.couple_norms=true traces the model on the datamodule's input_shape; "
                             "fit with a datamodule that has one, or set method.couple_norms=false")
        self.couple(state.model, state.input_shape, layers, method)

    def couple(self, model: nn.Module, input_shape: Sequence[int], layers: Sequence[PrunableLayer],
               method: str = "") -> None:
        """Find each layer's producer BatchNorm; its γ, β join the layer's input groups."""
        self.norms = producer_norms(model, [(layer.name, layer.module) for layer in layers], input_shape)
        uncoupled = [layer.name for layer in layers if layer.name not in self.norms]
        if not self.norms:
            log.warning("method.couple_norms=true but no layer reads a BatchNorm one-to-one (layers: %s): the "
                        "groups stay the weights alone", uncoupled)
            return
        log.info("%s: BN-coupled groups in %s; uncoupled (no one-to-one BatchNorm): %s", method,
                 sorted(self.norms), uncoupled or "none")

    def groups(self, layer: PrunableLayer) -> ChannelGroups:
        """`layer`'s channel groups as the method sees them (coupled or not)."""
        return ChannelGroups(layer.name, layer.weight, self.norms.get(layer.name))
