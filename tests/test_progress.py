"""The progress-bar policy: full bars on a terminal, few lines and no nested bars in a log."""
import io
import sys

import pytest

from starfast import progress
from starfast.progress import progress_bar


class FakeStderr(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_nested_bars_are_dropped_and_outer_bars_thinned_in_a_log(monkeypatch, terminal):
    stream = FakeStderr(terminal)
    monkeypatch.setattr(sys, "stderr", stream)
    outer = progress_bar(total=1000, desc="outer", file=stream)
    inner = progress_bar(total=1000, desc="inner", nested=True, file=stream)
    for _ in range(1000):
        outer.update(1)
        inner.update(1)
    inner.close()
    outer.close()
    text = stream.getvalue()
    assert ("inner" in text) is terminal
    assert "outer" in text and "1000/1000" in text
    if not terminal:  # a start line and a final line, nothing in between at this speed
        assert text.count("outer") <= 2 + int(outer.format_dict["elapsed"] // progress.LOG_INTERVAL_S), text


def test_quiet_draws_nothing(monkeypatch):
    stream = FakeStderr(True)
    monkeypatch.setattr(sys, "stderr", stream)
    for _ in progress_bar(range(10), enabled=False, desc="quiet", file=stream):
        pass
    assert stream.getvalue() == ""


def test_a_log_gets_a_line_at_least_every_interval_even_when_nothing_moves(monkeypatch):
    """A long epoch of a large model moves the bar once in minutes; the log still grows by a line
    (with the elapsed time) every interval. Here the interval is 0.2 s and nothing moves for 1 s."""
    import time

    stream = FakeStderr(False)
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(total=3, desc="models × epochs", unit="epoch", file=stream, mininterval=0.2)
    time.sleep(1.0)
    lines_while_waiting = stream.getvalue().count("models × epochs")
    bar.update(3)
    bar.close()
    assert lines_while_waiting >= 3, stream.getvalue()
    count_after_close = stream.getvalue().count("models × epochs")
    time.sleep(0.5)
    assert stream.getvalue().count("models × epochs") == count_after_close  # the heartbeat stops with the bar
