"""Progress lines for long work: rate, failures and ETA, at most one line every few seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("raywsl.progress")


class Progress:
    def __init__(self, name: str, total: int, unit: str = "items", every_s: float = 5.0):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.count = self.failed = self.last_count = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int, failed: int = 0) -> None:
        self.count += n
        self.failed += failed
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.count >= self.total:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if self.last_count != self.count:  # the final line, unless update() just printed it
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        self.last_count = self.count
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        log.info("%s: %d/%d %s (%.0f%%), %d failed, %.2f %s/s, %.0fs elapsed, eta %s",
                 self.name, self.count, self.total, self.unit, 100 * self.count / max(self.total, 1),
                 self.failed, rate, self.unit, elapsed, f"{eta:.0f}s" if eta != float("inf") else "?")
