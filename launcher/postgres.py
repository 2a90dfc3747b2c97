"""A PostgreSQL server of our own for the anchor's MLflow store: the binaries pgserver's wheel ships, run by us.

pgserver's own server management keeps servers running after the Python process that asked for them ends; here
`postgres` is one child in the launcher's `ProcessGroup`, stopped by PID with everything else. The server listens
on 127.0.0.1 only, with trust authentication, like the MLflow server in front of it (local demos and tests; a
production anchor passes its own server's URI, `--backend-store-uri`). PostgreSQL refuses to run as root: under
root the server runs as user `nobody`, who must be able to reach the data folder.

`python -m launcher.postgres serve ...` runs one detached from the caller's process tree (a test session's server,
stopped when the session ends or its process dies), so the tests' "no process of ours is left" checks hold.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.processes import Managed, ProcessGroup, free_port, pid_alive, start_time
from maxfl.atomic import atomic_write_text
from maxfl.errors import ConfigError, ProcessError

SUPERUSER = "postgres"
# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver we install is psycopg2, so URIs name it.
DRIVER = "postgresql+psycopg2"
STARTUP_TIMEOUT_S = 60.0
# Under root: drop to an unprivileged user, then exec postgres (the PID stays the server's own).
_DROP_PRIVILEGES = "import os,sys; os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1])); os.execv(sys.argv[3], sys.argv[3:])"


def bin_dir() -> Path:
    """The PostgreSQL binaries inside the installed pgserver wheel (found without importing it: no side effects)."""
    spec = importlib.util.find_spec("pgserver")
    folder = Path(spec.origin).parent / "pginstall" / "bin" if spec and spec.origin else None
    if folder is None or not (folder / "postgres").is_file():
        raise ConfigError("PostgreSQL binaries not found: install the anchor's extra (pip install -c constraints.txt 'maxfl[server]'), "
                          "which ships them in the pgserver wheel, or pass --backend-store-uri for your own server")
    return folder


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (PostgreSQL refuses root); None: as ourselves."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def _reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether every folder above `path` lets `uid` pass (the search bit for owner, group or others)."""
    for parent in path.resolve().parents:
        if not parent.exists():
            continue  # made by us later, with the usual permissions
        st = parent.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def _connect(**params: Any) -> Any:
    import psycopg2

    return psycopg2.connect(connect_timeout=params.pop("connect_timeout", 2), **params)


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()


