"""`maxfl-supernode`: Flower's `flower-supernode` with LAN-sized waits (see maxfl.flower_tuning).

Same flags as `flower-supernode`. `MAXFL_SUPERNODE_POLL_S` (default 0.2) caps the SuperNode's idle
poll of the SuperLink, which Flower 1.41 fixes at 3 s. `MAXFL_SUPERNODE_HEARTBEAT_S` (default 10, Flower's
minimum) is the heartbeat it announces: the SuperLink notices a dead plant after two missed beats.
"""

from __future__ import annotations

import os

from maxfl.flower_tuning import cap_module_sleeps, tune_node_heartbeat, tune_object_pulls


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll_s = float(os.environ.get("MAXFL_SUPERNODE_POLL_S", "0.2"))
    cap_module_sleeps(start_client_internal, poll_s)
    tune_object_pulls(initial_backoff_s=poll_s / 4, backoff_cap_s=poll_s / 2)
    tune_node_heartbeat(float(os.environ.get("MAXFL_SUPERNODE_HEARTBEAT_S", "10")))
    flower_supernode()


if __name__ == "__main__":
    main()
