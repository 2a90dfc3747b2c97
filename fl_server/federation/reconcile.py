"""The SuperLink's nodes against the anchor's plants.json: a node registered outside maxfl does not stay.

Registering a SuperNode key needs only the Control API (`flwr supernode register`), and Flower 1.41/1.42 does
not authenticate that API by itself. A node the SuperLink has but `plants.json` lacks (or lists as revoked) was
registered outside maxfl: it is reported, audited (`node.unknown`) and, by default, unregistered. An active
plant whose node the SuperLink no longer has (someone unregistered it) is reported and audited
(`node.missing`): Flower never re-registers an unregistered key, so that plant needs a new key and kit.

Run by the ServerApp at the start of every run when `federation-dir` is set, and meant for `maxfl federation
superlink` once the SuperLink answers. The lister and the unregisterer are parameters (tests stand in for them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fl_server.federation.provision import Federation, PlantBook, ProvisionError, _flwr, flwr_unregister

log = logging.getLogger("maxfl")

NodeLister = Callable[[Federation], dict[int, str]]  # node id -> status ("online", "offline", "registered", ...)
Unregister = Callable[[Federation, int], None]
AuditHook = Callable[..., None]  # (event, **details)
GONE = frozenset({"unregistered", "deleted"})  # statuses of nodes the SuperLink no longer admits


class Reconciliation(BaseModel):
    """What one comparison found and did."""

    model_config = ConfigDict(frozen=True)

    unknown: dict[int, str] = Field(default_factory=dict)  # node id -> why it is no plant of this federation
    unregistered: list[int] = Field(default_factory=list)
    failed: dict[int, str] = Field(default_factory=dict)  # node id -> why unregistering it failed
    missing: list[str] = Field(default_factory=list)  # active plants whose node the SuperLink lacks

    @property
    def clean(self) -> bool:
        return not (self.unknown or self.missing)

    def summary(self) -> str:
        parts = []
        if self.unknown:
            parts.append(f"{len(self.unknown)} node(s) registered outside maxfl ({', '.join(map(str, sorted(self.unknown)))})"
                         + (f", {len(self.unregistered)} unregistered" if self.unregistered else ""))
        if self.failed:
            parts.append(f"could not unregister {', '.join(f'{n} ({why})' for n, why in sorted(self.failed.items()))}")
        if self.missing:
            parts.append(f"active plant(s) without a node at the SuperLink: {', '.join(self.missing)} "
                         "(unregistered outside maxfl? revoke and re-add them with a new key)")
        return "; ".join(parts) or "the SuperLink's nodes are the federation's active plants"


def flwr_list_nodes(fed: Federation) -> dict[int, str]:
    """`flwr supernode ls <federation> --format json`: node id -> status, unregistered nodes left out (Flower lists
    them with status "unregistered"; its own JSON filter looks for "deleted")."""
    answer = _flwr(fed, ["supernode", "ls"])
    nodes: dict[int, str] = {}
    for item in answer.get("nodes", []):
        try:
            node, status = int(item["node-id"]), str(item.get("status", ""))
        except (KeyError, TypeError, ValueError):
            raise ProvisionError(f"`flwr supernode ls` answered with a node entry maxfl cannot read: {str(item)[:200]}") from None
        if status not in GONE:
            nodes[node] = status
    return nodes


def reconcile(fed: Federation, book: PlantBook | None = None, lister: NodeLister = flwr_list_nodes, unregister: Unregister = flwr_unregister,
              remove_unknown: bool = True, audit: AuditHook | None = None) -> Reconciliation:
    """Compare the SuperLink's nodes with plants.json; unregister unknown ones unless `remove_unknown` is off.

    `audit(event, **details)` records what was found (default: the federation folder's audit log).
    Raises ProvisionError (SuperLinkUnreachable) when the SuperLink cannot be asked.
    """
    book = book if book is not None else fed.plants()
    record = audit if audit is not None else (lambda event, **details: fed.audit.record(event, "anchor", **details))
    nodes = lister(fed)
    by_node = {r.node_id: r for r in book.plants.values()}
    unknown: dict[int, str] = {}
    for node in sorted(nodes):
        plant = by_node.get(node)
        if plant is None:
            unknown[node] = "not in plants.json"
        elif plant.status != "active":
            unknown[node] = f"{plant.plant_id} was revoked, yet its node is still registered"
    unregistered: list[int] = []
    failed: dict[int, str] = {}
    for node, why in unknown.items():
        action = "unregistered" if remove_unknown else "reported"
        if remove_unknown:
            try:
                unregister(fed, node)
                unregistered.append(node)
            except ProvisionError as exc:
                failed[node] = str(exc)
                action = "unregister failed"
        log.warning("node %d at the SuperLink is no plant of federation '%s' (%s): %s", node, fed.info.name, why, action)
        details: dict[str, Any] = {"node_id": node, "status": nodes[node], "reason": why, "action": action}
        if node in failed:
            details["error"] = failed[node]
        record("node.unknown", **details)
    missing = sorted(r.plant_id for r in book.plants.values() if r.status == "active" and r.node_id not in nodes)
    for plant in missing:
        log.warning("plant %s is active in plants.json but the SuperLink has no node %d for it", plant, book.plants[plant].node_id)
        record("node.missing", plant=plant, node_id=book.plants[plant].node_id)
    return Reconciliation(unknown=unknown, unregistered=unregistered, failed=failed, missing=missing)
