"""How a lifelong run uses each edited layer's key space, read back from its journal.

    FASTROME_CACHE=... python benches/edit_capacity.py benches/results/lifelong/1000/RUN \
        [--every 50] [--stats-tokens 1000000] [--beta 0.02] [--keys both|prompt] [--json OUT]

For every layer the run wrote and every ``--every`` edits, with C the layer's key second moment (the
statistics the run used, from the cache) and W₀ its unedited weight:

- ``energy``: ``tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ)``, the mean squared change of the layer's output on
  ordinary text relative to the output itself, for ΔW the sum of the journal's factors so far;
- ``coherence``: that energy over the sum of the edits' own energies ``Σ‖Λᵢ‖²·uᵢᵀCuᵢ`` (1: they add
  like a random walk; above 1 they pile up in common directions);
- ``edit energy``: the median own energy of the edits in the window, relative to ``tr(W₀ C W₀ᵀ)``;
- ``key reach``: the median ``kᵀC⁻¹k / d`` of the window's prompt keys (1 for a key typical of C;
  an edit's least ``uᵀCu`` is ``1/kᵀC⁻¹k``, so at a fixed change its energy falls like 1/d);
- ``memory rank``: the keys an edit memory with ``--beta`` and ``--keys`` would hold, against d, and
  how many of its directions outweigh C there (eigenvalues of ``β·K C⁻¹ Kᵀ`` above 1);
- ``free``: the median over the next 9 edits' prompt keys k of ``kᵀA⁻¹k / kᵀC⁻¹k`` with ``A = C + β·KᵀK``, the share of
  its solve the memory leaves to it (1: none taken; it falls as the memory fills the key space).

Reads only the journal and the statistics; the model is loaded for W₀ and the fingerprints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def layer_rows(journal, layer: int):
    return [e for e in journal.entries if e.layer == layer]


def _kept(entry, keys: str):
    rows = list(entry.key.reshape(-1, entry.key.shape[-1]).double())
    return rows[-1:] if len(rows) == 2 and keys == "prompt" else rows


def analyse_layer(entries, C: torch.Tensor, W0: torch.Tensor, *, every: int, beta: float, keys: str) -> list:
    """Rows of figures for one layer at every ``every`` edits (see the module docstring)."""
    d = C.shape[0]
    ridge = 1e-6 * float(C.diagonal().mean())
    Cr = C + ridge * torch.eye(d, dtype=torch.float64)
    C_inv = torch.cholesky_inverse(torch.linalg.cholesky(Cr))
    out_energy = float(torch.einsum("oi,ij,oj->", W0, C, W0))
    delta = torch.zeros_like(W0)
    own, kept, rows, reach = [], [], [], []
    for n, e in enumerate(entries, start=1):
        u, lam = e.u.double(), e.lam.double()
        delta += torch.outer(lam, u)
        own.append(float(lam.square().sum() * (u @ C @ u)) / out_energy)
        k_plain = e.key.reshape(-1, d)[-1].double()
        reach.append(float(k_plain @ C_inv @ k_plain) / d)
        kept.extend(_kept(e, keys))
        if n % every and n != len(entries):
            continue
        energy = float(torch.einsum("oi,ij,oj->", delta, C, delta)) / out_energy
        K = torch.stack(kept)
        G = beta * (K @ C_inv @ K.t())
        eig = torch.linalg.eigvalsh(0.5 * (G + G.t()))
        row = {"edits": n, "drift": float(delta.norm() / W0.norm()), "energy": energy,
               "coherence": energy / sum(own), "edit_energy": statistics.median(own[-every:]),
               "key_reach": statistics.median(reach[-every:]),
               "memory_keys": len(kept), "d": d, "memory_dominant": int((eig > 1).sum())}
        if n < len(entries):  # the next edits' prompt keys against the memory so far
            S = K @ C_inv @ K.t() + torch.eye(len(kept), dtype=torch.float64) / beta
            S = 0.5 * (S + S.t())
            free = []
            for nxt in entries[n:n + 9]:
                k = nxt.key.reshape(-1, d)[-1].double()
                base = float(k @ C_inv @ k)
                ck = K @ (C_inv @ k)  # kᵀA⁻¹k by Woodbury: kᵀC⁻¹k − (KC⁻¹k)ᵀ(I/β + KC⁻¹Kᵀ)⁻¹(KC⁻¹k)
                free.append((base - float(ck @ torch.linalg.solve(S, ck))) / base)
            row["free"] = statistics.median(free)
        rows.append(row)
    return rows


def open_run(run: Path, stats_tokens: int):
    """``(journal, adapter, tokenizer, layers, {layer: statistics})`` of a run folder: its journal
    (which must keep keys), the unedited model and the cached statistics of every layer it wrote."""
    from fastrome.adapter import ModelAdapter
    from fastrome.cache import cache_dir
    from fastrome.journal import Journal
    from fastrome.models import load_model
    from fastrome.stats import load_or_compute

    journal = Journal.read(run / "journal")
    if journal.entries and journal.entries[0].key is None:
        raise SystemExit(f"{run}: its journal keeps no keys (written before keys were kept)")
    model, tok = load_model()
    adapter = ModelAdapter(model)
    layers = sorted({e.layer for e in journal.entries})
    stats = load_or_compute(adapter, tok, layers, tokens=stats_tokens, cache_root=cache_dir(), progress=False)
    return journal, adapter, tok, layers, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--stats-tokens", type=int, default=1_000_000)
    ap.add_argument("--beta", type=float, default=None, help="memory β (default: the run's)")
    ap.add_argument("--keys", choices=("both", "prompt"), default=None, help="keys per dual edit (default: the run's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    run = json.loads((args.run / "run.json").read_text())
    settings = run.get("settings", {})
    beta = args.beta if args.beta is not None else (settings.get("memory_beta") or 0.02)
    keys = args.keys or settings.get("memory_dual_keys", "both")
    journal, adapter, _, layers, stats = open_run(args.run, args.stats_tokens)
    result = {"run": str(args.run), "beta": beta, "keys": keys, "torch": torch.__version__, "layers": {}}
    for layer in layers:
        C = stats[layer].matrix.double()
        W0 = adapter.weight(layer).detach().double()  # the loaded model is the unedited one
        rows = analyse_layer(layer_rows(journal, layer), C, W0, every=args.every, beta=beta, keys=keys)
        result["layers"][str(layer)] = rows
        print(f"layer {layer} (d = {C.shape[0]}, memory β {beta:g}, keys {keys})")
        print("| edits | ‖ΔW‖/‖W₀‖ | energy | coherence | edit energy (median) | key reach "
              "| memory keys / d | β·KC⁻¹Kᵀ > 1 | free |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            free = f"{r['free']:.2f}" if "free" in r else "–"
            print(f"| {r['edits']} | {r['drift']:.3f} | {r['energy']:.4f} | {r['coherence']:.2f} | "
                  f"{r['edit_energy']:.2e} | {r['key_reach']:.1f} | {r['memory_keys']} / {r['d']} | "
                  f"{r['memory_dominant']} | {free} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
