"""The anchor runs only the ServerApps it allowed: FABs whose SHA-256 hash is on its list.

The SuperLink runs whatever `flwr run` submits, and its Control API has no authentication of its own (Flower
1.41/1.42 without the enterprise module), so whoever reaches it can run code on the anchor. Plants already
refuse ClientApps they did not allow (fl_client.app_policy); this is the anchor's counterpart.

The allowed hashes (as `maxfl app hash APP_DIR` prints them) come from the federation folder's
`allowed-serverapps` file (one hash per line, `#` comments; `maxfl federation allow-serverapp` edits it) and
from `MAXFL_ALLOWED_SERVERAPPS` (comma-separated). Neither set: no ServerApp runs. The file is read when each
ServerApp starts, so allowing a new version needs no restart.

Enforcement: `maxfl-superexec` is Flower's `flower-superexec` whose ServerApp tasks start `maxfl-serverapp`
instead of `flwr-serverapp`; that is Flower's own `flwr-serverapp` with this check put in front of the FAB's
installation (`install_gate`). A refused FAB is never installed or imported; the anchor's audit log records
`serverapp.refused` and the run fails with the reason (`flwr run` shows it). The check is imported before any
FAB is, so a FAB cannot replace it. `maxfl federation superlink` runs the SuperLink in process isolation with
a SuperExec secret and `maxfl-superexec` beside it (`superexec_argv`), so nothing else can pick up a run.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from maxfl.atomic import atomic_write_text
from maxfl.audit import AuditLog
from maxfl.errors import UserError

ALLOWED_FILE = "allowed-serverapps"  # in the federation folder
ALLOWED_HEADER = ("# The ServerApps this anchor runs: one FAB SHA-256 per line, `#` starts a comment.\n"
                  "# `maxfl federation allow-serverapp APP_DIR --dir D` adds one; nothing listed: no ServerApp runs.\n")
AUDIT_FILE = "audit.jsonl"  # the federation folder's audit log (fl_server.federation.provision)
FEDERATION_ENV = "MAXFL_FEDERATION_DIR"
ALLOWED_ENV = "MAXFL_ALLOWED_SERVERAPPS"
AUDIT_ENV = "MAXFL_ANCHOR_AUDIT_LOG"  # default: <federation dir>/audit.jsonl, else $MAXFL_HOME/anchor/audit.jsonl
SERVERAPP_COMMAND = "maxfl-serverapp"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HINT = "if the anchor trusts it: `maxfl federation allow-serverapp APP_DIR --dir FEDERATION_DIR`"


class ServerAppRefused(UserError):
    """The anchor does not run this ServerApp."""


def read_allowed(path: Path) -> frozenset[str]:
    """Hashes in an allowed-serverapps file; a line that is not a SHA-256 hash is an error naming its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        raise ServerAppRefused(f"cannot read {path} ({exc.strerror or type(exc).__name__}); fix its permissions") from None
    found = set()
    for number, line in enumerate(text.splitlines(), start=1):
        item = line.split("#", 1)[0].strip().lower()
        if not item:
            continue
        if not _SHA256.match(item):
            raise ServerAppRefused(f"{path} line {number} is not a SHA-256 hash (64 hex digits); `maxfl app hash APP_DIR` prints one")
        found.add(item)
    return frozenset(found)


def _hash_of(app: str) -> tuple[str, str]:
    """A ServerApp given as its SHA-256, a `.fab` file or the app folder `flwr run` takes: (hash, label)."""
    if _SHA256.match(app.strip().lower()):
        return app.strip().lower(), ""
    from maxfl.fab import build_fab

    path = Path(app).expanduser()
    if path.is_file() and path.suffix == ".fab":
        content = path.read_bytes()
        fab_id, version = _metadata(content)
    elif path.is_dir():
        content, fab_id, version = build_fab(path)
    else:
        raise ServerAppRefused(f"{app} is neither a SHA-256 hash, a .fab file nor a Flower app folder; give the folder you pass to `flwr run`")
    return hashlib.sha256(content).hexdigest(), f"{fab_id} {version}".strip()


