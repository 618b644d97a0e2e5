"""Evaluation of edits: CounterFact and zsRE with ROME's metrics, fluency, test-time prefixes."""

from fastrome.evaluation.counterfact import (
    CounterFactCase,
    CounterFactCases,
    evaluate_case,
    format_table,
    load_counterfact,
    prefixed,
    summarize,
)
from fastrome.evaluation.data import load_cases, read_texts
from fastrome.evaluation.fluency import generate_for_fluency, ngram_entropy, text_ngram_entropy
from fastrome.evaluation.prefixes import test_prefixes
from fastrome.evaluation.zsre import ZsreCase, ZsreCases, evaluate_zsre_case, load_zsre

__all__ = [
    "CounterFactCase",
    "CounterFactCases",
    "ZsreCase",
    "ZsreCases",
    "evaluate_case",
    "evaluate_zsre_case",
    "format_table",
    "generate_for_fluency",
    "load_cases",
    "load_counterfact",
    "load_zsre",
    "ngram_entropy",
    "prefixed",
    "read_texts",
    "summarize",
    "test_prefixes",
    "text_ngram_entropy",
]
