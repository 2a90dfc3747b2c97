"""A Grid wrapper that polls for replies more often than Flower's built-in 3 s.

Flower 1.41's `send_and_receive` sleeps 3 s between pulls, so every phase of every round waits up to
3 s after the last plant has answered. This wrapper re-implements only `send_and_receive` on top of
the public `push_messages`/`pull_messages` API and delegates everything else; it also notes where each message went,
so a notice the SuperLink itself writes for a message (the node went offline, the message expired) is that plant's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fl_server.run.identity import note_sent
from maxfl.flower_tuning import object_pulls_within

LAST_PULL_GRACE_S = 10.0  # a pull that starts at the deadline still waits this long for objects already on their way


class PollingGrid(Grid):
    def __init__(self, inner: Grid, poll_interval_s: float) -> None:
        self.inner = inner
        self.poll_interval_s = poll_interval_s

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's push; each message's id is noted with the node it went to (fl_server.run.identity.note_sent)."""
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        for message_id, message in zip(ids, messages, strict=False):
            if message_id:
                note_sent(message_id, message.metadata.dst_node_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract (replies until all came or `timeout`), pulling every `poll_interval_s`.

        A pull that starts after the deadline is the last one, so a reply that arrived in time is never dropped
        because an earlier pull outlasted the deadline. Flower retries the objects of a reply whose sender died
        mid-upload until the SuperLink gives up on them (minutes); here they are waited for until the deadline, then
        that reply is Flower's error reply ("objects unavailable") and the round goes on with the others.
        """
        pending = {m for m in self.push_messages(messages) if m}  # Flower gives None for a message it could not push
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            last = deadline is not None and time.monotonic() >= deadline
            # a reply's objects are waited for until the round's time is up (and a grace for one already arriving)
            bound = None if deadline is None else max(deadline - time.monotonic(), LAST_PULL_GRACE_S)
            with object_pulls_within(bound):
                got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or last:
                break
            time.sleep(self.poll_interval_s if deadline is None else min(self.poll_interval_s, max(0.0, deadline - time.monotonic())))
        return replies
