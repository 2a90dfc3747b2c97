"""The anchor's side of update encodings (maxfl.encoding): every train reply reaches validation as fp32 weights."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from maxfl.encoding import decode_reply

log = logging.getLogger("maxfl")


class DecodedUpdates(Strategy):
    """Wraps a strategy: fp16-delta updates are decoded against the round's global model before it sees them.

    A reply it cannot decode is passed on as it came; update validation then rejects it (its dtype is not the model's).
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self._sent: ArrayRecord | None = None

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent = ArrayRecord({key: array for key, array in arrays.items()})  # the strategy may reuse its record
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent is None:
            raise RuntimeError("aggregate_train before configure_train: no global arrays to decode updates against")
        decoded = []
        for msg in replies:
            try:
                decoded.append(decode_reply(msg, self._sent))
            except ValueError as exc:
                log.warning("round %d: a train reply is kept as it came (%s)", server_round, exc)
                decoded.append(msg)
        return self.inner.aggregate_train(server_round, decoded)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
