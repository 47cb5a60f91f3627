"""Multi-task datamodules; each is instantiated from ``conf/dataset/<name>.yaml``."""
from mtlsparse.data.base import ImageData, MultiTaskDataModule
from mtlsparse.data.digits import MultiDigits
from mtlsparse.data.multi_mnist import MultiFashion, MultiFashionMNIST, MultiMNIST, MultiPairDataModule
from mtlsparse.data.synthetic import Synthetic

__all__ = [
    "ImageData",
    "MultiDigits",
    "MultiFashion",
    "MultiFashionMNIST",
    "MultiMNIST",
    "MultiPairDataModule",
    "MultiTaskDataModule",
    "Synthetic",
]
