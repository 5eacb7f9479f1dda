"""A small progress bar on stderr: step, seconds per step and time left. No dependency, no threads."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """``Progress(total, "sampling")``; call ``update(**extra)`` once per step, ``close()`` at the end."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, extra: dict[str, float] | None = None) -> str:
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / self.done if self.done else 0.0
        left = per_step * (self.total - self.done)
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        rate = f"{per_step:.2f} s/it" if per_step >= 1 or per_step == 0 else f"{1 / per_step:.2f} it/s"
        parts = [f"{self.label} [{bar}] {self.done}/{self.total}", rate, f"ETA {_clock(left)}"]
        parts += [f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}" for k, v in (extra or {}).items()]
        return " | ".join(parts)

    def update(self, **extra: float) -> None:
        self.done += 1
        finished = self.done >= self.total
        # On a terminal the line is redrawn in place; in a log file only every tenth step and the last one appear.
        if self.interactive:
            self.stream.write("\r" + self.line(extra) + ("\n" if finished else ""))
        elif finished or self.done % max(self.total // 10, 1) == 0:
            self.stream.write(self.line(extra) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()