def allow_serverapp(folder: Path, app: str, audit: AuditLog) -> tuple[str, bool]:
    """Add a ServerApp (hash, .fab or app folder) to `folder`'s allowed-serverapps, atomically; audited.

    Returns (hash, added): False when it was already allowed. Callers hold the federation's lock."""
    fab_hash, label = _hash_of(app)
    path = folder / ALLOWED_FILE
    if fab_hash in read_allowed(path):
        return fab_hash, False
    text = path.read_text(encoding="utf-8") if path.is_file() else ALLOWED_HEADER
    atomic_write_text(path, text + ("" if not text or text.endswith("\n") else "\n") + f"{fab_hash}  # {label or 'by hash'}\n")
    audit.record("serverapp.allowed", "anchor", fab_hash=fab_hash, app=label)
    return fab_hash, True


def disallow_serverapp(folder: Path, app: str, audit: AuditLog) -> tuple[str, bool]:
    """Take a ServerApp off `folder`'s allowed-serverapps (its later runs are refused); (hash, removed)."""
    fab_hash, label = _hash_of(app)
    path = folder / ALLOWED_FILE
    if fab_hash not in read_allowed(path):
        return fab_hash, False
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.split("#", 1)[0].strip().lower() != fab_hash]
    atomic_write_text(path, "\n".join(kept) + "\n")
    audit.record("serverapp.disallowed", "anchor", fab_hash=fab_hash, app=label)
    return fab_hash, True


class ServerAppPolicy(BaseModel):
    """Which ServerApps the anchor runs; `check` refuses any other and records it in the anchor's audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed: frozenset[str] = frozenset()
    audit_log: Path
    source: str = ""  # where the allowed hashes came from, for the refusal's message

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServerAppPolicy:
        env = dict(os.environ if env is None else env)
        allowed: set[str] = set()
        sources = []
        folder = Path(env[FEDERATION_ENV]) if env.get(FEDERATION_ENV) else None
        if folder is not None:
            allowed |= read_allowed(folder / ALLOWED_FILE)
            sources.append(str(folder / ALLOWED_FILE))
        if listed := env.get(ALLOWED_ENV, "").strip():
            items = [h.strip().lower() for h in listed.split(",") if h.strip()]
            if bad := [h for h in items if not _SHA256.match(h)]:
                raise ServerAppRefused(f"{ALLOWED_ENV} holds {bad[0][:16]!r}, not a SHA-256 hash; give comma-separated hashes")
            allowed |= set(items)
            sources.append(ALLOWED_ENV)
        if env.get(AUDIT_ENV):
            audit = Path(env[AUDIT_ENV])
        elif folder is not None:
            audit = folder / AUDIT_FILE
        else:
            from fl_client.config import maxfl_home

            audit = maxfl_home() / "anchor" / AUDIT_FILE
        return cls(allowed=frozenset(allowed), audit_log=audit, source=" and ".join(sources))

    def refusal(self, fab_hash: str) -> str | None:
        if not _SHA256.match(fab_hash):
            return "it comes without a valid SHA-256 hash"
        if fab_hash in self.allowed:
            return None
        if not self.allowed:
            return f"the anchor allows no ServerApp yet (no hashes in {self.source or f'{FEDERATION_ENV}/{ALLOWED_FILE} or {ALLOWED_ENV}'}); {HINT}"
        return f"its hash is not in {self.source}; {HINT}"

    def check(self, fab_hash: str, fab_id: str = "", fab_version: str = "", run_id: int | None = None) -> None:
        """Return if the anchor runs this FAB; else record `serverapp.refused` and raise ServerAppRefused."""
        fab_hash = fab_hash.strip().lower()
        details = {"fab_hash": fab_hash, "fab_id": fab_id, "fab_version": fab_version, "run_id": run_id}
        reason = self.refusal(fab_hash)
        label = f"ServerApp {fab_id} {fab_version}".rstrip() if fab_id else "a ServerApp"
        if reason is not None:
            message = f"the anchor refuses {label} (sha256 {fab_hash[:12] or '-'}…): {reason}"
            try:
                AuditLog(self.audit_log).record("serverapp.refused", "anchor", **details, reason=reason)
            except (OSError, UserError) as exc:
                message += f" (and could not record this in {self.audit_log}: {exc})"
            raise ServerAppRefused(message)
        try:
            AuditLog(self.audit_log).record("serverapp.accepted", "anchor", **details)
        except (OSError, UserError) as exc:
            raise ServerAppRefused(f"the anchor refuses {label} (sha256 {fab_hash[:12]}…): it cannot record running it in its "
                                   f"audit log {self.audit_log} ({exc}); fix that file's folder") from None


def _metadata(content: bytes) -> tuple[str, str]:
    """The FAB's id and version for the audit log; a FAB too broken to say is still checked (and refused) by hash."""
    try:
        from flwr.cli.config_utils import get_fab_metadata

        fab_id, fab_version = get_fab_metadata(content)
        return str(fab_id), str(fab_version)
    except Exception:  # noqa: BLE001 - only a label: the hash decides
        return "", ""


