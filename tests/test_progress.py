"""Progress bars in a log file: whole lines, not a carriage return per update."""

import io

import pytest

from distilgen.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_in_a_file_writes_its_first_and_last_count_as_lines(monkeypatch):
    monkeypatch.setenv("DISTILGEN_PROGRESS_SECONDS", "1000")
    log = io.StringIO()
    bar = progress_bar(total=500, desc="train", file=log)
    assert isinstance(bar, LineProgress)
    for step in range(500):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")  # refreshes on every call: throttled all the same
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert lines[0].startswith("train:   0%") and lines[1].startswith("train: 100%") and "500/500" in lines[1]
    assert "loss=0.0020" in lines[1]


def test_a_bar_in_a_file_writes_a_line_per_interval(monkeypatch):
    monkeypatch.setenv("DISTILGEN_PROGRESS_SECONDS", "0")
    log = io.StringIO()
    with progress_bar(total=3, desc="dev", file=log, leave=False) as bar:
        for _ in range(3):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert [line.split("|")[0].strip() for line in lines] == ["dev:   0%", "dev:  33%", "dev:  67%", "dev: 100%"]
    assert "\r" not in log.getvalue()


def test_a_terminal_gets_the_live_bar_and_a_bad_interval_is_named(monkeypatch):
    assert not isinstance(progress_bar(total=1, file=Terminal()), LineProgress)
    monkeypatch.setenv("DISTILGEN_PROGRESS_SECONDS", "often")
    with pytest.raises(ValueError, match="DISTILGEN_PROGRESS_SECONDS must be a number of seconds, got 'often'"):
        progress_bar(total=1, file=io.StringIO())
