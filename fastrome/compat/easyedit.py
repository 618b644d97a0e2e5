"""EasyEdit drop-in: an EasyEdit ROME or R-ROME script runs on fastrome by changing its import line.

    from fastrome.compat.easyedit import BaseEditor, ROMEHyperParams   # was: from easyeditor import ...

    hparams = ROMEHyperParams.from_hparams("hparams/ROME/llama-7b.yaml")
    editor = BaseEditor.from_hparams(hparams)
    metrics, edited_model, weights_copy = editor.edit(
        prompts=["Ray Charles, the"], ground_truth=["piano"], target_new=["violin"], subject=["Ray Charles"],
        rephrase_prompts=[...], locality_inputs={"neighborhood": {"prompt": [...], "ground_truth": [...]}},
        sequential_edit=True)

The hparams file's fields map onto :class:`fastrome.EditConfig` (the README has the table); a field
fastrome cannot honour is refused by name before any model is loaded. Edits are classic ROME
(:data:`fastrome.CLASSIC`), as in EasyEdit, with the key mode its algorithm names: ``ROME`` the
original implementation (prefixed keys for the solve, the unprefixed key for the write), ``R-ROME``
consistent keys. Metrics follow EasyEdit's layout: per request ``pre`` and ``post`` with
``rewrite_acc``, ``rephrase_acc``, ``locality`` (``<key>_acc``: the share of the locality answer's
tokens predicted the same after the edit as before) and ``portability`` (``<key>_acc``), all
teacher-forced token accuracies in lists of one value per prompt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from fastrome.config import CLASSIC

_log = logging.getLogger(__name__)

ALGORITHMS = ("ROME", "R-ROME")
# fields EasyEdit needs to find modules and places files; fastrome finds the modules itself
LOCATION_FIELDS = ("layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
                   "stats_dir")


@dataclass
class ROMEHyperParams:
    """EasyEdit's ROME / R-ROME hyperparameters, read from its YAML (or JSON) files."""

    model_name: Any = None  # a folder, a cached model id, a .gguf file, or a (model, tokenizer) pair
    alg_name: str = "ROME"
    layers: List[int] = field(default_factory=lambda: [5])
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 5e-1
    v_loss_layer: Optional[int] = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    rewrite_module_tmp: Optional[str] = None
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    device: Union[int, str, None] = 0
    model_parallel: bool = False
    fp16: bool = False
    batch_size: int = 1
    max_length: int = 40
    original_implementation: Optional[bool] = None
    enable_prompt_keys: Optional[bool] = None
    enable_random_prefix_keys: Optional[bool] = None
    layer_module_tmp: Optional[str] = None
    mlp_module_tmp: Optional[str] = None
    attn_module_tmp: Optional[str] = None
    ln_f_module: Optional[str] = None
    lm_head_module: Optional[str] = None
    stats_dir: Optional[str] = None

    @classmethod
    def from_hparams(cls, path: Union[str, "Path"]) -> "ROMEHyperParams":
        """Read an EasyEdit hparams file (``.yaml`` / ``.yml`` / ``.json``; ``hparams/ROME/x`` without
        the suffix finds ``x.yaml``); unknown fields and values fastrome cannot honour are refused."""
        path = Path(path)
        if not path.is_file() and path.with_suffix(".yaml").is_file():
            path = path.with_suffix(".yaml")
        if not path.is_file():
            raise ValueError(f"hparams: {str(path)!r} is not a file")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"hparams: {str(path)!r} holds {type(data).__name__}, not a mapping of fields")
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Dict[str, Any], where: str = "hparams") -> "ROMEHyperParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: fastrome cannot honour the field(s) {unknown} (known: {sorted(known)})")
        params = cls(**data)
        params.check(where)
        return params

    def check(self, where: str = "hparams") -> None:
        """Refuse values fastrome cannot honour, by field name."""
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"{where}: {name} = {getattr(self, name)!r}; fastrome needs {want}")

        if self.alg_name not in ALGORITHMS:
            raise bad("alg_name", f"one of {ALGORITHMS} (this drop-in covers ROME)")
        if (not isinstance(self.layers, (list, tuple)) or len(self.layers) != 1
                or not isinstance(self.layers[0], int) or isinstance(self.layers[0], bool)):
            raise bad("layers", "a list of one layer index (ROME writes one layer)")
        if self.fact_token != "subject_last":
            raise bad("fact_token", "'subject_last' (keys are read at the subject's last token)")
        if self.mom2_dataset != "wikipedia":
            raise bad("mom2_dataset", "'wikipedia' (the bundled Wikipedia corpus; pass stats= for others)")
        if self.mom2_dtype not in ("float32", "float64"):
            raise bad("mom2_dtype", "'float32' or 'float64'")
        if not isinstance(self.mom2_n_samples, int) or self.mom2_n_samples < 1:
            raise bad("mom2_n_samples", "a positive number of documents")
        if self.model_parallel:
            raise bad("model_parallel", "false (load the model yourself with device_map= and pass (model, tok))")
        if self.batch_size != 1:
            raise bad("batch_size", "1 (ROME edits one request at a time)")
        lengths = self.context_template_length_params
        if (not isinstance(lengths, (list, tuple)) or not lengths
                or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in lengths)):
            raise bad("context_template_length_params", "a list of [length, count] pairs")
        if self.model_name is None:
            raise bad("model_name", "a model folder, a cached model id, a .gguf file or a (model, tokenizer) pair")

    @property
    def mode(self) -> str:
        """fastrome's key mode for this algorithm and its R-ROME switches."""
        if self.original_implementation:
            return "original"
        if self.enable_prompt_keys:
            return "prompt"
        if self.enable_random_prefix_keys or self.alg_name == "R-ROME":
            return "consistent"
        return "original"

    def edit_config(self) -> Dict[str, Any]:
        """The :class:`fastrome.EditConfig` fields these hparams set (classic ROME otherwise)."""
        return {
            **CLASSIC,
            "mode": self.mode,
            "layer": int(self.layers[0]),
            "v_steps": int(self.v_num_grad_steps),
            "v_lr": float(self.v_lr),
            "v_weight_decay": float(self.v_weight_decay),
            "clamp_norm_factor": float(self.clamp_norm_factor),
            "kl_factor": float(self.kl_factor),
            "template_lengths": tuple((int(n), int(c)) for n, c in self.context_template_length_params),
            "stats_dtype": self.mom2_dtype,
        }


