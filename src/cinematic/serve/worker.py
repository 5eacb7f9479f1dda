"""One worker thread per device. It holds its pipeline warm, takes the oldest queued job, makes the video, repeats.

The API never waits for a worker: it writes the job to the store and nudges the workers (:meth:`Worker.notify`);
a worker that misses the nudge finds the job at its next poll anyway. Cancelling or stopping a running job raises
from the sampler's per-step callback, so it takes effect within one denoising step.

No error stops a worker (issue 23): a job that raises fails with a one-line message, scrubbed of server paths, and
the worker takes the next. When the store itself cannot be written (a full disk), what became of the job is kept
and written at each later turn until the store takes it; a server stopped before then leaves the job
``in_progress``, and the next start runs it again (the store's crash recovery). Only a ``BaseException`` (an
interpreter exit) ends the thread, and ``/healthz`` then reports the worker dead; one that makes no progress for
far longer than it ever has is reported stuck (:meth:`Worker.health`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cinematic.errors import CinematicError
from cinematic.serve.faults import describe, storage_fault
from cinematic.serve.files import Files, Inputs
from cinematic.serve.metrics import Histogram
from cinematic.serve.store import Job, JobStore, Params

if TYPE_CHECKING:
    from cinematic.pipeline import Pipeline, Video

log = logging.getLogger("cinematic.serve")
POLL_SECONDS = 1.0  # a backstop only: a new job wakes the workers at once
# A worker is stuck when it has shown no sign of life (a denoising step, the end of a stage, a turn of its loop
# while idle) for STUCK_FACTOR times the longest gap it has shown so far, and never sooner than STUCK_FLOOR_S: the
# first job's text encoding or VAE decode of a long clip on a CPU has no earlier gap to be judged by.
STUCK_FLOOR_S = 600.0
STUCK_FACTOR = 10
HEALTHY = ("starting", "idle", "busy")


class _Cancelled(Exception):
    pass


class _Stopping(Exception):
    pass


@dataclass(frozen=True)
class _Outcome:
    """What became of a job, to be written to the store: ``completed``, ``failed``, ``queued`` (the server is
    stopping) or ``cancelled`` (already in the store: nothing to write)."""

    status: str
    seconds: float = 0.0
    message: str = ""


class Worker(threading.Thread):
    def __init__(
        self,
        device: str,
        pipeline: Pipeline,
        store: JobStore,
        files: Files,
        generation: Histogram,
        inputs: Inputs | None = None,
        scrub: Callable[[str], str] = str,
        stuck_floor: float = STUCK_FLOOR_S,
    ):
        super().__init__(name=f"cinematic-worker-{device}", daemon=True)
        self.device, self.pipeline, self.store, self.files = device, pipeline, store, files
        self.inputs, self.scrub, self.stuck_floor = inputs, scrub, stuck_floor
        self.generation = generation
        self._wake, self._stopping, self._cancel = threading.Event(), threading.Event(), threading.Event()
        self._state = threading.Lock()
        self._current: str | None = None
        self._progress = 0
        self._beat, self._slowest = time.monotonic(), 0.0  # last sign of life; longest gap between two in a job
        self._unrecorded: dict[str, _Outcome] = {}  # outcomes the store refused, oldest first; this thread's own
        self._fault: str | None = None  # the store fault now in the way, if any (one line, no path)

    # --- called from the API's threads ---------------------------------------------------------------------

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Finish the current step and hand the running job back to the queue (it restarts on the next start)."""
        self._stopping.set()
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        with self._state:
            if self._current == job_id:
                self._cancel.set()

    def progress(self, job_id: str) -> int | None:
        """Percent done of ``job_id`` if this worker is running it."""
        with self._state:
            return self._progress if self._current == job_id else None

    @property
    def busy(self) -> bool:
        return self._current is not None

    def health(self) -> dict[str, Any]:
        """The worker's state: ``starting``, ``idle``, ``busy`` (healthy), ``stuck``, ``dead`` or ``stopped``."""
        with self._state:
            current, quiet, slowest = self._current, time.monotonic() - self._beat, self._slowest
        bound = max(self.stuck_floor, STUCK_FACTOR * slowest)
        if self.ident is None:
            state = "starting"
        elif not self.is_alive():
            state = "stopped" if self._stopping.is_set() else "dead"
        elif quiet > bound:
            state = "stuck"
        else:
            state = "busy" if current is not None else "idle"
        return {
            "device": self.device,
            "state": state,
            "busy": current is not None,
            "job": current,
            "quiet_s": round(quiet, 1),
            "stuck_after_s": round(bound, 1),
            "unrecorded": len(self._unrecorded),
            "fault": self._fault,
        }

    # --- the worker's own thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._turn()
                except Exception:  # a fault in the worker's own bookkeeping: log it and go on
                    log.exception("worker %s: unexpected error between jobs; going on", self.device)
                    self._wake.wait(POLL_SECONDS)
        except BaseException as error:
            log.critical("worker %s died (%s); /healthz reports it dead", self.device, type(error).__name__)
            raise
        self._record_unrecorded()
        if self._unrecorded:
            ids = ", ".join(self._unrecorded)
            log.warning("could not record the end of %s; the next start runs them again", ids)

    def _turn(self) -> None:
        self._alive()
        self._wake.clear()  # before claiming: a nudge that arrives during the claim is not lost
        self._record_unrecorded()
        try:
            job = self.store.claim()
        except Exception as error:
            self._store_fault("cannot claim a job", error)
            job = None
        else:
            if not self._unrecorded:  # a fault that keeps an outcome unrecorded is not over yet
                self._store_fault(None)
        if job is None:
            self._wake.wait(POLL_SECONDS)
            return
        self._run(job)

    def _run(self, job: Job) -> None:
        with self._state:
            self._current, self._progress = job.id, 0
            self._cancel.clear()
        try:
            log.info(
                "started %s on %s (attempt %d, seed %d)", job.id, self.device, job.attempts, job.params.settings.seed
            )
            self._alive()
            self._record(job.id, self._attempt(job))
        finally:
            with self._state:
                self._current = None

    def _attempt(self, job: Job) -> _Outcome:
        """Make and write the video; what became of the job. Raises only what is not an ``Exception``."""
        start = time.monotonic()
        try:
            clip = self._generate(job.id, job.params)
        except _Cancelled:
            return _Outcome("cancelled")
        except _Stopping:
            return _Outcome("queued")
        except Exception as error:  # out of memory, a driver error, a bad upload: the job fails, the worker goes on
            return self._failed(job.id, error)
        self._alive()
        try:
            clip.save(self.files.path(job.id))  # atomic: temp file, then rename
        except Exception as error:  # a full or read-only disk; the writer's message names a server path
            cause = (
                error.__cause__ if isinstance(error, CinematicError) and isinstance(error.__cause__, OSError) else None
            )
            return self._failed(job.id, cause or error, "the server could not write the video: ")
        self._alive()
        return _Outcome("completed", seconds=time.monotonic() - start)

    def _failed(self, job_id: str, error: Exception, context: str = "") -> _Outcome:
        if isinstance(error, CinematicError) or storage_fault(error):
            text = describe(error) if storage_fault(error) else str(error)
            log.warning("failed %s: %s%s", job_id, context, text)
        else:
            text = f"{type(error).__name__}: {describe(error)}"
            log.exception("failed %s", job_id)
        return _Outcome("failed", message=self.scrub(" ".join(f"{context}{text}".split())))

    def _generate(self, job_id: str, p: Params) -> Video:
        clip = self.pipeline(
            **p.settings.values(),
            **(self.inputs.call_kwargs(p) if self.inputs is not None else {}),
            progress=False,
            callback=self._step,
        )[0]
        # The served name, not the folder the weights were read from: file metadata should not leak server paths.
        clip.metadata = {**clip.metadata, "model": p.model, "id": job_id}
        return clip

    def _step(self, i: int, total: int) -> None:
        with self._state:
            job_id = self._current
        # A store shared by a fleet lets the job go when another server cancelled it or took it over.
        if self._cancel.is_set() or (job_id is not None and not self.store.holds(job_id)):
            raise _Cancelled
        if self._stopping.is_set():
            raise _Stopping
        self._alive()
        progress = min(99, (i + 1) * 100 // total)  # 100 only once the file is in place
        with self._state:
            self._progress = progress
        if job_id is not None:
            self.store.report(job_id, progress)

    def _alive(self) -> None:
        """A sign of life, for :meth:`health`; a gap within a job counts towards what is normal."""
        now = time.monotonic()
        with self._state:
            if self._current is not None:
                self._slowest = max(self._slowest, now - self._beat)
            self._beat = now

    # --- writing outcomes ----------------------------------------------------------------------------------

    def _record(self, job_id: str, outcome: _Outcome) -> None:
        """Write ``outcome``; if the store refuses, keep it for the next turns (:meth:`_record_unrecorded`)."""
        try:
            self._write(job_id, outcome)
        except Exception as error:
            self._unrecorded[job_id] = outcome
            self._store_fault(f"cannot record {job_id} as {outcome.status}", error)

    def _record_unrecorded(self) -> None:
        for job_id, outcome in list(self._unrecorded.items()):
            try:
                self._write(job_id, outcome)
            except Exception as error:
                self._store_fault(f"cannot record {job_id} as {outcome.status}", error)
                return  # the store still refuses: the rest wait for the next turn
            del self._unrecorded[job_id]
        self._store_fault(None)

    def _write(self, job_id: str, outcome: _Outcome) -> None:
        """One outcome into the store. Repeating it after a failure is harmless: each move is a compare-and-set."""
        if outcome.status == "completed":
            if not self.store.complete(job_id, outcome.seconds):  # cancelled while the file was being written
                self._drop_file(job_id)
                return
            log.info("completed %s in %.2f s", job_id, outcome.seconds)
            try:  # after the commit: a fault here must not record the job again
                self.generation.observe(outcome.seconds)
            except Exception:
                log.exception("could not count %s in the generation metrics", job_id)
        elif outcome.status == "failed":
            self.store.fail(job_id, outcome.message)
        elif outcome.status == "queued":
            self.store.requeue(job_id)
            log.info("requeued %s: the server is stopping", job_id)
        else:
            log.info("cancelled %s", job_id)

    def _drop_file(self, job_id: str) -> None:
        """Remove the file of a job this worker could not complete, unless another server's worker has completed
        it or is running it (a shared store: its lease ran out here): that worker writes the same file."""
        job = self.store.get(job_id)
        if job is not None and job.status in ("completed", "queued", "in_progress"):
            log.info("%s was taken over by another worker; its file stays", job_id)
            return
        self.files.remove(job_id)
        log.info("cancelled %s", job_id)

    def _store_fault(self, what: str | None, error: BaseException | None = None) -> None:
        """Log a store fault once when it starts (not once a second), and once when it is over."""
        fault = None if what is None or error is None else f"{what}: {describe(error)}"
        if fault is not None and fault != self._fault:
            log.warning("worker %s: %s; retrying", self.device, fault)
        elif fault is None and self._fault is not None:
            log.warning("worker %s: the job store takes writes again", self.device)
        self._fault = fault
