"""Peak memory of a region of code: what the reports and the benchmarks quote.

On CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation at the
start; elsewhere it is the process RSS, sampled on a thread, above the RSS at
the start. The core stays torch-only, so the caller hands in the RSS reader
(for example ``lambda: psutil.Process().memory_info().rss``).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class PeakMemory:
    """Context manager: ``peak`` = peak bytes above ``before`` while the block ran.

    ``device``: the compute device whose memory counts (``cuda:N`` or ``cpu``).
    ``read_rss``: returns this process's resident bytes; without it a non-CUDA
    region reports 0. ``interval``: seconds between RSS samples.
    """

    def __init__(self, device: torch.device | str = "cpu", read_rss: Callable[[], int] | None = None,
                 interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self._read_rss = read_rss
        self.interval = interval
        self.before = 0
        self.peak = 0
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self._read_rss is None:
            return self
        self.before = self._max = self._read_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._read_rss())
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._read_rss())
            self.peak = self._max - self.before
