"""Build step: ship the top-level config tree inside the wheel as `mtlsparse/_conf`.

`conf/` and `multirun_sweeps/` stay at the repository's top level (the single source of
configs); a wheel gets a copy, with the `conf/sweep -> ../multirun_sweeps` link resolved,
so `mtlsparse` finds its configs from any directory once installed. Editable installs read
the checkout's tree directly (mtlsparse/conf_dir.py).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    """build_py that also copies conf/ (following links) into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads ROOT/conf itself
        target = Path(self.build_lib) / "mtlsparse" / "_conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "conf", target, symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
