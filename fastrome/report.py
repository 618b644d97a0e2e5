"""What each edit did: numbers, status and timing, printable as a table and as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional

PHASES = ("stats", "templates", "keys", "values", "solve", "write", "memory")  # memory: the edit memory's update


@dataclass
class EditRecord:
    """One edit.

    ``status`` is ``applied``, ``forced`` (applied under ``policy='force'`` despite a guard),
    ``refused`` (nothing written; ``reasons`` says why) or ``undone``. ``seconds`` holds the time per phase;
    ``stats`` and ``templates`` are one-time costs charged to the edit that triggered them.
    """

    index: int
    case_id: Any
    prompt: str
    subject: str
    target_new: str
    layer: int
    mode: str
    status: str = "pending"
    reasons: List[str] = field(default_factory=list)
    denominator: float = float("nan")
    denominator_floor: float = float("nan")
    denominator_rel: float = float("nan")
    delta_norm: float = float("nan")
    v_init_norm: float = float("nan")
    v_star_norm: float = float("nan")  # ‖v*‖ as written (after value-norm control)
    value_norm_ref: float = float("nan")  # the unedited layer's ‖W₀k̄ + b‖ (value-norm control on)
    value_scale: float = 1.0  # what value-norm control multiplied v* by
    settings: Dict[str, Any] = field(default_factory=dict)  # EditConfig.lifelong_settings() of the edit
    update_norm: float = float("nan")
    update_ratio: float = float("nan")
    interference: float = float("nan")  # ‖Λ‖²·uᵀCu: mean squared output change on ordinary keys
    total_update_ratio: float = float("nan")
    target_prob: float = float("nan")
    losses: List[float] = field(default_factory=list)
    steps: int = 0
    early_stopped: bool = False
    stop_reason: str = ""  # why the value optimisation stopped: "loss", "top" or "steps"
    stats: str = ""
    seconds: Dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    edit_id: Optional[int] = None  # id in the editor's journal once applied
    batch: int = 1  # requests whose values were optimised together with this one
    # A spread edit (config.spread > 1): one entry per layer, lowest first, with that layer's
    # layer, edit_id, denominator, denominator_rel, update_norm, update_ratio and interference.
    # The record's own figures are then the weakest cosine, the largest ratio and the summed interference.
    parts: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def applied(self) -> bool:
        return self.status in ("applied", "forced")

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["total_seconds"] = self.total_seconds
        return _clean(out)


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _fmt(x: float, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


@dataclass
class EditReport:
    """The records of one ``edit`` call, in request order."""

    records: List[EditRecord] = field(default_factory=list)

    def __iter__(self) -> Iterator[EditRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> EditRecord:
        return self.records[i]

    @property
    def applied(self) -> int:
        return sum(r.applied for r in self.records)

    @property
    def refused(self) -> int:
        return sum(r.status == "refused" for r in self.records)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "applied": self.applied,
            "refused": self.refused,
            "edits": [r.to_dict() for r in self.records],
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def table(self) -> str:
        """A fixed-width table: one row per edit, then per-phase seconds."""
        head = ["#", "subject", "→ target", "layer", "mode", "status", "uᵀk", "uᵀk/‖u‖‖k‖", "‖δ‖",
                "‖ΔW‖/‖W‖", "p(target)", "steps", "loss", "s"]
        rows = []
        for r in self.records:
            rows.append([
                str(r.index), _short(r.subject, 24), _short(r.target_new, 16), str(r.layer), r.mode, r.status,
                _fmt(r.denominator), _fmt(r.denominator_rel), _fmt(r.delta_norm), _fmt(r.update_ratio),
                _fmt(r.target_prob, ".2f"), str(r.steps), _fmt(r.losses[-1] if r.losses else float("nan")),
                _fmt(r.total_seconds, ".1f"),
            ])
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        timing = ["seconds by phase: " + ", ".join(
            f"{p} {sum(r.seconds.get(p, 0.0) for r in self.records):.2f}" for p in PHASES)]
        notes = [f"edit {r.index} refused: {'; '.join(r.reasons)}" for r in self.records if r.status == "refused"]
        notes += [f"edit {r.index} forced past: {'; '.join(r.reasons)}" for r in self.records if r.status == "forced"]
        stats = sorted({r.stats for r in self.records if r.stats})
        if stats:
            notes.append("statistics: " + "; ".join(stats))
        return "\n".join(lines + timing + notes)

    def __str__(self) -> str:
        return self.table()


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
