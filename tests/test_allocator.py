"""cinematic.allocator: large tensors come from (and go back to) the heap, not fresh mmap pages.

Each case runs in a child process: the setting is process-wide and cannot be undone. No library call makes it (see
test_process_state.py); ``cinematic generate`` does at start, and so must any program that wants it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.glibc_probe import MALLINFO2

# A 64 MiB tensor is made and freed: how much more glibc holds in mmap'd blocks while it lives, and how much the
# heap (arena bytes) has grown once it is freed.
PROBE = MALLINFO2 + textwrap.dedent(
    """
    import ctypes, os, sys
    import torch
    from cinematic.allocator import keep_freed_memory

    if sys.argv[1] == "generate":  # the command up to loading the model, which is stopped there
        from cinematic.cli import main
        from cinematic.errors import CinematicError
        from cinematic.pipeline import Pipeline

        def stop(*args, **kwargs):
            raise CinematicError("stopped before loading")

        Pipeline.from_pretrained = stop
        assert main(["generate", "a red cat", "--model", "shapes", "--device", "cpu"]) == 2
    applied = keep_freed_memory() if sys.argv[1] == "on" else False
    before = libc.mallinfo2()
    t = torch.ones(16 * 2**20)
    live = libc.mallinfo2()
    del t
    after = libc.mallinfo2()
    print(int(applied), live.hblkhd - before.hblkhd, after.arena - before.arena)
    """
)


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    applied, mmapped, arena = (int(v) for v in out.stdout.split())
    return applied, mmapped, arena


@pytest.fixture(scope="module")
def glibc() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018
    except AttributeError:
        pytest.fail("these tests need glibc >= 2.33 (mallinfo2), as on the dev and CI machines")


def test_without_it_glibc_maps_large_tensors(glibc):
    applied, mmapped, _ = _probe("off")
    assert applied == 0
    assert mmapped >= 64 * 2**20  # the default: a fresh mmap, unmapped again when the tensor dies


def test_large_tensors_come_from_the_heap_and_stay_there(glibc):
    applied, mmapped, arena = _probe("on")
    assert applied == 1
    assert mmapped < 2**20  # none of the tensor is in an mmap'd block
    assert arena >= 64 * 2**20  # freed, but kept for the next tensor


def test_cinematic_generate_sets_it_at_start(glibc):
    _, mmapped, _ = _probe("generate")
    assert mmapped < 2**20  # the command's setting: the tensor is on the heap


def test_environment_opt_out(glibc):
    applied, mmapped, _ = _probe("on", env=os.environ | {"CINEMATIC_MALLOC": "system"})
    assert applied == 0
    assert mmapped >= 64 * 2**20


RELEASE = textwrap.dedent(
    """
    import torch
    from cinematic.allocator import keep_freed_memory, release_free_memory

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    assert keep_freed_memory()
    t = torch.ones(16 * 2**20)
    del t
    kept = rss()
    release_free_memory()
    print(kept - rss())
    """
)


def test_release_hands_the_kept_pages_back(glibc):
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 48 * 2**20  # most of the freed 64 MiB tensor leaves the resident set
