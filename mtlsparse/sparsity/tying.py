"""Parameter tying for GrOWL's phase 2: cluster a layer's non-zero rows, then share one value per cluster.

Clusters come from sklearn's AffinityPropagation on the precomputed similarity
S(i, j) = ⟨w_i, w_j⟩ / max(‖w_i‖², ‖w_j‖²) ∈ [−1, 1] (Zhang et al. 2018; MDMTN). A
layer's assignment is a LongTensor with one id per input-channel row: −1 for a zero
row, 0..K−1 for the cluster of a non-zero row.
"""
from __future__ import annotations

import logging
import warnings

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


def affinity_labels(rows: Tensor, preference: float) -> Tensor | None:
    """AffinityPropagation cluster labels of non-zero rows; None when AP does not converge."""
    if rows.shape[0] == 1:
        return torch.zeros(1, dtype=torch.long)
    similarity = row_similarity(rows.detach().double().cpu()).numpy()
    ap = AffinityPropagation(affinity="precomputed", preference=preference, random_state=0)
    with warnings.catch_warnings(record=True) as caught:  # reported by the caller, with the layer's name
        warnings.simplefilter("always", ConvergenceWarning)
        labels = ap.fit_predict(similarity)
    failed = any(issubclass(w.category, ConvergenceWarning) for w in caught) or (labels < 0).any()
    return None if failed else torch.from_numpy(labels).long()


def cluster_rows(weight: Tensor, preference: float, name: str = "") -> Tensor:
    """Cluster ids of `weight`'s input-channel rows (−1 for zero rows).

    Falls back to one cluster per non-zero row (no tying) with a warning when AP fails.
    """
    nonzero = group_norms(weight) > 0
    ids = torch.full((weight.shape[1],), ZERO_ROW, dtype=torch.long)
    live = group_view(weight)[nonzero]
    if live.shape[0] == 0:
        return ids.to(weight.device)
    labels = affinity_labels(live, preference)
    if labels is None:
        log.warning("GrOWL tying: affinity propagation did not converge on layer '%s' (%d rows, preference %g); "
                    "keeping every row in its own cluster", name, live.shape[0], preference)
        labels = torch.arange(live.shape[0])
    ids[nonzero.cpu()] = labels
    return ids.to(weight.device)


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
