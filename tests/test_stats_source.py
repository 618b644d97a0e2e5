"""``stats=`` names statistics that exist, ``corpus=`` the text to compute them from: each wrong
value is refused with one line naming the argument, before the model is touched."""

from __future__ import annotations

import pytest
import torch

from fastrome import Editor
from fastrome.stats.source import check_sources


def test_a_text_file_given_as_statistics_points_to_corpus(tmp_path):
    text = tmp_path / "texts.txt"
    text.write_text("Rome is the capital of Italy.\n")
    with pytest.raises(ValueError, match=r"^stats: .*texts\.txt' is not a statistics file.*pass corpus="):
        check_sources(str(text), None)
    check_sources(None, str(text))  # the same file as corpus is fine
    check_sources({1: None, 2: "identity"}, str(text))  # a None entry is computed from it


@pytest.mark.parametrize("stats, corpus, message", [
    ("bundled", None, r"^stats: 'bundled' names a corpus"),
    ("/no/such.safetensors", None, r"^stats: '/no/such.safetensors' does not exist"),
    (3, None, r"^stats: unsupported value of type int"),
    (None, "/no/such/texts", r"^corpus: '/no/such/texts' does not exist"),
    (None, 7, r"^corpus: expected a file"),
    ("identity", "bundled", r"^corpus: 'bundled' would be unused"),
    ({1: torch.eye(4)}, "bundled", r"^corpus: 'bundled' would be unused"),
])
def test_wrong_sources_are_refused_by_name(stats, corpus, message):
    with pytest.raises(ValueError, match=message):
        check_sources(stats, corpus)


def test_the_editor_refuses_before_anything_is_built(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    before = [p.detach().clone() for p in model.parameters()]
    text = tmp_path / "texts.txt"
    text.write_text("Rome is the capital of Italy.\n")
    with pytest.raises(ValueError, match="pass corpus="):
        Editor(model, tok, stats=str(text), layer=1, cache_dir=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
