"""Edit memory for lifelong editing: each new edit at a layer is solved against

    A = C + ridge·I + β·Σᵢ k̄ᵢ k̄ᵢᵀ          (sum over the earlier edits at that layer)

instead of ``C`` alone (sequential least squares, as in EMMET, ENCORE and RLSEdit). ``u = A⁻¹k̄`` is
then nearly A-orthogonal to the earlier keys, so a new write barely moves their outputs, while
``Λ = (v* − Wk̄)/(uᵀk̄)`` still makes the new edit exact.

``A⁻¹`` is kept by a Sherman–Morrison update after every applied edit,
``A⁻¹ ← A⁻¹ − β·u uᵀ/(1 + β·uᵀk̄)`` with that edit's ``u = A⁻¹k̄``, and recomputed from the
statistics' own inverse and all the keys every ``refactor_every`` keys, so rounding cannot build
up: by Woodbury (an n×n solve) while the n keys are fewer than half of d, then as
``L(I + β·LᵀKᵀKL)⁻¹Lᵀ`` with ``LLᵀ`` the statistics' inverse (d×d work, flat in n), so a run of
10,000 edits never factorises a 10,000×10,000 matrix. The schedule depends only on the keys in
order: rebuilding the memory from a journal's keys (resume, undo) gives the inverse bit for bit, so
a resumed run edits exactly as one never stopped.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from fastrome import ops
from fastrome.solver import CovarianceSolver

SNAPSHOT_EVERY = 32  # keys between the copies of A⁻¹ that undo restarts from
# Copies of A⁻¹ for undo are kept only while one costs at most this much (d ≤ 5,792 in fp64): at
# Llama-7B's d = 11,008 a copy is 0.97 GB, and undo then rebuilds from the last refactorisation.
SNAPSHOT_MAX_BYTES = 1 << 28


def base_precision(dim: int) -> str:
    """The dtype the statistics' own inverse is kept in under an edit memory of dimension ``dim``.

    ``"float64"`` while a d×d fp64 matrix costs at most :data:`SNAPSHOT_MAX_BYTES`; ``"float32"``
    beyond (Llama-7B's d = 11,008 and up). The memory always holds its own fp64 ``A⁻¹`` for the
    updates, so the base is then only the restart point of refactorisations and rebuilds, and
    keeping it in fp32 saves half a d×d fp64 buffer (0.82 GB at d = 14,336) for the whole run. Its
    rounding (about 1e-6 relative on ``u``, ``benches/solve_options.py``) enters the first edits and
    every refactorisation alike, so resume and undo still rebuild ``A⁻¹`` bit for bit; the edits stay
    exact at their keys, since ``Λ`` is computed with the ``u`` actually used.
    """
    return "float64" if dim * dim * 8 <= SNAPSHOT_MAX_BYTES else "float32"


class EditMemory:
    """A solver over the statistics plus the keys of the edits applied so far at one layer.

    Args:
        base: the layer's :class:`CovarianceSolver` (``(C + ridge·I)⁻¹``, fp64, or fp32 at the sizes
            where :func:`base_precision` says so), kept unchanged.
        beta: weight of each remembered key (> 0), on the scale of ``C = E[kkᵀ]``: one key counts
            like a ``β`` share of all of ordinary text, so ``β·k̄ᵀC⁻¹k̄`` (≈ β·d for a typical key)
            says how hard an earlier edit is held against everything else.
        refactor_every: recompute ``A⁻¹`` from ``base`` and all keys after this many keys.

    It has the solver interface the update uses (:meth:`solve`, ``dim``, ``device``, ``identity``,
    ``ridge``, ``condition``), and :meth:`add` / :meth:`rebuild` / :meth:`forget_last` for the keys.
    Besides ``A⁻¹`` it keeps two copies of it from recent points (d×d fp64 each) for undo, where a
    copy costs at most :data:`SNAPSHOT_MAX_BYTES`. Until the first key, ``A⁻¹`` is the statistics'
    own inverse, not a copy of it, when that is fp64; an fp32 base is converted to an fp64 copy.
    """

    def __init__(self, base: CovarianceSolver, beta: float, refactor_every: int):
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta: expected a finite number > 0, got {beta!r}")
        if not isinstance(refactor_every, int) or isinstance(refactor_every, bool) or refactor_every < 1:
            raise ValueError(f"refactor_every: expected a positive int, got {refactor_every!r}")
        self.base, self.beta, self.refactor_every = base, float(beta), refactor_every
        self.keys: List[Tensor] = []  # (d_in,) fp32 on the CPU, in the order they were added
        self.inverse = self._base_inverse()
        # (keys held, a copy of the inverse then, or None) at two recent points, oldest first:
        # forgetting the latest keys (undo) restarts from a copy, so it costs at most
        # 2·SNAPSHOT_EVERY updates; from a point without one it rebuilds
        self._snapshots: List[Tuple[int, Optional[Tensor]]] = [(0, None)]
        self._keep_copies = self.dim * self.dim * 8 <= SNAPSHOT_MAX_BYTES

    # -- the solver interface ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def device(self) -> torch.device:
        return self.inverse.device

    @property
    def identity(self) -> bool:
        return self.base.identity

    @property
    def ridge(self) -> float:
        return self.base.ridge

    @property
    def condition(self) -> float:
        return self.base.condition

    @property
    def copies_held(self) -> int:
        """How many d×d copies of ``A⁻¹`` are kept as restart points for undo."""
        return sum(copy is not None for _, copy in self._snapshots)

    def solve(self, k: Tensor) -> Tuple[Tensor, Tensor]:
        """``(u, uᵀk)`` with ``u = A⁻¹k`` for one key (d,) or a batch (b, d)."""
        if not isinstance(k, Tensor) or k.shape[-1:] != (self.dim,) or k.dim() not in (1, 2):
            shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(f"k: expected shape ({self.dim},) or (b, {self.dim}), got {shape}")
        return ops.solve_keys(self.inverse, k.to(self.device))

    # -- the keys -------------------------------------------------------------------------------
    def add(self, key: Tensor) -> None:
        """Remember an applied edit's key (d_in,): ``A ← A + β·kkᵀ``."""
        key = _as_key(key, self.dim)
        if (len(self.keys) + 1) % self.refactor_every == 0:
            self.inverse = self._refactor(self.keys + [key])
        else:
            self._sherman_morrison(key)  # raises, changing nothing, if the update is refused
        self.keys.append(key)
        if len(self.keys) - self._snapshots[-1][0] >= SNAPSHOT_EVERY:
            self._snapshot()

    def rebuild(self, keys: Iterable[Tensor]) -> None:
        """Forget every key, then remember ``keys`` in order: the inverse an uninterrupted sequence
        of :meth:`add` calls would hold, bit for bit (resume and undo use this)."""
        keys = [_as_key(k, self.dim) for k in keys]
        boundary = (len(keys) // self.refactor_every) * self.refactor_every
        # With no key held A⁻¹ already is the base's inverse (a refused update writes nothing), so it
        # is kept: converting an fp32 base again would hold two fp64 copies at once.
        held_any = bool(self.keys)
        self.keys = keys[:boundary]
        if boundary:
            self.inverse = self._refactor(self.keys)
            self._snapshots = []
            self._snapshot()
        else:
            if held_any:
                self.inverse = self._base_inverse()
            self._snapshots = [(0, None)]  # the base itself: no copy needed
        self._replay(keys[boundary:])

    def forget_last(self, n: int) -> None:
        """Forget the ``n`` latest keys: the inverse :meth:`rebuild` of the others would give, bit for
        bit. From the newest copy of A⁻¹ held before them (at most 2·SNAPSHOT_EVERY updates, in time
        independent of how many keys there are), else by a rebuild."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(self.keys):
            raise ValueError(f"n: expected 0..{len(self.keys)} (keys held), got {n!r}")
        keep = len(self.keys) - n
        usable = [snap for snap in self._snapshots if snap[0] <= keep and snap[1] is not None]
        if not usable:  # further back than the copies: the ordinary rebuild
            self.rebuild(self.keys[:keep])
            return
        held, copy = usable[-1]
        later, self.keys = self.keys[held:keep], self.keys[:held]
        self.inverse = copy.clone()
        self._snapshots = usable
        self._replay(later)

    def _replay(self, keys: List[Tensor]) -> None:
        """Remember ``keys`` in order, as :meth:`add` would (refactorising where its schedule does)."""
        for key in keys:
            self.add(key)

    def _snapshot(self) -> None:
        """Mark this point; with a copy of A⁻¹ where copies are kept (None marks a point without one,
        from which undo rebuilds)."""
        copy = self.inverse.clone() if self._keep_copies else None
        self._snapshots = self._snapshots[-1:] + [(len(self.keys), copy)]

    def _base_inverse(self) -> Tensor:
        """The statistics' inverse in fp64, on the memory's device: itself (shared until the first
        update) or a converted copy."""
        return self.base.inverse.to(self.base.device, torch.float64)

    def _sherman_morrison(self, key: Tensor) -> None:
        if self.inverse is self.base.inverse:  # copy on first write: the base stays as it was
            self.inverse = self.inverse.clone()
        u, denom = ops.solve_keys(self.inverse, key.to(self.device, torch.float64))
        if not bool(ops.symmetric_rank_one_update(self.inverse, u, self.beta, denom)):
            raise ValueError(f"edit memory: 1 + β·uᵀk = {1.0 + self.beta * float(denom)!r} for a new key; A would "
                             "not stay positive definite (the key or the statistics are damaged)")

    def _refactor(self, keys: List[Tensor]) -> Tensor:
        """``(C + ridge·I + β·KᵀK)⁻¹`` for the keys K (n, d), by whichever way costs less at this n."""
        return self._woodbury(keys) if 2 * len(keys) < self.dim else self._direct(keys)

    def _direct(self, keys: List[Tensor]) -> Tensor:
        """``(B⁻¹ + β·KᵀK)⁻¹ = L(I + β·LᵀKᵀKL)⁻¹Lᵀ`` with ``B = LLᵀ`` the statistics' own inverse:
        two d×d Cholesky factorisations and no n×n matrix."""
        B = self._base_inverse()
        L = torch.linalg.cholesky(0.5 * (B + B.t()))
        KL = torch.stack(keys).to(self.device, torch.float64) @ L  # (n, d)
        S = self.beta * (KL.t() @ KL)
        S.diagonal().add_(1.0)
        out = L @ torch.cholesky_inverse(torch.linalg.cholesky(0.5 * (S + S.t()))) @ L.t()
        return 0.5 * (out + out.t())

    def _woodbury(self, keys: List[Tensor]) -> Tensor:
        """``(C + ridge·I + β·KᵀK)⁻¹`` from the statistics' own inverse B and the keys K (n, d):
        ``B − BKᵀ(I/β + KBKᵀ)⁻¹KB``, an n×n solve instead of a d×d factorisation."""
        B = self._base_inverse()
        K = torch.stack(keys).to(self.device, torch.float64)
        BK = B @ K.t()  # (d, n)
        S = K @ BK
        S.diagonal().add_(1.0 / self.beta)
        factor = torch.linalg.cholesky(0.5 * (S + S.t()))
        out = B - BK @ torch.cholesky_solve(BK.t(), factor)
        return 0.5 * (out + out.t())

    def __repr__(self) -> str:
        return f"EditMemory(d={self.dim}, β={self.beta:g}, keys={len(self.keys)}, refactor every {self.refactor_every})"


def _as_key(key: Tensor, dim: int) -> Tensor:
    if not isinstance(key, Tensor) or key.shape != (dim,):
        shape = tuple(key.shape) if isinstance(key, Tensor) else type(key).__name__
        raise ValueError(f"key: expected shape ({dim},), got {shape}")
    key = key.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(key).all()):
        raise ValueError("key: not finite; an edit with a non-finite key cannot be remembered")
    return key
