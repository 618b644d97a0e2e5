"""What ``Editor(stats=..., corpus=...)`` accept, checked before any work starts.

``stats`` names statistics that exist: a statistics file (``.safetensors`` written by ``fastrome
stats``, or a ROME / EasyEdit ``.npz``), a :class:`~fastrome.stats.SecondMoment`, a (d, d) tensor
``C``, a :class:`~fastrome.solver.CovarianceSolver`, ``"identity"`` (``C = I``), or a ``{layer: ...}``
mapping of those. ``None`` (the default, also allowed as a mapping value) means "compute them".
``corpus`` is the text they are computed from when they have to be: ``None`` or ``"bundled"`` for
the bundled Wikipedia text, a file or folder, or ``hf:NAME`` (see :func:`fastrome.open_corpus`).
Keeping the two apart means a path is never sniffed to decide whether it is statistics or text.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from torch import Tensor

from fastrome.solver import CovarianceSolver
from fastrome.stats.moment import SecondMoment, is_statistics_file

IDENTITY_WORDS = ("identity", "none", "off")
BUNDLED_WORDS = ("bundled", "default")

StatsLike = Union[None, str, "os.PathLike[str]", Tensor, SecondMoment, CovarianceSolver, Mapping[int, Any], bool]
CorpusLike = Union[None, str, "os.PathLike[str]"]


def is_identity(spec: Any) -> bool:
    """``stats`` switched off: ``False`` or one of :data:`IDENTITY_WORDS`."""
    return spec is False or (isinstance(spec, str) and spec.lower() in IDENTITY_WORDS)


def statistics_file_kind(path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """``"fastrome"`` or ``"rome-npz"`` when ``path`` is a statistics file, None otherwise."""
    s = str(path).lower()
    if s.endswith(".npz"):
        return "rome-npz"
    if s.endswith(".safetensors") and is_statistics_file(str(path)):
        return "fastrome"
    return None


def corpus_source(corpus: CorpusLike) -> Optional[str]:
    """The corpus to hand to the statistics engine: None for the bundled text."""
    if corpus is None or str(corpus).lower() in BUNDLED_WORDS:
        return None
    return str(corpus)


def check_sources(stats: Any, corpus: Any) -> None:
    """Refuse a wrong ``stats`` or ``corpus`` with one line naming it, before anything is loaded."""
    specs = list(stats.values()) if isinstance(stats, Mapping) else [stats]
    for spec in specs:
        _check_stats_spec(spec)
    if corpus is None:
        return
    if not isinstance(corpus, (str, os.PathLike)):
        raise ValueError(f"corpus: expected a file, a folder, 'hf:NAME' or 'bundled', got {type(corpus).__name__}")
    s = str(corpus)
    if s.lower() not in BUNDLED_WORDS and not s.startswith("hf:") and not os.path.exists(s):
        raise ValueError(f"corpus: {s!r} does not exist (give a text or token-id file or folder, 'hf:NAME' or "
                         "'bundled')")
    if s.lower() not in BUNDLED_WORDS and os.path.isfile(s) and statistics_file_kind(s) is not None:
        raise ValueError(f"corpus: {s!r} is a statistics file, not text to compute statistics from; pass it as "
                         "stats=")
    if None not in specs:
        raise ValueError(f"corpus: {s!r} would be unused: stats= gives every layer's statistics (corpus= is the text "
                         "they are computed from when stats is None)")


def _check_stats_spec(spec: Any) -> None:
    if spec is None or spec is False or isinstance(spec, (Tensor, SecondMoment, CovarianceSolver)):
        return
    if not isinstance(spec, (str, os.PathLike)) or isinstance(spec, bool):
        raise ValueError(f"stats: unsupported value of type {type(spec).__name__}")
    s = str(spec)
    if is_identity(s):
        return
    if s.lower() in BUNDLED_WORDS:
        raise ValueError(f"stats: {s!r} names a corpus; statistics computed from the bundled text are the default "
                         "(stats=None), or say so with corpus='bundled'")
    if not os.path.exists(s):
        raise ValueError(f"stats: {s!r} does not exist (give a statistics file written by `fastrome stats` or a ROME "
                         "/ EasyEdit .npz, or 'identity'; text to compute statistics from goes in corpus=)")
    if statistics_file_kind(s) is None:
        raise ValueError(f"stats: {s!r} is not a statistics file (a .safetensors written by `fastrome stats` or a "
                         f"ROME / EasyEdit .npz); to compute statistics from it, pass corpus={s!r}")
