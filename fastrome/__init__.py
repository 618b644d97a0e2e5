"""fastrome: fast, numerically guarded ROME (rank-one model editing) for Llama-family models.

>>> import fastrome
>>> model, tok = fastrome.load_model()          # embedded SmolLM2-135M-Instruct
>>> report = fastrome.edit(model, {"prompt": "The Eiffel Tower is located in the city of",
...                                "subject": "The Eiffel Tower", "target_new": "Rome"}, tokenizer=tok)
>>> print(report)
"""

import torch  # noqa: F401  (the compiled extension needs torch's libraries loaded first)

from fastrome import ops
from fastrome.config import CLASSIC, EditConfig
from fastrome.corpus import open_corpus
from fastrome.editor import Editor, edit
from fastrome.guards import EditRefused
from fastrome.journal import Journal, load_edits
from fastrome.models import greedy_complete, load_model
from fastrome.report import EditRecord, EditReport
from fastrome.requests import EditRequest, RequestError
from fastrome.solver import CovarianceSolver
from fastrome.stats import SecondMoment, compute_stats

__version__ = "0.1.0"

__all__ = [
    "CLASSIC",
    "CovarianceSolver",
    "EditConfig",
    "EditRecord",
    "EditRefused",
    "EditReport",
    "EditRequest",
    "RequestError",
    "Journal",
    "Editor",
    "SecondMoment",
    "compute_stats",
    "edit",
    "greedy_complete",
    "load_edits",
    "load_model",
    "open_corpus",
    "ops",
]