R_ROMEHyperParams = ROMEHyperParams  # EasyEdit's R-ROME class: the same fields


def documents_to_tokens(tokenizer: Any, documents: int, max_len: int, sample: int = 500) -> Tuple[int, float]:
    """``(token budget, mean tokens per document)``: EasyEdit counts statistics in documents (each
    truncated to the model's context), fastrome in tokens; the mean is measured on the bundled
    corpus' first ``sample`` documents, truncated to ``max_len``."""
    from fastrome.corpus import open_corpus
    from fastrome.tokens import encode

    lengths = []
    for text in open_corpus(None).documents():
        lengths.append(min(len(encode(tokenizer, text)), max_len))
        if len(lengths) >= sample:
            break
    mean = sum(lengths) / max(len(lengths), 1)
    return max(1, int(round(documents * mean))), mean


class BaseEditor:
    """EasyEdit's ``BaseEditor`` for ROME, on a :class:`fastrome.Editor`."""

    @classmethod
    def from_hparams(cls, hparams: ROMEHyperParams, **overrides: Any) -> "BaseEditor":
        return cls(hparams, **overrides)

    def __init__(self, hparams: ROMEHyperParams, *, stats: Any = None, **overrides: Any):
        """Load the model named by ``hparams.model_name`` (or take a ``(model, tokenizer)`` pair) and
        set up the editor. ``stats`` overrides the statistics (any ``Editor`` ``stats=`` value);
        ``overrides`` are further :class:`fastrome.EditConfig` fields."""
        from fastrome.editor import Editor
        from fastrome.models import load_model

        if not isinstance(hparams, ROMEHyperParams):
            raise ValueError(f"hparams: expected ROMEHyperParams, got {type(hparams).__name__}")
        hparams.check()
        self.hparams = hparams
        self.alg_name = hparams.alg_name
        if isinstance(hparams.model_name, (tuple, list)) and len(hparams.model_name) == 2:
            self.model, self.tok = hparams.model_name
            self.model_name = type(self.model).__name__
        else:
            device = _device(hparams.device)
            dtype = torch.float16 if hparams.fp16 else torch.float32
            self.model, self.tok = load_model(hparams.model_name, dtype=dtype, device=device)
            self.model_name = str(hparams.model_name)
        n_layers = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        if hparams.v_loss_layer is not None and n_layers and hparams.v_loss_layer != n_layers - 1:
            warnings.warn(f"hparams: v_loss_layer = {hparams.v_loss_layer} is not this model's last layer "
                          f"({n_layers - 1}); fastrome reads the value loss at the model's output, as ROME "
                          "does with its published settings", stacklevel=2)
        config = hparams.edit_config()
        if stats is None and not hparams.mom2_adjustment:
            stats = "identity"  # EasyEdit's mom2_adjustment: false solves without the key second moment
            warnings.warn("hparams: mom2_adjustment = false: edits are solved without the key second moment "
                          "(C = I), as EasyEdit does; set it true for ROME's covariance step", stacklevel=2)
        if stats is None and "stats_tokens" not in overrides:
            max_len = int(overrides.get("stats_max_len", 1024))
            budget, mean = documents_to_tokens(self.tok, hparams.mom2_n_samples, max_len)
            config["stats_tokens"] = budget
            warnings.warn(f"hparams: mom2_n_samples = {hparams.mom2_n_samples:,} documents → {budget:,} tokens "
                          f"(a mean of {mean:.1f} tokens per document of the bundled Wikipedia corpus, "
                          f"truncated to {max_len}); pass stats_tokens= to set the budget directly",
                          stacklevel=2)
        self.editor = Editor(self.model, self.tok, stats=stats, module_template=hparams.rewrite_module_tmp,
                             **{**config, **overrides})

    def edit(
        self,
        prompts: Union[str, List[str]],
        target_new: Union[str, List[str]],
        ground_truth: Optional[Union[str, List[str]]] = None,
        rephrase_prompts: Optional[Union[str, List[str]]] = None,
        locality_inputs: Optional[Dict[str, Dict[str, Any]]] = None,
        portability_inputs: Optional[Dict[str, Dict[str, Any]]] = None,
        sequential_edit: bool = False,
        verbose: bool = True,
        subject: Optional[Union[str, List[str]]] = None,
        **kwargs: Any,
    ) -> Tuple[List[Dict[str, Any]], nn.Module, Dict[str, torch.Tensor]]:
        """Edit, and score before and after, in EasyEdit's layout: ``(metrics, edited_model,
        weights_copy)``. With ``sequential_edit`` every edit is applied, then all are scored and the
        model stays edited; otherwise each edit is applied, scored and undone (bit for bit) before the
        next, as EasyEdit does. ``weights_copy`` maps each edited parameter's name to its value from
        before this call."""
        if kwargs:
            raise ValueError(f"edit: fastrome's drop-in does not take {sorted(kwargs)}")
        requests = _requests(prompts, target_new, ground_truth, rephrase_prompts, locality_inputs,
                             portability_inputs, subject)
        # every request parsed and checked before the first write (a refused call changes nothing)
        from fastrome.requests import parse_requests

        parse_requests([_fastrome_request(r, i) for i, r in enumerate(requests)])
        layers = sorted({self.editor.layer - i for i in range(self.editor.config.spread)})
        weights_copy = {f"{self.editor.adapter.module_template.format(layer)}.weight":
                        self.editor.adapter.weight(layer).detach().clone() for layer in layers}
        metrics = [{"pre": self._quality(r, pre=None)} for r in requests]
        times = []
        if sequential_edit:
            for i, r in enumerate(requests):
                t0 = time.perf_counter()
                self.editor.edit(_fastrome_request(r, i))
                times.append(time.perf_counter() - t0)
            for i, r in enumerate(requests):
                metrics[i].update(case_id=i, requested_rewrite=r, time=times[i],
                                  post=self._quality(r, pre=metrics[i]["pre"]))
        else:
            for i, r in enumerate(requests):
                t0 = time.perf_counter()
                self.editor.edit(_fastrome_request(r, i))
                elapsed = time.perf_counter() - t0
                metrics[i].update(case_id=i, requested_rewrite=r, time=elapsed,
                                  post=self._quality(r, pre=metrics[i]["pre"]))
                self.editor.undo_last()
        for m in metrics:
            m["pre"].pop("locality", None)
            if verbose:
                _log.info("%s editing: %s -> %s  %s", m["case_id"], m["requested_rewrite"]["prompt"],
                          m["requested_rewrite"]["target_new"], m["post"])
        return metrics, self.model, weights_copy

    def _quality(self, request: Dict[str, Any], pre: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """One request's token accuracies (``pre`` given: the locality answers compared with it)."""
        model, tok = self.model, self.tok
        out: Dict[str, Any] = {"rewrite_acc": [_accuracy(model, tok, request["prompt"], request["target_new"])]}
        if request.get("rephrase_prompt") is not None:
            out["rephrase_acc"] = [_accuracy(model, tok, request["rephrase_prompt"], request["target_new"])]
        out["locality"] = {}
        for key, item in request["locality"].items():
            tokens = [_predicted(model, tok, p, a) for p, a in zip(item["prompt"], item["ground_truth"])]
            if pre is None:
                out["locality"][f"{key}_output"] = tokens
            else:
                before = pre["locality"][f"{key}_output"]
                out["locality"][f"{key}_acc"] = [
                    sum(a == b for a, b in zip(now, was)) / max(len(was), 1) for now, was in zip(tokens, before)]
        out["portability"] = {
            f"{key}_acc": [_accuracy(model, tok, p, a) for p, a in zip(item["prompt"], item["ground_truth"])]
            for key, item in request["portability"].items()}
        return out


def _device(device: Union[int, str, None]) -> str:
    if device is None or device == "cpu":
        return "cpu"
    name = f"cuda:{device}" if isinstance(device, int) else str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"hparams: device = {device!r}, but no CUDA device is available; using the CPU", stacklevel=3)
        return "cpu"
    return name