def guard_install(install: Callable[..., Any], policy: Callable[[], ServerAppPolicy] = ServerAppPolicy.from_env,
                  run_id: Callable[[], int | None] = lambda: None) -> Callable[..., Any]:
    """Flower's `install_from_fab`, refusing (before anything is written) a FAB the anchor did not allow."""
    def install_from_fab(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        policy().check(hashlib.sha256(content).hexdigest(), *_metadata(content), run_id=run_id())
        return install(content, *args, **kwargs)  # exactly the bytes that were checked

    install_from_fab.__wrapped__ = install  # type: ignore[attr-defined]
    return install_from_fab


def install_gate(runtime: Any) -> None:
    """Put the check into Flower's ServerApp runtime module (flwr.superlink.runtime.run_serverapp)."""
    from flwr.supercore.task_identity import TaskIdentity

    runtime.install_from_fab = guard_install(runtime.install_from_fab, run_id=lambda: TaskIdentity.run_id)


def serverapp_main() -> None:
    """`maxfl-serverapp`: Flower's `flwr-serverapp`, with the anchor's ServerApp check (same arguments)."""
    import importlib

    from flwr.superlink.cli import flwr_serverapp

    install_gate(importlib.import_module("flwr.superlink.runtime.run_serverapp"))  # the module (its package exports the function)
    flwr_serverapp()


def superexec_main() -> None:
    """`maxfl-superexec [--federation-dir D] FLOWER-SUPEREXEC-ARGS`: Flower's `flower-superexec` whose ServerApp
    tasks run `maxfl-serverapp` (the check above) instead of `flwr-serverapp`."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    argv = sys.argv[1:]
    if "--federation-dir" in argv:
        i = argv.index("--federation-dir")
        if i + 1 >= len(argv):
            raise SystemExit("maxfl-superexec: --federation-dir needs the anchor's federation folder")
        os.environ[FEDERATION_ENV] = str(Path(argv[i + 1]).resolve())
        del argv[i:i + 2]
    sys.argv = [sys.argv[0], *argv]
    command = serverapp_command()
    if not os.access(command, os.X_OK):
        raise SystemExit(f"maxfl-superexec: {command} is missing; reinstall maxfl's server extra (pip install -e '.[server]')")
    TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP] = command
    flower_superexec()


def superexec_argv(bin_dir: Path, runtime_address: str, secret: Path, federation_dir: Path | None, ca_cert: Path | None,
                   parent_pid: int | None = None) -> list[str]:
    """`maxfl-superexec` for a SuperLink in process isolation: attached to its Runtime API (TLS verified with the
    federation CA, or `--insecure` without one), holding its SuperExec secret, checking ServerApps against
    `federation_dir`'s list; with `parent_pid` it exits with that process (the SuperLink)."""
    argv = [str(bin_dir / "maxfl-superexec")]
    if federation_dir is not None:
        argv += ["--federation-dir", str(federation_dir)]
    argv += ["--runtime-api-address", runtime_address]
    argv += ["--root-certificates", str(ca_cert)] if ca_cert is not None else ["--insecure"]
    argv += ["--superexec-auth-secret-file", str(secret)]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    return argv


def serverapp_command() -> str:
    """`maxfl-serverapp` next to this interpreter: the one the anchor installed, never one a PATH entry could put first."""
    return str(Path(sys.executable).parent / SERVERAPP_COMMAND)
