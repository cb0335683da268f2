"""A throwaway PostgreSQL cluster for tests: initdb into a temp dir, run on a loopback port (as
the `postgres` user when the tests run as root, as initdb refuses root), removed afterwards."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile


def binaries() -> str | None:
    """The directory holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    candidates = ([os.path.dirname(os.path.realpath(found))] if found else []) + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((d for d in candidates if os.path.exists(os.path.join(d, "pg_ctl"))), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, bindir: str):
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="dialogen-pg-")
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str):
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> "Cluster":
        data = os.path.join(self.root, "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync")
        self.resume()
        return self

    def resume(self):
        """Start the server (again)."""
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", os.path.join(self.root, "data"), "-o", opts, "-l", os.path.join(self.root, "log"),
                  "-w", "-t", "60", "start")

    def halt(self):
        """Stop the server as an operator's restart does (fast: open connections are cut)."""
        self._run("pg_ctl", "-D", os.path.join(self.root, "data"), "-m", "fast", "-w", "stop")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self):
        try:
            self._run("pg_ctl", "-D", os.path.join(self.root, "data"), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
