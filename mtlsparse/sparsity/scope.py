"""Which layers a sparsity method acts on: the top-level `scope` node of conf/config.yaml.

By default a method sparsifies the conv/linear layers of the shared backbones, without
the input layers (they read the raw image) and without the task heads. `scope.input_layers`
and `scope.heads` add them; every method reads the same node (`scope: ${scope}`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Scope:
    """Layers beyond the shared backbones that a method sparsifies too."""

    input_layers: bool = False
    heads: bool = False

    @classmethod
    def of(cls, value: Scope | Mapping[str, Any] | None) -> Scope:
        """A `Scope` from a config mapping (e.g. the `scope` DictConfig), a Scope, or None (the defaults)."""
        if value is None or isinstance(value, Scope):
            return value or cls()
        if not isinstance(value, Mapping):
            raise ValueError(f"scope must be a mapping like {{input_layers: false, heads: false}}, got {value!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise ValueError(f"unknown key(s) {['scope.' + k for k in unknown]}; allowed keys: "
                             f"{['scope.' + k for k in allowed]}")
        for key, flag in value.items():
            if not isinstance(flag, bool):
                raise ValueError(f"scope.{key} must be true or false, got {flag!r}")
        return cls(**{str(k): v for k, v in value.items()})


#: what a method constructor's `scope` argument accepts (Hydra passes the `scope` DictConfig)
ScopeLike = Scope | Mapping[str, Any] | None
