"""Where the Hydra config tree lives, for a checkout and for an installed package alike.

The repository keeps `conf/` (and `multirun_sweeps/`, linked as `conf/sweep`) at its top
level. A wheel carries a copy of that tree as `mtlsparse/_conf/` (setup.py's build step),
so an installed `mtlsparse` finds its configs from any working directory; a checkout or an
editable install reads the top-level tree itself, so edits there take effect at once.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
PACKAGED = _PACKAGE / "_conf"
CHECKOUT = _PACKAGE.parent / "conf"


def config_dir() -> Path:
    """The `conf/` tree this package runs with: the packaged copy, else the checkout's."""
    if (PACKAGED / "config.yaml").is_file():
        return PACKAGED
    if (CHECKOUT / "config.yaml").is_file() and (_PACKAGE.parent / "pyproject.toml").is_file():
        return CHECKOUT
    raise FileNotFoundError(f"mtlsparse's config tree is missing: neither {PACKAGED} (installed wheel) nor "
                            f"{CHECKOUT} (checkout) holds config.yaml; reinstall with `pip install mtlsparse` "
                            "or `pip install -e .` from the repository")


CONF_DIR = str(config_dir())

#: groups the primary config lists as `group: null`: chosen with `group=NAME`
OPTIONAL_GROUPS = ("experiment",)


def normalise_overrides(overrides: list[str]) -> list[str]:
    """Accept `+experiment=NAME` (the older spelling) as `experiment=NAME`.

    The defaults list holds `experiment: null`, so Hydra itself takes `experiment=NAME`
    and would refuse the appending `+` form as a second value.
    """
    prefixes = tuple(f"{plus}{group}=" for group in OPTIONAL_GROUPS for plus in ("++", "+"))
    return [o.lstrip("+") if o.startswith(prefixes) else o for o in overrides]
