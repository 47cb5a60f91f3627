"""The allocator limits: a freed large block stays in the heap for the next step (glibc only)."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

# a fresh interpreter: the limits are per process, and this test must not change the pytest process's heap
PROBE = """
import ctypes, sys
from mtlsparse.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "on":
    assert keep_freed_memory()
block = bytearray(64 << 20)  # 64 MiB: above glibc's largest automatic mmap threshold (32 MiB)
del block
print(libc.mallinfo2().fordblks)  # bytes free inside the heap
"""


def _free_in_heap_after_a_64mib_block(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_a_freed_block_stays_in_the_heap_only_with_the_limits():
    assert _free_in_heap_after_a_64mib_block("off") < 64 << 20  # glibc unmapped it: the next step faults it in
    assert _free_in_heap_after_a_64mib_block("on") >= 64 << 20  # kept for the next step
