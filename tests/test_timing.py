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
