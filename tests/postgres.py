"""A throwaway PostgreSQL server for tests, started from the machine's own binaries.

`.ci/run` installs Debian's ``postgresql`` package. The server runs as the ``postgres`` user
(``initdb`` refuses root) in a private data directory, listening only on a Unix socket in that
directory on a private port number, with trust authentication; `PostgresServer.stop` shuts it down
and removes everything. Where no binaries exist the tests skip and say why — except under CI
(``CI=true``), where a missing server is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

START_TIMEOUT_S = 60


def binaries() -> Optional[str]:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, pg_ctl and postgres."""
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
             if all(os.access(os.path.join(d, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres"))]
    return sorted(found, key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)[-1] if found else None


def unavailable_reason() -> Optional[str]:
    if binaries() is None:
        return "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql; .ci/run does)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start initdb as another user"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' user to run the server as (the Debian package creates it)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (requirements/tools.txt)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.bin = binaries()
        self.root = tempfile.mkdtemp(prefix="fc2-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self.url = f"postgresql://postgres@/postgres?host={self.root}&port={self.port}"
        self._started = False

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--"] + command
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres", group="postgres")
        done = self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust",
                         "-E", "UTF8", "--no-sync")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr[-2000:]}")
        options = f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off -c max_connections=50"
        done = self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-o", options, "-l",
                         os.path.join(self.root, "server.log"), "-w", "-t", str(START_TIMEOUT_S), "start")
        if done.returncode:
            log = open(os.path.join(self.root, "server.log")).read()[-2000:] if os.path.exists(
                os.path.join(self.root, "server.log")) else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-1000:]} {log}")
        self._started = True
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg2

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg2.connect(dbname="postgres", user="postgres", host=self.root, port=self.port).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self._started:
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
