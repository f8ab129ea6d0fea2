"""Worker recycling: ML libraries leak, so a worker retires itself before it becomes a problem.

After ``max_tasks`` deliveries or once resident memory passes ``max_rss_mb``, the daemon stops
taking work, drains, and exits with ``EXIT_RECYCLED``; Kubernetes (``restartPolicy: Always``)
starts a fresh process. Keep the limits loose enough that a pod recycles less often than every
ten minutes, or the kubelet's restart back-off starts to delay the restarts.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: Read the RSS at most this often. A read of /proc costs ~9 µs, as much as a tenth of a
#: fast delivery (``make bench``) if every settle paid it; memory that grows for a second
#: more before the worker retires is well inside the limits' margins.
RSS_CHECK_INTERVAL_S = 1.0


def rss_bytes() -> int:
    """Current resident set size; /proc on Linux (cheap), peak RSS elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Recycler:
    def __init__(self, max_tasks: int, max_rss_mb: int,
                 rss_check_interval_s: float = RSS_CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_tasks = max_tasks
        self._max_rss = max_rss_mb * 1024 * 1024
        self._rss_interval = rss_check_interval_s
        self._clock = clock
        self._next_rss_check = 0.0
        self.tasks_done = 0

    def settled(self) -> str | None:
        """Count one settled delivery; return why the worker should retire, if it should (the
        RSS is looked at on the first settle and then at most every ``rss_check_interval_s``)."""
        self.tasks_done += 1
        if self._max_tasks and self.tasks_done >= self._max_tasks:
            return "max_tasks"
        if self._max_rss:
            now = self._clock()
            if now >= self._next_rss_check:
                self._next_rss_check = now + self._rss_interval
                if rss_bytes() > self._max_rss:
                    return "max_rss"
        return None
