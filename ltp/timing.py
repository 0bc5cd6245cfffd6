"""
Wall time and peak memory of a block of model work: the one clock that packed.forward_batches, bench.py and the
scripts share. Stopwatch waits for the device's queued work on both sides (cuda), so the time is the work's, not
the launch's; PeakMemory reads the growth of the process's peak memory over a block.
"""
import resource
import statistics
import time

import torch


def sync(device):
    """Wait for the device's queued work (cuda), so that a timer reads the real time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """`with Stopwatch(device) as clock: ...`, then clock.seconds: the block's wall time, its device work included."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


def timed(fn, device, repeats, warmup=1):
    """Median wall time of fn() over `repeats` runs after `warmup` discarded runs (synchronized on cuda); returns
    (median, every run's time). Example: timed(f, "cpu", 3, 0) -> (0.2, [0.3, 0.2, 0.1])."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Stopwatch(device) as clock:
            fn()
        times.append(clock.seconds)
    return statistics.median(times), times


class PeakMemory:
    """
    Peak memory of a block, in MB. CPU: growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs on Linux, after glibc's malloc_trim; else the ru_maxrss delta, which only sees new
    highs) over the resident set before the block: activations and allocator growth, not the weights.
    cuda: torch.cuda.max_memory_allocated (tensors only) over the allocation before.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def status(key):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        self.reset = False
        try:  # hand freed heap pages back to the OS first, so that reused memory shows up as growth again
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.reset = self.status("VmHWM") is not None
        except OSError:
            pass
        self.base = self.status("VmRSS") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
        elif self.reset:
            self.mb = self.status("VmHWM") - self.base
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base
        self.mb = max(self.mb, 0.0)


def time_in_turns(runs, repeats, dev):
    """
    Warm-up on a few batches (allocator, MKL / oneDNN kernel selection), then `repeats` timed passes of each of
    `runs`. The repeats go round the runs, so a change in the machine's load hits every method alike. Returns each
    one's times (s) and peak memory (MB), the memory from one more pass of each, untimed: PeakMemory hands the
    freed heap back to the OS first (malloc_trim), and a timed pass would then pay for the page faults of memory
    that torch's rows otherwise reuse (cli.tune_allocator).
    """
    for run in runs.values():
        run(8)
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            times[k].append(timed(run, dev, 1, warmup=0)[0])
    mem = {}
    for k, run in runs.items():
        with PeakMemory(dev) as pmem:
            run()
        mem[k] = pmem.mb
    return times, mem