@dataclass
class LocalPostgres:
    """One server on 127.0.0.1:`port` over `data_dir` (initialised once, kept across runs)."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    durable: bool = True  # False (tests): no fsync; a crash may lose the data, which a test's server does not keep
    managed: Managed | None = None

    @property
    def log_name(self) -> str:
        return "postgres"

    def check(self) -> None:
        """Before anything starts: the binaries are there and, under root, the server's user can reach the folder."""
        bin_dir()
        if (who := _run_as()) is not None and not _reachable_by(self.data_dir, *who):
            raise ConfigError(f"PostgreSQL refuses to run as root, so maxfl runs it as user 'nobody', who cannot reach {self.data_dir.parent}: "
                              "run maxfl as a regular user, choose a --workdir whose parent folders others may enter (chmod o+x), "
                              "or pass --backend-store-uri for your own PostgreSQL")

    def initialise(self) -> None:
        """initdb, once: a data folder that has PG_VERSION is the server's already."""
        if (self.data_dir / "PG_VERSION").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        who = _run_as()
        if who is not None:
            os.chown(self.data_dir, *who)
        argv = [str(bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--locale=C"]
        if not self.durable:
            argv.append("--no-sync")
        kwargs: dict[str, Any] = {"user": who[0], "group": who[1], "extra_groups": []} if who else {}
        done = subprocess.run(argv, capture_output=True, text=True, env=_env(self.data_dir), **kwargs)
        if done.returncode != 0:
            raise ProcessError(f"initdb {self.data_dir} failed: {_one_line(done.stderr or done.stdout)[-400:]}")

    def argv(self) -> list[str]:
        argv = [str(bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=100"]
        if not self.durable:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        who = _run_as()
        return [sys.executable, "-c", _DROP_PRIVILEGES, str(who[0]), str(who[1]), *argv] if who else argv

    def start(self, procs: ProcessGroup) -> Managed:
        """Initialise if needed, start the server in `procs` and wait until it accepts connections."""
        self.check()
        self.initialise()
        self.managed = procs.start(self.log_name, self.argv(), _env(self.data_dir))
        procs.wait_until(f"PostgreSQL to accept connections on 127.0.0.1:{self.port}", self.accepts, STARTUP_TIMEOUT_S, self.managed)
        return self.managed

    def accepts(self) -> bool:
        try:
            _connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", connect_timeout=1).close()
            return True
        except Exception:  # noqa: BLE001 - starting up, or not yet listening
            return False

    def uri(self, database: str) -> str:
        return f"{DRIVER}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, template: str | None = None) -> str:
        """The database (made now unless it exists), as a SQLAlchemy URI for MLflow."""
        from psycopg2 import sql

        conn = _connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                    if template:
                        query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
                    cur.execute(query)
        finally:
            conn.close()
        return self.uri(name)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions are ended, the data stays consistent), then wait for the server to exit.
        A `ProcessGroup.stop_all` afterwards kills anything left; SIGTERM alone would wait for every client."""
        if self.managed is None or self.managed.popen.poll() is not None:
            return
        self.managed.popen.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.managed.popen.wait(timeout=timeout_s)


def _env(data_dir: Path) -> dict[str, str]:
    """Just what postgres needs: nothing of the caller's environment (paths of other runs) ends up in its processes."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "HOME": str(data_dir), "TZ": "UTC"}


@contextlib.contextmanager
def running(data_dir: Path, log_dir: Path, port: int | None = None, durable: bool = True) -> Iterator[LocalPostgres]:
    """A server for the duration of the block, in its own process group; stopped, by PID, however the block ends."""
    server = LocalPostgres(data_dir, port or free_port(), durable)
    procs = ProcessGroup(log_dir)
    try:
        server.start(procs)
        yield server
    finally:
        server.stop()
        procs.stop_all()


def check_backend_uri(uri: str, timeout_s: float = 5.0) -> str:
    """A PostgreSQL URI MLflow can use, checked by connecting; returns it naming the driver (postgresql+psycopg2://).
    Anything else: one line saying what to fix."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "postgresql://USER[:PASSWORD]@HOST:5432/DATABASE"
    try:
        url = make_url(uri)
    except (ArgumentError, ValueError):
        raise ConfigError(f"--backend-store-uri {uri!r} is not a database URI; give {example}") from None
    shown = url.render_as_string(hide_password=True)
    if url.drivername not in ("postgresql", "postgresql+psycopg2"):
        raise ConfigError(f"--backend-store-uri {shown}: only PostgreSQL is supported here (postgresql://, got {url.drivername}://); give {example}")
    if not url.host or not url.database:
        raise ConfigError(f"--backend-store-uri {shown} names no {'host' if not url.host else 'database'}; give {example}")
    params = {**url.translate_connect_args(username="user", database="dbname"), **{k: v for k, v in url.query.items() if isinstance(v, str)}}
    try:
        _connect(connect_timeout=max(1, int(timeout_s)), **params).close()
    except Exception as exc:  # noqa: BLE001 - psycopg2 reports refusals, bad passwords and unknown databases alike
        raise ConfigError(f"PostgreSQL at {shown} refused the connection ({_one_line(exc)}); start the server, create the database, "
                          "or fix --backend-store-uri") from None
    return url.set(drivername=DRIVER).render_as_string(hide_password=False)


# ---------------------------------------------------------------- detached (a test session's server)
@dataclass(frozen=True)
class Detached:
    """A server started by `serve_detached`: its supervisor's PID (and start time), the server's, and its port."""

    supervisor: int
    supervisor_started: int | None
    postmaster: int
    port: int

    def uri(self, database: str) -> str:
        return f"{DRIVER}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def server(self) -> LocalPostgres:
        """For `create_database` (no process of its own)."""
        return LocalPostgres(Path("."), self.port)

    def alive(self) -> list[int]:
        return [p for p in (self.supervisor, self.postmaster) if pid_alive(p)]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the supervisor, which stops the server (fast shutdown); wait until both are gone."""
        if pid_alive(self.supervisor, self.supervisor_started):
            os.kill(self.supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.alive():  # the supervisor did not manage: by PID, never by name
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def serve_detached(data_dir: Path, log_dir: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> Detached:
    """A server outside the caller's process tree that stops when the caller's process ends (or on `stop`)."""
    ready = log_dir / "postgres-ready.json"
    ready.unlink(missing_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "launcher.postgres", "serve", "--data-dir", str(data_dir), "--log-dir", str(log_dir),
            "--watch-pid", str(os.getpid()), "--ready-file", str(ready)]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))}
    with open(log_dir / "supervisor.log", "ab") as out:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, check=True)
    deadline = time.monotonic() + timeout_s
    while not ready.is_file():
        if time.monotonic() > deadline:
            raise ProcessError(f"timed out after {timeout_s:.0f}s waiting for PostgreSQL (log: {log_dir})")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    if "error" in info:
        raise ProcessError(f"PostgreSQL did not start: {info['error']} (log: {log_dir})")
    return Detached(info["supervisor"], start_time(info["supervisor"]), info["postmaster"], info["port"])


def _serve(args: argparse.Namespace) -> None:
    """The detached supervisor: fork away from the caller, run the server until the watched PID or SIGTERM ends it."""
    if os.fork() > 0:
        os._exit(0)  # the caller reaps this; the supervisor is reparented out of its tree
    stop = False

    def _on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    watched = start_time(args.watch_pid)
    ready = Path(args.ready_file)
    try:
        with running(Path(args.data_dir), Path(args.log_dir), durable=False) as server:
            assert server.managed is not None
            atomic_write_text(ready, json.dumps({"supervisor": os.getpid(), "postmaster": server.managed.popen.pid, "port": server.port}))
            while not stop and pid_alive(args.watch_pid, watched) and server.managed.popen.poll() is None:
                time.sleep(0.2)
    except Exception as exc:  # noqa: BLE001 - reported to the caller through the ready file
        if not ready.is_file():
            atomic_write_text(ready, json.dumps({"error": _one_line(exc)}))
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launcher.postgres", description="A detached local PostgreSQL (test sessions).")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--data-dir", required=True)
    serve.add_argument("--log-dir", required=True)
    serve.add_argument("--watch-pid", type=int, required=True)
    serve.add_argument("--ready-file", required=True)
    _serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
