"""Push a released model to the plants' edge stores through the federation itself (`query.deploy` messages).

Every connected plant gets the model and answers with what its store did. Plants that should have it but are
not connected are recorded as pending in the registry; the next run (or `maxfl model push --wait`) delivers it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from pydantic import ValidationError

from fl_server.run.config import RunConfig
from fl_server.run.identity import refusal
from fl_server.release.registry import EdgeRecord, Registry, now
from fl_server.run.strategy import failed_plant, failure_reason, plant_of
from maxfl.errors import UserError
from maxfl.messages import ACK, ARRAYS, DEPLOY, ONNX, RELEASE, DeployAck
from maxfl.release import ReleaseManifest

log = logging.getLogger("maxfl")

def _deploy_messages(nodes: Iterable[int], manifest: ReleaseManifest, onnx: bytes, targets: set[str] | None,
                     weights: np.ndarray | None = None) -> list[Message]:
    content = RecordDict({
        RELEASE: ConfigRecord({"manifest": manifest.model_dump_json(), "targets": ",".join(sorted(targets or []))}),
        ONNX: ConfigRecord({"model": onnx}),
    })
    if weights is not None:  # the trained weights: a plant personalises from them (fl_client.personalise)
        content[ARRAYS] = ArrayRecord([weights])
    return [Message(content=content, message_type=f"{MessageType.QUERY}.{DEPLOY}", dst_node_id=node) for node in nodes]


def _record(msg: Message, manifest: ReleaseManifest) -> EdgeRecord | None:
    """What a plant's reply says, or None when it was not for this plant."""
    if (why_not := refusal(msg)) is not None:
        log.warning("push: a reply from %s is ignored: %s", plant_of(msg), why_not)
        return None
    if msg.has_error():
        plant, why = failed_plant(msg)
        if plant.startswith("node-"):  # not a plant that answered: nothing to record against a plant id
            log.warning("push: %s", failure_reason(msg))
            return None
        return EdgeRecord(plant=plant, version=manifest.version, status="refused", at=now(), detail=why)
    try:
        ack = DeployAck.parse(msg.content[ACK])
    except (KeyError, UserError, ValidationError) as exc:
        log.warning("push: %s sent an unreadable acknowledgement (%s)", plant_of(msg), exc)
        return None
    if ack.status == "not-targeted":
        return None
    status = "refused" if ack.status == "refused" else "installed"
    return EdgeRecord(plant=plant_of(msg), version=manifest.version, status=status, at=now(), detail=ack.detail or ack.status,
                      serving=ack.serving or None)


def push(
    grid: Grid, cfg: RunConfig, registry: Registry, manifest: ReleaseManifest, onnx: bytes,
    targets: set[str] | None, known: Iterable[str] = (), wait_s: float = 0.0, weights: np.ndarray | None = None,
) -> list[EdgeRecord]:
    """Deploy to the connected plants; `targets` None means every plant: those connected now, the ones that
    trained it (`known`) and every plant the registry has pushed to before. Returns one record per plant."""
    expected = set(targets) if targets else set(known) | set(registry.edge())
    records: dict[str, EdgeRecord] = {}
    sent: set[int] = set()
    deadline = time.monotonic() + wait_s
    while True:
        fresh = [n for n in grid.get_node_ids() if n not in sent]
        if fresh:
            sent.update(fresh)
            for msg in grid.send_and_receive(_deploy_messages(fresh, manifest, onnx, targets, weights), timeout=cfg.round_timeout_s):
                if (record := _record(msg, manifest)) is not None:
                    records[record.plant] = record
                    if not targets:
                        expected.add(record.plant)
        missing = expected - records.keys()
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(cfg.poll_interval_s, 0.1)))
    for plant in sorted(expected - records.keys()):
        records[plant] = EdgeRecord(plant=plant, version=manifest.version, status="pending", at=now(),
                                    detail="not connected at push time; delivered when it is back")
    registry.record_edge(list(records.values()))
    for record in sorted(records.values(), key=lambda r: r.plant):
        log.info("push: %s %s v%d %s%s", record.plant, manifest.model_name, manifest.version, record.status,
                 f" ({record.detail})" if record.detail and record.status != "installed" else "")
    return sorted(records.values(), key=lambda r: r.plant)


def deliver_pending(grid: Grid, cfg: RunConfig, registry: Registry) -> list[EdgeRecord]:
    """Plants that were offline when a version was pushed get it now, if they are connected."""
    pending: dict[int, set[str]] = {}
    for record in registry.edge().values():
        if record.status == "pending":
            pending.setdefault(record.version, set()).add(record.plant)
    delivered: list[EdgeRecord] = []
    for version, plants in sorted(pending.items()):
        release = registry.load_release(version)
        log.info("push: delivering pending %s v%d to %s", registry.name, version, ", ".join(sorted(plants)))
        delivered += push(grid, cfg, registry, release.manifest, release.onnx, targets=plants, weights=release.weights)
    return delivered
