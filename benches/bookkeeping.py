"""Per-edit bookkeeping against the number of edits in a journal: it must stay flat for long runs.

    python benches/bookkeeping.py --edits 100 10000 --out benches/results/bookkeeping_cpu.json

For each size N, a journal of N synthetic one-layer edits (random factors and keys at SmolLM2-135M's
down-projection shape, 576 × 1,536, with the edit memory on) is written to a temporary folder, then
timed: recording one more edit (journal append + memory update), ``journal.next_id`` and
``journal.edit_count``, undo of the last edit (median over four positions in the edit memory's
snapshot cycle), and resuming the journal into a
new editor (replay of every write and the memory rebuilt), reported per edit. Ratios are against
the smallest N in the same run. No model forward runs: this is the bookkeeping alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

D_OUT, D_IN, LAYER = 576, 1536, 1


def tiny_model():
    """Two Llama layers with SmolLM2-135M's MLP shape (the rest as small as it can be)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=D_OUT, intermediate_size=D_IN, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def no_tokenizer(*args, **kwargs):
    """The editor asks for a tokenizer; undo, resume and the journal never call it."""
    raise RuntimeError("this benchmark runs no model forward")


def synthetic_journal(folder: Path, model, n: int, settings: dict, seed: int = 0):
    import torch

    from fastrome.adapter import ModelAdapter
    from fastrome.journal import Journal, JournalEntry, weight_digest

    g = torch.Generator().manual_seed(seed)
    journal = Journal(folder)
    journal.note_base(LAYER, weight_digest(ModelAdapter(model).weight(LAYER)))
    for i in range(n):
        u = torch.randn(D_IN, generator=g) / D_IN
        lam = torch.randn(D_OUT, generator=g) * 1e-3
        key = torch.randn(D_IN, generator=g)
        journal.append(JournalEntry(i, LAYER, u, lam, {"case_id": i}, {"update_ratio": 1e-4, "settings": settings},
                                    key=key))
    journal.close()


def measure(n: int, stats, repeats: int) -> dict:
    import torch

    from fastrome import Editor
    from fastrome.config import make_config
    from fastrome.journal import JournalEntry
    from fastrome.memory import SNAPSHOT_EVERY

    overrides = dict(layer=LAYER, spread=1, mode="consistent", memory_beta=0.02, mpes_checks=0)
    settings = make_config(**overrides).lifelong_settings()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "journal"
        model = tiny_model()
        t0 = time.perf_counter()
        synthetic_journal(folder, model, n, settings)
        written = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            ed = Editor(model, no_tokenizer, stats={LAYER: stats}, journal=folder, cache_dir=False,
                        **overrides)
            ed.solver(LAYER)  # the edit memory, rebuilt from the journal's keys
            resume = time.perf_counter() - t0
        g = torch.Generator().manual_seed(1)
        appends, undos, ids = [], [], []

        def record() -> float:
            t0 = time.perf_counter()
            ed.journal.append(JournalEntry(ed.journal.next_id, LAYER, torch.randn(D_IN, generator=g) / D_IN,
                                           torch.randn(D_OUT, generator=g) * 1e-3, {"case_id": "x"},
                                           {"update_ratio": 1e-4, "settings": settings},
                                           key=torch.randn(D_IN, generator=g)))
            ed.solver(LAYER).add(ed.journal.entries[-1].key)
            return time.perf_counter() - t0

        # Undo restarts the memory from its copy of A⁻¹ kept every SNAPSHOT_EVERY keys and replays the
        # keys since: its cost depends on where the count falls in that cycle (4 keys past a copy at
        # 100 edits, 16 at 10,000), not on the count. So every size is timed at the same spread of
        # positions in the cycle, a quarter cycle apart.
        step = SNAPSHOT_EVERY // 4
        for _ in range((-len(ed.journal.entries)) % SNAPSHOT_EVERY):  # to the start of a cycle
            record()
        for position in range(4):
            for _ in range(step if position else 0):
                record()
            for _ in range(repeats):
                appends.append(record())
                t0 = time.perf_counter()
                ids.append((ed.journal.next_id, ed.journal.edit_count))
                ids_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                ed.undo_last()
                undos.append(time.perf_counter() - t0)
        ed.close()
    return {"edits": n, "write_journal_s": written, "resume_s": resume, "resume_per_edit_ms": 1e3 * resume / n,
            "record_edit_ms": 1e3 * statistics.median(appends), "undo_last_ms": 1e3 * statistics.median(undos),
            "next_id_and_count_us": 1e6 * ids_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, nargs="+", default=[100, 10_000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    import fastrome

    if args.threads:
        torch.set_num_threads(args.threads)
    a = torch.randn(D_IN, 3 * D_IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = a @ a.T / a.shape[1]
    rows = []
    for n in sorted(args.edits):
        rows.append(measure(n, stats, args.repeats))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    base = rows[0]
    for row in rows:
        row["ratio"] = {k: row[k] / base[k] for k in ("resume_per_edit_ms", "record_edit_ms", "undo_last_ms")}
    print(json.dumps({r["edits"]: {k: round(v, 2) for k, v in r["ratio"].items()} for r in rows}))
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "fastrome": fastrome.__version__,
                "shape": [D_OUT, D_IN], "memory_beta": 0.02}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
