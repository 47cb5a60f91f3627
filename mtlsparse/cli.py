"""The `mtlsparse` console script: `mtlsparse [overrides]` trains, `mtlsparse report DIR` reports."""
from __future__ import annotations

import sys

SUBCOMMANDS = ("report",)


def main() -> None:
    """Dispatch subcommands; anything else is a Hydra training command line."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        from mtlsparse import report

        sys.exit(report.main(sys.argv[2:]))
    from mtlsparse.__main__ import main as train_main

    train_main()
