"""When long work shows a progress bar: where asked, else when standard error is a terminal."""

from __future__ import annotations

import sys
from typing import Optional


def show_progress(progress: Optional[bool]) -> bool:
    """``progress`` when given; otherwise whether standard error is a terminal (no bars in logs)."""
    if progress is not None:
        return bool(progress)
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
