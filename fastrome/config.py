"""Edit configuration: every knob of the algorithm and the guards, with the reference defaults.

Fields left as ``None`` are filled per model family by :meth:`EditConfig.resolve` (the published
ROME settings differ between GPT-style and Llama-style models).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

MODES = ("consistent", "original", "prompt", "dual")
POLICIES = ("raise", "skip", "force")
VALUE_NORMS = ("off", "anchor", "cap", "refuse")
MEMORY_DUAL_KEYS = ("both", "prompt")
V_OPTIMIZERS = ("adam", "normalized")
UPDATE_FORMS = ("exact", "alphaedit")
# The settings that shape how edits interact over a long run: recorded with every edit, and a run
# resumed from its journal must keep them.
LIFELONG_FIELDS = ("mode", "spread", "memory_beta", "memory_refactor_every", "memory_dual_keys",
                   "memory_refresh_every", "mpes_checks",
                   "mpes_min_prob", "mpes_shrink", "v_optimizer", "norm_alpha",
                   "value_norm", "value_norm_factor", "null_space", "update_form", "max_interference_spike")

# The default each lifelong setting had when it was added. A journal or run written before a setting
# existed was made with that value, which is not always today's default.
FIRST_DEFAULTS: Dict[str, Any] = {"memory_dual_keys": "both", "mpes_shrink": False, "v_optimizer": "adam",
                                  "update_form": "exact"}


def settings_made_with(recorded: Dict[str, Any], fields: Tuple[str, ...] = LIFELONG_FIELDS) -> Dict[str, Any]:
    """``recorded`` settings completed for ``fields`` it lacks (it was written before they existed):
    with the default each had when it was added (:data:`FIRST_DEFAULTS`), else today's default."""
    today = dataclasses.asdict(EditConfig())
    return {**{k: FIRST_DEFAULTS.get(k, today.get(k)) for k in fields if k not in recorded}, **recorded}


def settings_that_act(settings: Dict[str, Any]) -> Dict[str, Any]:
    """``settings`` without those that cannot change an edit under the others, so that a run resumes
    whatever value they were recorded with: which keys of a dual edit the memory keeps means nothing
    without a memory or outside mode "dual", and how often the memory re-reads its keys nothing without one."""
    acting = dict(settings)
    if acting.get("mode") != "dual" or not acting.get("memory_beta"):
        acting.pop("memory_dual_keys", None)
    if not acting.get("memory_beta"):
        acting.pop("memory_refresh_every", None)
    return acting


