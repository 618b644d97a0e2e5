"""The tokenised prompts of one edit: the request's prompt under every context template."""

from __future__ import annotations

from typing import Any, List, Sequence

from fastrome.requests import SLOT, EditRequest
from fastrome.tokens import SubjectPrompt, locate_subject

ESSENCE_TEMPLATE = "{} is a"


def subject_prompt(tokenizer: Any, template: str, subject: str) -> SubjectPrompt:
    """Tokenise ``template`` (one ``{}`` slot) filled with ``subject`` and locate the subject."""
    start = template.index(SLOT)
    text = template[:start] + subject + template[start + len(SLOT) :]
    return locate_subject(tokenizer, text, start, start + len(subject))


def templated(templates: Sequence[str], request: EditRequest) -> List[str]:
    """The request's prompt under each context template (each still has the subject slot)."""
    return [t.replace(SLOT, request.prompt, 1) for t in templates]


def edit_prompts(tokenizer: Any, templates: Sequence[str], request: EditRequest) -> List[SubjectPrompt]:
    """Tokenised prompts (subject filled in) for every context template, in template order."""
    return [subject_prompt(tokenizer, t, request.subject) for t in templated(templates, request)]
