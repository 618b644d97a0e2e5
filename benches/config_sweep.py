"""The command line of the benchmarks that compare :class:`fastrome.EditConfig` settings on the
first CounterFact dev records (``settings_pilot.py``, ``value_size.py``)."""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence


def parse_args(doc: str, argv: Optional[Sequence[str]],
               more: Callable[[argparse.ArgumentParser], None] = lambda ap: None) -> argparse.Namespace:
    """Parse ``configs --cases --threads --out`` plus what ``more`` adds; applies ``--threads``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="JSON objects of EditConfig fields ('{}' for the defaults)")
    ap.add_argument("--cases", type=int, default=12, help="CounterFact dev records, from the first")
    more(ap)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    if args.threads:
        import torch  # here, so that --help does not wait for torch

        torch.set_num_threads(args.threads)
    return args
