"""The plant decides what runs on its node: only apps whose FAB hash it allowed.

A plant's node config names the apps it runs (`allowed-apps`: SHA-256 hashes of FABs, as Flower computes
them; or "any", which the plant must set explicitly). Not set: it runs no app. maxfl's executor
(`maxfl-warm-exec`) asks this module before Flower installs or imports a submitted FAB (`AppGate`); a refused
app never reaches the disk, the plant's audit log records the refusal (`app.refused`), and the anchor gets an
error reply with the reason. The first acceptance of a hash in a run is recorded too (`app.accepted`).

Simulation has no executor, so no check: virtual plants run the app of the simulation. With Flower's stock
SuperExec (`maxfl federate --no-warm`) maxfl checks nothing either; there the plant can use Flower's own app
verification, `flower-supernode --trusted-entities FILE` (apps signed through Flower's platform; a SuperLink
of your own does not sign FABs, so it then refuses everything).

Everything the check needs is imported when this module is: the executor imports it before it drops the
app packages from its fork, so the FAB under review cannot replace the code that reviews it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from fl_client.config import SHA256_PATTERN, PlantConfig
from maxfl.audit import AuditLog
from maxfl.errors import ConfigError, UserError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

HINT = "if you trust it, add its hash to the node config (maxfl app hash prints it)"


class AppRefused(UserError):
    """The plant does not run this app on its node."""


def _label(fab_id: str, fab_version: str) -> str:
    return f"app {fab_id} {fab_version}".rstrip() if fab_id else "an app"


class AppPolicy(BaseModel):
    """What one plant runs; `check` refuses anything else and records it in the plant's audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plant_id: str
    allow_any: bool = False
    allowed: frozenset[str] = frozenset()  # FAB hashes, lower-case hex
    audit_log: Path

    @classmethod
    def from_plant(cls, plant: PlantConfig) -> AppPolicy:
        apps = plant.allowed_apps
        return cls(plant_id=plant.plant_id, allow_any=apps == "any",
                   allowed=frozenset(apps.split(",")) if apps and apps != "any" else frozenset(), audit_log=plant.audit_log_path())

    def refusal(self, fab_hash: str) -> str | None:
        """Why this plant does not run the FAB with this hash; None: it runs it."""
        if not SHA256_PATTERN.match(fab_hash):
            return "it comes without a valid SHA-256 hash"
        if self.allow_any or fab_hash in self.allowed:
            return None
        if not self.allowed:
            return f"this plant's node config sets no allowed-apps, so it runs no app; {HINT}"
        return f"not in this plant's allowed-apps; {HINT}"

    def check(self, fab_hash: str, fab_id: str, fab_version: str, run_id: int | None = None, reason: str | None = None) -> None:
        """Return if the plant runs this app; else record `app.refused` and raise AppRefused (one line).

        `reason`: refuse for this reason whatever the hash (e.g. the FAB does not match its hash).
        """
        fab_hash = fab_hash.strip().lower()
        details = {"fab_hash": fab_hash, "fab_id": fab_id, "fab_version": fab_version, "run_id": run_id}
        reason = reason or self.refusal(fab_hash)
        if reason is not None:
            message = f"{self.plant_id} refuses {_label(fab_id, fab_version)} (sha256 {fab_hash[:12] or '-'}…): {reason}"
            try:
                AuditLog(self.audit_log).record("app.refused", self.plant_id, **details, reason=reason)
            except (OSError, UserError) as exc:
                message += f" (and could not record this in {self.audit_log}: {exc})"
            raise AppRefused(message)
        self._record_acceptance(details)

    def _record_acceptance(self, details: dict[str, Any]) -> None:
        """`app.accepted`, once per run and hash (every time without a run id). Unrecordable: refused."""
        marker = None
        if details["run_id"] is not None:
            seen = self.audit_log.with_name(self.audit_log.name + ".accepted")
            marker = seen / f"{details['run_id']}-{details['fab_hash']}"
            try:
                seen.mkdir(parents=True, exist_ok=True)
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:
                if marker.is_file():
                    return  # this run's acceptance of this app is on record already
                marker = None
            except OSError:
                marker = None  # recorded below, or refused if that fails too
            else:
                os.close(fd)
        try:
            AuditLog(self.audit_log).record("app.accepted", self.plant_id, **details)
        except (OSError, UserError) as exc:
            if marker is not None:
                marker.unlink(missing_ok=True)
            label = _label(str(details["fab_id"]), str(details["fab_version"]))
            raise AppRefused(f"{self.plant_id} refuses {label} (sha256 {details['fab_hash'][:12]}…): it cannot record "
                             f"running it in its audit log {self.audit_log} ({exc}); fix that file's folder or set audit-log") from None


