"""Before the first round: every plant describes its data, the anchor checks they agree and merges a spec.

This is where a plant whose schema differs is found, plant by plant, before anyone trains; and where
statistics that need all plants (scaling, vocabularies, classes) are merged without pooling data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from pydantic import ValidationError

from fl_server.run.config import RunConfig
from fl_server.run.identity import refusal
from fl_server.run.strategy import RunAborted, failure_reason, plant_of
from maxfl.errors import UserError
from maxfl.messages import CONFIG, PROFILE, DataQuery
from tasks.base import DataProfile, Task, TaskOptions, TaskSpec, check_labels

log = logging.getLogger("maxfl")


def wait_for_plants(grid: Grid, cfg: RunConfig) -> list[int]:
    deadline = time.monotonic() + cfg.round_timeout_s
    while len(nodes := list(grid.get_node_ids())) < cfg.min_plants:
        if time.monotonic() > deadline:
            raise RunAborted(f"only {len(nodes)} plant(s) connected within {cfg.round_timeout_s:.0f}s, {cfg.min_plants} needed")
        time.sleep(cfg.poll_interval_s)
    return nodes


def collect_profiles(grid: Grid, cfg: RunConfig, task: Task) -> dict[str, DataProfile]:
    """Ask every connected plant for its profile; plants that decline are named, too few aborts the run."""
    query = DataQuery(task=cfg.task, seed=cfg.seed).to_flower()
    messages = [
        Message(content=RecordDict({CONFIG: ConfigRecord(query)}), message_type=MessageType.QUERY, dst_node_id=node)
        for node in wait_for_plants(grid, cfg)
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s))
    profiles: dict[str, DataProfile] = {}
    declined: list[str] = []
    for msg in replies:
        if (why_not := refusal(msg)) is not None:
            declined.append(f"{plant_of(msg)}: {why_not}")
            continue
        if msg.has_error():
            declined.append(failure_reason(msg))
            continue
        try:
            profiles[plant_of(msg)] = task.profile_type.model_validate_json(str(msg.content[CONFIG][PROFILE]))
        except (KeyError, ValidationError) as exc:
            declined.append(f"{plant_of(msg)}: unreadable data profile ({exc.__class__.__name__})")
    silent = len(messages) - len(replies)
    if silent:
        declined.append(f"{silent} plant(s) did not answer within {cfg.round_timeout_s:.0f}s")
    for reason in declined:
        log.warning("data check: %s", reason)
    if len(profiles) < cfg.min_plants:
        raise RunAborted(f"data check: {len(profiles)} plant(s) have usable data, {cfg.min_plants} needed ({'; '.join(declined)})")
    return profiles


def agree_on_data(grid: Grid, cfg: RunConfig, task: Task) -> tuple[TaskSpec, dict[str, DataProfile]]:
    profiles = collect_profiles(grid, cfg, task)
    try:
        spec = task.make_spec(profiles, TaskOptions(model=cfg.model, image_size=cfg.image_size))
        missing = check_labels(profiles)
    except UserError as exc:  # schema or label mismatch, too few classes, a model the task does not have
        raise RunAborted(str(exc)) from None
    for warning in missing:
        log.warning("data check: %s", warning)
    summary = ", ".join(f"{p} {prof.examples} examples" for p, prof in sorted(profiles.items()))
    log.info("data check: %d plant(s) agree on the %s schema (%s)", len(profiles), cfg.task, summary)
    return spec, profiles


def agreed_examples(profiles: Mapping[str, DataProfile]) -> dict[str, int]:
    """Training records per plant as declared in the data agreement: the most a plant's update may weigh."""
    return {plant: profile.examples for plant, profile in profiles.items()}
