"""Read and write IDX files, the on-disk format of MNIST and Fashion-MNIST.

Reading validates the header against the payload so that a truncated download or
a corrupt file fails loudly with the file's name instead of producing garbage.
"""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import torch
from torch import Tensor

from mtlsparse.errors import DataError

UINT8 = 0x08  # the only element type MNIST-style files use


class IdxFormatError(DataError, ValueError):
    """An IDX file is corrupt, truncated or not an unsigned-byte IDX file."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> Tensor:
    """Read an unsigned-byte IDX file (raw or ``.gz``) into a uint8 tensor of its header's shape."""
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a cut gzip stream is EOFError
        raise IdxFormatError(f"{path}: cannot read IDX file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{path}: bad IDX magic number {data[:4].hex() or '(empty file)'}")
    if data[2] != UINT8:
        raise IdxFormatError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IdxFormatError(f"{path}: IDX header truncated or has {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise IdxFormatError(
            f"{path}: header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes; the file is truncated or corrupt"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(dims)


def write_idx(path: str | Path, array: Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzip-compressed if the name ends in ``.gz``).

    Used to make tiny fake copies of MNIST-format datasets for tests.
    """
    path = Path(path)
    if array.dtype != torch.uint8:
        raise TypeError(f"IDX writer expects uint8, got {array.dtype}")
    header = bytes([0, 0, UINT8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.contiguous().numpy().tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
