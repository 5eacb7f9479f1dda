"""One worker thread per device. It holds its pipeline warm, takes the oldest queued job, makes the video, repeats.

The API never waits for a worker: it writes the job to the store and nudges the workers (:meth:`Worker.notify`);
a worker that misses the nudge finds the job at its next poll anyway. Cancelling or stopping a running job raises
from the sampler's per-step callback, so it takes effect within one denoising step.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from cinematic.errors import CinematicError
from cinematic.serve.files import Files, Inputs
from cinematic.serve.metrics import Histogram
from cinematic.serve.store import Job, Params, Store

if TYPE_CHECKING:
    from cinematic.pipeline import Pipeline, Video

log = logging.getLogger("cinematic.serve")
POLL_SECONDS = 1.0  # a backstop only: a new job wakes the workers at once


class _Cancelled(Exception):
    pass


class _Stopping(Exception):
    pass


class Worker(threading.Thread):
    def __init__(
        self,
        device: str,
        pipeline: Pipeline,
        store: Store,
        files: Files,
        generation: Histogram,
        inputs: Inputs | None = None,
    ):
        super().__init__(name=f"cinematic-worker-{device}", daemon=True)
        self.device, self.pipeline, self.store, self.files = device, pipeline, store, files
        self.inputs = inputs
        self.generation = generation
        self._wake, self._stopping, self._cancel = threading.Event(), threading.Event(), threading.Event()
        self._state = threading.Lock()
        self._current: str | None = None
        self._progress = 0

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

    # --- the worker's own thread ---------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before claiming: a nudge that arrives during the claim is not lost
            try:
                job = self.store.claim()
            except Exception:
                log.exception("worker %s cannot read the job store; retrying", self.device)
                job = None
            if job is None:
                self._wake.wait(POLL_SECONDS)
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        with self._state:
            self._current, self._progress = job.id, 0
            self._cancel.clear()
        log.info("started %s on %s (attempt %d, seed %d)", job.id, self.device, job.attempts, job.params.settings.seed)
        start = time.monotonic()
        try:
            clip = self._generate(job.id, job.params)
            clip.save(self.files.path(job.id))  # atomic: temp file, then rename
            seconds = time.monotonic() - start
            if self.store.complete(job.id, seconds):
                self.generation.observe(seconds)
                log.info("completed %s in %.2f s", job.id, seconds)
            else:  # cancelled while the file was being written
                self.files.remove(job.id)
                log.info("cancelled %s", job.id)
        except _Cancelled:
            log.info("cancelled %s", job.id)
        except _Stopping:
            self.store.requeue(job.id)
            log.info("requeued %s: the server is stopping", job.id)
        except CinematicError as error:
            self.store.fail(job.id, str(error))
            log.warning("failed %s: %s", job.id, error)
        except Exception as error:  # out of memory, a driver error: the job fails, the worker goes on
            log.exception("failed %s", job.id)
            self.store.fail(job.id, " ".join(f"{type(error).__name__}: {error}".split()))
        finally:
            with self._state:
                self._current = None

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
        if self._cancel.is_set():
            raise _Cancelled
        if self._stopping.is_set():
            raise _Stopping
        with self._state:
            self._progress = min(99, (i + 1) * 100 // total)  # 100 only once the file is in place
