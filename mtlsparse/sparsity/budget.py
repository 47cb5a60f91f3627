"""Epoch schedules given as fractions of the run, resolved once the epoch budget is known.

Convention, the same for every method: a point or length of a schedule has two keys,
`<name>_fraction` (the default: a fraction in [0, 1] of trainer.max_epochs) and
`<name>_epoch` / `<name>_epochs` (null by default: an explicit 0-based epoch, or a
number of epochs; when given it replaces the fraction). So a short run (CI smoke test,
quick sweep) still runs the whole schedule, and a long one keeps its proportions.

- a point resolves to the epoch at whose end that fraction of the run is done,
  round(f·N) − 1, clamped to the run's epochs 0..N−1 (so it exists for every N ≥ 1);
- a length resolves to round(f·N) epochs, clamped to what the run can hold.

An explicit epoch the run cannot reach is a `ConfigError` that names both keys: a
schedule that silently never fires leaves a dense or unrefined model.
"""
from __future__ import annotations

import math

from mtlsparse.errors import ConfigError


def finite_budget(max_epochs: int | None) -> int | None:
    """trainer.max_epochs as a number of epochs, None for an unbounded run (None or < 1, e.g. -1)."""
    if max_epochs is None or int(max_epochs) < 1:
        return None
    return int(max_epochs)


def check_fraction(key: str, value: float) -> float:
    """A `method.<key>` fraction of the run: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"method.{key} must be a fraction of trainer.max_epochs in [0, 1], got {value!r}")
    return float(value)


def check_epoch(key: str, value: int | None, fraction_key: str) -> int | None:
    """A `method.<key>` explicit epoch (or epoch count): null or an integer >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"method.{key} must be null or an integer epoch >= 0, got {value!r}; "
                          f"give a fraction of the run as method.{fraction_key} instead")
    return value


def round_half_up(x: float) -> int:
    """Nearest integer, halves up (monotone, unlike banker's rounding's tie-breaking)."""
    return math.floor(x + 0.5 + 1e-9)


def point_epoch(fraction: float, max_epochs: int) -> int:
    """0-based epoch at whose end `fraction` of a `max_epochs` run is done, in 0..max_epochs−1."""
    return min(max(round_half_up(fraction * max_epochs) - 1, 0), max_epochs - 1)


def epoch_count(fraction: float, max_epochs: int, low: int = 0, high: int | None = None) -> int:
    """`fraction` of `max_epochs` as a whole number of epochs, clamped to [low, high] (high: max_epochs)."""
    high = max_epochs if high is None else high
    return min(max(round_half_up(fraction * max_epochs), low), high)


def needs_budget(fraction_key: str, epoch_key: str) -> ConfigError:
    """The error for a fraction-of-run schedule in a run without a finite epoch budget."""
    return ConfigError(f"method.{fraction_key} is a fraction of trainer.max_epochs, which is unbounded here: "
                       f"set trainer.max_epochs or give method.{epoch_key} explicitly")


def past_the_run(key: str, value: int, max_epochs: int, fraction_key: str) -> ConfigError:
    """The error for an explicit epoch after the last epoch of the run."""
    return ConfigError(f"method.{key}={value} is past the last epoch of trainer.max_epochs={max_epochs} "
                       f"(epochs 0..{max_epochs - 1}): lower method.{key} or drop it (method.{key}=null) "
                       f"to use method.{fraction_key}, a fraction of the run (e.g. method.{fraction_key}=0.5)")


def resolve_point(epoch_key: str, epoch: int | None, fraction_key: str, fraction: float,
                  max_epochs: int | None) -> int:
    """The epoch of a schedule point: the explicit one (checked against the run) or the fraction's."""
    if epoch is not None:
        if max_epochs is not None and epoch >= max_epochs:
            raise past_the_run(epoch_key, epoch, max_epochs, fraction_key)
        return epoch
    if max_epochs is None:
        raise needs_budget(fraction_key, epoch_key)
    return point_epoch(fraction, max_epochs)
