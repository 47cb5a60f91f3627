"""Multi-task architectures (see `MultiTaskModel` for the contract)."""
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.hps import HPS
from mtlsparse.models.stl import STL

__all__ = ["HPS", "MultiTaskModel", "STL"]
