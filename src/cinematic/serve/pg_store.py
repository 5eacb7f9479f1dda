"""The job store of a fleet: one PostgreSQL database shared by any number of ``cinematic serve`` processes.

The SQLite store's first two rules hold as they are (every change of status is a compare-and-set whose ``WHERE``
names the status it expects; a job is completed only after its file is in place). Its third, one server per data
folder, becomes a lease:

3. A worker claims the oldest queued job with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two workers never wait for
   each other and never both take one job) and holds it for ``lease`` seconds, renewed by this store's heartbeat
   thread about once a second. A job whose lease ran out (its worker was killed, its machine lost, its network cut)
   goes back to the queue when any server next looks, or is failed once it has been started ``max_attempts``
   times, as the SQLite store does at start. A claim is named by the job's attempt count, and completing, failing
   or requeueing checks it: a worker whose job was taken over cannot record it too (completion exactly once), and
   its heartbeat finds the job gone and stops the run (:meth:`PostgresStore.holds`).
4. Times come from the database's clock, so the servers' clocks need not agree.
5. The schema is created or upgraded under a transaction-level advisory lock: servers starting at once on an empty
   database wait for one another, and the later ones find the tables made.

The heartbeat also writes each running job's progress, so any server's API can show it; a cancel is a status
change that any server can make, and the worker running the job sees it at its next heartbeat.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cinematic.errors import CinematicError
from cinematic.serve.settings import redacted
from cinematic.serve.store import (
    COLUMNS,
    DELETED,
    FINISHED,
    STATUSES,
    Job,
    Params,
    QueueFull,
    StoreError,
    job_from_row,
    new_id,
)

log = logging.getLogger("cinematic.serve")
SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x63696E656D61  # advisory lock keys ("cinema" in ASCII): schema changes, and the queue's bound
_QUEUE_LOCK = _SCHEMA_LOCK + 1
POOL_SIZE = 8  # connections per process; more requests than that wait for one
CONNECT_TIMEOUT_S = 10
HEARTBEAT_S = 1.0  # at most; a third of the lease when that is shorter
_NOW = "extract(epoch from clock_timestamp())"  # the database's clock, in seconds
_SECOND = f"floor({_NOW})::bigint"
# version -> the statements that bring the schema from the version before to it
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE cinematic_jobs (
            n BIGSERIAL PRIMARY KEY,              -- submission order: the list is newest first by n
            id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            params TEXT NOT NULL,                 -- JSON of Params, as in the SQLite store
            created_at BIGINT NOT NULL,
            started_at BIGINT,
            completed_at BIGINT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,  -- times a worker claimed it; names the claim
            seconds DOUBLE PRECISION,
            lease_until DOUBLE PRECISION,         -- while in_progress: when the claim runs out (database seconds)
            progress INTEGER NOT NULL DEFAULT 0   -- percent, written by the heartbeat
        )""",
        "CREATE INDEX cinematic_jobs_by_status ON cinematic_jobs (status, n)",
    ],
}
_RETURNED = f"{COLUMNS}, progress"


