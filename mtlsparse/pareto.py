"""Pareto tools for comparing runs: objective matrices, ε-non-dominance, hypervolume, the front of runs.

Plain numpy functions in the minimisation convention (smaller is better in every
column); `objectives` negates the columns that are to be maximised. Hypervolume
comes from the maintained `moocore` library. `pareto_front` applies them to runs (dicts
of metrics) and objective specs (`key`, or `max:key` to maximise), as `mtlsparse report` does.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import moocore
import numpy as np

Direction = Literal["min", "max"]
#: hypervolume reference per direction when none is given: 2 per minimised (a loss), 0 per maximised objective
DEFAULT_REF = {"min": 2.0, "max": 0.0}


def objectives(
    rows: Sequence[Mapping[str, object]],
    keys: Sequence[str],
    directions: Sequence[Direction] | None = None,
) -> np.ndarray:
    """(n_rows, n_keys) float matrix of `keys` taken from `rows`, in minimisation form.

    `directions[i] == "max"` negates column i so every column is minimised. A missing
    or non-numeric value becomes NaN (such rows are never non-dominated).
    """
    directions = list(directions) if directions is not None else ["min"] * len(keys)
    if len(directions) != len(keys):
        raise ValueError(f"got {len(directions)} directions for {len(keys)} objective keys")
    bad = [d for d in directions if d not in ("min", "max")]
    if bad:
        raise ValueError(f"objective direction must be 'min' or 'max', got {bad}")
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    values = np.array([[as_float(row.get(k)) for k in keys] for row in rows], dtype=float)
    return values.reshape(len(rows), len(keys)) * sign


def as_float(value: object) -> float:
    """`value` as a float, NaN when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


def non_dominated(points: np.ndarray, eps: float | Sequence[float] | np.ndarray = 0.0) -> np.ndarray:
    """Boolean mask of the ε-non-dominated subset of `points` (n, d), minimisation.

    Definition (additive ε-dominance, Zitzler et al. 2003): q ε-dominates p when
    q_i - eps_i <= p_i for every objective i. The kept set is built in two steps:

    1. ordinary Pareto filter: p is dropped if some q has q <= p everywhere and
       q < p somewhere;
    2. ε-thinning: the survivors are visited in lexicographic order of their
       objective vectors (ties by index) and p is dropped if an already kept q
       ε-dominates it; with eps=0 this drops exactly the later copies of duplicates.

    So every input point is ε-dominated by some kept point, and kept points never
    dominate each other. eps=0 gives the ordinary Pareto set (one copy of each
    duplicate). Rows containing NaN are never kept.
    """
    points = np.asarray(points, dtype=float)
    if points.ndim != 2:
        raise ValueError(f"points must be a 2-D array (n, d), got shape {points.shape}")
    eps_vec = np.asarray(eps, dtype=float).ravel()
    if eps_vec.size not in (1, points.shape[1]):
        raise ValueError(f"eps has {eps_vec.size} values for {points.shape[1]} objectives")
    eps_vec = np.broadcast_to(eps_vec, (points.shape[1],))
    if np.any(eps_vec < 0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    keep = _pareto_mask(points)
    kept: list[int] = []
    for i in sorted(np.flatnonzero(keep), key=lambda j: tuple(points[j])):
        if any(np.all(points[j] - eps_vec <= points[i]) for j in kept):
            keep[i] = False
        else:
            kept.append(i)
    return keep


def _pareto_mask(points: np.ndarray) -> np.ndarray:
    """Ordinary non-dominance mask (duplicates all kept); NaN rows dropped."""
    finite = np.all(np.isfinite(points), axis=1)
    keep = finite.copy()
    others = points[finite]
    for i in np.flatnonzero(finite):
        weakly_better = np.all(others <= points[i], axis=1)
        strictly_somewhere = np.any(others < points[i], axis=1)
        if np.any(weakly_better & strictly_somewhere):
            keep[i] = False
    return keep


def hypervolume(points: np.ndarray, ref: Sequence[float] | np.ndarray) -> float:
    """Hypervolume (minimisation) dominated by `points` and bounded by `ref`.

    Points that do not strictly dominate `ref` contribute nothing; NaN rows are
    ignored; an empty set has hypervolume 0.
    """
    points = np.asarray(points, dtype=float)
    ref = np.asarray(ref, dtype=float)
    if points.ndim != 2 or points.shape[1] != ref.shape[0]:
        raise ValueError(f"points of shape {points.shape} do not match ref of length {ref.shape[0]}")
    inside = points[np.all(points < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    return _hypervolume_backend(inside, ref)


def _hypervolume_backend(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume by moocore."""
    return float(moocore.hypervolume(points, ref=ref))


def parse_objective(spec: str) -> tuple[str, Direction]:
    """`key` (minimised) or `max:key` (maximised) → (key, direction)."""
    return (spec[4:], "max") if spec.startswith("max:") else (spec, "min")


def pareto_front(
    runs: Sequence[Mapping[str, object]], specs: Sequence[str], ref: Sequence[float] | None,
    eps: float | Sequence[float],
) -> dict:
    """ε-non-dominated `runs` (the successful ones) over `specs` and their hypervolume w.r.t. `ref` (metric units).

    Returns {"front": runs, "hypervolume": float | None, "ref": list, "note": str}; the
    note says why the front was skipped or which runs were left out. A `ref` whose length
    does not match `specs` (one value is repeated for all) is a ValueError.
    """
    keys, directions = zip(*map(parse_objective, specs)) if specs else ((), ())
    ref_list = list(ref) if ref is not None else [DEFAULT_REF[d] for d in directions]
    if len(ref_list) == 1 and len(keys) > 1:
        ref_list *= len(keys)
    if len(ref_list) != len(keys):
        raise ValueError(f"ref has {len(ref_list)} values for {len(keys)} objectives {list(specs)}")
    skipped = {"front": [], "hypervolume": None, "ref": ref_list}
    if not runs:
        return skipped | {"note": "Pareto front skipped: no run succeeded."}
    if len(keys) < 2:
        return skipped | {"note": f"Pareto front skipped: needs at least 2 objectives, got {list(specs)}."}
    points = objectives(runs, keys, directions)
    complete = np.all(np.isfinite(points), axis=1)
    if not complete.any():
        return skipped | {"note": f"Pareto front skipped: no successful run has all of {list(keys)}."}
    mask = non_dominated(points, eps)
    ref_point = objectives([dict(zip(keys, map(float, ref_list)))], keys, directions)[0]
    hv = hypervolume(points[mask], ref_point)
    missing = int((~complete).sum())
    note = f"{missing} successful run(s) lack an objective and are left out." if missing else ""
    return {"front": [run for run, m in zip(runs, mask) if m], "hypervolume": hv, "ref": ref_list, "note": note}
