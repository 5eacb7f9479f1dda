"""Batch workers as Ray actors: ``cinematic batch --ray [auto|ADDRESS]``.

One long-lived actor per GPU of the cluster (or ``--workers`` CPU actors of ``--threads`` cores each), each loading
the model once. Work goes out one task at a time, a new one as each comes back, so a slow actor holds one line and
never a share of the batch; only small descriptions travel through Ray's object store, and each video goes straight
from its actor to the output folder, which every node must be able to write (a shared filesystem). When an actor
dies (its node lost, ``ray.kill``, out of memory), its task goes to another actor and a new actor takes its place; a
task that has killed :data:`LOST_LIMIT` actors fails. Files are written under a temporary name and renamed, and the
manifest is the driver's alone, so a retried task never leaves a second file or a second row.

Ray is optional (``pip install "cinematic[ray]"``) and imported only here, only when ``--ray`` is given.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

from cinematic.batch.lines import Task, one_line
from cinematic.batch.worker import BatchWorker, Result, configure_process
from cinematic.errors import CinematicError

LOST_LIMIT = 3  # actors a task may take down with it before it fails
WAIT_S = 1.0
PROBE_S = 5.0  # how long a cluster address may take to answer


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CinematicError('--ray needs Ray, which is not installed: pip install "cinematic[ray]"') from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (None: Ray's own choice, a running local cluster or a new one; ``auto``: a
    running cluster, which must exist). True when this call started the session (so the caller ends it); a Ray
    session the process already has is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address not in (None, "auto") and not address.startswith("ray://"):
        _probe(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except Exception as error:  # ConnectionError, or a RuntimeError about the address
        where = "a running Ray cluster" if address == "auto" else f"the Ray cluster at {address}"
        raise CinematicError(f"--ray: cannot reach {where}: {one_line(error)}") from None
    return True


def _probe(address: str) -> None:
    """A ``HOST:PORT`` that nothing answers is one line at once, not a minute of Ray's retries."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CinematicError(f"--ray: {address!r} is not auto or HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_S).close()
    except OSError as error:
        raise CinematicError(f"--ray: no Ray cluster answers at {address} ({error.strerror or error})") from None


class Actor(BatchWorker):
    """The Ray actor: a :class:`BatchWorker` in its own process, configured first."""

    def __init__(self, model: str, device: str, out: str, dtype: str | None, threads: int):
        configure_process(device, threads)
        super().__init__(model, device, out, dtype)


class RayRunner:
    """Runs tasks on Ray actors; :meth:`results` yields each task's :class:`Result` as it comes."""

    def __init__(self, model: str, out: str, workers: int | None, threads: int, dtype: str | None = None):
        self.ray = import_ray()
        gpus = int(self.ray.cluster_resources().get("GPU", 0))
        self.workers = workers or max(gpus, 1)
        self.gpus = 1 if gpus else 0
        self.model, self.out, self.threads, self.dtype = model, out, threads, dtype
        self.name = f"cinematic-batch-{secrets.token_hex(3)}"  # actors are named <name>-<n>, for an operator
        self._started = 0
        self._remote = self.ray.remote(Actor)

    def _actor(self) -> Any:
        self._started += 1
        if self._started > self.workers * (LOST_LIMIT + 1):
            raise CinematicError(f"Ray actors keep dying ({self._started - 1} started for {self.workers} workers)")
        remote = self._remote.options(
            num_cpus=self.threads, num_gpus=self.gpus, name=f"{self.name}-{self._started}", max_restarts=0
        )
        return remote.remote(self.model, "cuda" if self.gpus else "cpu", self.out, self.dtype, self.threads)

    def results(self, tasks: list[Task]) -> Iterator[Result]:
        ray = self.ray
        pending, lost = deque(tasks), Counter()
        idle = [self._actor() for _ in range(min(self.workers, len(tasks)))]
        running: dict[Any, tuple[Any, Task]] = {}  # result ref -> (actor, task)
        try:
            while pending or running:
                while idle and pending:
                    actor, task = idle.pop(), pending.popleft()
                    running[actor.run.remote(task)] = (actor, task)
                done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
                for ref in done:
                    actor, task = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as error:
                        idle.append(self._actor())
                        yield from self._lost(task, lost, pending, error)
                        continue
                    except ray.exceptions.RayTaskError as error:  # not the line's own failure: run() catches those
                        result = Result(task.id, "failed", error=f"line {task.line}: {one_line(error.cause)}")
                    idle.append(actor)
                    yield result
        finally:
            for actor in idle + [actor for actor, _ in running.values()]:
                ray.kill(actor)

    def _lost(self, task: Task, lost: Counter[str], pending: deque[Task], error: Exception) -> Iterator[Result]:
        lost[task.id] += 1
        if lost[task.id] < LOST_LIMIT:
            pending.appendleft(task)
        else:
            reason = one_line(error).split(". ")[0]
            yield Result(task.id, "failed", error=f"line {task.line}: its Ray actor died {LOST_LIMIT} times ({reason})")
