"""ltp/timing.py: the clock that packed.forward_batches, bench.py and the scripts share (counts, not speeds)."""
import statistics

import torch

from ltp.timing import PeakMemory, Stopwatch, timed


def test_timed_discards_the_warmup_and_takes_the_median_of_the_rest():
    calls = []
    median, times = timed(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and median == statistics.median(times)
    assert all(t >= 0 for t in times)


def test_stopwatch_spans_its_block_and_peak_memory_sees_a_new_tensor():
    with Stopwatch("cpu") as outer:
        with Stopwatch("cpu") as inner:
            sum(range(1000))
    assert 0 <= inner.seconds <= outer.seconds
    with PeakMemory("cpu") as probe:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del x
    assert probe.mb >= 32  # resident growth of the block, well above the process's noise


def test_fix_mmap_threshold_sends_large_blocks_to_mmap_again():
    """ltp.cli.fix_mmap_threshold, in a fresh process: after a 16 MiB block is freed glibc serves a 1 MiB block from
    the heap (its threshold raised); once fixed at 128 KiB, a 4 MiB one from mmap again (mallinfo2's count of mmapped blocks)."""
    import platform
    import subprocess
    import sys
    import pytest
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = """
import ctypes
from ltp.cli import fix_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(16 << 20))  # freeing an mmapped block raises glibc's threshold to its size
def mmapped(n):
    before = libc.mallinfo2().hblks
    p = libc.malloc(n)
    after = libc.mallinfo2().hblks
    libc.free(p)
    return after - before
print(mmapped(1 << 20), fix_mmap_threshold(), mmapped(4 << 20))  # 4 MiB: more than the heap has free
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "True", "1"]