def settings_that_differ(recorded: Dict[str, Any], now: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{field: (recorded value, value now)}`` for the lifelong settings an edit was ``recorded`` with
    that a run under ``now`` would change: only settings that act, and a field the record predates
    taken at its first default (:func:`settings_made_with`)."""
    was, have = settings_that_act(settings_made_with(recorded)), settings_that_act(now)
    return {k: (v, have[k]) for k, v in was.items() if k in have and have[k] != v}


# Classic one-edit ROME (consistent keys): every edit solved as if it were the only one, the value
# optimised until the loss threshold. The default differs from it only in these fields, so
# ``Editor(model, tok, **CLASSIC)`` (``--classic`` on the command line) is the one setting away.
CLASSIC: Dict[str, Any] = {"mode": "consistent", "spread": 1, "memory_beta": 0.0, "mpes_checks": 0}
# Layers a default edit is shared among (``spread=None``), ending at the edit's layer; fewer where
# that layer is lower, one with value-norm control (which is defined for one-layer edits).
DEFAULT_SPREAD = 4

# Published ROME value-optimisation settings per family: steps, weight decay.
_FAMILY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llama": {"v_steps": 25, "v_weight_decay": 1e-3},
    "gpt": {"v_steps": 20, "v_weight_decay": 0.5},
}


@dataclass
class EditConfig:
    """How an edit is computed and when it is refused.

    Algorithm (docs/architecture.md, "The algorithm"): ``mode`` chooses the keys (``consistent``:
    prefixed mean key everywhere; ``original``: the published code's mixed keys; ``prompt``: the
    unprefixed key everywhere;
    ``dual``: exact at both the prefixed mean key and the unprefixed key, see :mod:`fastrome.update`).
    ``template_lengths`` lists (tokens, count) pairs of generated context prefixes. ``v_fast``
    lets the value optimisation run only the layers above the edited one on the tokens from the
    subject's last token on (:mod:`fastrome.runners`; same result up to rounding, checked on first
    use); False runs the whole model at every step.
    ``spread`` > 1 shares every edit among that many consecutive layers ending at the edit's layer
    (MEMIT-style, for one request at a time): the value is optimised at the last of them as usual,
    then each layer in turn, from the lowest, takes its share of what is still missing there. Each
    layer's update is a rank-one update with the edit's keys (mode) there, so every guard applies
    per layer; the layers' updates, and with them their damage to unrelated text, are about
    ``spread`` times smaller. ``None`` (the default) is :data:`DEFAULT_SPREAD` layers, see
    :meth:`EditConfig.spread_at`.
    Guards (docs/architecture.md, "Guards"): an edit is refused when ``uᵀk <= min_denom_rel·‖u‖·‖k‖``, when anything is
    non-finite, or when ``‖ΔW‖_F/‖W‖_F`` exceeds ``max_update_ratio`` (or the running sum of those
    ratios at the layer exceeds ``max_total_update_ratio``); ``policy`` says what a refusal does.
    """

    layer: Optional[int] = None
    # the defaults of the lifelong settings (mode, spread, memory_beta, mpes_checks) are the combination
    # that measured best over long sequential runs; CLASSIC lists the classic ROME values
    mode: str = "dual"
    spread: Optional[int] = None
    # context templates
    template_lengths: Tuple[Tuple[int, int], ...] = ((5, 10), (10, 10))
    template_seed: int = 0
    # value optimisation
    v_steps: Optional[int] = None
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: Optional[float] = None
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2
    # most-probable early stopping: stop once the new target is the teacher-forced top prediction
    # at every templated prompt for this many consecutive checks (0: off; the loss rule stays)
    mpes_checks: int = 2
    # with mpes_checks: the target must also have at least this probability at each of those
    # tokens (0: being on top suffices); a margin against later edits' interference
    mpes_min_prob: float = 0.0
    # with mpes_checks: once early stopping fires, δ is scaled down to the smallest fraction of it
    # (bisection, six forward passes) that still meets the condition, so the write is no larger than
    # the condition needs (the optimisation's last step overshoots it)
    mpes_shrink: bool = False
    # "adam" (ROME's) or "normalized": steps of length v_lr·√d_out along the gradient itself
    v_optimizer: str = "adam"
    v_fast: bool = True
    # statistics and solve
    stats_tokens: Optional[int] = None
    stats_max_len: int = 1024
    stats_dtype: str = "float64"
    stats_batch_tokens: int = 8192
    stats_packing: str = "truncate"
    ridge: float = 1e-6
    # edit memory: each edit at a layer is solved against A = C + memory_beta·Σ k̄ᵢk̄ᵢᵀ over the
    # earlier edits there (0: off, the classic one-edit solve); A⁻¹ is kept by Sherman–Morrison and
    # refactorised from C and the keys every memory_refactor_every edits
    memory_beta: float = 0.02
    memory_refactor_every: int = 256
    # which of a dual edit's two keys its memory keeps: "both" (k̄ and k_u) or "prompt" (k_u only).
    # Each kept key claims a direction of the layer's key space (β·kᵀC⁻¹k ≫ 1: nearly a hard
    # constraint), so "both" fills a d-dimensional layer after d/2 edits and "prompt" after d.
    # "prompt" measured ahead over 500 sequential edits (benches/results/lifelong/500/summary.md)
    memory_dual_keys: str = "prompt"
    # re-read every remembered edit's key from the edited model after every this many edits and
    # rebuild the memory from them (0: each key stays as it was solved). Edits at lower layers
    # (a spread edit's first parts, later edits) move the keys an edit's subject has at the layers
    # above; the memory then guards where the subjects no longer are
    # (benches/results/lifelong/1000/key_drift_default.md)
    memory_refresh_every: int = 0
    # norm constraint (ENCORE's Frobenius term): α·I added to the solve, as a fraction of C's scale
    # (mean |diag C|), on top of the numerical ridge; trades ‖ΔW‖_F against interference on ordinary keys
    norm_alpha: float = 0.0
    # value-norm control (Norm-Anchor Scaling): the reference is the unedited layer's output norm
    # at the edit's key, ‖W₀k̄ + b‖. "anchor": ‖v*‖ set to value_norm_factor × it; "cap": rescaled
    # only when above that; "refuse": the edit refused when above that; "off"
    value_norm: str = "off"
    value_norm_factor: float = 1.0
    # null-space projection (AlphaEdit): u restricted to C's eigenvectors with eigenvalue at most
    # this times the mean eigenvalue (0: off)
    null_space: float = 0.0
    # "exact": Λ = change/(uᵀk), so the write moves the output at the key by exactly the change.
    # "alphaedit": AlphaEdit's published closed form (arXiv 2410.02355) as a reference baseline,
    # u = (SP + kkᵀP + I)⁻ᵀPk with S the earlier edits' keys and P the null-space projector, Λ = the
    # change itself: not exact at k (uᵀk < 1). Needs mode "consistent", spread 1, null_space > 0 and
    # an edit memory (memory_beta > 0, which keeps the earlier keys in step with undo and resume).
    update_form: str = "exact"
    # guards
    policy: str = "raise"
    min_denom_rel: float = 1e-6
    max_update_ratio: float = 1.0
    max_total_update_ratio: float = float("inf")
    # refuse an edit (each layer of a spread edit) whose interference ‖Λ‖²·uᵀCu, its mean squared
    # change of the layer's output over ordinary text, exceeds this many times the median of the
    # earlier edits' at that layer (from the 10th on; 0: off). A subject whose key lies among
    # ordinary text's (a common word) needs a write that moves everything
    max_interference_spike: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "EditConfig":
        """Raise ``ValueError`` naming the field for any out-of-range value."""

        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"config.{name}: expected {want}, got {getattr(self, name)!r}")

        def number(value: Any) -> bool:
            # bool is an int to Python, never a setting here; NaN and ±inf fail every optimisation
            # late, after minutes of work, so only finite numbers pass (the caps may be +inf)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        if self.policy not in POLICIES:
            raise bad("policy", f"one of {POLICIES}")
        if self.layer is not None and not integer(self.layer):
            raise bad("layer", "an int or None")
        for name in ("v_lr", "clamp_norm_factor"):
            value = getattr(self, name)
            if not (number(value) and math.isfinite(value) and value > 0):
                raise bad(name, "a finite positive number")
        spike = self.max_interference_spike
        if not (number(spike) and math.isfinite(spike) and (spike == 0 or spike > 1)):
            raise bad("max_interference_spike", "0 (off) or a finite number > 1")
        for name in ("max_update_ratio", "max_total_update_ratio"):
            if not (number(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a positive number (inf for no cap)")
        for name in ("kl_factor", "early_stop_loss", "ridge", "min_denom_rel"):
            value = getattr(self, name)
            if not (number(value) and math.isfinite(value) and value >= 0):
                raise bad(name, "a finite non-negative number")
        if not integer(self.template_seed):
            raise bad("template_seed", "an int")
        if not integer(self.mpes_checks) or self.mpes_checks < 0:
            raise bad("mpes_checks", "an int >= 0 (0: off)")
        if not (number(self.mpes_min_prob) and 0 <= self.mpes_min_prob < 1):
            raise bad("mpes_min_prob", "a number in [0, 1) (0: the top prediction suffices)")
        if not isinstance(self.mpes_shrink, bool):
            raise bad("mpes_shrink", "True or False")
        if self.mpes_shrink and not self.mpes_checks:
            raise bad("mpes_shrink", "False unless mpes_checks > 0 (it scales δ down to what early stopping needs)")
        if self.v_optimizer not in V_OPTIMIZERS:
            raise bad("v_optimizer", f"one of {V_OPTIMIZERS}")
        if self.mpes_min_prob and not self.mpes_checks:
            raise bad("mpes_min_prob", "0 unless mpes_checks > 0 (it is a condition of most-probable early stopping)")
        if not (number(self.memory_beta) and math.isfinite(self.memory_beta) and self.memory_beta >= 0):
            raise bad("memory_beta", "a finite non-negative number (0: off)")
        if not integer(self.memory_refactor_every) or self.memory_refactor_every < 1:
            raise bad("memory_refactor_every", "a positive int")
        if self.memory_dual_keys not in MEMORY_DUAL_KEYS:
            raise bad("memory_dual_keys", f"one of {MEMORY_DUAL_KEYS}")
        if not integer(self.memory_refresh_every) or self.memory_refresh_every < 0:
            raise bad("memory_refresh_every", "an int >= 0 (0: keys stay as solved)")
        if not (number(self.norm_alpha) and math.isfinite(self.norm_alpha) and self.norm_alpha >= 0):
            raise bad("norm_alpha", "a finite non-negative number (0: off)")
        if self.value_norm not in VALUE_NORMS:
            raise bad("value_norm", f"one of {VALUE_NORMS}")
        if not (number(self.null_space) and math.isfinite(self.null_space) and self.null_space >= 0):
            raise bad("null_space", "a finite non-negative number (0: off)")
        if self.update_form not in UPDATE_FORMS:
            raise bad("update_form", f"one of {UPDATE_FORMS}")
        if self.update_form == "alphaedit":
            if self.mode != "consistent" or self.spread != 1 or not self.null_space > 0 or not self.memory_beta > 0:
                raise bad("update_form", "'exact' unless mode='consistent', spread=1, null_space > 0 and "
                          "memory_beta > 0 "
                          f"(AlphaEdit's form solves one mean key against its projector and the earlier keys; here "
                          f"mode={self.mode!r}, spread={self.spread!r}, null_space={self.null_space!r}, "
                          f"memory_beta={self.memory_beta!r})")
        factor = self.value_norm_factor
        if not (number(factor) and math.isfinite(factor) and factor > 0):
            raise bad("value_norm_factor", "a finite positive number")
        if self.value_norm != "off" and integer(self.spread) and self.spread > 1:
            raise bad("value_norm", "'off' with spread > 1 (a spread edit's target is a residual-stream change, "
                      "not one layer's value)")
        if self.spread is not None and (not integer(self.spread) or self.spread < 1):
            raise bad("spread", "a positive int or None (the default number of layers)")
        if not isinstance(self.v_fast, bool):
            raise bad("v_fast", "True or False")
        if self.v_steps is not None and (not integer(self.v_steps) or self.v_steps < 1):
            raise bad("v_steps", "a positive int")
        if self.v_weight_decay is not None and not (
            number(self.v_weight_decay) and math.isfinite(self.v_weight_decay) and self.v_weight_decay >= 0
        ):
            raise bad("v_weight_decay", "a finite non-negative number")
        if self.stats_tokens is not None and (not integer(self.stats_tokens) or self.stats_tokens < 1):
            raise bad("stats_tokens", "a positive int")
        if not integer(self.stats_max_len) or self.stats_max_len < 2:
            raise bad("stats_max_len", "an int >= 2")
        if not integer(self.stats_batch_tokens) or self.stats_batch_tokens < 1:
            raise bad("stats_batch_tokens", "a positive int")
        if self.stats_dtype not in ("float32", "float64"):
            raise bad("stats_dtype", "'float32' or 'float64'")
        if self.stats_packing not in ("truncate", "pack"):
            raise bad("stats_packing", "'truncate' or 'pack'")
        try:
            if any(not (integer(n) and integer(c)) for n, c in self.template_lengths):
                raise TypeError
            lengths = [(int(n), int(c)) for n, c in self.template_lengths]
        except (TypeError, ValueError):
            raise bad("template_lengths", "a sequence of (tokens, count) pairs") from None
        if any(n < 1 or c < 0 for n, c in lengths):
            raise bad("template_lengths", "positive token lengths and non-negative counts")
        return self

    def resolve(self, family: str) -> "EditConfig":
        """A copy with the family's defaults filled in and every field validated."""
        defaults = _FAMILY_DEFAULTS.get(family, _FAMILY_DEFAULTS["gpt"])
        out = dataclasses.replace(self)
        for name, value in defaults.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        out.template_lengths = tuple((int(n), int(c)) for n, c in out.template_lengths)
        return out.validate()

    def spread_at(self, layer: int) -> int:
        """How many layers an edit at ``layer`` is shared among: ``spread``, or for ``None``
        :data:`DEFAULT_SPREAD` (at most ``layer + 1``; 1 with value-norm control)."""
        if self.spread is not None:
            return self.spread
        return 1 if self.value_norm != "off" else min(DEFAULT_SPREAD, layer + 1)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def lifelong_settings(self) -> Dict[str, Any]:
        """The :data:`LIFELONG_FIELDS` and their values."""
        return {name: getattr(self, name) for name in LIFELONG_FIELDS}


def make_config(config: Optional[EditConfig] = None, **overrides: Any) -> EditConfig:
    """``config`` (or the defaults) with ``overrides`` applied; unknown names raise ``ValueError``."""
    if config is not None and not isinstance(config, EditConfig):
        raise ValueError(f"config: expected an EditConfig or None, got {type(config).__name__}")
    base = dataclasses.replace(config) if config is not None else EditConfig()
    names = {f.name for f in dataclasses.fields(EditConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"{key}: not an EditConfig field (fields: {sorted(names)})")
        setattr(base, key, value)
    return base.validate()
