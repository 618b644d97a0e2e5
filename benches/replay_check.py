"""Does today's code still make a committed lifelong run's edits, bit for bit? Re-edits the run's
first records on a fresh copy of the model, with the settings and templates its journal recorded,
and compares each edit's factors (u, Λ, keys) with the journal's files.

    python benches/replay_check.py benches/results/lifelong/1000/memory+mpes+dual --edits 10 \
        --stats-tokens 1000000 --set memory_beta=0.02 --set mpes_checks=2 --mode dual

The statistics come from the cache (computed when missing, ~25 min for 1M tokens on the 2-core CPU);
the run's recorded statistics line (ridge, condition) is printed beside today's. Exit status 0
when every edit matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--stats-tokens", type=int, default=1_000_000)
    ap.add_argument("--mode")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--against", type=Path,
                    help="compare with this journal instead of the run's (e.g. one a --keep of other code left)")
    ap.add_argument("--keep", type=Path, help="keep the new journal in this folder")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    import fastrome
    from fastrome import Journal

    torch.set_num_threads(args.threads)
    journal = Journal.read(args.run / "journal")
    entries = list(journal)[: args.edits]
    overrides = dict(fastrome.CLASSIC)
    for item in args.overrides:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    if args.mode:
        overrides["mode"] = args.mode
    model, tok = fastrome.load_model()
    run = json.loads((args.run / "run.json").read_text()) if (args.run / "run.json").is_file() else {}
    matches = 0
    reference = (args.against or args.run / "journal") / "factors"
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp) / "journal"
        editor = fastrome.Editor(model, tok, journal=where, stats_tokens=args.stats_tokens,
                                 progress=False, **overrides)
        editor.use_templates(journal.templates)
        print(f"statistics then:  {run.get('stats', '?')}")
        print(f"statistics today: {editor.stats_source()}")
        for entry in entries:
            case = entry.request.get("case_id")
            editor.edit(entry.request)  # the request as the journal recorded it
            mine = editor.journal.entries[-1]
            theirs = load_file(str(reference / f"{entry.edit_id:06d}.safetensors"))
            ours = load_file(str(where / "factors" / f"{mine.edit_id:06d}.safetensors"))
            same = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
            diff = {k: float((theirs[k].double() - ours[k].double()).abs().max() / theirs[k].double().abs().max())
                    for k in theirs if k in ours and theirs[k].shape == ours[k].shape}
            matches += same
            detail = ", ".join(f"{k} {v:.2e}" for k, v in sorted(diff.items()))
            print(f"edit {entry.edit_id} (case {case}): {'bit for bit' if same else f'differs: {detail}'}",
                  flush=True)
        editor.close()
    print(f"{matches} of {len(entries)} edits the same bit for bit")
    return 0 if matches == len(entries) else 1


if __name__ == "__main__":
    sys.exit(main())