class PostgresStore:
    """The jobs of a fleet, in the database at ``url``. Thread-safe: each call takes a pooled connection for one
    short transaction."""

    shared = True

    def __init__(self, url: str, lease: float = 30.0, max_attempts: int = 3, pool_size: int = POOL_SIZE):
        self.url, self.lease, self.max_attempts = url, float(lease), max_attempts
        self._pg = _psycopg()
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._claims: dict[str, int] = {}  # job id -> attempt, for the jobs this process's workers hold
        self._progress: dict[str, int] = {}
        self._claims_lock = threading.Lock()
        self._closing = threading.Event()
        try:
            with self._connection() as db:
                _migrate(db)
        except BaseException as error:
            self._close_idle()
            if isinstance(error, StoreError):
                raise CinematicError(f"cannot use the job store at {redacted(url)}: {error}") from error
            raise
        self._heartbeat = threading.Thread(target=self._beat, name="cinematic-store-heartbeat", daemon=True)
        self._heartbeat.start()

    def close(self) -> None:
        self._closing.set()
        self._heartbeat.join(10)
        self._close_idle()

    def _close_idle(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().close()

    # --- connections -----------------------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection in autocommit mode; a database error becomes a one-line :class:`StoreError`."""
        with self._slots:
            try:
                try:
                    db = self._idle.get_nowait()
                except queue.Empty:
                    db = self._pg.connect(
                        self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="cinematic"
                    )
            except self._pg.Error as error:
                raise StoreError(_one_line(error)) from error
            try:
                yield db
            except self._pg.Error as error:
                raise StoreError(_one_line(error)) from error
            finally:
                if db.closed or db.broken or db.info.transaction_status != self._pg.pq.TransactionStatus.IDLE:
                    db.close()
                else:
                    self._idle.put(db)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._connection() as db, db.transaction():
            yield db

    def _rows(self, sql: str, args: dict[str, Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as db:
            return db.execute(sql, args).fetchall()

    def _changed(self, sql: str, args: dict[str, Any]) -> bool:
        with self._connection() as db:
            return db.execute(sql, args).rowcount == 1

    # --- life of a job ---------------------------------------------------------------------------------------

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Requeue (or fail, after ``max_attempts`` starts) the running jobs whose lease ran out; returns
        (requeued, failed) ids. Jobs other servers hold are left alone: their leases are alive."""
        with self._transaction() as db:
            rows = _expire(db, max_attempts)
        return [i for i, status in rows if status == "queued"], [i for i, status in rows if status == "failed"]

    def add(self, params: Params, max_queue: int) -> Job:
        """Queue a new job, or raise QueueFull; the count and the insert are one transaction, and adds from all
        servers take turns (an advisory lock), so the bound holds across the fleet."""
        with self._transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_LOCK,))
            (waiting,) = db.execute("SELECT count(*) FROM cinematic_jobs WHERE status = 'queued'").fetchone()
            if waiting >= max_queue:
                raise QueueFull
            row = db.execute(
                f"INSERT INTO cinematic_jobs (id, status, params, created_at) VALUES (%s, 'queued', %s, {_SECOND}) "
                f"RETURNING {_RETURNED}",
                (new_id(), params.to_json()),
            ).fetchone()
        return _job(row)

    def claim(self) -> Job | None:
        """The oldest queued job, now ``in_progress`` and held by this process under a lease; None when the queue is
        empty. Jobs whose lease ran out are requeued first. A row that cannot be read back as a job is failed."""
        with self._transaction() as db:
            _expire(db, self.max_attempts)
            while True:
                row = db.execute(
                    f"""WITH next AS (
                            SELECT n FROM cinematic_jobs WHERE status = 'queued' ORDER BY n LIMIT 1
                            FOR UPDATE SKIP LOCKED)
                        UPDATE cinematic_jobs AS j SET status = 'in_progress', started_at = {_SECOND},
                            attempts = j.attempts + 1, lease_until = {_NOW} + %s, progress = 0
                        FROM next WHERE j.n = next.n RETURNING {_RETURNED}""",
                    (self.lease,),
                ).fetchone()
                if row is None:
                    return None
                try:
                    job = _job(row)
                except (ValueError, TypeError, KeyError, CinematicError) as error:
                    message = f"its stored settings cannot be read ({type(error).__name__}); it was not run"
                    db.execute(
                        f"UPDATE cinematic_jobs SET status = 'failed', completed_at = {_SECOND}, error = %s, "
                        "lease_until = NULL WHERE id = %s",
                        (message, row[0]),
                    )
                    continue
                break
        with self._claims_lock:
            self._claims[job.id], self._progress[job.id] = job.attempts, 0
        return job

    def complete(self, job_id: str, seconds: float) -> bool:
        """Mark a job this process holds completed (its file must be in place); False if it was cancelled, or
        taken over after its lease ran out."""
        return self._release(
            job_id, f"status = 'completed', completed_at = {_SECOND}, seconds = %(seconds)s, error = NULL, "
            "progress = 100", seconds=seconds,
        )  # fmt: skip

    def fail(self, job_id: str, message: str) -> bool:
        return self._release(job_id, f"status = 'failed', completed_at = {_SECOND}, error = %(error)s", error=message)

    def requeue(self, job_id: str) -> bool:
        """Give a held job back to the queue (the server is stopping); it will start again from the start."""
        return self._release(job_id, "status = 'queued', started_at = NULL, progress = 0")

    def _release(self, job_id: str, assignments: str, **args: Any) -> bool:
        """One compare-and-set on a job this process holds, naming its claim; the claim ends whatever the answer
        (a store fault raises and keeps it, so that the heartbeat keeps the lease while the worker retries)."""
        with self._claims_lock:
            attempt = self._claims.get(job_id)
        if attempt is None:
            return False
        changed = self._changed(
            f"UPDATE cinematic_jobs SET {assignments}, lease_until = NULL "
            "WHERE id = %(id)s AND status = 'in_progress' AND attempts = %(attempt)s",
            {**args, "id": job_id, "attempt": attempt},
        )
        self._forget(job_id)
        return changed

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job from any server; the worker running it stops at its next heartbeat."""
        return self._changed(
            f"UPDATE cinematic_jobs SET status = 'cancelled', completed_at = {_SECOND}, lease_until = NULL "
            "WHERE id = %(id)s AND status IN ('queued', 'in_progress')",
            {"id": job_id},
        )

    def delete(self, job_id: str) -> bool:
        """Turn a finished job into a tombstone (its files are the caller's to remove); False if not finished."""
        return self._changed(
            "UPDATE cinematic_jobs SET status = %(deleted)s, params = '{}', error = NULL "
            "WHERE id = %(id)s AND status = ANY(%(finished)s)",
            {"deleted": DELETED, "id": job_id, "finished": list(FINISHED)},
        )

    def holds(self, job_id: str) -> bool:
        """Whether this process still holds the job: False once the heartbeat found it cancelled or taken over."""
        with self._claims_lock:
            return job_id in self._claims

    def report(self, job_id: str, progress: int) -> None:
        """The running job's progress, written by the next heartbeat."""
        with self._claims_lock:
            if job_id in self._claims:
                self._progress[job_id] = progress

    def _forget(self, job_id: str, attempt: int | None = None) -> bool:
        """End the claim on ``job_id`` (only if it is ``attempt``, when given); whether there was one to end."""
        with self._claims_lock:
            if job_id not in self._claims or attempt not in (None, self._claims[job_id]):
                return False
            del self._claims[job_id]
            self._progress.pop(job_id, None)
            return True

    def _beat(self) -> None:
        """Renew the lease of every held job and write its progress; a job that is no longer running under this
        claim (cancelled, or taken over) is forgotten, which stops its worker (:meth:`holds`)."""
        fault = None
        while not self._closing.wait(min(HEARTBEAT_S, self.lease / 3)):
            with self._claims_lock:
                held = [(job_id, attempt, self._progress.get(job_id, 0)) for job_id, attempt in self._claims.items()]
            try:
                for job_id, attempt, progress in held:
                    renewed = self._changed(
                        f"UPDATE cinematic_jobs SET lease_until = {_NOW} + %(lease)s, progress = %(progress)s "
                        "WHERE id = %(id)s AND status = 'in_progress' AND attempts = %(attempt)s",
                        {"lease": self.lease, "progress": progress, "id": job_id, "attempt": attempt},
                    )
                    if not renewed and self._forget(job_id, attempt):  # not when its worker just recorded it
                        log.info("%s is no longer held by this server (cancelled, or its lease ran out)", job_id)
            except Exception as error:  # the database is away: the leases may run out; the workers go on
                if str(error) != fault:
                    log.warning("cannot renew the leases of running jobs: %s", error)
                fault = str(error)
            else:
                fault = None

    # --- reading ---------------------------------------------------------------------------------------------

    def deleted(self, job_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM cinematic_jobs WHERE id = %s AND status = %s", (job_id, DELETED)))

    def get(self, job_id: str) -> Job | None:
        rows = self._rows(f"SELECT {_RETURNED} FROM cinematic_jobs WHERE id = %s AND status != %s", (job_id, DELETED))
        return _job(rows[0]) if rows else None

    def page(self, limit: int, after: str | None = None) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs, newest first, older than the job ``after``; and whether more follow. Raises
        KeyError for an ``after`` that never existed (a tombstone still works as a cursor)."""
        with self._transaction() as db:
            below = 2**63 - 1
            if after is not None:
                row = db.execute("SELECT n FROM cinematic_jobs WHERE id = %s", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                below = row[0]
            rows = db.execute(
                f"SELECT {_RETURNED} FROM cinematic_jobs WHERE n < %s AND status != %s ORDER BY n DESC LIMIT %s",
                (below, DELETED, limit + 1),
            ).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        rows = self._rows("SELECT status, count(*) FROM cinematic_jobs WHERE status != %s GROUP BY status", (DELETED,))
        counts.update((status, int(n)) for status, n in rows)
        return counts

    def ids(self) -> set[str]:
        return {row[0] for row in self._rows("SELECT id FROM cinematic_jobs WHERE status != %s", (DELETED,))}

    def completed_ids(self) -> set[str]:
        return {row[0] for row in self._rows("SELECT id FROM cinematic_jobs WHERE status = 'completed'")}

    def upload_names(self) -> set[str]:
        rows = self._rows("SELECT params FROM cinematic_jobs WHERE status != %s AND params != '{}'", (DELETED,))
        params = [Params.from_json(row[0]) for row in rows]
        return {name for p in params for name in (p.init_video, p.init_image) if name}


def _job(row: tuple[Any, ...]) -> Job:
    return dataclasses.replace(job_from_row(row[:-1]), progress=row[-1])


def _expire(db: Any, max_attempts: int) -> list[tuple[str, str]]:
    """Requeue the running jobs whose lease ran out, or fail those started ``max_attempts`` times; (id, new
    status) of each. Rows another server is changing are skipped (it is doing the same, or renewing them)."""
    spent = "attempts >= %(max)s"
    message = f"its worker stopped during this job {max_attempts} times; it was not run again"
    return db.execute(
        f"""UPDATE cinematic_jobs SET
                status = CASE WHEN {spent} THEN 'failed' ELSE 'queued' END,
                started_at = CASE WHEN {spent} THEN started_at END,
                completed_at = CASE WHEN {spent} THEN {_SECOND} END,
                error = CASE WHEN {spent} THEN %(message)s END,
                lease_until = NULL, progress = 0
            WHERE n IN (SELECT n FROM cinematic_jobs WHERE status = 'in_progress' AND lease_until < {_NOW}
                        ORDER BY n FOR UPDATE SKIP LOCKED)
            RETURNING id, status""",
        {"max": max_attempts, "message": message},
    ).fetchall()


def _migrate(db: Any) -> None:
    """Create or upgrade the tables, one server at a time (the others wait on the lock, then find them made)."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS cinematic_schema (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM cinematic_schema").fetchone()
        version = 0 if row is None else row[0]
        if version > SCHEMA_VERSION:
            raise CinematicError(f"the job store was written by a newer cinematic (store version {version})")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                db.execute(statement)
        if row is None:
            db.execute("INSERT INTO cinematic_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        else:
            db.execute("UPDATE cinematic_schema SET version = %s", (SCHEMA_VERSION,))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as error:
        raise CinematicError("a PostgreSQL store needs psycopg: pip install 'cinematic[postgres]'") from error
    return psycopg
