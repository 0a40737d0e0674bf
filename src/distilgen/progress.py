"""Progress bars that suit where they are written: a live bar on a terminal (or in a notebook); in a file (a CI
log, `nohup`, a job scheduler's output) one plain line every `DISTILGEN_PROGRESS_SECONDS` (30) seconds, and the
last count, instead of a carriage return per update.

    for batch in progress_bar(batches, desc="train"): ...
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm as live_bar
from tqdm.std import tqdm as std_bar

from distilgen.config import ConfigError


def line_seconds() -> float:
    """`DISTILGEN_PROGRESS_SECONDS`: the interval of a bar written to a file; a `ConfigError` when not a number
    (the CLI checks it before a command starts)."""
    value = os.environ.get("DISTILGEN_PROGRESS_SECONDS", "30")
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise ConfigError("", f"DISTILGEN_PROGRESS_SECONDS must be a number of seconds, got {value!r}") from None


def is_interactive(stream: Any) -> bool:
    """Whether `stream` shows a live bar: a terminal, or a notebook's output."""
    return "ipykernel" in sys.modules or bool(getattr(stream, "isatty", lambda: False)())


class LineProgress(std_bar):
    """A tqdm bar that writes whole lines, at most one per interval, plus its final count when it closes."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.every = line_seconds()
        self._last_line, self._last_n = -math.inf, None
        kwargs.setdefault("mininterval", self.every)
        kwargs["dynamic_ncols"] = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing a bar it does not leave: there is nothing to clear in a log
            return False
        if msg is None and time.monotonic() - self._last_line < self.every:
            return True
        self._last_line, self._last_n = time.monotonic(), self.n
        self.fp.write((str(self) if msg is None else msg) + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if not getattr(self, "disable", True) and self._last_n != self.n:  # the final count, once
            self._last_line = -math.inf
            self.display()
        self.leave = False  # written above: tqdm's own final display would repeat it
        super().close()


def progress_bar(*args: Any, **kwargs: Any) -> std_bar:
    """A progress bar with tqdm's arguments: live where it is seen live, plain lines in a file."""
    return (live_bar if is_interactive(kwargs.get("file") or sys.stderr) else LineProgress)(*args, **kwargs)
