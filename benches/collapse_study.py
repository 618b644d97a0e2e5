"""Thousands of sequential edits on SmolLM2 over CounterFact dev records (or zsRE), in one key mode.

    python benches/collapse_study.py --classic --edits 1000 --out benches/results/collapse/consistent
    python benches/collapse_study.py --classic --mode original --edits 1000 --out benches/results/collapse/original
    python benches/collapse_study.py --dataset zsre --edits 1000 --out benches/results/lifelong/zsre

Every record goes through :func:`fastrome.sequential.run_sequential` (collapse rules on ``record``:
flagged, never rescued, so the curves show what the mode does). Every ``--every`` edits it measures
retention (top-1 and efficacy score, with and without a test-time prefix) over a sample of the edits
so far, specificity, ME-PPL_50 and WikiText-2 perplexity and the n-gram entropy of sampled
generations. The run is resumable: start the same command again after an interruption; ``run.json``
accumulates the wall time of every session. Plots: ``fastrome eval --plot OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def wikitext_paragraphs(path: Path, n: int, seed: int = 0) -> list:
    """``n`` WikiText-2 test paragraphs of 400–1,500 characters (headings and short lines left out)."""
    paras = [p.strip() for p in path.read_text(encoding="utf-8").split("\n")]
    paras = [p for p in paras if 400 <= len(p) <= 1500 and not p.startswith("=")]
    return random.Random(seed).sample(paras, min(n, len(paras)))


def zsre_cases(path: Path, start: int, n: int) -> list:
    """The good zsRE cases among records ``start`` … ``start + n − 1`` of the MEND-prepared file."""
    from fastrome.evaluation.zsre import load_zsre

    return [c for c in load_zsre(path, limit=start + n) if c.case_id >= start]


def zsre_record(case) -> dict:
    """A zsRE case as a run record: its edit, paraphrase and locality question (``loc + "?"``)."""
    from fastrome.evaluation.zsre import loc_prompt

    q = case.request
    return {"case_id": case.case_id, "prompt": q.prompt, "subject": q.subject, "target_new": q.target_new,
            "target_true": q.target_true, "rephrase_prompt": case.rephrase,
            "locality_prompt": loc_prompt(case.loc), "locality_ground_truth": case.loc_ans}


def parse_overrides(items: list) -> dict:
    """``["v_weight_decay=0.5", ...]`` -> ``{"v_weight_decay": 0.5}``: values are read as JSON (numbers,
    ``true``/``false``), anything else as a string; the Editor checks the names and the values."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name or name in ("mode", "stats_tokens"):
            raise SystemExit(f"--set: expected FIELD=VALUE for an EditConfig field other than mode and "
                             f"stats_tokens (they have their own options), got {item!r}")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("consistent", "original", "prompt", "dual"), default=None,
                    help="key mode (default: fastrome's, or consistent with --classic)")
    ap.add_argument("--classic", action="store_true",
                    help="start from classic one-edit ROME (fastrome.CLASSIC) instead of fastrome's defaults")
    ap.add_argument("--dataset", choices=("counterfact", "zsre"), default="counterfact",
                    help="CounterFact dev records, or the zsRE file (then every checkpoint also scores zsRE's "
                         "token accuracy on the sampled edits: zsre.jsonl)")
    ap.add_argument("--edits", type=int, default=1000, help="records to take from CounterFact dev")
    ap.add_argument("--start", type=int, default=0, help="index of the first record")
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--retention-sample", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--fluency-prompts", type=int, default=6)
    ap.add_argument("--wikitext", type=int, default=24, help="WikiText-2 paragraphs for perplexity")
    ap.add_argument("--stats-tokens", type=int, default=None,
                    help="tokens of the bundled corpus for the key statistics (default: fastrome's)")
    ap.add_argument("--fork", metavar="RUN", default=None,
                    help="start this run from another run's first --fork-at records (its journal, logs and "
                         "checkpoints up to there), then go on with this run's settings")
    ap.add_argument("--fork-at", type=int, default=None, metavar="N")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="an EditConfig field for this run, e.g. v_weight_decay=0.5 (repeatable)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    import fastrome
    from fastrome.evaluation.prefixes import test_prefixes
    from fastrome.models import load_model
    from fastrome.sequential import CollapseRules, open_run, run_sequential

    out = Path(args.out)
    if (args.fork is None) != (args.fork_at is None):
        ap.error("--fork and --fork-at go together")
    if args.fork and not (out / "journal").exists():
        from fastrome.sequential import fork_run

        fork = fork_run(args.fork, out, args.fork_at)
        src_zsre = Path(args.fork) / "zsre.jsonl"
        if src_zsre.is_file():
            rows = [line for line in src_zsre.read_text().splitlines()
                    if line.strip() and json.loads(line).get("edits", 0) <= fork["applied"]]
            (out / "zsre.jsonl").write_text("".join(line + "\n" for line in rows))
        print(f"forked {args.fork} at {args.fork_at} records ({fork['applied']} edits) into {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    cases = None
    if args.dataset == "zsre":
        cases = zsre_cases(DATA / "zsre" / "zsre_mend_train-1k.json", args.start, args.edits)
        records = [zsre_record(c) for c in cases]
    else:
        records = json.loads((DATA / "counterfact" / "counterfact_dev.json").read_text())
        records = records[args.start : args.start + args.edits]
    ppl = [r["Text"] for r in json.loads((DATA / "me_ppl" / "ME-PPL_50.json").read_text())]
    wiki = wikitext_paragraphs(DATA / "corpus" / "wiki.test.raw", args.wikitext)
    full = json.loads((DATA / "counterfact" / "counterfact_full_dev.json").read_text())
    fluency = [r["generation_prompts"][0] for r in full[: args.fluency_prompts]]

    model, tok = load_model()
    prefix_file = out / "test_prefixes.json"
    if prefix_file.is_file():
        prefixes = json.loads(prefix_file.read_text())
    else:  # sampled once from the unedited model, reused by every resumed session
        prefixes = test_prefixes(model, tok, n=5, length=5, seed=0)
        prefix_file.write_text(json.dumps(prefixes, indent=1))
    overrides = {**(fastrome.CLASSIC if args.classic else {}), **parse_overrides(args.overrides)}
    if args.mode:
        overrides["mode"] = args.mode
    editor = open_run(model, tok, out, progress=False, stats_tokens=args.stats_tokens, **overrides)

    run_file = out / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {"sessions": []}
    session = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "edits_before": len(editor.done_case_ids()),
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "fastrome": fastrome.__version__,
        "python": sys.version.split()[0],
    }
    if run.get("stats") and run["stats"] != editor.stats_source():
        raise SystemExit(f"{out}: this run was made with statistics {run['stats']!r}, not {editor.stats_source()!r}")
    settings = {k: v for k, v in editor.config.to_dict().items() if k != "extra"}
    # (the editor itself refuses a journal written with other lifelong settings; this covers the rest)
    if run.get("settings"):  # a setting added after the run began was, for its edits, at its default then
        from fastrome.config import settings_made_with

        made = settings_made_with(run["settings"], tuple(settings))
        changed = sorted(k for k in settings if json.loads(json.dumps(settings[k])) != made.get(k))
        if changed:
            raise SystemExit(f"{out}: this run was made with other settings ({', '.join(changed)})")
    if run.get("sessions") and not run.get("settings"):  # a run from before full settings were recorded
        made = {"mode": run.get("mode"), **run.get("overrides", {})}
        changed = sorted(k for k, v in made.items() if v is not None and settings.get(k) != v)
        if changed:
            raise SystemExit(f"{out}: this run was made with {made!r}; now {', '.join(changed)} differ")
    forked_on = (run.get("forked") or {}).get("dataset")
    if forked_on and forked_on != args.dataset:
        raise SystemExit(f"{out}: this run was forked from a run on {forked_on}, not {args.dataset}")
    if run.get("sessions") and run.get("dataset", "counterfact") != args.dataset:
        raise SystemExit(f"{out}: this run is on {run.get('dataset', 'counterfact')}, not {args.dataset}")
    run.update(mode=editor.config.mode, dataset=args.dataset, overrides=overrides, settings=settings,
               records=len(records), start=args.start, every=args.every, batch_size=args.batch_size,
               layer=editor.layer, stats=editor.stats_source(), model="SmolLM2-135M-Instruct fp32")
    t0 = time.perf_counter()

    zsre_log = out / "zsre.jsonl"

    def score_zsre(point):
        """zsRE token accuracy on a sample of the edits so far, and specificity against the
        unedited model's (measured once, before the first edit, on the same questions)."""
        from fastrome.evaluation.zsre import evaluate_zsre_case

        done = {str(c) for c in editor.done_case_ids()}
        ids = [c for c in cases if str(c.case_id) in done]
        picked = random.Random(len(ids)).sample(ids, min(args.retention_sample, len(ids)))
        rows = [evaluate_zsre_case(model, tok, c) for c in picked]
        row = {"edits": point.get("edits", 0), "n": len(rows)}
        for name in ("efficacy", "paraphrase", "specificity"):
            row[name] = sum(r[name] for r in rows) / len(rows) if rows else None
        with open(zsre_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row

    if cases is not None and not zsre_log.is_file():
        from fastrome.evaluation.zsre import evaluate_zsre_case

        base = [evaluate_zsre_case(model, tok, c)["specificity"] for c in cases]
        zsre_log.write_text(json.dumps({"edits": 0, "n": len(base), "specificity": sum(base) / len(base)}) + "\n")

    def save(point=None):
        if point is not None and cases is not None:
            point = {**point, **{f"zsre_{k}": v for k, v in score_zsre(point).items() if k not in ("edits", "n")}}
        session["seconds"] = time.perf_counter() - t0
        session["edits_after"] = len(editor.done_case_ids())
        run["sessions"] = [s for s in run["sessions"] if s.get("started") != session["started"]] + [session]
        run["wall_seconds"] = sum(s.get("seconds", 0.0) for s in run["sessions"])
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=1))
        os.replace(tmp, run_file)
        if point is not None:
            shown = {k: round(v, 4) for k, v in point.items() if isinstance(v, float) and k != "time"}
            print(f"[{time.strftime('%H:%M:%S')}] edits {point.get('edits')}: {shown}", flush=True)

    summary = run_sequential(
        editor, records, out, every=args.every, ppl_texts=ppl, wikitext_texts=wiki, fluency_prompts=fluency,
        test_prefixes=prefixes, retention_sample=args.retention_sample, batch_size=args.batch_size,
        rules=CollapseRules(action="record"), on_checkpoint=save, progress=True,
    )
    save()
    print(json.dumps({k: v for k, v in vars(summary).items() if k != "checkpoints"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
