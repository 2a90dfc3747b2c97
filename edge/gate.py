"""What every inference endpoint of the edge server goes through, whatever its protocol (/v1, Open Inference
Protocol v2): admission, the body limit, the request's time limit, and one mapping from what went wrong to a
4xx/5xx with one line, so the two protocols cannot drift apart in what they allow or how they refuse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from edge.admission import Admission, Busy, Ticket
from tasks.base import BadInput
from tasks.serving import ImageTooLarge

if TYPE_CHECKING:
    import onnxruntime

    from edge.server import Limits

log = logging.getLogger("maxfl.edge")

MB = 1024 * 1024
T = TypeVar("T")
RETRY_AFTER = {"Retry-After": "1"}


class Refused(Exception):
    """A request answered with `status` and one line; `headers` e.g. Retry-After on a 503."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Abandoned(Exception):
    """The request's time ran out: its work stops at the next step (onnxruntime's run is terminated)."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_json(body: bytes, send: str) -> Any:
    """The body as JSON; Refused(400) naming what is wrong and what to `send` instead."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Refused(400, f"body is not valid JSON ({first_line(exc)[:200]}); send {send}") from None
    except ValueError as exc:  # an integer beyond Python's digit limit, and whatever else the decoder refuses
        why = "an integer of more than 4300 digits" if "integer string conversion" in str(exc) else first_line(exc)[:200]
        raise Refused(400, f"body cannot be read as a request ({why}); send {send} with numbers of ordinary size") from None
    except RecursionError:
        raise Refused(400, f"body is nested too deeply to be a request; send {send}") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to be over `limit` (declared length, then bytes read)."""
    too_large = Refused(413, f"request body is larger than this server's limit of {limit / MB:g} MB (--max-body-mb); "
                             "send fewer or smaller instances per request")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refused(400, "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


class Gate:
    """Admission, body, time limit and error mapping for one app's inference endpoints (one Admission for all of
    them: the model's threads are shared). `on_refused(reason)` counts admission refusals ("busy", "wait")."""

    def __init__(self, limits: Limits, on_refused: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self.admission = Admission(limits.max_in_model, limits.max_waiting)
        self._on_refused = on_refused or (lambda reason: None)

    async def run(self, request: Request, work: Callable[[bytes, onnxruntime.RunOptions], T],
                  check_body: Callable[[bytes], None] | None = None) -> T:
        """Admit the request, read its body (`check_body` may refuse it before it waits for the model), run
        `work(body, run_options)` on a model thread within the request's time, and return its result. Every failure
        is a Refused with its status and one line."""
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

        limits = self.limits
        try:
            ticket = self.admission.enter()
        except Busy:
            self._on_refused("busy")
            raise Refused(503, f"busy: {limits.max_in_model} requests in the model and {limits.max_waiting} waiting; retry shortly",
                          RETRY_AFTER) from None
        try:
            return await self._admitted(request, ticket, work, check_body)
        except ImageTooLarge as exc:
            raise Refused(413, first_line(exc)) from None
        except BadInput as exc:
            raise Refused(400, first_line(exc)) from None
        except (InvalidArgument, Fail) as exc:  # the adapter let through something the model cannot take
            raise Refused(400, f"the model cannot take this input: {first_line(exc)}") from None
        finally:
            self.admission.leave(ticket)

    async def _admitted(self, request: Request, ticket: Ticket, work: Callable[[bytes, onnxruntime.RunOptions], T],
                        check_body: Callable[[bytes], None] | None) -> T:
        """Between admission and answer: the body (in the connection's body time), then a model thread and the
        work, within the request's time."""
        import onnxruntime
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail

        limits = self.limits
        body = await read_body(request, limits.max_body_bytes)
        if check_body is not None:
            check_body(body)
        deadline = time.monotonic() + limits.request_timeout_s
        run_options = onnxruntime.RunOptions()
        try:
            done = await self.admission.run(ticket, lambda: work(body, run_options), deadline - time.monotonic())
        except Busy:
            self._on_refused("wait")
            raise Refused(503, f"busy: waited {limits.request_timeout_s:g} s (--request-timeout-s) for the model; retry shortly",
                          RETRY_AFTER) from None
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                return await asyncio.shield(done)
        except TimeoutError:
            run_options.terminate = True  # onnxruntime stops the run; the thread is freed when it returns
            done.add_done_callback(_retrieve)
            raise Refused(504, f"the model did not answer within {limits.request_timeout_s:g} s (--request-timeout-s); "
                               "send fewer or smaller instances") from None
        except Abandoned:
            raise Refused(504, f"the request ran out of its {limits.request_timeout_s:g} s (--request-timeout-s)") from None
        except Fail:
            if run_options.terminate:
                raise Refused(504, f"the model did not answer within {limits.request_timeout_s:g} s (--request-timeout-s)") from None
            raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Read an abandoned request's outcome, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
