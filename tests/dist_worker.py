"""One rank of a ``torchrun``-launched ``cinematic`` command, for ``tests/test_distributed.py``.

``torchrun ... tests/dist_worker.py train --out ...`` runs ``cinematic train ...`` as ``-m cinematic`` would, and
can also
- record every file and folder this rank creates, replaces or opens for writing (``CINEMATIC_TEST_WRITES=FOLDER``:
  the paths go to ``FOLDER/rank-<RANK>.json`` when the command ends), to check that only rank 0 writes;
- make one rank fail as a broken clip would (``CINEMATIC_TEST_FAIL=RANK:CLIPS``: that rank's loader raises a
  ``CinematicError`` at its ``CLIPS + 1``-th clip).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
from pathlib import Path

WRITE_MODES = set("wax+")


def record_writes(paths: list[str]) -> None:
    """Route the ways cinematic writes files through a recorder of their paths."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if WRITE_MODES & set(mode) and isinstance(file, str | os.PathLike):
            paths.append(os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_
    for name in ("mkdir", "replace", "rename", "link", "symlink", "makedirs"):
        real = getattr(os, name)

        def recorded(*args, _real=real, **kwargs):
            paths.extend(os.fspath(a) for a in args[:2] if isinstance(a, str | os.PathLike))
            return _real(*args, **kwargs)

        setattr(os, name, recorded)
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        paths.append(os.fspath(filename))
        return real_save(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file
    import torch

    real_torch_save = torch.save

    def torch_save(obj, f, *args, **kwargs):  # torch.save writes a path from C++, not through open()
        if isinstance(f, str | os.PathLike):
            paths.append(os.fspath(f))
        return real_torch_save(obj, f, *args, **kwargs)

    torch.save = torch_save


def fail_after(clips: int) -> None:
    from cinematic.errors import CinematicError
    from cinematic.train import batches

    real = batches.Keyed.__getitem__
    seen = []

    def getitem(self, key):
        seen.append(key)
        if len(seen) > clips:
            raise CinematicError(f"cannot read clip {key[0]} (a broken clip, for the test)")
        return real(self, key)

    batches.Keyed.__getitem__ = getitem


def main() -> int:
    rank = os.environ.get("RANK", "0")
    writes: list[str] = []
    folder = os.environ.get("CINEMATIC_TEST_WRITES")
    if folder:
        record_writes(writes)
    failing = os.environ.get("CINEMATIC_TEST_FAIL")
    if failing and failing.split(":")[0] == rank:
        fail_after(int(failing.split(":")[1]))
    from cinematic.cli import main as cinematic

    try:
        return cinematic(sys.argv[1:])
    finally:
        if folder:
            report = Path(folder) / f"rank-{rank}.json"
            data = json.dumps(writes)
            os.write(os.open(report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), data.encode())


if __name__ == "__main__":
    sys.exit(main())
