"""`maxfl-supernode`: Flower's `flower-supernode` with LAN-sized waits (see maxfl.flower_tuning).

Same flags as `flower-supernode`. `MAXFL_SUPERNODE_POLL_S` (default 0.4) is the SuperNode's poll of the SuperLink
while its plant is in a run (Flower 1.41: 3 s); a plant that has been quiet polls less often (a twentieth of the quiet
time), up to `MAXFL_SUPERNODE_IDLE_POLL_S` (default Flower's 3 s) after a minute. `MAXFL_SUPERNODE_REPLY_S` (default
0.05) is how often it looks for its ClientApp's reply (Flower: 0.5 s).
`MAXFL_SUPERNODE_HEARTBEAT_S` (default 10, Flower's minimum) is the heartbeat it announces: the SuperLink notices a
dead plant after two missed beats. Each message it has pulled and stored wakes its warm executor (fl_client.task_wake).
"""

from __future__ import annotations

import argparse
import os
import sys

from fl_client.task_wake import WakeSender
from maxfl.flower_tuning import notify_after_each_message, pace_supernode_sleeps, tune_node_heartbeat, tune_object_pulls


def runtime_port(argv: list[str]) -> int:
    """The port of the Runtime API this SuperNode serves (`--port`, Flower's default without it)."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
    return parser.parse_known_args(argv)[0].port


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll_s = float(os.environ.get("MAXFL_SUPERNODE_POLL_S", "0.4"))
    pace_supernode_sleeps(start_client_internal, poll_s, float(os.environ.get("MAXFL_SUPERNODE_REPLY_S", "0.05")),
                          float(os.environ.get("MAXFL_SUPERNODE_IDLE_POLL_S", "3")))
    tune_object_pulls(initial_backoff_s=poll_s / 4, backoff_cap_s=poll_s / 2)
    tune_node_heartbeat(float(os.environ.get("MAXFL_SUPERNODE_HEARTBEAT_S", "10")))
    notify_after_each_message(start_client_internal, WakeSender(runtime_port(sys.argv[1:])).wake)
    flower_supernode()


if __name__ == "__main__":
    main()
