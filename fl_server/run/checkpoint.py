"""Round checkpoints in the run's own MLflow run, so a restarted ServerApp resumes where the last one stopped.

After every completed round the ServerApp uploads `checkpoint/round-<k>.npz` — the global arrays, the
strategy's state (FedAdam's moments, FedAvgM's momentum, central DP's release count) and the round's metrics —
and only then moves the run's `maxfl.checkpoint` tag to k. The tag is the commit point: a ServerApp (or
SuperLink) that dies before it resumes from round k, and a checkpoint uploaded without its tag is ignored.
Storing it in MLflow keeps it with the anchor's other durable state (PostgreSQL + artifact store in compose),
so a fresh ServerApp container needs nothing but the run id.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from maxfl.errors import ConfigError

CHECKPOINT_TAG = "maxfl.checkpoint"
CHECKPOINT_DIR = "checkpoint"
# Where strategies keep what they learned across rounds (Flower's FedOpt family, FedAvgM; maxfl's CentralDP).
STATE_ATTRS = ("m_t", "v_t", "momentum_vector", "releases")
# How wrappers (ours and Flower's DP wrappers) reach the strategy they wrap.
WRAPPED_ATTRS = ("inner", "dp", "strategy")


@dataclass
class Checkpoint:
    server_round: int
    arrays: ArrayRecord
    metrics: dict[str, float]  # the round's metrics, exactly as logged (or to be logged) at step = round
    state: dict[str, Any] = field(default_factory=dict)  # strategy state: path -> value
    # The previous round's metrics that arrived with this round (its evaluation, folded into this round's train
    # message: fl_server.run.strategy), logged at step = round - 1 when this round is.
    earlier: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        payload: dict[str, np.ndarray] = {f"arrays/{k}": v.numpy() for k, v in self.arrays.items()}
        scalars: dict[str, Any] = {}
        for path, value in self.state.items():
            if isinstance(value, dict):
                payload |= {f"state/{path}/dict/{k}": np.asarray(v) for k, v in value.items()}
            elif isinstance(value, list):
                payload |= {f"state/{path}/list/{i:06d}": np.asarray(v) for i, v in enumerate(value)}
            else:
                scalars[path] = value
        meta = {"server_round": self.server_round, "metrics": self.metrics, "scalars": scalars, "array_keys": list(self.arrays.keys()),
                "earlier": self.earlier}
        payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **payload)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            arrays = ArrayRecord({k: Array(np.array(npz[f"arrays/{k}"])) for k in meta["array_keys"]})
            state: dict[str, Any] = dict(meta["scalars"])
            for name in npz.files:
                if not name.startswith("state/"):
                    continue
                path, kind, key = name.removeprefix("state/").rsplit("/", 2)
                if kind == "dict":
                    state.setdefault(path, {})[key] = np.array(npz[name])
                else:
                    state.setdefault(path, []).append((key, np.array(npz[name])))
            state = {p: [v for _, v in sorted(x)] if isinstance(x, list) else x for p, x in state.items()}
        return cls(int(meta["server_round"]), arrays, {k: float(v) for k, v in meta["metrics"].items()}, state,
                   {k: float(v) for k, v in meta.get("earlier", {}).items()})


def _stateful(strategy: Strategy) -> list[tuple[str, object]]:
    """(path, object) for the strategy and every strategy it wraps, outermost first."""
    found: list[tuple[str, object]] = []
    obj: object | None = strategy
    path = type(strategy).__name__
    while obj is not None:
        found.append((path, obj))
        nxt = next(((a, getattr(obj, a)) for a in WRAPPED_ATTRS if isinstance(getattr(obj, a, None), Strategy)), None)
        if nxt is None:
            break
        path, obj = f"{path}.{nxt[0]}", nxt[1]
    return found


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What the strategy (and those it wraps) carries from round to round; Nones are left out."""
    state: dict[str, Any] = {}
    for path, obj in _stateful(strategy):
        for attr in STATE_ATTRS:
            value = getattr(obj, attr, None)
            if value is not None:
                state[f"{path}.{attr}"] = value
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    objects = dict(_stateful(strategy))
    for key, value in state.items():
        path, attr = key.rsplit(".", 1)
        if path not in objects or attr not in STATE_ATTRS:
            raise ConfigError(f"the checkpoint holds state '{key}' that the run's strategy does not have; resume with the run config it started with")
        setattr(objects[path], attr, value)


class CheckpointStore:
    """Checkpoints of one MLflow run."""

    def __init__(self, client: Any, run_id: str) -> None:  # client: mlflow.MlflowClient (imported lazily by callers)
        self.client = client
        self.run_id = run_id

    def save(self, checkpoint: Checkpoint) -> None:
        with tempfile.TemporaryDirectory(prefix="maxfl-ckpt-") as tmp:
            path = Path(tmp) / f"round-{checkpoint.server_round:05d}.npz"
            path.write_bytes(checkpoint.to_bytes())
            self.client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
        self.client.set_tag(self.run_id, CHECKPOINT_TAG, str(checkpoint.server_round))  # the commit point

    def last_round(self) -> int:
        return int(self.client.get_run(self.run_id).data.tags.get(CHECKPOINT_TAG, 0))

    def load(self) -> Checkpoint | None:
        last = self.last_round()
        if last == 0:
            return None
        with tempfile.TemporaryDirectory(prefix="maxfl-ckpt-") as tmp:
            local = self.client.download_artifacts(self.run_id, f"{CHECKPOINT_DIR}/round-{last:05d}.npz", tmp)
            return Checkpoint.from_bytes(Path(local).read_bytes())
