"""A sequential run in its own process, for tests/test_kill_resume.py: edits ``records`` into the
model saved in ``model_dir`` through the run folder ``out``, optionally killing itself (SIGKILL, no
clean-up of any kind) at one chosen moment of the second edit, and saves the edited layer's weight.

    python kill_resume_child.py MODEL_DIR OUT RECORDS_JSON CORPUS RESULT KILL_AT [SETTINGS_JSON]
KILL_AT: none | values (during the value optimisation) | factor (factor file on disk, its
journal line not yet) | log (journal line written, run-log line not yet). SETTINGS_JSON: more
EditConfig fields (e.g. the edit memory and spread); RESULT then holds every edited layer's weight.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fastrome import editor as editor_module
from fastrome import journal as journal_module
from fastrome import sequential as sequential_module
from fastrome.adapter import ModelAdapter
from fastrome.config import CLASSIC
from fastrome.sequential import CollapseRules, open_run, run_sequential

LAYER = 3
# classic one-layer ROME unless the test's settings say otherwise
SETTINGS = dict(CLASSIC, layer=LAYER, v_steps=3, template_lengths=((3, 2),), stats_tokens=3000, stats_max_len=64,
                max_update_ratio=float("inf"), progress=False)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill_at: str) -> None:
    if kill_at == "values":
        real_values, calls = editor_module.optimize_values, [0]

        def values(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                die()
            return real_values(*args, **kwargs)

        editor_module.optimize_values = values
    elif kill_at == "factor":
        real_write = journal_module.write_safetensors

        def write(path, *args, **kwargs):
            out = real_write(path, *args, **kwargs)
            if Path(path).name == "000001.safetensors":
                die()
            return out

        journal_module.write_safetensors = write
    elif kill_at == "log":
        real_append, applied = sequential_module._append, [0]

        def append(path, obj):
            if Path(path).name == "edits.jsonl" and obj.get("status") == "applied":
                applied[0] += 1
                if applied[0] == 2:
                    die()
            return real_append(path, obj)

        sequential_module._append = append
    elif kill_at != "none":
        raise SystemExit(f"KILL_AT: unknown {kill_at!r}")


def main() -> None:
    model_dir, out, records_json, corpus, result, kill_at = sys.argv[1:7]
    extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).float().eval()
    load_model(model, str(Path(model_dir) / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = json.loads(Path(records_json).read_text())
    arm(kill_at)
    editor = open_run(model, tok, out, corpus=corpus, **{**SETTINGS, **extra})
    summary = run_sequential(editor, records, out, every=100, ppl_texts=["The city is large and old."],
                             retention_sample=3, rules=CollapseRules(sentinel_ppl_ratio=1e9, sentinel_jump=1e9,
                                                                     action="record"))
    adapter, spread = ModelAdapter(model), editor.config.spread
    save_file({"weight" if layer == LAYER else f"weight{layer}": adapter.weight(layer).detach().clone()
               for layer in range(LAYER - spread + 1, LAYER + 1)}, result)
    print(json.dumps({"applied": summary.applied, "done": [str(c) for c in editor.done_case_ids()]}))


if __name__ == "__main__":
    main()
