"""Edits as a standard PEFT LoRA adapter, to serve edited facts on an untouched base model.

Every edit adds ``Λuᵀ`` to one down projection, so the edits at a module sum to ``B A`` with
``B = [Λ₁ … Λᵣ]`` (d_out, r) and ``A = [u₁ … uᵣ]ᵀ`` (r, d_in): exactly a LoRA pair of rank r, the
number of edits at that module, with ``lora_alpha = r`` so PEFT's scale ``alpha / r`` is 1. The folder
holds what ``peft.PeftModel.from_pretrained`` reads (``adapter_config.json``,
``adapter_model.safetensors``) and ``fastrome_edits.json`` (the edited facts and the digests of the
base weights the adapter was made against). Writing needs no ``peft`` package.

What is lost against the edited model itself: nothing in fp32 but rounding (the adapter adds
``x Aᵀ Bᵀ`` to the base output instead of using the summed weight); a half-precision base merges in
its own precision; a spread edit is one LoRA pair at each layer it wrote.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from fastrome.cache import write_json, write_safetensors
from fastrome.journal import JournalEntry

PathLike = Union[str, "os.PathLike[str]"]
EDITS_FILE = "fastrome_edits.json"


def lora_factors(entries: Iterable[JournalEntry]) -> Dict[int, Tuple[Tensor, Tensor]]:
    """``{layer: (B, A)}``: B (d_out, r) the edits' Λ as columns, A (r, d_in) their u as rows, fp32,
    in the order the edits were applied; ``B @ A`` is the sum of the layer's edits."""
    by_layer: Dict[int, List[JournalEntry]] = {}
    for e in entries:
        by_layer.setdefault(e.layer, []).append(e)
    return {layer: (torch.stack([e.lam.float() for e in es], dim=1), torch.stack([e.u.float() for e in es]))
            for layer, es in sorted(by_layer.items())}


def save_peft_adapter(
    entries: Iterable[JournalEntry],
    module_template: str,
    path: PathLike,
    *,
    base_model_name_or_path: Optional[str] = None,
    base_digests: Optional[Dict[int, str]] = None,
) -> Path:
    """Write ``entries`` as a PEFT LoRA adapter folder at ``path``; returns the folder.

    Args:
        entries: applied edits (a journal's entries), each a rank-one factor pair at one layer.
        module_template: the edited modules' dotted path with ``{}`` for the layer
            (``ModelAdapter.module_template``, e.g. ``"model.layers.{}.mlp.down_proj"``).
        base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT to name the base.
        base_digests: ``{layer: sha256}`` of the unedited weights, recorded in ``fastrome_edits.json``.
    """
    entries = list(entries)
    if not entries:
        raise ValueError("save_peft: there are no applied edits to export")
    if not isinstance(module_template, str) or module_template.count("{}") != 1:
        raise ValueError(f"module_template: expected a dotted path with one '{{}}', got {module_template!r}")
    factors = lora_factors(entries)
    modules = {layer: module_template.format(layer) for layer in factors}
    tensors: Dict[str, Tensor] = {}
    for layer, (B, A) in factors.items():
        prefix = f"base_model.model.{modules[layer]}"
        tensors[f"{prefix}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
    ranks = {modules[layer]: int(A.shape[0]) for layer, (_, A) in factors.items()}
    first = next(iter(ranks.values()))
    config: Dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(ranks),
        # rank r per module (the edits there) and alpha = r, so every module's scale alpha/r is 1
        "r": first,
        "lora_alpha": first,
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    facts = [{"edit_id": e.edit_id, "layer": e.layer, "module": modules[e.layer], **_fact(e.request)}
             for e in entries]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    write_json(path / "adapter_config.json", config)
    write_json(path / EDITS_FILE, {
        "format": "fastrome.peft.v1",
        "base_digests": {str(k): v for k, v in sorted((base_digests or {}).items())},
        "edits": facts,
    })
    return path


def _fact(request: Dict[str, Any]) -> Dict[str, Any]:
    """The request's subject, prompt, old and new answer (``{"str": ...}`` targets unwrapped)."""
    out = {}
    for key in ("subject", "prompt", "target_true", "target_new", "case_id"):
        value = request.get(key)
        value = value.get("str") if isinstance(value, dict) else value
        if value is not None:
            out[key] = value
    return out
