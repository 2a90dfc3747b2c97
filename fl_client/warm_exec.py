"""`maxfl-warm-exec`: a plant's ClientApp executor with the heavy imports already paid.

Flower's default SuperExec starts a fresh `flwr-clientapp` for every message, and each one pays
its imports (torch alone ~1.5 s here) before it can train. With the SuperNode in
`--isolation process`, this executor takes the SuperExec's place: it imports torch and Flower once,
then forks a child per task that runs Flower's own `run_clientapp`. The child still imports the
ClientApp from the submitted FAB (our modules are dropped from the fork), so the code that runs is
the code the anchor submitted, not whatever the plant has installed.

The first task of a run forks a *resident* process for that run (its run id and FAB hash): every later
task of the run that finds it idle runs there too, so the app's imports, the plant's loaded data
(fl_client.resident) and torch's warmed-up state stay between the messages of a round and across rounds
(Flower issue #3670's non-ephemeral ClientApp, built from Flower's own `run_clientapp`). A task that finds
its run's resident busy gets a one-shot fork as before; a resident idle longer than `--resident-idle-s`,
or displaced by newer runs, is told to exit.

Before Flower installs or imports that FAB, the plant's own policy decides whether it runs at all
(fl_client.app_policy: the node config's `allowed-apps`); a refused app is never installed, the plant's
audit log records it and the anchor gets an error reply with the reason. The check is the plant's
installed code, bound before the app packages are dropped, so a FAB cannot replace it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

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


def _enter_task_process(torch_threads: int) -> None:
    """Once per forked process, before its first task."""
    import torch

    torch.set_num_threads(torch_threads)
    _guard_apps()  # before the app packages go: the FAB must not be able to replace the check
    _forget_app_modules()


def _run_one(address: str, token: str, insecure: bool, certificates: bytes | None) -> int:
    """One task through Flower's own `run_clientapp`; its exit code."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        run_clientapp(runtime_api_address=address, token=token, insecure=insecure, certificates=certificates,
                      parent_pid=None, runtime_dependency_install=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _run_task(address: str, token: str, insecure: bool, certificates: bytes | None, torch_threads: int) -> int:
    """A one-shot task process."""
    _enter_task_process(torch_threads)
    return _run_one(address, token, insecure, certificates)


def _serve_run(tokens: int, done: int, token: str, address: str, insecure: bool, certificates: bytes | None, torch_threads: int) -> int:
    """A resident task process: run `token`, report its exit code on `done`, wait on `tokens` for the next one of the run."""
    from flwr.supernode.runtime import run_clientapp as runtime

    from maxfl.flower_tuning import exit_without_force_timer

    _enter_task_process(torch_threads)
    if not exit_without_force_timer(runtime):  # Flower's exit would kill this process 5 s after its first task
        return _run_one(address, token, insecure, certificates)
    with os.fdopen(tokens, "r") as incoming:
        while token:
            os.write(done, bytes([_run_one(address, token, insecure, certificates) & 0xFF]))
            token = incoming.readline().strip()
    return 0


@dataclass
class Resident:
    """The parent's handle on one resident task process."""

    pid: int
    run: tuple[int, str]  # (Flower run id, FAB hash): the only tasks it takes
    tokens: int  # write end: the next task's token
    done: int  # read end: one byte per finished task, its exit code
    busy: bool = True
    idle_since: float = 0.0
    tasks: int = 1


class Residents:
    """The executor's resident task processes, at most `max_runs`, each retired after `idle_s` without a task."""

    def __init__(self, max_runs: int, idle_s: float) -> None:
        self.max_runs, self.idle_s = max_runs, idle_s
        self.procs: list[Resident] = []
        self.parent_only: list[int] = []  # the executor's own descriptors, closed in every task process it forks

    def idle_for(self, run: tuple[int, str]) -> Resident | None:
        return next((r for r in self.procs if r.run == run and not r.busy), None)

    def give(self, resident: Resident, token: str) -> None:
        try:
            os.write(resident.tokens, f"{token}\n".encode())
        except BrokenPipeError:  # it ended since the last poll: the caller falls back to a one-shot fork
            self._retire(resident)
            raise
        resident.busy, resident.tasks = True, resident.tasks + 1

    def has_room(self, run: tuple[int, str]) -> bool:
        """Room for a resident of `run`: one per run, and the oldest idle one of another run makes way."""
        if any(r.run == run for r in self.procs):
            return False  # its resident is busy: this task runs one-shot
        while len(self.procs) >= self.max_runs:
            idle = [r for r in self.procs if not r.busy]
            if not idle:
                return False
            self._retire(min(idle, key=lambda r: r.idle_since))
        return True

    def start(self, run: tuple[int, str], token: str, task: Callable[[int, int], int]) -> Resident:
        to_child, tokens = os.pipe()
        done, from_child = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.close_inherited()  # else an older resident never sees its pipe close
                os.close(tokens)
                os.close(done)
                code = task(to_child, from_child)
            finally:
                os._exit(code)
        os.close(to_child)
        os.close(from_child)
        resident = Resident(pid, run, tokens, done)
        self.procs.append(resident)
        return resident

    def poll(self) -> None:
        """Note finished tasks, retire residents idle too long, reap those that ended."""
        readable = set(select.select([r.done for r in self.procs], [], [], 0)[0]) if self.procs else set()
        now = time.monotonic()
        for r in list(self.procs):
            if r.done in readable:
                codes = os.read(r.done, 64)
                if not codes:  # it exited (or died): nothing more to give it
                    self._retire(r)
                    continue
                r.busy, r.idle_since = False, now
                log.info("resident task process %d (run %d) finished task %d with code %d", r.pid, r.run[0], r.tasks, codes[-1])
            if not r.busy and now - r.idle_since > self.idle_s:
                self._retire(r)

    def close_inherited(self) -> None:
        for fd in [fd for r in self.procs for fd in (r.tokens, r.done)] + self.parent_only:
            try:
                os.close(fd)
            except OSError:
                pass

    def stop(self) -> None:
        for r in list(self.procs):
            self._retire(r)

    def _retire(self, r: Resident) -> None:
        """Close its pipes (it exits on the closed token pipe, or already has) and reap it."""
        if r in self.procs:
            self.procs.remove(r)
        for fd in (r.tokens, r.done):
            try:
                os.close(fd)
            except OSError:
                pass
        if not r.busy:
            os.waitpid(r.pid, 0)
            log.info("resident task process %d (run %d) ended after %d task(s)", r.pid, r.run[0], r.tasks)
        else:  # died mid-task or still busy at shutdown: reap without waiting; the SuperNode times its task out
            _reap_later.append(r.pid)


