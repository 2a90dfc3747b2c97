"""Which plant a reply comes from: the node the SuperLink says sent it, never the plant id inside the reply.

Every reply carries the plant's own id (`maxfl.messages.PLANT`, or the start of a declined reply's reason),
but that is content: any node can write any id there. The SuperLink authenticates nodes (SuperNode
authentication) and stamps each reply with its sender's node id (`msg.metadata.src_node_id`); the anchor's
federation folder maps node ids to plants (`plants.json`, written by `maxfl federation add-plant`). So:

- with a plants file (run config `federation-dir`), a reply is its node's plant; a node that is in no record
  (registered outside maxfl) speaks for no plant and its replies are refused;
- without one (simulation, `--insecure` demos), the first id a node claims is pinned to that node for the run:
  a node cannot change identity within a run, and a second node claiming a pinned plant is refused.

A claim that differs from the node's plant is attributed to the real plant, logged and audited
(`reply.spoofed`). The ServerApp installs one `PlantIdentities` per run (`use_identities`);
`fl_server.run.strategy.plant_of` asks it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.common.constant import SUPERLINK_NODE_ID

from maxfl.errors import ConfigError
from maxfl.messages import PLANT

if TYPE_CHECKING:
    from flwr.app import Message

log = logging.getLogger("maxfl")

SpoofHook = Callable[[int, str, str, str], None]  # (node id, claimed plant, real plant, message type)
# A declined reply's reason starts with the plant's id (fl_client.mods.plant_declines_mod).
_DECLINED = re.compile(r"^([a-z0-9][a-z0-9_-]{0,62}) declined: (.*)$", re.DOTALL)
_NODE_LABEL = re.compile(r"^node-\d+$")


def node_label(node_id: int) -> str:
    """How a node that speaks for no plant is named in logs, metrics and the audit log."""
    return f"node-{node_id}"


@dataclass(frozen=True)
class Identity:
    """Who sent a reply. `refused`: why the reply is not taken from that node (then `plant` is its node label)."""

    plant: str
    refused: str | None = None


def claimed_plant(msg: Message) -> str | None:
    """The plant id a reply claims for itself (content, so unverified); None when it claims none."""
    if msg.has_error():
        match = _DECLINED.match(msg.error.reason)
        claim = match.group(1) if match else None
    elif PLANT in msg.content.config_records:
        claim = str(msg.content[PLANT].get("plant-id", "")) or None
    else:
        claim = None
    return None if claim is None or _NODE_LABEL.match(claim) else claim


def split_declined(reason: str) -> tuple[str | None, str]:
    """("plant-3", "why") for "plant-3 declined: why"; (None, reason) for any other reason."""
    match = _DECLINED.match(reason)
    return (match.group(1), match.group(2)) if match else (None, reason)


class PlantIdentities:
    """Node id -> plant for one run, from the federation's `plants.json` or pinned on first sight."""

    def __init__(self, plants_file: Path | None = None, on_spoof: SpoofHook | None = None) -> None:
        self.plants_file = plants_file
        self.on_spoof = on_spoof
        self._registered: dict[int, tuple[str, str]] = {}  # node id -> (plant id, status) from plants.json
        self._loaded_mtime: float | None = None
        self._pinned: dict[int, str] = {}  # node id -> plant (no plants file: the first id the node claimed)
        self._spoofs_seen: set[tuple[int, str]] = set()  # (node id, replied-to message id): one report per reply
        self._sent: dict[str, int] = {}  # message id -> the node it was sent to (fl_server.run.grid)
        if plants_file is not None:
            self._load()

    def _load(self) -> None:
        """(Re)read plants.json; a plant added during the run is known from its first reply on."""
        from pydantic import ValidationError

        from fl_server.federation.provision import PlantBook
        from maxfl.errors import describe_validation_error

        assert self.plants_file is not None
        try:
            mtime = self.plants_file.stat().st_mtime
            if mtime == self._loaded_mtime:
                return
            book = PlantBook.model_validate_json(self.plants_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{self.plants_file} does not exist; set run config 'federation-dir' to the anchor's federation "
                              "folder (`maxfl federation init --dir`), or leave it empty for simulation and demos") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.plants_file} ({exc.strerror or type(exc).__name__})") from None
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, str(self.plants_file))) from None
        self._registered = {r.node_id: (r.plant_id, r.status) for r in book.plants.values()}
        self._loaded_mtime = mtime

    def note_sent(self, message_id: str, node: int) -> None:
        """A message went to `node`: the SuperLink's own notice that it found no answer there is that node's reply."""
        self._sent[message_id] = node

    def identify(self, msg: Message) -> Identity:
        node = int(msg.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID and msg.has_error():
            # Flower writes these itself (the node went offline, the message expired): they speak for the node asked
            node = self._sent.get(str(msg.metadata.reply_to_message_id), node)
        claim = claimed_plant(msg)
        if self.plants_file is not None:
            identity = self._from_plants_file(node)
        else:
            identity = self._pinned_identity(node, claim)
        if claim is not None and identity.refused is None and claim != identity.plant:
            self._report_spoof(msg, node, claim, identity.plant)
        return identity

    def _from_plants_file(self, node: int) -> Identity:
        if node not in self._registered:
            self._load()
        if node not in self._registered:
            return Identity(node_label(node), f"node {node} is no plant of this federation (not in {self.plants_file}); "
                                              "a node registered outside maxfl is not heard")
        plant, status = self._registered[node]
        if status != "active":
            return Identity(plant, f"{plant} was revoked; its node {node} is not heard")
        return Identity(plant)

    def _pinned_identity(self, node: int, claim: str | None) -> Identity:
        if node in self._pinned:
            return Identity(self._pinned[node])
        if claim is None:
            return Identity(node_label(node))
        owner = next((n for n, p in self._pinned.items() if p == claim), None)
        if owner is not None:
            return Identity(node_label(node), f"node {node} claims to be {claim}, which node {owner} already is in this run")
        self._pinned[node] = claim
        return Identity(claim)

    def _report_spoof(self, msg: Message, node: int, claim: str, plant: str) -> None:
        key = (node, str(msg.metadata.reply_to_message_id))
        if key in self._spoofs_seen:
            return
        self._spoofs_seen.add(key)
        kind = str(msg.metadata.message_type)
        log.warning("a %s reply from node %d claims to be %s; it is %s's node, so it counts as %s's", kind, node, claim, plant, plant)
        if self.on_spoof is not None:
            self.on_spoof(node, claim, plant, kind)


_current = PlantIdentities()


def use_identities(identities: PlantIdentities) -> PlantIdentities:
    """Make `identities` the one every reply is attributed with (one per ServerApp run); returns the previous."""
    global _current
    previous, _current = _current, identities
    return previous


def identify(msg: Message) -> Identity:
    return _current.identify(msg)


def note_sent(message_id: str, node: int) -> None:
    _current.note_sent(message_id, node)


def refusal(msg: Message) -> str | None:
    """Why a reply is not taken from its node (an unknown or revoked node, a second claim of a plant); None: it is."""
    return _current.identify(msg).refused
