"""A throwaway PostgreSQL server for the fleet tests, and the ``store`` fixture that runs a test on both stores.

The server comes from Debian's packages (``apt-get install postgresql``; ``.ci/run`` installs it): one per test
session, in a temporary folder, listening on a free loopback port, with ``fsync`` off (the tests kill servers of
ours, never the database's machine), and stopped at the end. PostgreSQL refuses to run as root, so as root it runs
as the unprivileged user ``postgres`` (made by the package) or, failing that, ``nobody``. Each test gets a database
of its own. A test that needs PostgreSQL and cannot find it fails: it never skips.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

STORES = ("sqlite", "postgres")
_names = itertools.count()


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)", pytrace=False)
    return Path(initdb).parent


def _unprivileged() -> list[str]:
    """The prefix that runs a command as an unprivileged user when we are root (the server refuses root)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    pytest.fail("no unprivileged user to run PostgreSQL as (postgres or nobody)", pytrace=False)


class PostgresServer:
    def __init__(self) -> None:
        bin_dir, prefix = _binaries(), _unprivileged()
        self.folder = Path(tempfile.mkdtemp(prefix="cinematic-pg-"))
        if prefix:
            shutil.chown(self.folder, user=prefix[2])
        self.data, self.log = self.folder / "data", self.folder / "server.log"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        run = [*prefix, str(bin_dir / "initdb"), "-D", str(self.data), "-U", "cinematic", "--auth=trust"]
        subprocess.run([*run, "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._ctl = [*prefix, str(bin_dir / "pg_ctl"), "-D", str(self.data)]
        subprocess.run([*self._ctl, "-o", options, "-l", str(self.log), "-w", "start"], check=True, capture_output=True)
        self.url = f"postgresql://cinematic@127.0.0.1:{self.port}/postgres"

    def database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return f"postgresql://cinematic@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self._ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh database of the session's server."""
    return postgres.database()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> str | None:
    """The ``store`` setting of a test run on both stores: None (SQLite in the data folder), or a fresh
    PostgreSQL database."""
    return request.getfixturevalue("pg_url") if request.param == "postgres" else None
