"""PeakMemory reports the peak above the start of the region (CPU: sampled RSS)."""
import time

import psutil
import torch

from lightcache_core.memory_probe import PeakMemory


def test_cpu_peak_sees_a_transient_allocation():
    size = 64 * 2**20
    process = psutil.Process()
    with PeakMemory("cpu", lambda: process.memory_info().rss, interval=0.001) as probe:
        block = torch.ones(size // 4, dtype=torch.float32)  # touched, so resident
        # Live for a few sampling intervals: torch.ones may hold the GIL while it fills, so the sampler
        # thread only sees blocks that outlive the call (decode buffers do).
        time.sleep(0.05)
        del block
    assert probe.before > 0
    assert probe.peak >= size * 0.9


def test_without_a_reader_a_cpu_region_reports_zero():
    with PeakMemory("cpu") as probe:
        torch.ones(1024)
    assert probe.peak == 0 and probe.before == 0
