"""Subject positions and target tokens across tokenizer families, with and without BOS."""

import pytest
import torch

from conftest import tiny_llama
from fastrome.adapter import ModelAdapter
from fastrome.keys import capture_at
from fastrome.prompts import subject_prompt
from fastrome.tokens import _locate_by_prefix, _locate_with_offsets, encode, special_counts, target_ids

TEMPLATES = [
    "{} is located in the city of",
    "The Eiffel Tower. {} is located in",
    "Where is {}? It is in",
    "In 1889, {}, a tower, opened",
    "I saw {}",
]
SUBJECTS = ["The Eiffel Tower", "Eiffel", "Danielle Darrieux", "Toko Yasuda", "São Paulo", "X"]


@pytest.fixture(params=["bytelevel_tokenizer", "sentencepiece_tokenizer"])
def tok(request):
    return request.getfixturevalue(request.param)


def test_special_counts(bytelevel_tokenizer, sentencepiece_tokenizer):
    assert special_counts(bytelevel_tokenizer) == (0, 0)
    assert special_counts(sentencepiece_tokenizer) == (1, 0)
    assert encode(sentencepiece_tokenizer, "Paris")[0] == sentencepiece_tokenizer.bos_token_id


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_subject_last_token_spells_the_subject(tok, template, subject):
    sp = subject_prompt(tok, template, subject)
    start = template.index("{}")
    text = template.replace("{}", subject)
    # the last subject token ends at (or just after) the subject's last character
    enc = tok(text, return_offsets_mapping=True)
    s, e = enc["offset_mapping"][sp.last]
    assert s < start + len(subject) <= e + 1
    covered = text[enc["offset_mapping"][sp.first][0] : enc["offset_mapping"][sp.last][1]]
    assert subject in covered
    # and the token after it (if any) is not part of the subject
    if sp.last + 1 < len(sp.ids):
        s2, _ = enc["offset_mapping"][sp.last + 1]
        assert s2 >= start + len(subject) - 1
    # BOS handling: the first token of a BOS tokenizer is BOS and never the subject
    if special_counts(tok)[0]:
        assert sp.ids[0] == tok.bos_token_id and sp.first >= 1


@pytest.mark.parametrize("template", TEMPLATES)
def test_offsets_and_prefix_methods_agree(tok, template):
    subject = "Danielle Darrieux"
    start = template.index("{}")
    text = template.replace("{}", subject)
    a = _locate_with_offsets(tok, text, start, start + len(subject))
    b = _locate_by_prefix(tok, text, start, start + len(subject))
    assert a.ids == b.ids and a.last == b.last


def test_target_ids_follow_the_prompt(tok):
    prompt = "The Eiffel Tower is located in"
    ids = target_ids(tok, prompt, " Rome")
    full = encode(tok, prompt + " Rome")
    assert full[-len(ids) :] == ids and encode(tok, prompt) + ids == full
    assert tok.decode(ids).strip() == "Rome"
    multi = target_ids(tok, prompt, " Rio de Janeiro")
    assert tok.decode(multi).strip() == "Rio de Janeiro" and len(multi) > 1


def test_right_padding_does_not_change_keys(tok):
    model = tiny_llama(tok)
    adapter = ModelAdapter(model)
    prompts = [subject_prompt(tok, t, "Danielle Darrieux") for t in TEMPLATES]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    keys, values = capture_at(adapter, 1, prompts, pad)
    for i, p in enumerate(prompts):
        k1, v1 = capture_at(adapter, 1, [p], pad)
        torch.testing.assert_close(keys[i], k1[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values[i], v1[0], rtol=1e-5, atol=1e-5)
    # the key really is the down projection's input: W k = value (no bias in Llama)
    w = adapter.weight(1).float()
    torch.testing.assert_close(keys @ w.t(), values, rtol=1e-4, atol=1e-5)
