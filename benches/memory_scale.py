"""Peak resident memory of one edit of a Llama-2-7B / Llama-3-8B-shaped bf16 model on the CPU,
against the bytes of its weights.

    python benches/memory_scale.py --shapes llama2-7b llama3-8b --out benches/results/memory_scale_cpu.json

Each shape runs in a fresh process. The model has random weights (bf16, built on the meta device
and filled in place, so building it never holds a second copy), a byte-level BPE tokenizer trained
on the bundled corpus supplies the token ids, and the edit is fastrome's default configuration
(edit memory on), shared among one layer or the default number (``--spreads``), with a small
statistics budget, one generated template and few value steps: the
point is memory, not quality. Once the model is built the peak-RSS mark is reset
(``/proc/self/clear_refs``); the peak (``VmHWM``) after statistics, solve and write is divided by the
weights' bytes, for statistics and solve (``Editor.solver()``) and for the edit itself, each
with its own peak mark. Linux only.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (256, 691, 4, 4, 2, 4000),  # a check of the script itself
}

CHILD = r"""
import json, sys, tempfile, time
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import fastrome
from fastrome.corpus import open_corpus

hidden, inter, layers, heads, kv, vocab = map(int, sys.argv[1:7])
stats_tokens, v_steps = int(sys.argv[7]), int(sys.argv[8])
spread = None if sys.argv[9] == "default" else int(sys.argv[9])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

t0 = time.perf_counter()
texts = list(open_corpus(seed=None).documents())[:300]
raw = Tokenizer(models.BPE(unk_token="<unk>"))
raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "</s>"]))
tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", pad_token="</s>")

cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
with torch.device("meta"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model = model.to_empty(device="cpu").eval()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() == 1:  # RMSNorm gains
            p.fill_(1.0)
        else:
            for rows in p.split(1024):
                rows.normal_(0.0, 0.02, generator=g)
    # non-persistent buffers (rotary frequencies) are uninitialised after to_empty: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
build_seconds = time.perf_counter() - t0

def reset():
    open("/proc/self/clear_refs", "w").write("5")  # the peak mark (VmHWM) back to the resident size

reset()
before = status("VmRSS:")
t1 = time.perf_counter()
phases = {}
request = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
with tempfile.TemporaryDirectory() as cache:
    editor = fastrome.Editor(model, tok, cache_dir=cache, stats_tokens=stats_tokens, stats_max_len=256,
                             v_steps=v_steps, template_lengths=((3, 1),), max_update_ratio=float("inf"),
                             spread=spread, progress=False)
    if editor.config.spread == 1:  # statistics and solve first, on their own peak mark
        editor.solver()
        phases["statistics_and_solve"] = {"peak_rss": status("VmHWM:"), "rss_after": status("VmRSS:"),
                                          "seconds": round(time.perf_counter() - t1, 1)}
        reset()
    # (a spread edit computes the statistics of all its layers in one pass, inside edit())
    t2 = time.perf_counter()
    report = editor.edit(request)  # templates, keys, value, update, write
    phases["edit"] = {"peak_rss": status("VmHWM:"), "rss_after": status("VmRSS:"),
                      "seconds": round(time.perf_counter() - t2, 1)}
    rec = report.records[0]
    peak = max(p["peak_rss"] for p in phases.values())
    out = {
        "weights_bytes": weights, "rss_before_edit": before, "peak_rss": peak,
        "peak_over_weights": round(peak / weights, 4), "rise_over_weights": round((peak - before) / weights, 4),
        "phases": phases, "layer": editor.layer, "spread": editor.config.spread, "d_in": inter,
        "applied": bool(rec.applied),
        "memory_beta": editor.config.memory_beta, "stats_tokens": stats_tokens, "v_steps": v_steps,
        "build_seconds": round(build_seconds, 1),
    }
print(json.dumps(out))
"""


def measure(shape: str, stats_tokens: int, v_steps: int, spread: str) -> dict:
    dims = SHAPES[shape]
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, dims), str(stats_tokens), str(v_steps), spread],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"shape": shape, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                f"exit {proc.returncode}", "exit": proc.returncode}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"shape": shape, **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llama2-7b"])
    ap.add_argument("--stats-tokens", type=int, default=1024)
    ap.add_argument("--v-steps", type=int, default=2)
    ap.add_argument("--spreads", nargs="+", default=["1", "default"],
                    help="layers each edit is shared among: numbers, or 'default' (the library's)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch
    import transformers

    rows = []
    for shape in args.shapes:
        for spread in args.spreads:
            rows.append(measure(shape, args.stats_tokens, args.v_steps, spread))
            print(rows[-1], flush=True)
    mem = [line for line in open("/proc/meminfo") if line.startswith("MemTotal")][0].split()[1]
    result = {"machine": f"{platform.machine()}, {int(mem) // 2**20} GiB", "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
