"""tccli.runtime.allocator: glibc's malloc keeps a training step's buffers in its heap instead of mapping them anew."""

import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# A 16 MiB malloc, then glibc's own count of mmapped blocks (mallinfo2().hblks) while it is held.
PROBE = """
import ctypes, sys
from tccli.runtime import allocator
libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "set":
    assert allocator.keep_freed_memory()
before = libc.mallinfo2().hblks
block = libc.malloc(16 * 2**20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's (elsewhere keep_freed_memory does nothing)")
def test_blocks_below_32_mib_come_from_the_heap():
    def mapped(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    assert mapped("default") == 1  # glibc's default: a fresh mapping for a 16 MiB block
    assert mapped("set") == 0  # after keep_freed_memory: from the heap, reused step after step


@pytest.mark.skipif(GLIBC, reason="only where the C library is not glibc")
def test_does_nothing_elsewhere():
    from tccli.runtime import allocator

    assert allocator.keep_freed_memory() is False
