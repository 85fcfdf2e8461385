"""Peak resident memory of this process during a block of work, sampled by a background thread.

getrusage's ru_maxrss is a lifetime maximum and cannot be reset, and one simulation worker process runs
many clients one after another; sampling RSS while the block runs gives that block's own peak.
"""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.peak_mb` is the highest RSS seen, in MiB."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.peak_bytes = 0

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        self.peak_bytes = max(self.peak_bytes, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
