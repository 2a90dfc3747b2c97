"""Long work shows progress: a bar in a terminal, a bounded number of log lines anywhere else."""

from __future__ import annotations

import io
import logging

import pytest

from maxfl.progress import STEPS, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_with_the_time_left_not_a_line_per_item(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maxfl")
    with progress("simulating runs", 1000, stream=io.StringIO()) as advance:
        for _ in range(1000):
            advance(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "simulating runs: 0/1000" and lines[-1].startswith("simulating runs: 1000/1000 done in")
    assert len(lines) == STEPS + 1  # start, nine tenths on the way, the end
    assert lines[1].startswith("simulating runs: 100/1000 (10%") and all("s left" in line for line in lines[1:-1])


def test_a_terminal_gets_a_bar_and_the_log_stays_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maxfl")
    screen = Terminal()
    with progress("computing features", 40, stream=screen) as advance:
        for _ in range(4):
            advance(10)
    assert "computing features" in screen.getvalue() and "40/40" in screen.getvalue()
    assert not caplog.records


def test_work_that_fails_does_not_say_done(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maxfl")
    with pytest.raises(RuntimeError), progress("simulating runs", 3, stream=io.StringIO()) as advance:
        advance(1)
        raise RuntimeError("simulator crashed")
    assert not any("done" in r.getMessage() for r in caplog.records)
