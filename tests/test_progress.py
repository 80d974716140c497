"""psunet.progress: plain lines in logs (when, and what they say) and a tqdm bar on a terminal, on a fake clock."""

import io

import pytest

import psunet.progress
from psunet.progress import duration, progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(psunet.progress.time, "monotonic", clock)
    return clock


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_after_the_interval_and_a_last_line(clock):
    stream = io.StringIO()
    bar = progress(total=100, desc="encode", unit="samples", stream=stream, interval=10, delay=2)
    assert bar.bar is None
    clock.now += 1
    bar.update(50)
    assert stream.getvalue() == ""  # within the delay: quiet
    clock.now += 9
    bar.update(5)  # a tenth more, 10 s since the start
    assert stream.getvalue() == "encode: 55/100 samples (55%), 5.5 samples/s, eta 8 s\n"
    clock.now += 5
    bar.update(20)  # two tenths more but only 5 s since the last line
    clock.now += 5
    bar.note("loss 0.1234")
    bar.update(1)
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "encode: 76/100 samples (76%), 3.8 samples/s, eta 6 s, loss 0.1234" and len(lines) == 2
    clock.now += 4
    bar.update(24)
    bar.close()
    assert stream.getvalue().splitlines()[-1] == "encode: 100/100 samples (100%), 4.2 samples/s, in 24 s, loss 0.1234"


def test_open_ended_work_gets_a_heartbeat_and_quick_work_stays_quiet(clock):
    stream = io.StringIO()
    with progress(desc="read", unit="records", stream=stream, interval=10, delay=2) as bar:
        clock.now += 59
        bar.update(3)
        assert stream.getvalue() == ""  # no total: no tenths, and not yet six intervals
        clock.now += 1
        bar.update(3)
    assert stream.getvalue() == "read: 6 records, 0.1 records/s\n"  # nothing more done at close: no last line

    quick = io.StringIO()
    assert list(progress(range(5), desc="quick", stream=quick)) == [0, 1, 2, 3, 4]
    assert quick.getvalue() == ""


def test_iterating_counts_each_item(clock):
    bar = progress(iter("abc"), total=3, stream=io.StringIO())
    assert "".join(bar) == "abc" and bar.done == 3


def test_a_terminal_gets_a_tqdm_bar_and_lines_above_it(capsys):
    stream = Terminal()
    bar = progress(total=10, desc="encode", unit="samples", stream=stream, delay=0)
    bar.update(3)
    bar.note("loss 0.5")
    bar.write("encode: shard 1 written")
    bar.close()
    assert bar.bar is not None and "encode" in stream.getvalue() and "10/10" not in stream.getvalue()
    assert "3/10" in stream.getvalue() and "loss 0.5" in stream.getvalue()
    assert "encode: shard 1 written" in capsys.readouterr().out


@pytest.mark.parametrize("seconds, text", [(45, "45 s"), (180, "3 min"), (5400, "1.5 h")])
def test_durations_read_as_people_say_them(seconds, text):
    assert duration(seconds) == text