def _listed(value: Any, n: int, name: str) -> List[Any]:
    if value is None:
        return [None] * n
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} value(s), one per prompt, got {len(values)}")
    return values


def _per_request(inputs: Optional[Dict[str, Dict[str, Any]]], n: int, name: str) -> List[Dict[str, Any]]:
    """EasyEdit's ``{key: {"prompt": [...], "ground_truth": [...]}}`` (one entry per request, each a
    string or a list of strings) as one ``{key: {"prompt": [...], "ground_truth": [...]}}`` per request."""
    out: List[Dict[str, Any]] = [{} for _ in range(n)]
    for key, item in (inputs or {}).items():
        if not isinstance(item, dict) or set(item) != {"prompt", "ground_truth"}:
            raise ValueError(f"{name}[{key!r}]: expected a dict with 'prompt' and 'ground_truth'")
        prompts = _listed(item["prompt"], n, f"{name}[{key!r}].prompt")
        answers = _listed(item["ground_truth"], n, f"{name}[{key!r}].ground_truth")
        for i, (p, a) in enumerate(zip(prompts, answers)):
            p_list = [p] if isinstance(p, str) else list(p)
            a_list = [a] if isinstance(a, str) else list(a)
            if len(p_list) != len(a_list):
                raise ValueError(f"{name}[{key!r}]: request {i} has {len(p_list)} prompts, {len(a_list)} answers")
            out[i][key] = {"prompt": p_list, "ground_truth": a_list}
    return out


