"""``GET /metrics`` in the Prometheus text format (version 0.0.4), written by hand: three metrics need no library.

Queue depth and jobs by status are read from the store at scrape time, so they are right across restarts. The
generation-time histogram counts the jobs this process completed, as Prometheus counters do: it starts from zero
at each start, and ``rate()`` handles the reset.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a shapes clip on a GPU takes well under one, a 1.7B-parameter clip on a CPU tens of minutes.
BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS):
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def mean(self) -> float | None:
        with self._lock:
            count = sum(self._counts)
            return self._sum / count if count else None

    def lines(self, name: str) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, cumulative = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum {_number(total)}", f"{name}_count {cumulative}"]


def render(counts: Mapping[str, int], busy_workers: int, workers: int, generation: Histogram) -> str:
    lines = [
        "# HELP cinematic_queue_depth Jobs waiting for a worker.",
        "# TYPE cinematic_queue_depth gauge",
        f"cinematic_queue_depth {counts.get('queued', 0)}",
        "# HELP cinematic_jobs Jobs in the store, by status.",
        "# TYPE cinematic_jobs gauge",
        *(f'cinematic_jobs{{status="{status}"}} {n}' for status, n in counts.items()),
        "# HELP cinematic_workers Workers (one per device), and how many are generating now.",
        "# TYPE cinematic_workers gauge",
        f'cinematic_workers{{state="busy"}} {busy_workers}',
        f'cinematic_workers{{state="idle"}} {workers - busy_workers}',
        "# HELP cinematic_generation_seconds Time from a worker taking a job to its video file being in place.",
        "# TYPE cinematic_generation_seconds histogram",
        *generation.lines("cinematic_generation_seconds"),
    ]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))
