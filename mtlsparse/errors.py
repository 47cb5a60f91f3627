"""The errors a user can fix: each carries a message that names the problem and the fix.

They live in this leaf module so every layer (models, data, balancers, sparsity, run)
can raise them without importing the entry point's config machinery. The command line
prints the message (no traceback, unless `HYDRA_FULL_ERROR=1`) and exits with
`exit_code(err)`.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


class DataError(OSError):
    """Missing or malformed dataset files; the message names the cause and the expected layout."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset's files are not where the config says."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the message says where and with which state."""


#: exit status of the command line for each expected failure (anything else: 1, with traceback)
EXIT_CODES: dict[type[BaseException], int] = {ConfigError: 2, DataError: 2, NonFiniteLossError: 3}


def exit_code(err: BaseException) -> int | None:
    """The exit status for an expected failure, None for a bug (which gets a traceback)."""
    return next((code for kind, code in EXIT_CODES.items() if isinstance(err, kind)), None)
