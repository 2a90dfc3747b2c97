"""The SuperNode's wake reaches its executor on the same port only; without a listener, waking is harmless."""

from __future__ import annotations

import os
import socket

from fl_client.supernode import runtime_port
from fl_client.task_wake import WakeListener, WakeSender
from launcher.processes import free_port


def test_a_wake_reaches_the_listener_of_its_port_and_every_queued_wake_is_consumed_at_once():
    port = free_port()
    listener = WakeListener.open(port)
    assert listener is not None
    try:
        assert not listener.wait(0) and not listener.heard
        for _ in range(3):
            WakeSender(port).wake()
        assert listener.wait(5.0) and listener.heard
        assert not listener.wait(0)  # the three wakes were one
        WakeSender(port + 1).wake()  # another plant's SuperNode
        assert not listener.wait(0)
    finally:
        listener.close()


def test_waking_with_nobody_listening_does_nothing_and_a_taken_channel_means_polling():
    port = free_port()
    WakeSender(port).wake()  # no executor yet (or a stock one): no error
    first = WakeListener.open(port)
    assert first is not None
    try:
        assert WakeListener.open(port) is None  # a second executor for the same SuperNode polls instead
    finally:
        first.close()
    again = WakeListener.open(port)  # nothing left behind: a restarted executor gets the channel back
    assert again is not None
    again.close()


def test_a_forked_task_process_does_not_keep_the_channel(tmp_path):
    from fl_client.warm_exec import Residents

    port = free_port()
    listener = WakeListener.open(port)
    assert listener is not None
    residents = Residents(1, 60)
    residents.parent_only.append(listener.sock.fileno())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            residents.close_inherited()
            os.close(read)
            try:
                socket.socket(fileno=listener.sock.fileno())
                os.write(write, b"kept")
            except OSError:
                os.write(write, b"closed")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        assert os.read(read, 16) == b"closed"
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(read)
        listener.close()


def test_the_supernode_finds_its_runtime_port_in_flowers_flags():
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    assert runtime_port(["--superlink", "127.0.0.1:9092", "--port", "41234", "--isolation", "process"]) == 41234
    assert runtime_port(["--insecure"]) == SUPERNODE_UVICORN_DEFAULT_PORT
