"""What null-space projection (AlphaEdit) does to ROME's exact edit: the interference energy on
ordinary keys, ``E[(uᵀx)²] = uᵀCu`` for ``uᵀk = 1``, with and without the projection, for the keys
of real edits.

ROME's solve ``u = C⁻¹k / (kᵀC⁻¹k)`` is the least-energy ``u`` with ``uᵀk = 1`` (energy
``1/(kᵀC⁻¹k)``); restricted to the span of ``P`` it is ``1/((Pk)ᵀC⁻¹(Pk))``, never less. The ratio
of the two is how much larger each projected write is on ordinary text for the same residual.

    python benches/projection_interference.py --stats STATS.safetensors \
        --journal benches/results/lifelong/1000/memory+mpes+dual/journal --limit 300 \
        --thresholds 0.25 0.5 1 2 --out benches/results/projection_interference_smollm2.json

``--stats`` is a statistics file of the journal's layer (the cache keeps them under
``<cache>/stats/``); the keys are the solved keys the journal stores with each edit (the first one
of a dual edit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastrome.projection import null_space_projector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stats", type=Path, required=True)
    ap.add_argument("--journal", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tensors = load_file(str(args.stats))
    C = next(t for t in tensors.values() if t.dim() == 2).double()
    C = 0.5 * (C + C.T)
    d = C.shape[0]
    files = sorted((args.journal / "factors").glob("*.safetensors"))[: args.limit]
    K = torch.stack([load_file(str(f))["key"].double().reshape(-1, d)[0] for f in files])
    values = torch.linalg.eigvalsh(C)
    inverse = torch.linalg.inv(C)
    plain = ((K @ inverse) * K).sum(1)
    rows = []
    for threshold in args.thresholds:
        try:
            P, rank = null_space_projector(C, threshold)
        except ValueError as exc:
            rows.append({"threshold": threshold, "rank": 0, "note": str(exc)})
            print(rows[-1])
            continue
        PK = K @ P
        ratio = plain / ((PK @ inverse) * PK).sum(1)
        share = PK.norm(dim=1) / K.norm(dim=1)
        rows.append({"threshold": threshold, "rank": rank, "key_share_median": round(float(share.median()), 3),
                     "energy_ratio_median": round(float(ratio.median()), 2),
                     "energy_ratio_min": round(float(ratio.min()), 2),
                     "energy_ratio_max": round(float(ratio.max()), 2)})
        print(rows[-1])
    result = {"stats": args.stats.name, "journal": str(args.journal), "keys": len(files), "d": d,
              "eigenvalue_min_over_mean": round(float(values[0] / values.mean()), 4),
              "condition": round(float(values[-1] / values[0]), 1), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print({k: v for k, v in result.items() if k != "rows"})
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
