"""Edit requests: the accepted input forms, normalised to :class:`EditRequest` and validated.

Accepted forms (a single one or a list):

- ROME / CounterFact: ``{"prompt": "{} plays the sport of", "subject": "LeBron James",
  "target_new": {"str": "football"}, "target_true": {"str": "basketball"}}``, possibly wrapped as
  ``{"case_id": 7, "requested_rewrite": {...}}`` with evaluation fields beside it.
- Flat: ``{"prompt": "LeBron James plays the sport of", "subject": "LeBron James",
  "target_new": "football"}`` (or ``"target"``): the subject occurs literally in the prompt.
- :class:`EditRequest` instances.

Every problem raises ``ValueError`` naming the request index and the field, before anything else
happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

SLOT = "{}"


class RequestError(ValueError):
    """A request that cannot be edited (a missing field, a subject absent from its prompt, a target
    that tokenises to nothing, ...). Raised before anything is written: the model is unchanged, so
    the caller may drop the request and try the others."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` (with a ``{}`` slot) filled with ``subject`` should continue
    with ``target_new``.

    ``target_true`` (the current answer) and ``extra`` (evaluation prompts such as
    ``rephrase_prompt``) are kept for evaluation only.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: Optional[str] = None
    case_id: Any = None
    layer: Optional[int] = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill(self.prompt, self.subject)

    def target_text(self) -> str:
        """The target as it follows the prompt: with exactly one leading space."""
        return " " + self.target_new.strip()

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": {"str": self.target_new},
        }
        if self.target_true is not None:
            out["target_true"] = {"str": self.target_true}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        if self.layer is not None:
            out["layer"] = self.layer
        return out


def fill(template: str, subject: str) -> str:
    """``template`` with its single ``{}`` replaced by ``subject`` (other braces are left alone)."""
    return template.replace(SLOT, subject, 1)


RequestLike = Union[EditRequest, Mapping[str, Any]]


def _target_str(value: Any, where: str) -> str:
    if isinstance(value, Mapping):
        if "str" not in value:
            raise RequestError(f"{where}: expected a string or a {{'str': ...}} mapping, got keys {sorted(value)}")
        value = value["str"]
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    return value


def _from_mapping(raw: Mapping[str, Any], where: str) -> EditRequest:
    body: Mapping[str, Any] = raw
    extra = {}
    if "requested_rewrite" in raw:
        body = raw["requested_rewrite"]
        if not isinstance(body, Mapping):
            raise RequestError(f"{where}.requested_rewrite: expected a mapping, got {type(body).__name__}")
        extra = {k: v for k, v in raw.items() if k not in ("requested_rewrite", "case_id")}
        where = f"{where}.requested_rewrite"
    for key in ("prompt", "subject"):
        if key not in body:
            raise RequestError(f"{where}.{key}: missing (keys present: {sorted(body)})")
    if "target_new" in body:
        target_new = _target_str(body["target_new"], f"{where}.target_new")
    elif "target" in body:
        target_new = _target_str(body["target"], f"{where}.target")
    else:
        raise RequestError(f"{where}.target_new: missing (keys present: {sorted(body)})")
    target_true = body.get("target_true")
    if target_true is not None:
        target_true = _target_str(target_true, f"{where}.target_true")
    case_id = raw.get("case_id", body.get("case_id"))
    return EditRequest(
        prompt=body["prompt"],
        subject=body["subject"],
        target_new=target_new,
        target_true=target_true,
        case_id=case_id,
        layer=body.get("layer", raw.get("layer")),
        extra=extra,
    )


def validate(req: EditRequest, index: int) -> EditRequest:
    """Check one request and return its normal form (``{}`` template, no trailing space)."""
    where = f"requests[{index}]"
    for name in ("prompt", "subject", "target_new"):
        value = getattr(req, name)
        if not isinstance(value, str):
            raise RequestError(f"{where}.{name}: expected a string, got {type(value).__name__} {value!r}")
    if req.layer is not None and (not isinstance(req.layer, int) or isinstance(req.layer, bool)):
        raise RequestError(f"{where}.layer: expected an int, got {type(req.layer).__name__} {req.layer!r}")
    if req.target_true is not None and not isinstance(req.target_true, str):
        raise RequestError(f"{where}.target_true: expected a string or None, got {type(req.target_true).__name__}")
    subject = req.subject.strip()
    if not subject:
        raise RequestError(f"{where}.subject: empty")
    if not req.target_new.strip():
        raise RequestError(f"{where}.target_new: empty target {req.target_new!r}")
    prompt = req.prompt
    slots = prompt.count(SLOT)
    if slots > 1:
        raise RequestError(f"{where}.prompt: has {slots} '{{}}' slots, expected one: {prompt!r}")
    if slots == 0:
        if subject not in prompt:
            raise RequestError(f"{where}.subject: {subject!r} does not occur in prompt {prompt!r}")
        prompt = prompt.replace(subject, SLOT, 1)
    # The target is appended with one space, so a trailing space on the prompt would double it.
    prompt = prompt.rstrip()
    target_true = req.target_true
    if target_true is not None and target_true.strip() == req.target_new.strip():
        raise RequestError(
            f"{where}.target_new: {req.target_new!r} equals target_true; the edit would change nothing"
        )
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=req.target_new.strip(),
        target_true=target_true.strip() if target_true is not None else None,
        case_id=req.case_id,
        layer=req.layer,
        extra=dict(req.extra),
    )


def parse_requests(requests: Union[RequestLike, Iterable[RequestLike]]) -> List[EditRequest]:
    """Normalise and validate ``requests``; raises ``ValueError`` naming the index and field."""
    if isinstance(requests, (EditRequest, Mapping)):
        items: Sequence[Any] = [requests]
    elif isinstance(requests, (str, bytes)):
        raise RequestError(f"requests: expected a request or a list of requests, got a string {requests[:60]!r}")
    else:
        try:
            items = list(requests)
        except TypeError:
            raise RequestError(
                f"requests: expected a request or a list of requests, got {type(requests).__name__}"
            ) from None
    if not items:
        raise RequestError("requests: empty; give at least one edit request")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, EditRequest):
            req = item
        elif isinstance(item, Mapping):
            req = _from_mapping(item, f"requests[{i}]")
        else:
            raise RequestError(
                f"requests[{i}]: expected a mapping or EditRequest, got {type(item).__name__} {item!r:.80}"
            )
        out.append(validate(req, i))
    return out
