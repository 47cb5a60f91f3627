"""The `mtlsparse` console script: `mtlsparse [overrides]` trains, `mtlsparse report DIR` reports,
`mtlsparse export RUN_DIR` compacts a trained channel-sparse model."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"report": "mtlsparse.report", "export": "mtlsparse.export"}


def main() -> None:
    """Dispatch subcommands; anything else is a Hydra training command line."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    from mtlsparse.__main__ import main as train_main

    train_main()
