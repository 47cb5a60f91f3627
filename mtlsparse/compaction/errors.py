"""Why a compaction stops: the errors export reports in one line."""
from __future__ import annotations


class ExportError(RuntimeError):
    """Export cannot proceed (bad run dir, missing checkpoint, outputs that do not match, budget spent)."""


class NotCompactable(ExportError):
    """The model's architecture is declared not compactable (`NOT_COMPACTABLE`)."""


class BudgetExceeded(ExportError):
    """The dependency analysis ran past its `Budget` (time or channel indices)."""

