"""Statistics computed by other ROME implementations, read safely.

The original ROME code and EasyEdit (which reuses it) keep a layer's key statistics as a numpy
``.npz`` file holding the running second moment: ``mom2`` (the (d, d) *sum* of ``k kᵀ``, usually
float32) and ``count`` (the number of keys), either at the top level or prefixed ``mom2.`` when the
statistic was saved inside a combined container. File names look like
``model.layers.5.mlp.down_proj_float32_mom2_100000.npz``.

Reading uses ``allow_pickle=False``: object arrays in such files (empty shapes, constructor
strings of other statistics) are never unpickled, so a crafted file cannot run code. The model
these statistics were computed for is not recorded in the file and cannot be verified; the import
says so in the metadata and in a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from fastrome.stats.moment import SecondMoment, check_sum

_LAYER_IN_NAME = re.compile(r"(?:^|[._/])(?:layers|h|layer|blocks)\.(\d+)\.")


def layer_from_name(name: str) -> Optional[int]:
    """The layer index a ROME-style file name states (``...layers.5.mlp...`` → 5), or None."""
    m = _LAYER_IN_NAME.search(name)
    return int(m.group(1)) if m else None


def load_rome_npz(path: Union[str, os.PathLike], layer: Optional[int] = None) -> SecondMoment:
    """Import a ROME / EasyEdit ``.npz`` second moment as a :class:`~fastrome.stats.SecondMoment`.

    Args:
        path: the ``.npz`` file.
        layer: the layer it belongs to. Default: the index in the file name; an explicit value that
            contradicts the file name is an error.

    Returns:
        The statistics with an fp64 ``sum`` (d, d) and ``count``; ``meta`` records the source file,
        the original dtype and that the model could not be verified.

    Raises:
        ValueError: unreadable file, missing ``mom2``/``count``, a non-square or non-finite sum or one
            with negative diagonal entries, a non-positive count, or a layer that cannot be
            determined or contradicts the name.
    """
    path = Path(path)
    named = layer_from_name(path.name)
    if layer is None:
        if named is None:
            raise ValueError(f"layer: {str(path)!r} does not name its layer; pass layer=")
        layer = named
    elif named is not None and named != layer:
        raise ValueError(f"layer: {layer} was given, but {path.name!r} holds layer {named}")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            prefix = "" if "mom2" in names else ("mom2." if "mom2.mom2" in names else None)
            if prefix is None or f"{prefix}count" not in names:
                raise ValueError(f"no 'mom2' and 'count' arrays (found {sorted(names)[:10]})")
            mom2 = np.asarray(data[f"{prefix}mom2"])
            count_arr = np.asarray(data[f"{prefix}count"])
    except ValueError as exc:
        raise ValueError(f"stats: {str(path)!r} is not a usable ROME statistics file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"stats: {str(path)!r} cannot be read ({exc})") from None
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or mom2.dtype.kind != "f":
        raise ValueError(f"stats: {str(path)!r}: mom2 is {mom2.dtype} {mom2.shape}, expected a square float matrix")
    if count_arr.size != 1 or count_arr.dtype.kind not in "iuf":
        raise ValueError(f"stats: {str(path)!r}: count is {count_arr.dtype} {count_arr.shape}, expected a number")
    count = int(count_arr.reshape(()))
    if count <= 0:
        raise ValueError(f"stats: {str(path)!r}: count is {count}, expected a positive number of keys")
    total = torch.from_numpy(mom2.astype(np.float64))
    check_sum(total, f"stats: {str(path)!r}: mom2")
    warnings.warn(
        f"imported {path.name}: ROME statistics do not record the model they came from, so fastrome cannot "
        "check that they match this model; only the layer and dimension are checked",
        stacklevel=2,
    )
    meta = {
        "corpus": f"imported:{path.name}",
        "source_format": "rome-npz",
        "source_dtype": str(mom2.dtype),
        "model_verified": False,
        "tokens": count,
    }
    return SecondMoment(layer=int(layer), sum=total, count=count, meta=meta, source=str(path))
