"""`maxfl-warm-exec`: a plant's ClientApp executor with the heavy imports already paid.

Flower's default SuperExec starts a fresh `flwr-clientapp` for every message, and each one pays
its imports (torch alone ~1.5 s here) before it can train. With the SuperNode in
`--isolation process`, this executor takes the SuperExec's place: it imports torch and Flower once,
then forks a child per task that runs Flower's own `run_clientapp`. The child still imports the
ClientApp from the submitted FAB (our modules are dropped from the fork), so the code that runs is
the code the anchor submitted, not whatever the plant has installed.

Before Flower installs or imports that FAB, the plant's own policy decides whether it runs at all
(fl_client.app_policy: the node config's `allowed-apps`); a refused app is never installed, the plant's
audit log records it and the anchor gets an error reply with the reason. The check is the plant's
installed code, bound before the app packages are dropped, so a FAB cannot replace it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

log = logging.getLogger("maxfl.warm_exec")

PRELOAD = ("numpy", "pydantic", "torch", "torch.nn", "torch.optim", "opacus", "flwr.app", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")
APP_PACKAGES = ("fl_client", "fl_server", "tasks", "privacy", "maxfl", "edge", "experiments")


def _warm_torch() -> int:
    """Pay torch's lazy first-use costs once (building an optimizer imports torch._dynamo: ~1.3 s here).

    Runs single-threaded: an OpenMP thread pool started before fork() deadlocks the children.
    Returns the thread count the children should restore.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.GroupNorm(1, 2), torch.nn.Flatten(), torch.nn.Linear(72, 2))
    for optimizer_cls in (torch.optim.SGD, torch.optim.Adam):
        model(torch.zeros(2, 1, 8, 8)).sum().backward()
        optimizer_cls(model.parameters(), lr=0.01).step()
    return threads


def _forget_app_modules() -> None:
    """Drop our own packages so the child imports them from the FAB Flower installs."""
    for name in list(sys.modules):
        if name.split(".", 1)[0] in APP_PACKAGES:
            del sys.modules[name]


def _guard_apps() -> None:
    """The plant's app policy, from its installed maxfl, between Flower's pull of a task and the FAB's install."""
    from flwr.supernode.runtime import run_clientapp as runtime

    from fl_client.app_policy import install_gate

    install_gate(runtime)


def _run_task(address: str, token: str, insecure: bool, certificates: bytes | None, torch_threads: int) -> int:
    import torch
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    torch.set_num_threads(torch_threads)
    _guard_apps()  # before the app packages go: the FAB must not be able to replace the check
    _forget_app_modules()
    try:
        run_clientapp(runtime_api_address=address, token=token, insecure=insecure, certificates=certificates,
                      parent_pid=None, runtime_dependency_install=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _reap(children: dict[int, float]) -> None:
    for pid, started in list(children.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            del children[pid]
            log.info("task process %d ended with code %d after %.2fs", pid, os.waitstatus_to_exitcode(status), time.monotonic() - started)


def serve(address: str, insecure: bool, root_certificates: str | None, parent_pid: int | None, poll_s: float) -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    torch_threads = _warm_torch()
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    import fl_client.app_policy  # noqa: F401 - paid once here; every task process checks its app with it
    from maxfl.flower_tuning import tune_object_pulls

    # A task is handed out before the SuperNode has stored all of its objects; forked tasks retry quickly.
    tune_object_pulls(initial_backoff_s=0.02, backoff_cap_s=0.1)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    certificates = validate_and_resolve_root_certificates(root_certificates, insecure)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    log.info("warm executor ready for %s", address)
    children: dict[int, float] = {}
    try:
        while True:
            _reap(children)
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = _run_task(address, res.token, insecure, certificates, torch_threads)
                    finally:
                        os._exit(code)
                children[pid] = time.monotonic()
                continue
            time.sleep(poll_s)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="maxfl-warm-exec", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (loopback only)")
    parser.add_argument("--root-certificates", default=None, help="CA bundle for the SuperNode's Runtime API")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="seconds between task polls")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        serve(args.runtime_api_address, args.insecure, args.root_certificates, args.parent_pid, args.poll_interval)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