def _requests(prompts, target_new, ground_truth, rephrase_prompts, locality_inputs, portability_inputs,
              subject) -> List[Dict[str, Any]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    targets = _listed(target_new, n, "target_new")
    truths = _listed(ground_truth, n, "ground_truth")
    subjects = _listed(subject, n, "subject")
    if any(s is None for s in subjects):
        raise ValueError("subject: ROME needs the subject of every prompt (subject=[...])")
    rephrases = _listed(rephrase_prompts, n, "rephrase_prompts")
    locality = _per_request(locality_inputs, n, "locality_inputs")
    portability = _per_request(portability_inputs, n, "portability_inputs")
    return [{"prompt": prompts[i], "target_new": targets[i], "ground_truth": truths[i] or "<|endoftext|>",
             "subject": subjects[i], "rephrase_prompt": rephrases[i], "locality": locality[i],
             "portability": portability[i]} for i in range(n)]


def _fastrome_request(request: Dict[str, Any], index: int) -> Dict[str, Any]:
    truth = request["ground_truth"]
    return {"prompt": request["prompt"], "subject": request["subject"], "target_new": request["target_new"],
            "case_id": index, **({"target_true": truth} if truth and truth != "<|endoftext|>" else {})}


def _scores(model: nn.Module, tok: Any, prompt: str, answer: str):
    from fastrome.metrics import score_targets

    with torch.no_grad():
        return score_targets(model, tok, [prompt], [answer])[0]


def _accuracy(model: nn.Module, tok: Any, prompt: str, answer: str) -> float:
    """Teacher-forced token accuracy of ``answer`` after ``prompt`` (EasyEdit's rewrite accuracy)."""
    top = _scores(model, tok, prompt, answer).top
    return sum(top) / len(top) if top else math.nan


def _predicted(model: nn.Module, tok: Any, prompt: str, answer: str) -> List[int]:
    """The model's teacher-forced top token at each of ``answer``'s positions after ``prompt``."""
    from fastrome.tokens import encode, pad_id, right_pad, target_ids

    text = answer if answer[:1].isspace() else " " + answer
    pre, tgt = encode(tok, prompt), target_ids(tok, prompt, text)
    device = next(model.parameters()).device
    ids, mask = right_pad([pre + tgt], pad_id(tok), device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
    return logits[len(pre) - 1:len(pre) - 1 + len(tgt)].argmax(-1).tolist()
