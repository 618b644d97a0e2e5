import pytest

from fastrome.config import EditConfig, make_config
from fastrome.requests import EditRequest, parse_requests


def test_counterfact_wrapper_and_flat_forms_agree():
    cf = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} plays the sport of",
            "subject": "LeBron James",
            "target_new": {"str": "football"},
            "target_true": {"str": "basketball"},
        },
        "rephrase_prompt": "LeBron James is a professional",
    }
    plain = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}
    flat = {"prompt": "LeBron James plays the sport of", "subject": "LeBron James", "target": "football"}
    dc = EditRequest(prompt="{} plays the sport of", subject="LeBron James", target_new="football")
    a, b, c, d = parse_requests([cf, plain, flat, dc])
    for r in (a, b, c, d):
        assert r.prompt == "{} plays the sport of"
        assert r.subject == "LeBron James"
        assert r.target_new == "football"
        assert r.text == "LeBron James plays the sport of"
        assert r.target_text() == " football"
    assert a.case_id == 7 and a.target_true == "basketball"
    assert a.extra["rephrase_prompt"] == "LeBron James is a professional"
    # a single mapping is accepted too
    assert parse_requests(flat)[0] == c


def test_normalisation_trailing_space_and_target_space():
    (r,) = parse_requests({"prompt": "{} is located in ", "subject": " Paris ", "target_new": " France"})
    assert r.prompt == "{} is located in" and r.subject == "Paris" and r.target_new == "France"


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"prompt": "The tower is tall", "subject": "Eiffel", "target_new": "x"}, "requests[1].subject"),
        ({"prompt": "{} is in", "subject": "Paris", "target_new": "   "}, "requests[1].target_new"),
        ({"prompt": "{} is in", "subject": "", "target_new": "Rome"}, "requests[1].subject"),
        ({"prompt": 5, "subject": "Paris", "target_new": "Rome"}, "requests[1].prompt"),
        ({"prompt": "{} and {}", "subject": "Paris", "target_new": "Rome"}, "requests[1].prompt"),
        ({"prompt": "{} is in", "subject": "Paris"}, "requests[1].target_new"),
        ({"subject": "Paris", "target_new": "Rome"}, "requests[1].prompt"),
        ({"prompt": "{} is in", "subject": "Paris", "target_new": {"id": 3}}, "requests[1].target_new"),
        ({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome", "layer": "5"}, "requests[1].layer"),
        ({"requested_rewrite": "oops"}, "requests[1].requested_rewrite"),
        (
            {"prompt": "{} is in", "subject": "Paris", "target_new": "France", "target_true": "France"},
            "requests[1].target_new",
        ),
        ("just a string", "requests[1]"),
    ],
)
def test_malformed_requests_name_index_and_field(bad, where):
    good = {"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}
    with pytest.raises(ValueError) as err:
        parse_requests([good, bad])
    assert str(err.value).startswith(where), str(err.value)


def test_empty_and_wrong_container():
    with pytest.raises(ValueError, match="requests: empty"):
        parse_requests([])
    with pytest.raises(ValueError, match="requests:"):
        parse_requests("{} is in")
    with pytest.raises(ValueError, match="requests:"):
        parse_requests(42)


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="config.mode"):
        make_config(mode="fancy")
    with pytest.raises(ValueError, match="config.policy"):
        make_config(policy="maybe")
    with pytest.raises(ValueError, match="config.v_lr"):
        make_config(v_lr=0)
    with pytest.raises(ValueError, match="nonsense"):
        make_config(nonsense=1)
    cfg = make_config(EditConfig(mode="original"), layer=3)
    assert cfg.mode == "original" and cfg.layer == 3
    llama, gpt = cfg.resolve("llama"), cfg.resolve("gpt")
    assert (llama.v_steps, llama.v_weight_decay) == (25, 1e-3)
    assert (gpt.v_steps, gpt.v_weight_decay) == (20, 0.5)
