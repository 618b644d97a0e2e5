"""Key statistics: the uncentered second moment ``C = E[kkᵀ]`` of down-projection inputs.

- :mod:`~fastrome.stats.moment`: :class:`SecondMoment` (the fp64 sum and the token count) and its
  validated safetensors file format;
- :mod:`~fastrome.stats.collect`: one forward pass over a corpus that feeds every requested layer,
  checkpointed and resumable;
- :mod:`~fastrome.stats.cache`: the cache of statistics files, loaded when valid, else computed;
- :mod:`~fastrome.stats.npz`: import of a ROME / EasyEdit ``.npz`` second moment;
- :mod:`~fastrome.stats.source`: what the ``stats=`` argument of :class:`fastrome.Editor` may be.
"""

from fastrome.stats.cache import cache_file, compute_stats, load_or_compute
from fastrome.stats.collect import compute
from fastrome.stats.moment import SecondMoment, default_token_budget, is_statistics_file, layer_fingerprint

__all__ = [
    "SecondMoment",
    "cache_file",
    "compute",
    "compute_stats",
    "default_token_budget",
    "is_statistics_file",
    "layer_fingerprint",
    "load_or_compute",
]