_reap_later: list[int] = []


def _reap(children: dict[int, float]) -> None:
    for pid in list(_reap_later):
        if os.waitpid(pid, os.WNOHANG)[0]:
            _reap_later.remove(pid)
    for pid, started in list(children.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            del children[pid]
            log.info("task process %d ended with code %d after %.2fs", pid, os.waitstatus_to_exitcode(status), time.monotonic() - started)


def _exit_with_parent(parent_pid: int, residents: Residents, children: dict[int, float], period_s: float = 0.5) -> None:
    """Ends this executor, and the task processes it forked, once its SuperNode is gone, however the SuperNode ended.

    Flower's parent monitor interrupts the main thread, which a task poll retrying against the vanished SuperNode's
    Runtime API does not notice; and it counts a zombie as alive. Here: a zombie is dead, and the exit does not wait
    for the main thread.
    """
    from launcher.processes import pid_alive  # a zombie (a SuperNode that died, not reaped yet) is not alive

    def watch() -> None:
        while pid_alive(parent_pid):
            time.sleep(period_s)
        log.warning("the SuperNode (pid %d) is gone: stopping this executor and its task processes", parent_pid)
        for pid in [r.pid for r in list(residents.procs)] + list(children) + list(_reap_later):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(address: str, insecure: bool, root_certificates: str | None, parent_pid: int | None, poll_s: float,
          resident_idle_s: float = 300.0, resident_runs: int = 2, idle_poll_s: float = 1.0) -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    torch_threads = _warm_torch()
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    import fl_client.app_policy  # noqa: F401 - paid once here; every task process checks its app with it
    from fl_client.task_wake import WakeListener
    from maxfl.flower_tuning import QuietBackoff, tune_object_pulls

    # A task is handed out before the SuperNode has stored all of its objects; forked tasks retry quickly.
    tune_object_pulls(initial_backoff_s=0.02, backoff_cap_s=0.1)
    certificates = validate_and_resolve_root_certificates(root_certificates, insecure)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    log.info("warm executor ready for %s", address)
    children: dict[int, float] = {}
    residents = Residents(resident_runs, resident_idle_s)
    # Every poll is a request its SuperNode answers: at a fixed 50 ms, twenty plants' polls kept the 2-core box's SuperNodes
    # busy and a 20-plant round took 99 s (23 s backing off; experiments/scale_curve.py).
    backoff = QuietBackoff(poll_s, idle_poll_s)
    # Once its SuperNode has woken it, a poll is only the fallback for a lost wake (fl_client.task_wake).
    wake = WakeListener.open(int(address.rsplit(":", 1)[1]))
    if wake is not None:  # a task process that outlives the executor must not keep the channel from its successor
        residents.parent_only.append(wake.fileno())
    if parent_pid is not None:
        _exit_with_parent(parent_pid, residents, children)
    try:
        while True:
            _reap(children)
            residents.poll()
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                backoff.worked()
                run, token = (res.task.run_id, res.task.fab_hash), res.token
                if (resident := residents.idle_for(run)) is not None:
                    try:
                        residents.give(resident, token)
                        continue
                    except BrokenPipeError:
                        pass
                if resident_runs > 0 and residents.has_room(run):
                    residents.start(run, token, lambda tokens, done: _serve_run(tokens, done, token, address, insecure, certificates, torch_threads))
                    continue
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        residents.close_inherited()
                        code = _run_task(address, token, insecure, certificates, torch_threads)
                    finally:
                        os._exit(code)
                children[pid] = time.monotonic()
                continue
            if wake is None:
                time.sleep(backoff.interval())
            else:
                wake.wait(idle_poll_s if wake.heard else backoff.interval())
    finally:
        if wake is not None:
            wake.close()
        residents.stop()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="maxfl-warm-exec", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (loopback only)")
    parser.add_argument("--root-certificates", default=None, help="CA bundle for the SuperNode's Runtime API")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="seconds between task polls right after a task")
    parser.add_argument("--idle-poll-interval", type=float, default=1.0,
                        help="seconds between task polls at most, once quiet (a twentieth of the quiet time until then)")
    parser.add_argument("--resident-idle-s", type=float, default=300.0,
                        help="a run's resident task process exits after this many seconds without a task")
    parser.add_argument("--resident-runs", type=int, default=2, help="resident task processes at most (0: a fork per task)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        serve(args.runtime_api_address, args.insecure, args.root_certificates, args.parent_pid, args.poll_interval,
              args.resident_idle_s, args.resident_runs, args.idle_poll_interval)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
