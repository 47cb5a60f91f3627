"""The errors a user can fix: each carries one line that names the problem and the fix.

They live in this leaf module so every layer (models, data, balancers, sparsity, run)
can raise them without importing the entry-point's config machinery. The command line
prints the message (no traceback, unless `HYDRA_FULL_ERROR=1`) and exits with
`EXIT_CODES[type]`.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


class DataError(RuntimeError):
    """Missing or malformed dataset files; the message names the cause and the expected layout."""


#: exit status of the command line for each expected failure (anything else: 1, with traceback)
EXIT_CODES = {"ConfigError": 2, "DataError": 2, "NonFiniteLossError": 3}
