"""Tensor cache for datasets built from other datasets.

Files live under ``<root>/mtlsparse_cache/<name>-<hash of build params>.pt``; writes
are atomic (temp file + ``os.replace``) so concurrent runs of a sweep never see a
half-written file, and unreadable or inconsistent files are rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CACHE_DIR = "mtlsparse_cache"


def cache_path(root: str | Path, name: str, params: dict[str, Any]) -> Path:
    """Cache file of dataset ``name`` built with ``params`` (JSON-serialisable)."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root) / CACHE_DIR / f"{name}-{digest}.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the target directory, then atomically rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_valid(path: Path, check: Callable[[Any], None]) -> Any | None:
    """The cached object at ``path``, or None if missing; warns and returns None if it is corrupt.

    ``check`` raises (any exception) when the loaded object is not what the builder
    would produce, e.g. wrong keys or shapes.
    """
    if not path.exists():
        return None
    try:
        obj = torch.load(path, weights_only=True)
        check(obj)
    except Exception as err:
        warnings.warn(f"dataset cache {path} is unusable ({type(err).__name__}: {err}); rebuilding it", stacklevel=2)
        return None
    return obj


def build_cached(path: Path, build: Callable[[], Any], check: Callable[[Any], None]) -> Any:
    """Load the cache at ``path``, or build, save and return it if missing or corrupt."""
    obj = load_valid(path, check)
    if obj is None:
        obj = build()
        save_atomic(obj, path)
    return obj
