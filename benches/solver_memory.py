"""Peak memory of building the solver (``CovarianceSolver``) at Llama-7B/8B key sizes, in d×d fp64
buffers beside the statistics matrix C, against the in-repo reference construction (the textbook
``cholesky(C + ridge·I)`` with a materialised identity and out-of-place symmetrisation).

    python benches/solver_memory.py --dims 4096 11008 14336 --out benches/results/solver_memory_cpu.json

Each construction runs in a fresh process: C (fp32, as statistics files store it) is made first,
the peak-RSS mark is reset (``/proc/self/clear_refs``), the solver is built, and the rise of the
peak above the resident size before it is divided by d²·8 bytes. Linux only.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, time, torch
from fastrome.solver import CovarianceSolver  # imported before the mark, for both constructions
torch.manual_seed(0)
d, way = int(sys.argv[1]), sys.argv[2]
C = torch.randn(d, d) * (1.0 / d)        # a well-conditioned symmetric positive-definite fp32 C
C = C @ C.t() if d <= 4096 else torch.eye(d) + 0.5 * (C + C.t()) * 0.1
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
t0 = time.perf_counter()
if way == "fastrome":
    s = CovarianceSolver(C, relative_ridge=1e-6)
    inverse = s.inverse
else:  # the reference construction
    C64 = C.double()
    C64 = 0.5 * (C64 + C64.t())
    eye = torch.eye(d, dtype=torch.float64)
    ridge = 1e-6 * float(C64.diagonal().abs().mean())
    factor = torch.linalg.cholesky(C64 + ridge * eye)
    inverse = torch.cholesky_inverse(factor)
    inverse = 0.5 * (inverse + inverse.t())
    norm1 = float((C64 + ridge * eye).abs().sum(0).max()) * float(inverse.abs().sum(0).max())
seconds = time.perf_counter() - t0
peak = rss("VmHWM:")
print((peak - before) / (d * d * 8), seconds)
"""


def measure(d: int, way: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(d), way], capture_output=True, text=True, check=True)
    buffers, seconds = map(float, out.stdout.split())
    return {"d": d, "construction": way, "peak_buffers": round(buffers, 2), "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 11008])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    rows = []
    for d in args.dims:
        for way in ("reference", "fastrome"):
            rows.append(measure(d, way))
            print(rows[-1], flush=True)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
