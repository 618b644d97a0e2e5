"""When long work shows a progress bar."""

import io
import sys

from fastrome.progress import show_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_an_explicit_choice_wins(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert show_progress(False) is False
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert show_progress(True) is True


def test_by_default_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert show_progress(None) is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, a pipe
    assert show_progress(None) is False
    monkeypatch.setattr(sys, "stderr", object())  # no isatty at all
    assert show_progress(None) is False
