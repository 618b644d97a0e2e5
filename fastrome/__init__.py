"""fastrome: fast, numerically guarded ROME (rank-one model editing) for Llama-family models.

>>> import fastrome
>>> model, tok = fastrome.load_model()          # embedded SmolLM2-135M-Instruct
>>> report = fastrome.edit(model, {"prompt": "The Eiffel Tower is located in the city of",
...                                "subject": "The Eiffel Tower", "target_new": "Rome"}, tokenizer=tok)
>>> print(report)
"""

import logging

import torch  # noqa: F401  (the compiled extension needs torch's libraries loaded first)

from fastrome import ops
from fastrome.config import CLASSIC, EditConfig
from fastrome.corpus import open_corpus
from fastrome.editor import Editor, edit
from fastrome.evaluation.counterfact import evaluate_case, load_counterfact, summarize
from fastrome.evaluation.plots import plot_runs
from fastrome.evaluation.single import evaluate_edits
from fastrome.evaluation.zsre import evaluate_zsre_case, load_zsre
from fastrome.guards import EditRefused
from fastrome.journal import Journal
from fastrome.locking import FolderBusy
from fastrome.models import greedy_complete, load_model
from fastrome.report import EditRecord, EditReport
from fastrome.requests import EditRequest, RequestError
from fastrome.sequential import CollapseRules, RunSummary, open_run, run_sequential
from fastrome.solver import CovarianceSolver
from fastrome.stats import SecondMoment, compute_stats

__version__ = "0.1.0"

# Operational messages (statistics computed, caches recovered, runs reconciled) go to this logger;
# warnings are kept for what the user must act on. Silent unless the application configures logging
# (the `fastrome` command shows INFO and above on stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())

# Exactly the surface README.md's "Python API" documents (tests/test_public_api.py holds them equal);
# everything else is internal and may change.
__all__ = [
    # editing
    "CLASSIC",
    "EditConfig",
    "EditRecord",
    "EditRefused",
    "EditReport",
    "EditRequest",
    "Editor",
    "FolderBusy",
    "Journal",
    "RequestError",
    "edit",
    # models
    "greedy_complete",
    "load_model",
    # statistics
    "CovarianceSolver",
    "SecondMoment",
    "compute_stats",
    "open_corpus",
    # evaluation and long runs
    "CollapseRules",
    "RunSummary",
    "evaluate_case",
    "evaluate_edits",
    "evaluate_zsre_case",
    "load_counterfact",
    "load_zsre",
    "open_run",
    "plot_runs",
    "run_sequential",
    "summarize",
    # kernels
    "ops",
]
