"""Peak resident memory of this process while a block runs, shared by the benchmarks:

    with Peak() as pk:
        work()
    print(pk.peak / 2**20, "MiB")
"""

from __future__ import annotations

import threading
import time


class Peak:
    """Peak RSS of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self.p, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.p.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, self.p.memory_info().rss)
