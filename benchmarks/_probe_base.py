"""What the probe's cases share: running the real ``cinematic`` command in a child process (exit code, output, wall
time, its own peak RSS), judging a refusal, and the record of each case.

A refusal is right when the command exits with the expected code, its standard error ends in one line that starts
``error: `` and holds the expected words (sampling progress lines may come before it), no traceback is printed, the
marker file a hostile payload would create does not exist, and the output folder holds nothing new.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
QUICK = ["--model", "shapes", "--seed", "1", "--num-inference-steps", "2", "--num-frames", "2"]


def cinematic(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "cinematic", *args]


@dataclass
class Ran:
    code: int
    out: str
    err: str
    seconds: float
    peak_mb: float


# ``python -m cinematic`` that writes its own peak RSS (VmHWM, kB) to $PROBE_PEAK_FILE as it exits. wait4's
# ru_maxrss cannot be used: Linux keeps it across exec, so a child forked from this process (torch and diffusers
# loaded) would start from this process's RSS. VmHWM belongs to the memory map that exec makes anew.
PEAK_WRAPPER = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["PROBE_PEAK_FILE"], "w") as out:
        out.write(kb)
atexit.register(peak)
sys.argv[0] = "cinematic"
runpy.run_module("cinematic", run_name="__main__", alter_sys=True)
"""


def run(argv: Sequence[str | bytes], timeout: float = 600, preexec: Callable[[], None] | None = None) -> Ran:
    """Run ``argv`` to its end (killed after ``timeout`` s); a ``cinematic`` command reports its own peak RSS."""
    argv = list(argv)
    if argv[:3] == [sys.executable, "-m", "cinematic"]:
        argv[1:3] = ["-c", PEAK_WRAPPER]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as peak:
        start = time.monotonic()
        env = {**CHILD_ENV, "PROBE_PEAK_FILE": peak.name}
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=ROOT, preexec_fn=preexec)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            process.wait()
        finally:
            timer.cancel()
        seconds = time.monotonic() - start
        out.seek(0), err.seek(0)
        text = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        kb = Path(peak.name).read_text().strip()
    return Ran(process.returncode, *text, seconds, int(kb) / 1024 if kb else float("nan"))


@dataclass
class Case:
    group: str
    name: str
    expected: str
    got: str
    ok: bool
    traceback: bool = False
    executed: bool = False
    left_behind: list[str] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)
    not_run: str = ""  # why the case could not run here (e.g. no tmpfs without root); it counts as neither

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Probe:
    """The cases so far, and fresh folders under ``work`` for each."""

    def __init__(self, work: Path, quick: bool = False, jobs: int = 1):
        self.work, self.quick = work, quick
        self.cases: list[Case] = []
        self._folders = 0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(jobs)  # independent child processes, run side by side
        self._pending: list[Future] = []

    def fresh(self, name: str) -> Path:
        with self._lock:
            self._folders += 1
            folder = self.work / f"{self._folders:03d}-{name}"
        folder.mkdir(parents=True)
        return folder

    def add(self, case: Case) -> Case:
        with self._lock:
            self.cases.append(case)
        mark = "-- " if case.not_run else "ok " if case.ok else "BAD"
        print(f"[{mark}] {case.group}: {case.name}: {case.got}", file=sys.stderr, flush=True)
        return case

    def refusal(self, group: str, name: str, argv: Sequence[str | bytes], words: Sequence[str], **how: Any) -> Ran:
        """Run ``argv`` and record whether it was refused as the module docstring says."""
        outdir, marker = how.pop("outdir", None), how.pop("marker", None)
        code, limit_s, limit_mb = how.pop("code", 2), how.pop("limit_s", None), how.pop("limit_mb", None)
        before = listing(outdir)
        ran = run(argv, **how)
        lines = [line for line in ran.err.strip().splitlines() if not line.startswith("sampling ")]
        last = (lines[-1] if lines else "").replace(str(self.work), "<work>")
        prefix = "error: " if code == 2 else ""
        traceback = "Traceback" in ran.err or "Traceback" in ran.out
        executed = marker is not None and Path(marker).exists()
        left = sorted(set(listing(outdir)) - set(before))
        ok = ran.code == code and len(lines) == 1 and last.startswith(prefix) and all(w in last for w in words)
        ok = ok and not traceback and not executed and not left
        ok = ok and (limit_s is None or ran.seconds < limit_s) and (limit_mb is None or ran.peak_mb < limit_mb)
        expected = f"exit {code}, one line with {' / '.join(repr(w) for w in words)}"
        expected += f", under {limit_s} s" if limit_s else ""
        expected += f", peak RSS under {limit_mb} MB" if limit_mb else ""
        got = f"exit {ran.code}, {len(lines)} line(s): {last[:110]}"
        got += f" ({ran.seconds:.1f} s, {ran.peak_mb:.0f} MB)" if (limit_s or limit_mb) else ""
        measured = {"seconds": round(ran.seconds, 2), "peak_rss_mb": round(ran.peak_mb, 1)}
        self.add(Case(group, name, expected, got, ok, traceback, executed, left, measured))
        return ran


def listing(folder: Path | None) -> list[str]:
    """Every path under ``folder`` (hidden files included), relative to it."""
    if folder is None or not Path(folder).exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


class Tmpfs:
    """A small tmpfs at ``folder`` (needs root), the real full disk; ``None`` from ``mount`` where it cannot be had."""

    def __init__(self, folder: Path, size: str):
        self.folder, self.size = folder, size

    def mount(self) -> Tmpfs | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.folder)],
                              capture_output=True)  # fmt: skip
        return self if done.returncode == 0 else None

    def fill(self, leave: int = 0) -> Path:
        """Write a filler file until the disk is full (less ``leave`` bytes); returns it."""
        filler = self.folder / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        if leave:
            os.truncate(filler, max(0, filler.stat().st_size - leave))
        return filler

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


def guarded(probe: Probe, group: str, cases: Callable[..., Any], *args: Any) -> Any:
    """Run a group of cases; one that raises (a timeout, an answer of the wrong shape) is recorded as a failed case
    and the probe goes on with the next group."""
    try:
        return cases(probe, *args)
    except Exception as error:  # noqa: BLE001 - any failure of the code under test is a finding
        got = " ".join(f"raised {type(error).__name__}: {error}".split())[:300]
        probe.add(Case(group, cases.__name__, "runs to the end", got, False))
        return None


def later(probe: Probe, *args: Any, **how: Any) -> None:
    """``probe.refusal(*args, **how)`` in the probe's pool; ``settle`` waits for all of them."""
    probe._pending.append(probe.pool.submit(probe.refusal, *args, **how))


def settle(probe: Probe) -> None:
    for future in probe._pending:
        future.result()
    probe._pending.clear()
