"""The job store: one SQLite database in WAL mode, one row per job, in the data folder.

Nothing is lost or done twice because of three rules:

1. Every change of status is one transaction whose ``WHERE`` names the status it expects (compare-and-set), so of
   two racing changes (a cancel and a completion, two workers claiming) exactly one happens.
2. A job becomes ``completed`` only after its file is in place (written beside it and renamed), so a completed job
   always has its file. A file whose job is not completed is overwritten by the re-run, or swept at start.
3. One server owns a data folder at a time (an exclusive ``flock``, released by the kernel even on ``kill -9``),
   and on start it puts the jobs its dead predecessor left ``in_progress`` back in the queue. They run again from
   the start with the seed they were given at submission, so the result is the same video.

Progress within a running job is not stored: it lives in the worker and is gone after a crash anyway.

This is the store of one server. A fleet of servers shares :class:`cinematic.serve.pg_store.PostgresStore`
instead, which keeps rules 1 and 2 and replaces rule 3 by leases; both have the methods of :class:`JobStore`, and
:func:`cinematic.serve.service.open_store` picks one from the settings.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cinematic.errors import CinematicError
from cinematic.settings import ALIASES, Settings

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
DELETED = "deleted"  # a tombstone: keeps the row so that a list cursor naming it still works
ID_PATTERN = re.compile(r"video_[A-Za-z0-9_-]{24}")
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    n INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the list is newest first by n
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    params TEXT NOT NULL,                 -- JSON of Params
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,  -- times a worker started it
    seconds REAL                          -- generation time of the run that completed it
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, n);
"""


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` waiting jobs already."""


class StoreError(Exception):
    """The job store cannot be reached or refused a change (a shared database that is down): a storage fault, as
    a full disk is for SQLite. The message is one line and names no password."""


@dataclass(frozen=True)
class Params:
    """Everything a worker needs to make the video again, identically: the resolved settings (the seed is drawn at
    submission), the served model's name, the uploads (names in the data folder's uploads, see files.Inputs) and the
    adapters (``(name, scale)`` pairs from the server's adapter folder).

    Stored as one flat JSON object: the settings by name beside ``model``, ``init_video``, ``init_image`` and
    ``loras``. Rows written before the settings were renamed (``frames``, ``steps``, ``guidance``) still load."""

    settings: Settings
    model: str
    init_video: str | None = None
    init_image: str | None = None
    loras: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple((str(n), float(s)) for n, s in self.loras))  # JSON gives lists

    def to_json(self) -> str:
        files = {"init_video": self.init_video, "init_image": self.init_image, "loras": self.loras}
        return json.dumps({**self.settings.values(), "model": self.model, **files})

    @classmethod
    def from_json(cls, text: str) -> Params:
        values = json.loads(text)
        files = {name: values.pop(name) for name in ("model", "init_video", "init_image", "loras") if name in values}
        if values.get("prompt") == "" and values.get("prompt_schedule"):
            values["prompt"] = None  # rows of the first store wrote "" for a scheduled prompt
        renamed = {ALIASES.get(name, name): value for name, value in values.items()}
        return cls(Settings(**renamed), **files)


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    params: Params
    created_at: int
    started_at: int | None
    completed_at: int | None
    error: str | None
    attempts: int
    seconds: float | None
    progress: int | None = None  # percent, as a worker of a shared store last reported it; None: not stored


def new_id() -> str:
    """``video_`` and 18 random bytes (24 URL-safe characters): unguessable, and never a path."""
    return "video_" + secrets.token_urlsafe(18)


class JobStore(Protocol):
    """What the server needs of a job store. Every change of status is a compare-and-set that returns whether it
    happened; :meth:`holds` and :meth:`report` matter only where several servers share the store."""

    shared: bool  # other servers may use the store (and the data folder) at the same time

    def close(self) -> None: ...
    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]: ...
    def add(self, params: Params, max_queue: int) -> Job: ...
    def claim(self) -> Job | None: ...
    def complete(self, job_id: str, seconds: float) -> bool: ...
    def fail(self, job_id: str, message: str) -> bool: ...
    def requeue(self, job_id: str) -> bool: ...
    def cancel(self, job_id: str) -> bool: ...
    def delete(self, job_id: str) -> bool: ...
    def holds(self, job_id: str) -> bool: ...
    def report(self, job_id: str, progress: int) -> None: ...
    def deleted(self, job_id: str) -> bool: ...
    def get(self, job_id: str) -> Job | None: ...
    def page(self, limit: int, after: str | None = None) -> tuple[list[Job], bool]: ...
    def counts(self) -> dict[str, int]: ...
    def ids(self) -> set[str]: ...
    def completed_ids(self) -> set[str]: ...
    def upload_names(self) -> set[str]: ...


class Store:
    """The jobs of one data folder. Thread-safe: writes share one connection and one lock and are short
    transactions; reads use a connection per thread."""

    shared = False

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock_fd = _lock_folder(folder)
        try:
            self._db = sqlite3.connect(folder / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise CinematicError(f"{folder}: SQLite cannot use WAL mode there (got {mode}); use a local disk")
            # FULL: a commit reaches the disk before the answer goes out, so an accepted job survives power loss.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise CinematicError(f"{folder} was written by a newer cinematic (store version {version})")
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            os.close(self._lock_fd)
            raise CinematicError(f"cannot open the job store in {folder}: {error}") from error
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._mutex = threading.Lock()  # serializes the writes, which all go through self._db
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []

    def close(self) -> None:
        with self._mutex:
            self._db.close()
            for reader in self._readers:
                reader.close()
        os.close(self._lock_fd)  # releases the flock

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection. In WAL mode readers see the last commit and never wait for a
        writer, so polling clients are not held up by a commit's fsync."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = sqlite3.connect(self.folder / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
            reader.execute("PRAGMA query_only=1")
            reader.execute("PRAGMA busy_timeout=10000")
            with self._mutex:
                self._readers.append(reader)
            self._local.reader = reader
        return reader

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._reader().execute(sql, args).fetchall()

    # --- life of a job ---------------------------------------------------------------------------------------

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Put jobs left ``in_progress`` by a dead server back in the queue; returns (requeued, failed) ids.

        A job that has already been started ``max_attempts`` times is failed instead: it may be what kills the
        server (out of memory, a driver crash), and re-running it forever would stop every job behind it.
        """
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE status = 'in_progress' ORDER BY n").fetchall()
            requeued = [job_id for job_id, attempts in rows if attempts < max_attempts]
            failed = [job_id for job_id, attempts in rows if attempts >= max_attempts]
            for job_id in requeued:
                db.execute("UPDATE jobs SET status = 'queued', started_at = NULL WHERE id = ?", (job_id,))
            message = f"the server stopped during this job {max_attempts} times; it was not run again"
            for job_id in failed:
                db.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, completed_at = ? WHERE id = ?",
                    (message, _now(), job_id),
                )
        return requeued, failed

    def add(self, params: Params, max_queue: int) -> Job:
        """Queue a new job, or raise QueueFull; the count and the insert are one transaction."""
        with self._transaction() as db:
            (waiting,) = db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()
            if waiting >= max_queue:
                raise QueueFull
            job_id = new_id()
            db.execute(
                "INSERT INTO jobs (id, status, params, created_at) VALUES (?, 'queued', ?, ?)",
                (job_id, params.to_json(), _now()),
            )
            return job_from_row(db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def claim(self) -> Job | None:
        """The oldest queued job, now ``in_progress`` and owned by the caller; None when the queue is empty.

        A row that cannot be read back as a job (written by hand, or by another version) is failed, not returned:
        left queued, it would be claimed again at every turn and hold up every job behind it."""
        with self._transaction() as db:
            while True:
                row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY n LIMIT 1").fetchone()
                if row is None:
                    return None
                db.execute(
                    "UPDATE jobs SET status = 'in_progress', started_at = ?, attempts = attempts + 1 WHERE id = ?",
                    (_now(), row[0]),
                )
                try:
                    return job_from_row(db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone())
                except (ValueError, TypeError, KeyError, CinematicError) as error:
                    message = f"its stored settings cannot be read ({type(error).__name__}); it was not run"
                    db.execute(
                        "UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE id = ?",
                        (_now(), message, row[0]),
                    )

    def complete(self, job_id: str, seconds: float) -> bool:
        """Mark a running job completed (its file must be in place); False if it was cancelled meanwhile."""
        return self._move(
            job_id,
            "in_progress",
            "status = 'completed', completed_at = ?, seconds = ?, error = NULL",
            (_now(), seconds),
        )

    def fail(self, job_id: str, message: str) -> bool:
        return self._move(job_id, "in_progress", "status = 'failed', completed_at = ?, error = ?", (_now(), message))

    def requeue(self, job_id: str) -> bool:
        """Give a running job back to the queue (the server is stopping); it will start again from the start."""
        return self._move(job_id, "in_progress", "status = 'queued', started_at = NULL", ())

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it is not (or no longer) either."""
        return self._move(job_id, ("queued", "in_progress"), "status = 'cancelled', completed_at = ?", (_now(),))

    def delete(self, job_id: str) -> bool:
        """Turn a finished job into a tombstone (its files are the caller's to remove); False if not finished."""
        # The prompt goes too: deleting a video should not leave what it showed behind.
        return self._move(job_id, FINISHED, "status = ?, params = '{}', error = NULL", (DELETED,))

    def _move(self, job_id: str, expected: str | tuple[str, ...], assignments: str, args: tuple[Any, ...]) -> bool:
        expected = (expected,) if isinstance(expected, str) else expected
        marks = ", ".join("?" * len(expected))
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})", (*args, job_id, *expected)
            )
            return cursor.rowcount == 1

    def holds(self, job_id: str) -> bool:
        """Whether this server still owns the running job: always, as no other server uses the folder."""
        return True

    def report(self, job_id: str, progress: int) -> None:
        """Progress is not stored here: the worker holds it (see the module's docstring)."""

    # --- reading ---------------------------------------------------------------------------------------------

    def deleted(self, job_id: str) -> bool:
        """Whether ``job_id`` is a deleted job's tombstone."""
        return bool(self._query("SELECT 1 FROM jobs WHERE id = ? AND status = ?", (job_id, DELETED)))

    def get(self, job_id: str) -> Job | None:
        rows = self._query(f"SELECT {COLUMNS} FROM jobs WHERE id = ? AND status != ?", (job_id, DELETED))
        return job_from_row(rows[0]) if rows else None

    def page(self, limit: int, after: str | None = None) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs, newest first, older than the job ``after``; and whether more follow.

        Raises KeyError for an ``after`` that never existed (a deleted job's tombstone still works as a cursor).
        """
        db = self._reader()
        db.execute("BEGIN")  # one snapshot for both queries
        try:
            below = 2**63 - 1
            if after is not None:
                row = db.execute("SELECT n FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                below = row[0]
            rows = db.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE n < ? AND status != ? ORDER BY n DESC LIMIT ?",
                (below, DELETED, limit + 1),
            ).fetchall()
        finally:
            db.execute("COMMIT")
        return [job_from_row(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(self._query("SELECT status, count(*) FROM jobs WHERE status != ? GROUP BY status", (DELETED,)))
        return counts

    def ids(self) -> set[str]:
        """Every job that is not deleted."""
        return {row[0] for row in self._query("SELECT id FROM jobs WHERE status != ?", (DELETED,))}

    def completed_ids(self) -> set[str]:
        return {row[0] for row in self._query("SELECT id FROM jobs WHERE status = 'completed'")}

    def upload_names(self) -> set[str]:
        """The uploads that jobs still refer to (a job's upload goes when the job is deleted)."""
        rows = self._query("SELECT params FROM jobs WHERE status != ?", (DELETED,))
        params = [json.loads(row[0]) for row in rows]
        return {p[field] for p in params for field in ("init_video", "init_image") if p.get(field)}


COLUMNS = "id, status, params, created_at, started_at, completed_at, error, attempts, seconds"


def job_from_row(row: tuple[Any, ...]) -> Job:
    job_id, status, params, created, started, completed, error, attempts, seconds = row
    return Job(job_id, status, Params.from_json(params), created, started, completed, error, attempts, seconds)


def _now() -> int:
    return int(time.time())


def _lock_folder(folder: Path) -> int:
    """Create the data folder if needed and lock it for this process, or say which server holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise CinematicError(f"cannot use data folder {folder}: {error.strerror}") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CinematicError(f"data folder {folder} is in use by another cinematic serve (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
