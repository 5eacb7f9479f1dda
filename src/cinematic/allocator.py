"""Keep freed memory in the process for reuse, instead of handing it back to the kernel after every operation.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large requests (from 128 KiB, rising to
32 MiB as it adapts) with a fresh ``mmap`` and returns them with ``munmap`` when the tensor dies, and it trims the
heap's free top at 2x that size. A UNet step at the published model's size allocates and frees gigabytes of
activations, so most of its tensors land on pages the kernel has to fault in and zero again, one 4 KiB page at a
time. Measured on a 2-core EPYC (torch 2.13, 16 frames at 256x256, batched guidance): the step spends a quarter or
more of its time on these page faults, and a temporal transformer of the first level takes 1.2-1.6 s instead of
2.1-2.6 s once freed memory stays in the heap (docs/performance.md, "The allocator setting (Linux)").

:func:`keep_freed_memory` sets two of glibc's ``mallopt`` parameters: no ``mmap`` for allocations (they come from
the heap and go back to it) and a trim threshold of 1 GiB (the free top of the heap is returned to the kernel only
beyond that). The cost is memory the process keeps after its peak: freed blocks are reused, but a fragmented heap
can hold more than the live tensors need. :func:`release_free_memory` hands the free pages back between phases
(the pipeline calls it after sampling and when it frees the text encoder), so what the steps kept does not add to
the decode's peak.

The setting is the whole process's, so no library call makes it (loading a model or running a pipeline leaves the
allocator as it is): the entry points do, at start, when they run on the CPU (``cinematic generate``, ``cinematic
eval``, ``cinematic serve``). A program that uses the Python API calls :func:`keep_freed_memory` itself, once,
before its first model, to get the same speed. It only moves where tensors live, never what they hold.

Only glibc has ``mallopt``; elsewhere (macOS, Windows, musl) this does nothing. ``CINEMATIC_MALLOC=system`` in the
environment leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; returns whether they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("CINEMATIC_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt with these meanings  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Return the heap's free pages to the kernel (glibc ``malloc_trim``), where :func:`keep_freed_memory` is in
    effect. Called between phases (after the text encoder is freed, after sampling), so that memory kept for the
    steps does not add to the next phase's peak."""
    if _applied:
        ctypes.CDLL(None).malloc_trim(0)  # dlopen(NULL) returns the already loaded process image: no I/O
