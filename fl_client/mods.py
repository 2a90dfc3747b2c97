"""ClientApp mods: rules that hold for every message a plant handles, whatever the handler."""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_client.config import PlantConfig
from maxfl.errors import UserError
from maxfl.encoding import encode_reply
from maxfl.messages import ARRAYS, CONFIG

log = logging.getLogger("maxfl")


def plant_declines_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A plant that cannot do the work (bad data, bad config) declines with its reason instead of crashing.

    The reason names the plant, since node ids mean nothing to the anchor's operators.
    """
    try:
        return call_next(msg, context)
    except UserError as exc:
        try:
            who = PlantConfig.from_context(context).plant_id
        except UserError:
            who = f"node-{context.node_id}"
        log.error("%s declines the %s message: %s", who, msg.metadata.message_type, exc)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{who} declined: {exc}"), reply_to=msg)


def update_encoding_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The train reply's update in the run's encoding (maxfl.encoding), outermost: after clipping and fault drills,
    so what leaves is exactly what the anchor decodes."""
    reply = call_next(msg, context)
    encoding = msg.content[CONFIG].get("update-encoding", "fp32")
    return encode_reply(reply, msg.content[ARRAYS], "fp16" if encoding == "fp16" else "fp32")


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the round's update before it leaves, when the anchor runs Flower's client-side central DP
    (`central-dp = "plant-clipping"`, which puts the clipping norm in the train config); otherwise a no-op."""
    if KEY_CLIPPING_NORM in msg.content[CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
