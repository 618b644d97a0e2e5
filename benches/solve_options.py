"""Which way to compute u = C⁻¹k: precision against fp64 on real statistics, and speed.

Options, all from a factorisation or inverse cached at construction:
  chol64      fp64 Cholesky factor, two triangular solves (LAPACK potrs via torch.cholesky_solve)
  chol32      fp32 Cholesky factor of the fp32 matrix, two triangular solves
  inv64       fp64 inverse, fp64 matrix-vector product
  inv64→32    fp64 inverse rounded to fp32, fp32 matrix-vector product
Errors are relative to an fp64 LU solve, for keys drawn from N(0, C) and for real keys (the mean
keys of CounterFact prompts) at each layer with cached statistics.

    python benches/solve_options.py --out benches/results/solve_options_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import fastrome
from fastrome import ops
from fastrome.cache import cache_dir
from fastrome.stats import SecondMoment


def options(C: torch.Tensor, ridge: float):
    eye = torch.eye(C.shape[0], dtype=torch.float64)
    A = C.double() + ridge * eye
    L64 = torch.linalg.cholesky(A)
    L32 = torch.linalg.cholesky(A.float())
    inv64 = torch.cholesky_inverse(L64)
    inv32 = inv64.float()
    return {
        "chol64": lambda k: torch.cholesky_solve(k.double().unsqueeze(1), L64).squeeze(1),
        "chol32": lambda k: torch.cholesky_solve(k.float().unsqueeze(1), L32).squeeze(1),
        "inv64": lambda k: inv64 @ k.double(),
        "inv64 (fastrome.ops.solve_keys)": lambda k: ops.solve_keys(inv64, k.double())[0],
        "inv64->32": lambda k: inv32 @ k.float(),
    }, A


def timeit(fn, k, repeat=20):
    fn(k)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(k)
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ridge", type=float, default=1e-6, help="relative to mean(diag C), as the Editor uses")
    p.add_argument("--keys", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"layers": {}, "timing": {}}
    files = sorted((cache_dir() / "stats").glob("*.safetensors"))
    seen = set()
    for f in files:
        sm = SecondMoment.load(f)
        if sm.layer in seen:
            continue
        seen.add(sm.layer)
        C = sm.matrix.double()
        ridge = args.ridge * float(C.diagonal().mean())
        fns, A = options(C, ridge)
        eig = torch.linalg.eigvalsh(A)
        Lc = torch.linalg.cholesky(A)
        keys = (Lc @ torch.randn(C.shape[0], args.keys, dtype=torch.float64)).t().float()
        truth = torch.linalg.solve(A, keys.double().t()).t()
        row = {"cond": float(eig[-1] / eig[0]), "d": C.shape[0], "tokens": sm.count}
        for name, fn in fns.items():
            errs, derrs = [], []
            for k, u_true in zip(keys, truth):
                u = fn(k).double()
                errs.append(float((u - u_true).norm() / u_true.norm()))
                d_true = float(u_true @ k.double())
                derrs.append(abs(float(u @ k.double()) - d_true) / abs(d_true))
            row[name] = {"max_rel_err_u": max(errs), "max_rel_err_denom": max(derrs)}
        results["layers"][sm.layer] = row
        print(f"layer {sm.layer}: cond {row['cond']:.3g} " + "  ".join(
            f"{n}: u {row[n]['max_rel_err_u']:.1e} denom {row[n]['max_rel_err_denom']:.1e}" for n in fns))
    for d in (1536, 4096):
        X = torch.randn(4 * d, d, dtype=torch.float64)
        C = X.t() @ X / (4 * d)
        fns, _ = options(C, 1e-6)
        k = torch.randn(d)
        results["timing"][d] = {name: timeit(fn, k) for name, fn in fns.items()}
        print(f"d={d} seconds per key: " + "  ".join(f"{n} {t * 1e3:.2f} ms" for n, t in results["timing"][d].items()))
    results.update(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
                   fastrome=fastrome.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
