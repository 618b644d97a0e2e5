"""Causal trace of MLP states over known facts: where does a model recall its facts?

For each fact the model gets right (../shared/data/knowns), the subject's token embeddings are
corrupted with Gaussian noise (3× the embeddings' standard deviation, 10 samples) and the
probability of the correct first answer token drops. Then, for each layer l, the clean MLP outputs
at the subject's last token are restored in a window of layers centred on l; the recovered
probability (indirect effect) says how much that window carries the fact. The layer where the
average indirect effect of MLP states peaks early in the network is where ROME edits.

    python benches/causal_trace.py --facts 60 --window 5 --out benches/results/causal_trace_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fastrome
from fastrome.adapter import ModelAdapter
from fastrome.prompts import subject_prompt
from fastrome.tokens import encode

DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def known_facts(model, tok, n: int):
    facts = json.loads((DATA / "knowns" / "known_1000.json").read_text())
    out = []
    for fact in facts:
        answer = encode(tok, fact["prompt"] + " " + fact["attribute"])[len(encode(tok, fact["prompt"]))]
        ids = torch.tensor([encode(tok, fact["prompt"])])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        if int(probs.argmax()) == answer:
            out.append((fact, answer, float(probs[answer])))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def trace_fact(model, adapter, tok, fact, answer, noise_scale, window, samples, generator):
    template = fact["prompt"].replace(fact["subject"], "{}", 1)
    sp = subject_prompt(tok, template, fact["subject"])
    ids = torch.tensor([list(sp.ids)] * (samples + 1))
    emb = model.get_input_embeddings()
    noise = torch.randn(samples, sp.last - sp.first + 1, emb.weight.shape[1], generator=generator) * noise_scale

    def corrupt(mod, args, out):
        out = out.clone()
        out[1:, sp.first : sp.last + 1] += noise.to(out.dtype)
        return out

    clean_mlp = {}
    restore_layers: set = set()

    def mlp_hook(layer):
        def hook(mod, args, out):
            if layer not in clean_mlp:
                clean_mlp[layer] = out[0, sp.last].clone()
            if layer in restore_layers:
                out = out.clone()
                out[1:, sp.last] = clean_mlp[layer]
            return out

        return hook

    handles = [emb.register_forward_hook(corrupt)]
    handles += [adapter.module(i).register_forward_hook(mlp_hook(i)) for i in range(adapter.n_layers)]
    try:
        def prob() -> float:
            logits = model(input_ids=ids, use_cache=False).logits[1:, -1].float()
            return float(torch.softmax(logits, -1)[:, answer].mean())

        corrupted = prob()
        effects = []
        for layer in range(adapter.n_layers):
            lo = max(0, layer - window // 2)
            restore_layers.clear()
            restore_layers.update(range(lo, min(adapter.n_layers, lo + window)))
            effects.append(prob() - corrupted)
    finally:
        for h in handles:
            h.remove()
    return corrupted, effects


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--facts", type=int, default=60)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    model, tok = fastrome.load_model(args.model)
    adapter = ModelAdapter(model)
    t0 = time.perf_counter()
    facts = known_facts(model, tok, args.facts)
    # noise scale: 3 × the standard deviation of the embeddings of the subjects' tokens
    sub_ids = torch.tensor(sorted({t for f, _, _ in facts for t in encode(tok, f["subject"])}))
    noise_scale = 3 * float(model.get_input_embeddings().weight[sub_ids].float().std())
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for fact, answer, p_clean in facts:
        corrupted, effects = trace_fact(model, adapter, tok, fact, answer, noise_scale, args.window, args.samples, g)
        rows.append({"known_id": fact["known_id"], "p_clean": p_clean, "p_corrupted": corrupted, "effects": effects})
        print(f"{fact['known_id']:5d} {fact['subject'][:30]:30s} clean {p_clean:.3f} corrupted {corrupted:.3f} "
              f"peak layer {max(range(len(effects)), key=effects.__getitem__)}", file=sys.stderr)
    n_layers = adapter.n_layers
    mean = [sum(r["effects"][i] for r in rows) / len(rows) for i in range(n_layers)]
    peak = max(range(n_layers), key=mean.__getitem__)
    result = {
        "what": "average indirect effect of restoring MLP outputs at the subject's last token (window of layers)",
        "model": args.model or fastrome.models.DEFAULT_MODEL,
        "facts": len(rows), "window": args.window, "samples": args.samples, "noise_scale": noise_scale,
        "mean_p_clean": sum(r["p_clean"] for r in rows) / len(rows),
        "mean_p_corrupted": sum(r["p_corrupted"] for r in rows) / len(rows),
        "mean_indirect_effect": mean, "peak_layer": peak,
        "seconds": time.perf_counter() - t0,
        "versions": {"torch": torch.__version__, "fastrome": fastrome.__version__, "python": platform.python_version()},
        "device": "cpu", "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    print("layer  mean indirect effect")
    for i, v in enumerate(mean):
        print(f"{i:5d}  {v:+.4f} {'#' * max(0, int(v * 200))}")
    print(f"peak: layer {peak}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
