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


def malloc_probe(fix):
    """
    Run in a process of its own (glibc): a 16 MiB block freed (glibc then raises its mmap threshold to that size), a
    1 MiB block's source, ltp.cli.fix_mmap_threshold if fix, then a 4 MiB block's source (more than the heap has
    free); a source is 1 for mmap, 0 for the heap (mallinfo2's count of mmapped blocks). Returns (pid, whether
    onnxruntime was imported, 1 MiB's source, 4 MiB's source).
    """
    import ctypes
    import os
    import sys
    from ltp.cli import fix_mmap_threshold
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info

    def mmapped(n):
        before = libc.mallinfo2().hblks
        ptr = libc.malloc(n)
        after = libc.mallinfo2().hblks
        libc.free(ptr)
        return after - before
    ort_loaded = "onnxruntime" in sys.modules
    libc.free(libc.malloc(16 << 20))
    small = mmapped(1 << 20)
    if fix:
        assert fix_mmap_threshold()
    return os.getpid(), ort_loaded, small, mmapped(4 << 20)


def glibc_only():
    import platform
    import pytest
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")


def test_fix_mmap_threshold_sends_large_blocks_to_mmap_again():
    """ltp.cli.fix_mmap_threshold, in a fresh process: after a 16 MiB block is freed glibc serves a 1 MiB block from
    the heap (its threshold raised); once fixed at 128 KiB, a 4 MiB one from mmap again."""
    import os
    import subprocess
    import sys
    glibc_only()
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_timing; print(*test_timing.malloc_probe(True)[2:])"
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "1"]


def test_in_fresh_process_fixes_the_threshold_before_its_function_runs():
    """ltp.benchmark.in_fresh_process (bench.py's ONNX Runtime rows): fn runs in another process, onnxruntime not yet
    imported there and glibc's threshold already fixed, so a freed 16 MiB block raises nothing: 1 and 4 MiB from mmap."""
    import os
    from ltp.benchmark import in_fresh_process
    glibc_only()
    pid, ort_loaded, small, large = in_fresh_process(malloc_probe, False)
    assert pid != os.getpid() and not ort_loaded and (small, large) == (1, 1)
