"""Operational messages go through the ``fastrome`` logger; warnings are kept for what the user must act on."""

from __future__ import annotations

import logging
import warnings

from fastrome.adapter import ModelAdapter
from fastrome.corpus import open_corpus
from fastrome.stats import load_or_compute


def test_statistics_pass_is_logged_not_warned(make_tiny, tmp_path, caplog):
    model, tok = make_tiny("llama-bytelevel")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"Document {i} talks about cities, rivers and painters." * 4 for i in range(60)))
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="fastrome"):
        warnings.simplefilter("error")
        load_or_compute(ModelAdapter(model), tok, [1, 2], corpus=open_corpus(corpus), tokens=300, max_len=32,
                        cache_root=tmp_path, progress=False)
    (rec,) = [r for r in caplog.records if r.getMessage().startswith("statistics of layers")]
    assert rec.name == "fastrome.stats.collect" and rec.levelno == logging.INFO
    assert rec.getMessage().startswith("statistics of layers [1, 2]: 300 tokens of ")


def test_library_is_silent_until_configured_and_the_command_shows_info(monkeypatch, capsys):
    from fastrome import cli

    log = logging.getLogger("fastrome")
    assert any(isinstance(h, logging.NullHandler) for h in log.handlers)  # no "no handler" output from a library
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh process (pytest adds its own)
    monkeypatch.setattr(log, "handlers", list(log.handlers))
    monkeypatch.setattr(log, "level", log.level)
    cli._show_log()
    logging.getLogger("fastrome.stats").info("statistics of layers [6]: 10 tokens")
    logging.getLogger("fastrome.stats").debug("not shown")
    assert capsys.readouterr().err == "[fastrome] statistics of layers [6]: 10 tokens\n"
    cli._show_log()  # a second call adds no second handler
    assert sum(not isinstance(h, logging.NullHandler) for h in log.handlers) == 1
