"""Sparsity metrics on hand-made weights."""
import pytest
import torch
from torch import nn

from mtlsparse.metrics.sparsity import (
    group_sparsity,
    matrix_weights,
    param_counts,
    param_sparsity,
    row_metrics,
    row_stats,
)


def test_param_sparsity_counts_exact_zeros():
    a = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([1e-12, 0.0, 2.0, 3.0])
    assert param_sparsity([a, b]) == pytest.approx(100 * 4 / 8)


def test_group_sparsity_counts_all_zero_input_channels():
    lin = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])  # columns 0 and 2 are zero groups
    conv = torch.zeros(4, 2, 3, 3)
    conv[3, 1, 2, 2] = 1.0  # channel 1 has one non-zero → not a zero group
    assert group_sparsity([lin, conv]) == pytest.approx(100 * 3 / 5)


def test_row_stats_with_duplicates_and_zero_rows():
    # Linear (out=2, in=5): rows are the 5 columns
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0],
                      [3.0, 3.0, 0.0, 0.0, 4.0]])
    assert row_stats(w) == (5, 2, 3)  # unique: (1,3), (2,4), zero


def test_row_metrics_sr_cr_ps():
    w1 = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0],
                       [3.0, 3.0, 0.0, 0.0, 4.0]])        # 5 rows, 2 zero, 3 unique
    w2 = torch.zeros(2, 3, 1, 1)
    w2[:, 0] = 1.0                                       # 3 rows, 2 zero, 2 unique
    m = row_metrics([w1, w2])
    assert m["sr"] == pytest.approx(100 * 4 / 8)
    assert m["cr"] == pytest.approx(8 / 5)
    assert m["ps"] == pytest.approx(4 / 5)


def test_dense_distinct_rows_give_unit_cr_ps():
    torch.manual_seed(0)
    m = row_metrics([torch.randn(4, 6), torch.randn(3, 2, 3, 3)])
    assert m == {"sr": 0.0, "cr": 1.0, "ps": 1.0}


def test_matrix_weights_and_param_counts():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[3].weight.zero_()
    assert [tuple(w.shape) for w in matrix_weights(model)] == [(2, 1, 3, 3), (3, 8)]
    counts = param_counts(model)
    total = 2 * 9 + 2 + 2 + 2 + 3 * 8 + 3
    assert counts["total"] == total
    assert counts["nonzero"] == total - 24 - int((model[3].bias == 0).sum()) - 2  # BN bias starts at 0
