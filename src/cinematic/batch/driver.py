"""The batch driver: what is left to do, handing it to the workers, and recording each outcome as it comes.

A line is left to do unless the manifest's last row for its id says ``done``, with the same key (the same settings,
model and file) and its file still there. Lines whose own text is bad fail at once, without a worker. A line whose
file exists although no row says so (a worker finished it just before the driver was killed) is kept, not made
again, when the file's metadata carries the line's key. A done line whose settings changed since is not made again
over its file: it fails, saying so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cinematic.batch.lines import Task
from cinematic.batch.manifest import Manifest, locked
from cinematic.batch.worker import Result, made_by
from cinematic.errors import CinematicError
from cinematic.progress import Progress

Runner = Callable[[list[Task]], Iterable[Result]]


@dataclass
class Summary:
    """How a run went: lines done by this run, done before it, failed, and the manifest's path."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    manifest: Path | None = None
    errors: tuple[str, ...] = ()


def run_batch(tasks: list[Task], out: Path, runner: Runner, stream: TextIO | None = None) -> Summary:
    """Make every task's video in ``out`` with ``runner`` (resuming a run already there); returns the summary."""
    stream = stream or sys.stderr
    with locked(out):
        manifest = Manifest(out)
        manifest.open()
        try:
            return _run(tasks, out, manifest, runner, stream)
        finally:
            manifest.close()


def _run(tasks: list[Task], out: Path, manifest: Manifest, runner: Runner, stream: TextIO) -> Summary:
    summary = Summary(manifest=manifest.path)
    todo = []
    for task, row in _plan(tasks, out, manifest):
        if row is None:
            todo.append(task)
        elif row == "skip":
            summary.skipped += 1
        else:
            _count(summary, row)
            manifest.record(row)
    stream.write(f"{len(tasks)} lines: {summary.skipped} done before, {len(todo)} to make, {summary.failed} failed\n")
    if todo:
        by_id = {task.id: task for task in todo}  # those still to come
        bar, results = Progress(len(todo), "batch", stream=stream), runner(todo)
        try:
            for result in results:
                if result.status == "broken":
                    raise CinematicError(f"cannot load the model: {result.error}")
                task = by_id.pop(result.id, None)
                if task is None:  # a lost worker's late answer for a line retried since
                    continue
                row = _row(task, result)
                manifest.record(row)
                _count(summary, row)
                bar.update(done=summary.done, failed=summary.failed, remaining=len(by_id))
        finally:
            bar.close()
            getattr(results, "close", lambda: None)()  # stops the workers now, not when collected
    return summary


def _plan(tasks: list[Task], out: Path, manifest: Manifest) -> Iterator[tuple[Task, dict[str, Any] | str | None]]:
    """Each task with what to do about it: None (make it), ``"skip"`` (done before), or a row to record now."""
    for task in tasks:
        row = manifest.rows.get(task.id)
        if task.error is not None:
            yield task, _row(task, Result(task.id, "failed", error=task.error))
        elif row is not None and row.get("status") == "done" and (out / task.file).exists():
            if row.get("key") == task.key or made_by(out / task.file, task):
                yield task, "skip"
            else:
                error = f"line {task.line}: {task.id} was made before with other settings (see the manifest); give " \
                        "the line a new id, or choose another --out"  # fmt: skip
                yield task, _row(task, Result(task.id, "failed", error=error))
        elif made_by(out / task.file, task):
            yield task, _row(task, Result(task.id, "done"))
        else:
            yield task, None


def _row(task: Task, result: Result) -> dict[str, Any]:
    done = result.status == "done"
    settings = {k: v for k, v in (result.settings or task.settings).items() if k not in ("prompt", "seed")}
    return {
        "id": task.id,
        "line": task.line,
        "prompt": task.prompt,
        "seed": task.settings.get("seed"),
        "settings": settings,
        "file": task.file if done else None,
        "status": result.status,
        "seconds": None if result.seconds is None else round(result.seconds, 3),
        "error": result.error,
        "key": task.key,
    }


def _count(summary: Summary, row: dict[str, Any]) -> None:
    if row["status"] == "done":
        summary.done += 1
    else:
        summary.failed += 1
        summary.errors += (row["error"],)
