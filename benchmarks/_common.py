"""Helpers shared by the benchmark scripts: memory readings, measured child processes, the machine, tables.

Every measurement that reports a peak RSS runs in a fresh child process (``run_child``), because a process's peak
(``getrusage().ru_maxrss``) only ever grows: the child measures itself and prints one ``RESULT_PREFIX`` JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
GIB = 1024**3
MIB = 1024**2


def current_rss() -> int:
    """Resident set size of this process now, in bytes (anonymous and file-backed pages, as ``ru_maxrss`` counts)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """The highest RSS this process has had since it started, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kilobytes on Linux, bytes on macOS


def emit(result: dict[str, Any]) -> None:
    """Called by a child: hand its result to ``run_child`` in the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python *argv`` in a fresh process and return the dict it passed to ``emit``."""
    child_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=child_env, timeout=timeout)
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"benchmark child {' '.join(argv)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(results[-1].removeprefix(RESULT_PREFIX))


def tensor_bytes(modules: Iterable[Any]) -> int:
    """Bytes held by the parameters and buffers of ``modules`` (numel x element size), each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def touch(modules: Iterable[Any]) -> None:
    """Read one element per memory page of every parameter and buffer, so lazily mapped weights become resident."""
    import torch

    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if t.numel() and t.device.type == "cpu":
                    step = max(1, os.sysconf("SC_PAGE_SIZE") // t.element_size())
                    t.detach().reshape(-1)[::step].sum()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, memory, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x×%"))
        return True
    except ValueError:
        return text in ("-", "")
