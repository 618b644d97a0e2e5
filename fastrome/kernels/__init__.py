"""Triton kernels of fastrome (``fastrome.kernels``).

Kernels and their launch wrappers only: no argument checks and no policy; :mod:`fastrome.ops`
checks arguments and decides when they run. Importing this package does not import Triton;
:func:`load` does.
"""

from __future__ import annotations

from typing import Callable, Dict


def load() -> Dict[str, Callable]:
    """The Triton implementation of each op, keyed by op name (imports Triton).

    Signatures match the registered ops: ``second_moment_accumulate(acc, x, mask)``,
    ``solve_keys(inverse, k) -> (u, denom)``,
    ``rank_one_update(weight, u, lam, denom, min_denom, master) -> applied``,
    ``symmetric_rank_one_update(inverse, u, beta, denom, min_denom) -> applied``.
    """
    from fastrome.kernels.rank_one_update import rank_one_update
    from fastrome.kernels.second_moment import second_moment_accumulate
    from fastrome.kernels.solve_keys import solve_keys
    from fastrome.kernels.symmetric_rank_one_update import symmetric_rank_one_update

    return {
        "second_moment_accumulate": second_moment_accumulate,
        "solve_keys": solve_keys,
        "rank_one_update": rank_one_update,
        "symmetric_rank_one_update": symmetric_rank_one_update,
    }


def interpreted() -> bool:
    """Whether the loaded kernels run in Triton's CPU interpreter (fixed when they were imported)."""
    from fastrome.kernels import second_moment

    return bool(second_moment._INTERPRETED)
