"""ε-non-dominance, hypervolume and objective matrices on hand-made points."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from mtlsparse.pareto import hypervolume, non_dominated, objectives


def mask(points, eps=0.0) -> list[bool]:
    return non_dominated(np.array(points, dtype=float), eps).tolist()


def test_2d_front_drops_dominated_points():
    assert mask([[1, 2], [2, 1], [2, 2], [0.5, 3], [3, 3]]) == [True, True, False, True, False]


def test_tie_in_one_objective_is_dominated_when_worse_in_the_other():
    assert mask([[1, 3], [1, 2]]) == [False, True]


def test_duplicates_keep_only_the_first_copy():
    assert mask([[2, 0], [1, 1], [1, 1], [1, 1]]) == [True, True, False, False]


def test_3d_front():
    points = [[1, 2, 3], [3, 2, 1], [2, 2, 2], [2, 3, 3], [1, 2, 3.5]]
    assert mask(points) == [True, True, True, False, False]


def test_eps_removes_near_duplicates_but_not_distinct_trade_offs():
    points = [[0, 1], [0.01, 0.99], [1, 0]]
    assert mask(points) == [True, True, True]
    assert mask(points, eps=0.05) == [True, False, True]


def test_eps_per_objective():
    points = [[0, 1], [0.01, 0.99]]
    assert mask(points, eps=[0.05, 0.0]) == [True, True]
    assert mask(points, eps=[0.0, 0.05]) == [True, False]


def test_eps_front_covers_every_point_and_is_mutually_non_dominated():
    rng = np.random.default_rng(0)
    points = rng.random((60, 2))
    eps = 0.1
    keep = non_dominated(points, eps)
    kept = points[keep]
    assert 0 < keep.sum() < non_dominated(points).sum()  # ε thins the ordinary front
    for p in points:
        assert np.any(np.all(kept - eps <= p, axis=1))
    assert non_dominated(kept).all()


def test_nan_rows_are_never_kept():
    assert mask([[np.nan, 0], [1, 1]]) == [False, True]


@pytest.mark.parametrize("eps", [-0.1, [0.1, 0.1, 0.1]])
def test_bad_eps_raises(eps):
    with pytest.raises(ValueError, match="eps"):
        non_dominated(np.zeros((2, 2)), eps)


@pytest.mark.parametrize(
    ("points", "ref", "expected"),
    [
        ([[1, 1]], [2, 2], 1.0),
        ([[0, 1], [1, 0]], [2, 2], 3.0),
        ([[0, 1], [1, 0], [1, 1]], [2, 2], 3.0),  # a dominated point adds nothing
        ([[0, 1], [1, 0], [3, 0], [0, 2]], [2, 2], 3.0),  # outside / on the ref: ignored
        ([[1, 1, 1]], [2, 2, 2], 1.0),
        ([[0, 0, 1], [1, 1, 0]], [2, 2, 2], 4.0 + 2.0 - 1.0),
        ([[3, 3]], [2, 2], 0.0),
    ],
)
def test_hypervolume_matches_hand_computed_volume(points, ref, expected):
    assert hypervolume(np.array(points, dtype=float), ref) == pytest.approx(expected)


def test_hypervolume_of_empty_set_is_zero_and_shape_is_checked():
    assert hypervolume(np.empty((0, 2)), [2, 2]) == 0.0
    with pytest.raises(ValueError, match="ref"):
        hypervolume(np.zeros((1, 3)), [2, 2])


def test_pymoo_fallback_agrees_with_moocore(monkeypatch):
    pytest.importorskip("pymoo")
    monkeypatch.setitem(sys.modules, "moocore", None)  # import moocore -> ImportError
    assert hypervolume(np.array([[0.0, 1.0], [1.0, 0.0]]), [2, 2]) == pytest.approx(3.0)


def test_objectives_negates_max_keys_and_marks_missing_as_nan():
    rows = [{"a": 1.0, "b": 80}, {"a": 2.0, "b": "n/a"}, {"b": 90}]
    got = objectives(rows, ["a", "b"], ["min", "max"])
    np.testing.assert_array_equal(got, [[1.0, -80.0], [2.0, np.nan], [np.nan, -90.0]])
    assert objectives(rows, ["a"]).shape == (3, 1)


def test_objectives_rejects_bad_directions():
    with pytest.raises(ValueError, match="direction"):
        objectives([{"a": 1}], ["a"], ["up"])
    with pytest.raises(ValueError, match="directions"):
        objectives([{"a": 1}], ["a"], ["min", "max"])
