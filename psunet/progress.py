"""Progress of long command-line work: a tqdm bar on a terminal, plain lines now and then otherwise.

    for batch in progress(batches, desc="encode", unit="batch"):   # an iterable, counted as it goes
        ...
    with progress(total=8000, desc="encode", unit="samples") as bar:  # or counted by hand
        bar.update(len(rows))
        bar.note(f"loss {loss:.4f}")                                # shown beside the count

Where it goes is decided once, from the stream (standard error unless told): a terminal gets a
tqdm bar; anything else (a log file, CI, a Ray job's or a Ray worker's log) gets plain lines such as

    encode: 1200/8000 samples (15%), 35.1 samples/s, eta 3 min

one when another tenth of the total is done, at most every `interval` (10) seconds, or after six
intervals without one (a heartbeat for slow or open-ended work), and a last one at the end. Nothing is shown during the first `delay` seconds, so work that is quick stays quiet.
Code inside Ray tasks and actors writes to a log file, never a terminal, so it always gets plain lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO

from tqdm import tqdm


def is_terminal(stream: IO) -> bool:
    """Whether `stream` is an interactive terminal (a bar can be redrawn in place)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def duration(seconds: float) -> str:
    """A rough human duration: '45 s', '3 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts work done and shows it: a tqdm bar on a terminal, else a plain line now and then.

    Iterating over it yields the wrapped iterable's items, counting one per item, and closes it at
    the end; as a context manager it closes on exit. `update(n)` counts by hand.
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "progress",
                 unit: str = "it", stream: IO | None = None, interval: float = 10.0, delay: float = 2.0):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.unit, self.interval, self.delay = desc, unit, interval, delay
        self.stream = stream or sys.stderr
        self.done, self.shown, self.tenths, self.postfix = 0, 0, 0, ""
        self.started = self.last = time.monotonic()
        self.bar = tqdm(total=self.total, desc=desc, unit=f" {unit}", file=self.stream, delay=delay,
                        dynamic_ncols=True) if is_terminal(self.stream) else None

    def __iter__(self) -> Iterator:
        with self:
            for item in self.iterable:
                yield item
                self.update()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self._line_due():
            self._line()

    def note(self, text: str) -> None:
        """Show `text` (e.g. 'loss 0.0123') beside the count, until the next note."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def write(self, line: str, file: IO | None = None) -> None:
        """Print a line on `file` (standard output unless given) without breaking the bar."""
        file = file or sys.stdout
        if self.bar is not None:
            tqdm.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        """End the bar, or write a last line when earlier ones were written and more got done since."""
        if self.bar is not None:
            self.bar.close()
        elif self.shown and self.done != self.shown:
            self._line(final=True)

    def _line_due(self) -> bool:
        """After `delay`: another tenth done and `interval` s since the last line, or 6 x `interval` s since it."""
        now = time.monotonic()
        if now - self.started < self.delay:
            return False
        since = now - self.last
        tenths = self.done * 10 // self.total if self.total else 0
        return (tenths > self.tenths and since >= self.interval) or since >= 6 * self.interval

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        rate = self.done / max(now - self.started, 1e-9)
        count = f"{self.done}/{self.total} {self.unit} ({100 * self.done // self.total}%)" if self.total \
            else f"{self.done} {self.unit}"
        parts = [count, f"{rate:.{1 if rate < 100 else 0}f} {self.unit}/s"]
        if final:
            parts.append(f"in {duration(now - self.started)}")
        elif self.total and rate > 0:
            parts.append(f"eta {duration(max(self.total - self.done, 0) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: " + ", ".join(parts), file=self.stream, flush=True)
        self.shown, self.last = self.done, now
        self.tenths = self.done * 10 // self.total if self.total else 0


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "progress", unit: str = "it",
             **options) -> Progress:
    """Progress over `iterable` (iterate the result) or counted by hand (`update`); options: see Progress."""
    return Progress(iterable, total=total, desc=desc, unit=unit, **options)
