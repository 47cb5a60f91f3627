"""Multi-task architectures (see `MultiTaskModel` for the contract)."""
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.cross_stitch import CrossStitch
from mtlsparse.models.hps import HPS
from mtlsparse.models.mmoe import MMoE
from mtlsparse.models.stl import STL

__all__ = ["HPS", "STL", "CrossStitch", "MMoE", "MultiTaskModel"]
