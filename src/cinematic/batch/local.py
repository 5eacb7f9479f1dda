"""Batch workers as local processes: ``--workers N``, each loading the model once, the CPU cores split between them.

The processes are *spawned*, not forked: a fork of a process that has started torch's thread pools (or CUDA) can
hang or crash, and the driver itself never imports torch. Each worker takes one task at a time from its own inbox,
so the driver always knows which task a worker holds: when a worker process dies (killed, out of memory), its task
is handed to another worker, and a task that has killed :data:`LOST_LIMIT` workers fails. A worker whose driver is
gone (killed with ``kill -9``) exits within :data:`WATCH_S` seconds, so it cannot finish a file that the next run
makes again.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cinematic.batch.lines import Task
from cinematic.batch.worker import BatchWorker, Result, configure_process
from cinematic.errors import CinematicError

LOST_LIMIT = 3  # workers a task may take down with it before it fails
WATCH_S = 0.2
POLL_S = 0.5


@dataclass(frozen=True)
class Place:
    """Where one worker runs: its device and its torch threads."""

    device: str
    threads: int | None


def places(workers: int, device: str, cuda_devices: int, threads: int) -> list[Place]:
    """``workers`` workers on ``device`` with ``threads`` torch threads each; ``cuda`` means every GPU, one worker
    each, round robin."""
    if device == "cuda":
        return [Place(f"cuda:{i % max(cuda_devices, 1)}", threads) for i in range(workers)]
    return [Place(device, threads) for _ in range(workers)]


def _exit_with(parent: int) -> None:
    """Exit this process as soon as ``parent`` is gone (then this process's parent id changes)."""
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    os._exit(3)


def _serve(index: int, place: Place, model: str, out: str, dtype: str | None, inbox: Any, outbox: Any) -> None:
    """A worker process: load the model once, then make videos until told to stop (None)."""
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops the workers
    configure_process(place.device, place.threads)
    worker = BatchWorker(model, place.device, out, dtype)
    outbox.put(("ready", index, None))
    while (task := inbox.get()) is not None:
        outbox.put(("result", index, worker.run(task)))


class LocalRunner:
    """Runs tasks on local worker processes; :meth:`results` yields each task's :class:`Result` as it comes."""

    def __init__(self, model: str, out: str, where: list[Place], dtype: str | None = None):
        self.model, self.out, self.where, self.dtype = model, out, where, dtype
        self._context = multiprocessing.get_context("spawn")
        self._outbox: Any = None
        self._workers: dict[int, tuple[Any, Any]] = {}  # index -> (process, inbox)
        self._deaths = 0

    def _start(self, index: int) -> None:
        inbox = self._context.Queue()
        args = (index, self.where[index], self.model, self.out, self.dtype, inbox, self._outbox)
        process = self._context.Process(target=_serve, args=args, name=f"cinematic-batch-{index}", daemon=True)
        process.start()
        self._workers[index] = (process, inbox)

    def results(self, tasks: list[Task]) -> Iterator[Result]:
        self._outbox = self._context.Queue()
        pending, busy, lost = deque(tasks), {}, Counter()
        for index in range(min(len(self.where), len(tasks))):
            self._start(index)
        finished, checked = False, time.monotonic()
        try:
            while pending or busy:
                try:
                    kind, index, payload = self._outbox.get(timeout=POLL_S)
                except queue.Empty:
                    kind = None
                if kind == "result":
                    busy.pop(index, None)
                    yield payload
                if kind is not None and pending:
                    busy[index] = pending.popleft()
                    self._workers[index][1].put(busy[index])
                if time.monotonic() - checked > POLL_S:
                    yield from self._bury(pending, busy, lost)
                    checked = time.monotonic()
            finished = True
        finally:
            self._stop(finished)

    def _bury(self, pending: deque[Task], busy: dict[int, Task], lost: Counter[str]) -> Iterator[Result]:
        """Replace every worker that died; its task goes back to the queue, or fails once it has killed enough."""
        for index, (process, _) in list(self._workers.items()):
            if process.is_alive():
                continue
            self._deaths += 1
            if self._deaths > LOST_LIMIT * len(self.where):
                raise CinematicError(f"batch workers keep dying (the last with exit code {process.exitcode})")
            task = busy.pop(index, None)
            if task is not None:
                lost[task.id] += 1
                if lost[task.id] < LOST_LIMIT:
                    pending.appendleft(task)
                else:
                    error = f"line {task.line}: the worker making it died {LOST_LIMIT} times (exit code " \
                            f"{process.exitcode})"  # fmt: skip
                    yield Result(task.id, "failed", error=error)
            self._start(index)

    def _stop(self, finished: bool) -> None:
        """Finished: the workers are idle and told to exit. Else (Ctrl-C, a broken model) they are ended at once."""
        for process, inbox in self._workers.values():
            inbox.put(None) if finished else process.terminate()
        deadline = time.monotonic() + 10
        for process, _ in self._workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():  # interrupted mid-video: no file is left (video.write removes its temporary)
                process.terminate()
                process.join(5)
        self._workers.clear()
