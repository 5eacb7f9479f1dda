"""The server's state without HTTP: the store, the files, the workers and their warm pipelines.

Opening a :class:`Service` does everything that can fail on bad settings (locking the data folder, recovering
after a crash, loading the model), so ``cinematic serve`` reports a bad model or a busy folder in one line before
it binds a port. The HTTP layer (``app.py``) only translates requests into calls on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cinematic.devices import device_problem
from cinematic.errors import CinematicError
from cinematic.serve.faults import Scrubber
from cinematic.serve.files import Files, Inputs
from cinematic.serve.metrics import Histogram
from cinematic.serve.pg_store import PostgresStore
from cinematic.serve.settings import Settings
from cinematic.serve.store import Job, JobStore, Params, Store
from cinematic.serve.worker import HEALTHY, Worker
from cinematic.settings import ModelFacts

if TYPE_CHECKING:
    from cinematic.pipeline import Pipeline

log = logging.getLogger("cinematic.serve")
MAX_ATTEMPTS = 3  # starts of one job that a crash may interrupt before the job is failed instead of re-run
STOP_SECONDS = 120.0  # how long stopping waits for a worker that is writing its file
UPLOAD_GRACE_S = 3600.0  # a fleet's unreferenced upload younger than this may belong to a job being queued


@dataclass(frozen=True)
class ModelInfo:
    """What requests are checked against and default to: the served model's name and its facts (trained clip,
    schedule length, UNet depth)."""

    name: str
    facts: ModelFacts


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        devices = () if settings.role == "api" else settings.devices or _default_devices()
        for device in devices:
            check_device(device)
        self.scrub = _scrubber(settings)
        self.store = open_store(settings.data, settings.store, settings.lease, MAX_ATTEMPTS)
        try:
            self._recover()
            if settings.lora_dir is not None and not settings.lora_dir.is_dir():
                raise CinematicError(f"the LoRA folder {settings.lora_dir} is not a folder")
            self.inputs = Inputs(settings.data / "uploads", settings.lora_dir)
            # Another server of a fleet may be between saving an upload and queueing its job: only old ones go.
            orphans = self.inputs.sweep(self.store.upload_names(), UPLOAD_GRACE_S if self.store.shared else 0.0)
            if orphans:
                log.warning("removed %d upload(s) that no job refers to (left by a stopped server)", orphans)
            self.generation = Histogram()
            self.workers = [
                Worker(
                    device,
                    _load(settings, device),
                    self.store,
                    self.files,
                    self.generation,
                    self.inputs,
                    self.scrub,
                )
                for device in devices
            ]
            facts = self.workers[0].pipeline.facts if self.workers else _facts(settings.model)
        except BaseException:
            self.store.close()
            raise
        self.model = ModelInfo(settings.model, facts)
        self._validator = self.workers[0].pipeline if self.workers else _Validator(facts)
        self._started = False

    def _recover(self) -> None:
        """Requeue what a dead server left running, and remove the files no job owns."""
        requeued, failed = self.store.recover(MAX_ATTEMPTS)
        if requeued:
            log.warning("requeued %d job(s) left running by a previous server: %s", len(requeued), requeued)
        if failed:
            log.warning("failed %d job(s) that stopped the server %d times: %s", len(failed), MAX_ATTEMPTS, failed)
        self.files = Files(self.settings.data / "videos")
        if self.store.shared:  # other servers' workers may be writing (temp files) or about to commit (any job's)
            self.files.sweep(self.store.ids(), temp_files=False)
        else:
            self.files.sweep(self.store.completed_ids())

    def validate(self, **request: Any) -> Any:
        """``Pipeline.validate`` for the served model (an API node has the model's facts only, not its weights)."""
        return self._validator.validate(**request)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._started = True

    def close(self) -> None:
        """Stop the workers (a running job goes back to the queue) and release the data folder."""
        for worker in self.workers:
            worker.stop()
        if self._started:
            for worker in self.workers:
                worker.join(STOP_SECONDS)
        if any(worker.is_alive() for worker in self.workers):
            log.warning("a worker is still writing; leaving the store open until the process exits")
            return
        self.store.close()

    # --- jobs ----------------------------------------------------------------------------------------------

    def submit(self, params: Params) -> Job:
        """Queue a job (raises QueueFull) and wake the workers."""
        job = self.store.add(params, self.settings.max_queue)
        for worker in self.workers:
            worker.notify()
        return job

    def cancel(self, job_id: str) -> bool:
        if not self.store.cancel(job_id):
            return False
        for worker in self.workers:
            worker.cancel(job_id)
        return True

    def delete(self, job: Job) -> bool:
        """Delete a finished job and its files; False if it is not finished (or already deleted).

        A storage fault can stop this at any point and raises; what is left agrees with the row, and calling it
        again (or :meth:`finish_delete`, once the row is a tombstone) finishes the work. The uploads and the
        gif/webm variants go first (a finished job needs neither), then the row becomes a tombstone (the commit
        point), then the mp4: so a completed job always has its mp4.
        """
        self.inputs.remove(job.params.init_video, job.params.init_image)
        self.files.remove(job.id, keep_mp4=True)
        if not self.store.delete(job.id):
            return False
        self.files.remove(job.id)
        return True

    def finish_delete(self, job_id: str) -> bool:
        """Remove what a storage fault left of a deleted job (its mp4); True if there was something to remove."""
        if not self.store.deleted(job_id) or not self.files.left(job_id):
            return False
        self.files.remove(job_id)
        return True

    def content(self, job_id: str, variant: str) -> str | None:
        """The path of a completed job's file in ``variant`` (made on first request), or None."""
        path = self.files.variant(job_id, variant)
        job = self.store.get(job_id)
        if job is None or job.status != "completed":  # deleted while the variant was being made
            self.files.remove(job_id)
            return None
        return None if path is None else str(path)

    def progress(self, job: Job) -> int:
        """Percent done: from this server's worker running the job, else as the store last heard it (a fleet)."""
        if job.status == "completed":
            return 100
        if job.status == "in_progress":
            return next((p for w in self.workers if (p := w.progress(job.id)) is not None), job.progress or 0)
        return 0

    def health(self) -> tuple[bool, list[dict]]:
        """Whether every worker is alive and making progress, and each worker's state (``Worker.health``)."""
        workers = [worker.health() for worker in self.workers]
        return all(w["state"] in HEALTHY for w in workers), workers

    @property
    def busy_workers(self) -> int:
        return sum(worker.busy for worker in self.workers)


def configure_process(settings: Settings) -> None:
    """The server's process-wide settings, made once at start, before any model loads or worker runs: torch's CPU
    thread count (``settings.threads``) and, when a worker runs on the CPU, glibc's allocator setting
    (:func:`cinematic.allocator.keep_freed_memory`). ``cinematic serve`` calls it; an application that serves
    :func:`cinematic.serve.app.create_app` itself calls it first, or makes its own choices. Opening a
    :class:`Service` changes neither.

    The thread count is the process's, not a worker's: torch has one, and each worker thread takes it on its first
    operation. The server runs one worker per device and at most one on the CPU, whose operations use these threads;
    CUDA workers use them only for their CPU-side work.
    """
    import torch

    from cinematic.allocator import keep_freed_memory

    devices = () if settings.role == "api" else settings.devices or _default_devices()
    for device in devices:
        check_device(device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if any(torch.device(device).type == "cpu" for device in devices):
        keep_freed_memory()


def check_device(device: str) -> None:
    """Refuse, in one line, a device that torch does not know or this machine does not have."""
    problem = device_problem(device)
    if problem is not None:
        raise CinematicError(f"device {device!r}: {problem.text}")


def _scrubber(settings: Settings) -> Scrubber:
    """What job errors and API messages say in place of the server's folders."""
    model = Path(settings.model).expanduser()
    return Scrubber(
        [
            (settings.data / "uploads", "the upload"),
            (settings.data / "videos", "the video file"),
            (settings.data, "the data folder"),
            (model if model.is_dir() else None, "the model folder"),
            (settings.lora_dir, "the LoRA folder"),
        ]
    )


def open_store(folder: Path, url: str | None, lease: float, max_attempts: int) -> JobStore:
    """The SQLite store of ``folder`` when ``url`` is None, else the PostgreSQL store at ``url`` (psycopg is
    imported only then)."""
    if url is None:
        return Store(folder)
    return PostgresStore(url, lease=lease, max_attempts=max_attempts)


class _Validator:
    """What an API node checks requests with: ``Pipeline.validate`` reads only the model's facts, so the node needs
    the model's configuration, not its weights."""

    def __init__(self, facts: ModelFacts):
        self.facts = facts

    def validate(self, **request: Any) -> Any:
        from cinematic.pipeline import Pipeline

        return Pipeline.validate(self, **request)  # type: ignore[arg-type]


def _facts(model: str) -> ModelFacts:
    """The served model's facts from its configuration alone (no weights are read)."""
    from cinematic.weights import open_source

    return ModelFacts.of(open_source(model).config)


def _default_devices() -> tuple[str, ...]:
    import torch

    if torch.cuda.is_available():
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return ("cpu",)


def _load(settings: Settings, device: str) -> Pipeline:
    import torch

    from cinematic.pipeline import Pipeline

    # No --dtype: the library's default (on a CPU, half-precision files stay half precision and compute in fp32).
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.dtype or "")
    pipe = Pipeline.from_pretrained(settings.model, device=device, dtype=torch_dtype)
    log.info("loaded %s on %s (stored %s, computing in %s)", settings.model, device, settings.dtype or "as its files",
             str(pipe.dtype).removeprefix("torch."))  # fmt: skip
    return pipe  # the text encoder stays loaded: every job encodes its prompts
