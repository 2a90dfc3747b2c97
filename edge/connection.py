"""uvicorn's h11 protocol with a deadline on every request's head and body.

uvicorn times out only an idle keep-alive connection after a response; a connection that never finishes
its request head (slow loris) or its body stays open for good, and each holds a socket and a buffer. This
subclass arms one timer per connection: the head must arrive within `head_s` of the first byte (or of the
connection, for one that sends nothing) and the body within `body_s` of the head; when it fires the
connection is closed (with a 408 if no response was started). It goes to uvicorn as `Config(http=...)`.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("maxfl.edge")

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s")


def deadline_protocol(head_s: float, body_s: float) -> type[H11Protocol]:
    """An H11Protocol class whose connections must send each request head within `head_s` and body within `body_s`."""

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _waiting_for: str | None = None  # "head" | "body" while a timer is armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("head", head_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._waiting_for is None and self.conn.their_state is h11.IDLE:
                self._arm("head", head_s)  # the first bytes of a next request on a kept-alive connection
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def _follow(self) -> None:
            """Move the deadline along with the request: head, then body, then none once the body is in."""
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if self._waiting_for != "body":
                    self._arm("body", body_s)
            elif state is not h11.IDLE:  # the whole request is in (or the connection is ending)
                self._disarm()

        def _arm(self, what: str, seconds: float) -> None:
            self._disarm()
            self._waiting_for = what
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._waiting_for = None, None

        def _expired(self) -> None:
            what, self._deadline, self._waiting_for = self._waiting_for, None, None
            if self.transport.is_closing():
                return
            client = "%s:%d" % self.client if self.client else "?"
            limit = head_s if what == "head" else body_s
            log.info("closed the connection from %s: its request %s did not arrive within %g s", client, what, limit)
            if self.cycle is None or not self.cycle.response_started:
                body = (b'{"error": "the request %s did not arrive within %g s; send the whole request at once"}'
                        % (what.encode(), limit))
                self.transport.write(_TIMEOUT_408 % (len(body), body))
            self.transport.close()

    return DeadlineH11Protocol
