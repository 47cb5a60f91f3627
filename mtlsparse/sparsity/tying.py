"""Parameter tying for GrOWL's phase 2: cluster a layer's non-zero rows, then share one value per cluster.

Clusters come from sklearn's AffinityPropagation on the precomputed similarity
S(i, j) = ⟨w_i, w_j⟩ / max(‖w_i‖², ‖w_j‖²) ∈ [−1, 1] (Zhang et al. 2018; MDMTN). A
layer's assignment is a LongTensor with one id per input-channel row: −1 for a zero
row, 0..K−1 for the cluster of a non-zero row.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from sklearn.cluster import AffinityPropagation
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from mtlsparse.sparsity.layers import group_norms, group_shape, group_view

log = logging.getLogger(__name__)
ZERO_ROW = -1


def row_similarity(rows: Tensor) -> Tensor:
    """S(i, j) = ⟨w_i, w_j⟩ / max(‖w_i‖², ‖w_j‖²) for non-zero rows; 1 iff two rows are equal."""
    sq = (rows * rows).sum(dim=1)
    return rows @ rows.T / torch.maximum(sq[:, None], sq[None, :])


#: what a layer's rows become when AP does not converge
FALLBACKS = ("retry", "singletons")
RETRY_DAMPING = (0.7, 0.9)  # the retries of fallback="retry", each with 4× max_iter


@dataclass(frozen=True)
class AffinitySettings:
    """AffinityPropagation's knobs (sklearn's defaults) and the rule for a run that does not converge.

    sklearn's AP labels nothing when it does not converge, so the rule is: `fallback="retry"`
    (default) runs it again with damping 0.7, then 0.9, each with 4× `max_iter` (damping
    slows the oscillations that stop convergence), and only then keeps every non-zero row in
    its own cluster; `"singletons"` does that at once (no tying for the layer: its CR then
    comes from zero rows only).
    """

    preference: float = 0.7
    damping: float = 0.5
    max_iter: int = 200
    convergence_iter: int = 15
    fallback: str = "retry"

    def __post_init__(self) -> None:
        for key, ok, allowed in (("preference", math.isfinite(self.preference), "finite"),
                                 ("ap_damping", 0.5 <= self.damping < 1, "in [0.5, 1)"),
                                 ("ap_max_iter", self.max_iter >= 1, ">= 1"),
                                 ("ap_convergence_iter", self.convergence_iter >= 1, ">= 1"),
                                 ("ap_fallback", self.fallback in FALLBACKS, f"one of {list(FALLBACKS)}")):
            if not ok:
                raise ValueError(f"method.{key} must be {allowed}, got {getattr(self, key.removeprefix('ap_'))!r}")


def _affinity_run(similarity, settings: AffinitySettings, damping: float, max_iter: int) -> Tensor | None:
    ap = AffinityPropagation(affinity="precomputed", preference=settings.preference, damping=damping,
                             max_iter=max_iter, convergence_iter=settings.convergence_iter, random_state=0)
    with warnings.catch_warnings(record=True) as caught:  # reported by the caller, with the layer's name
        warnings.simplefilter("always", ConvergenceWarning)
        labels = ap.fit_predict(similarity)
    failed = any(issubclass(w.category, ConvergenceWarning) for w in caught) or (labels < 0).any()
    return None if failed else torch.from_numpy(labels).long()


def affinity_labels(rows: Tensor, settings: AffinitySettings) -> tuple[Tensor | None, int]:
    """(AffinityPropagation cluster labels of non-zero rows, or None; AP runs it took, 0 = none converged)."""
    if rows.shape[0] == 1:
        return torch.zeros(1, dtype=torch.long), 1
    similarity = row_similarity(rows.detach().double().cpu()).numpy()
    attempts = [(settings.damping, settings.max_iter)]
    if settings.fallback == "retry":
        attempts += [(d, 4 * settings.max_iter) for d in RETRY_DAMPING if d > settings.damping]
    for run, (damping, max_iter) in enumerate(attempts, start=1):
        labels = _affinity_run(similarity, settings, damping, max_iter)
        if labels is not None:
            if run > 1:
                log.info("GrOWL tying: affinity propagation converged at damping %g (run %d)", damping, run)
            return labels, run
    return None, 0


def cluster_rows(weight: Tensor, settings: AffinitySettings, name: str = "") -> tuple[Tensor, bool]:
    """(cluster ids of `weight`'s input-channel rows (−1 for zero rows), whether AP converged).

    When AP does not converge, `settings.fallback` decides (see `AffinitySettings`); either
    way a warning names the layer.
    """
    nonzero = group_norms(weight) > 0
    ids = torch.full((weight.shape[1],), ZERO_ROW, dtype=torch.long)
    live = group_view(weight)[nonzero]
    if live.shape[0] == 0:
        return ids.to(weight.device), True
    labels, runs = affinity_labels(live, settings)
    if labels is None:
        log.warning("GrOWL tying: affinity propagation did not converge on layer '%s' (%d rows, preference %g, "
                    "damping %g, max_iter %d, method.ap_fallback=%s); keeping every row in its own cluster "
                    "(raise method.ap_max_iter or method.ap_damping)", name, live.shape[0], settings.preference,
                    settings.damping, settings.max_iter, settings.fallback)
        labels = torch.arange(live.shape[0])
    ids[nonzero.cpu()] = labels
    return ids.to(weight.device), runs > 0


@torch.no_grad()
def zero_rows_(weight: Tensor, ids: Tensor) -> Tensor:
    """Set the rows marked −1 to exactly zero (keeps a fixed support)."""
    return weight.mul_((ids != ZERO_ROW).view(group_shape(weight)))


@torch.no_grad()
def tie_rows_(weight: Tensor, ids: Tensor) -> Tensor:
    """Zero the −1 rows and replace each cluster's rows by their mean, so they are exactly equal."""
    zero_rows_(weight, ids)
    live = torch.nonzero(ids != ZERO_ROW).flatten()
    if live.numel() == 0:
        return weight
    labels = ids[live]
    sums = torch.zeros_like(weight[:, : int(labels.max()) + 1]).index_add_(1, labels, weight[:, live])
    counts = torch.bincount(labels).to(weight.dtype)
    means = sums / counts.view(group_shape(sums))
    weight[:, live] = means[:, labels]
    return weight