def check_task(context: Context, run: Run, fab: Fab) -> str:
    """The plant's verdict on a task Flower pulled: the FAB's hash if it may run, else AppRefused."""
    node_config = context.node_config
    try:
        plant = PlantConfig.from_flower(node_config, context.run_config)
    except ConfigError as exc:
        who = str(node_config.get("plant-id") or f"node {context.node_id}")
        raise AppRefused(f"{who} refuses {_label(run.fab_id, run.fab_version)}: its node config is not valid ({exc})") from None
    policy = AppPolicy.from_plant(plant)
    actual = hashlib.sha256(fab.content).hexdigest()
    mismatch = None
    if fab.hash_str.strip().lower() != actual:
        mismatch = f"its content does not match the hash it came with ({fab.hash_str[:12] or 'none'}…)"
    policy.check(actual, run.fab_id, run.fab_version, run_id=run.run_id, reason=mismatch)
    return actual


PullTaskInput = Callable[[Any], "tuple[Message, Context, Run, Fab]"]


class AppGate:
    """Hooks into Flower's `run_clientapp` (flwr.supernode.runtime.run_clientapp), one gate per task process.

    `wrap_pull` decides right after Flower pulled the task's message, context, run and FAB; `wrap_install`
    enforces before the FAB is installed. The refusal is raised at install, not at the pull, so Flower already
    holds the message and context: its exception path then pushes an error reply with the reason to the
    anchor. Only the exact bytes that were checked and allowed get installed; the app is imported only from
    what was installed.
    """

    def __init__(self) -> None:
        self.allowed_hash: str | None = None
        self.refused: AppRefused | None = None
        # FAB hash -> where this process installed it: a resident task process (fl_client.warm_exec) runs every
        # task of its run, and each is checked again, but the same checked bytes are installed once.
        self.installed: dict[str, Path] = {}

    def wrap_pull(self, pull: PullTaskInput) -> PullTaskInput:
        def pull_task_input(client: Any) -> tuple[Message, Context, Run, Fab]:
            message, context, run, fab = pull(client)
            self.allowed_hash, self.refused = None, None
            try:
                self.allowed_hash = check_task(context, run, fab)
            except AppRefused as exc:
                self.refused = exc
            except Exception as exc:  # noqa: BLE001 - fail closed: a check that breaks refuses the app
                self.refused = AppRefused(f"the plant's app check failed ({type(exc).__name__}: {exc}); the app was not run")
            return message, context, run, fab

        pull_task_input.__wrapped__ = pull  # type: ignore[attr-defined]
        return pull_task_input

    def wrap_install(self, install: Callable[..., Path]) -> Callable[..., Path]:
        def install_from_fab(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
            if self.refused is not None:
                raise self.refused
            content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
            if self.allowed_hash is None or hashlib.sha256(content).hexdigest() != self.allowed_hash:
                raise AppRefused("the plant did not check this FAB before its installation; the app was not run")
            if (done := self.installed.get(self.allowed_hash)) is not None and done.is_dir():
                return done
            path = self.installed[self.allowed_hash] = install(content, *args, **kwargs)
            return path

        install_from_fab.__wrapped__ = install  # type: ignore[attr-defined]
        return install_from_fab


def install_gate(runtime: Any) -> AppGate:
    """Put a fresh gate into Flower's ClientApp runtime module (the executor's task process does this)."""
    gate = AppGate()
    runtime.pull_task_input = gate.wrap_pull(runtime.pull_task_input)
    runtime.install_from_fab = gate.wrap_install(runtime.install_from_fab)
    return gate
