"""Architecture adapter: where the edited matrix lives in a Hugging Face causal LM.

The edited module is the MLP's down projection (``mlp.down_proj`` in Llama / Mistral / Qwen2 /
Gemma / Phi-3, ``mlp.c_proj`` in GPT-2 (a Conv1D, with bias), ``mlp.fc_out`` in GPT-J). Its path is
discovered from the module tree and can be overridden with a template such as
``"model.layers.{}.mlp.down_proj"``. Weights are always handed out in nn.Linear orientation
``(d_out, d_in)``; for Conv1D that is a transposed view, so writes land in place.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

MLP_NAMES = ("mlp", "feed_forward", "ffn")
DOWN_PROJ_NAMES = ("down_proj", "c_proj", "fc_out", "fc2", "dense_4h_to_h", "w2")
LLAMA_FAMILY = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3"}
)
# Model types whose logits are exactly lm_head(base_model(...).last_hidden_state): for these the
# loss can read logits only at the positions it needs. Others (soft-capped or scaled logits) run
# the full head.
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gptj", "phi3", "olmo", "olmo2", "smollm3"})

# Edited layer chosen by measurement for known models: (model_type, layers, hidden, d_ff) -> layer.
# SmolLM2-135M: see benches/results/layer_sweep_smollm2.json and README ("Choice of layer").
MEASURED_LAYERS = {("llama", 30, 576, 1536): 6}


def head_split(model: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """``(body, head)`` when the model's logits are exactly ``head(body(...).last_hidden_state)``
    (its type in :data:`PLAIN_HEAD` and an output embedding present), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD or head is None:
        return None
    return getattr(model, "base_model", model), head


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _n_layers(config) -> Optional[int]:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


class ModelAdapter:
    """Locates and reads the edited matrices of one model.

    Args:
        model: a Hugging Face causal LM (``PreTrainedModel`` with ``.config``).
        module_template: dotted path of the down projection with ``{}`` for the layer index;
            discovered when None.
    """

    def __init__(self, model: nn.Module, module_template: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = getattr(model, "config", None)
        self.model_type = str(getattr(self.config, "model_type", type(model).__name__)).lower()
        modules = dict(model.named_modules())
        if module_template is None:
            module_template, n_layers = self._discover(model)
        else:
            if module_template.count("{}") != 1:
                raise ValueError(f"module_template: expected exactly one '{{}}', got {module_template!r}")
            n_layers = 0
            while module_template.format(n_layers) in modules:
                n_layers += 1
            if n_layers == 0:
                raise ValueError(
                    f"module_template: {module_template!r} matches no module (e.g. "
                    f"{module_template.format(0)!r} does not exist in {type(model).__name__})"
                )
        self.module_template = module_template
        self.n_layers = n_layers
        first = modules[module_template.format(0)]
        if not (isinstance(first, nn.Linear) or _is_conv1d(first)):
            raise ValueError(
                f"module_template: {module_template.format(0)!r} is a {type(first).__name__}; "
                "fastrome edits nn.Linear or transformers Conv1D down projections"
            )
        self.is_conv1d = _is_conv1d(first)
        w = self.weight(0)
        self.d_out, self.d_in = int(w.shape[0]), int(w.shape[1])

    # -- discovery ---------------------------------------------------------------------------
    @staticmethod
    def _discover(model: nn.Module) -> Tuple[str, int]:
        n_expected = _n_layers(getattr(model, "config", None))
        candidates: List[Tuple[str, nn.ModuleList]] = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_expected is None or len(mod) == n_expected)
        ]
        for path, layers in candidates:
            for sub, mod in layers[0].named_modules():
                parts = sub.split(".")
                if len(parts) >= 2 and parts[-2] in MLP_NAMES and parts[-1] in DOWN_PROJ_NAMES:
                    if isinstance(mod, nn.Linear) or _is_conv1d(mod):
                        return f"{path}.{{}}.{sub}", len(layers)
        raise ValueError(
            f"model: could not find an MLP down projection in {type(model).__name__} (looked for "
            f"<layers>.N.{{{'|'.join(MLP_NAMES)}}}.{{{'|'.join(DOWN_PROJ_NAMES)}}}); pass module_template="
            "'path.to.layers.{}.mlp.down_proj'"
        )

    # -- facts about the model ---------------------------------------------------------------
    @property
    def family(self) -> str:
        """'llama' for Llama-style models, 'gpt' otherwise (chooses the default hyper-parameters)."""
        return "llama" if self.model_type in LLAMA_FAMILY else "gpt"

    @property
    def plain_head(self) -> bool:
        return head_split(self.model) is not None

    def default_layer(self) -> int:
        """The measured layer for known models, else about one sixth of the depth (the depth the
        published ROME layers sit at: 5 of 32 for Llama-2-7B, 5 of 28 for GPT-J)."""
        cfg = self.config
        key = (
            self.model_type,
            self.n_layers,
            getattr(cfg, "hidden_size", None),
            getattr(cfg, "intermediate_size", None),
        )
        if key in MEASURED_LAYERS:
            return MEASURED_LAYERS[key]
        return max(0, min(self.n_layers - 1, round(self.n_layers / 6)))

    def check_layer(self, layer: int, where: str = "layer") -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise ValueError(
                f"{where}: {layer!r} is not a layer of this model (it has layers 0..{self.n_layers - 1})"
            )
        return layer

    # -- the edited module --------------------------------------------------------------------
    def module_name(self, layer: int) -> str:
        return self.module_template.format(layer)

    def module(self, layer: int) -> nn.Module:
        return self.model.get_submodule(self.module_name(self.check_layer(layer)))

    def block(self, layer: int) -> nn.Module:
        """The transformer block holding ``layer``'s down projection (its output is the residual stream)."""
        return self.model.get_submodule(self.module_template.split("{}")[0] + str(self.check_layer(layer)))

    def weight(self, layer: int) -> Tensor:
        """The edited weight as a (d_out, d_in) view (transposed for Conv1D)."""
        mod = self.module(layer)
        return mod.weight.t() if _is_conv1d(mod) else mod.weight

    def bias(self, layer: int) -> Optional[Tensor]:
        return getattr(self.module(layer), "bias", None)

    def device(self, layer: int) -> torch.device:
        return self.module(layer).weight.device

    def layer_parameters(self, layer: int) -> List[Tuple[str, Tensor]]:
        """Parameters that can influence the keys at ``layer``: everything except the blocks after
        it and its own down projection (which only consumes the key). Used to fingerprint
        statistics, so they stay valid while that layer is being edited."""
        down = self.module_name(layer) + "."
        layers_path = self.module_template.split(".{}")[0] + "."
        out = []
        for name, p in self.model.named_parameters():
            if name.startswith(down):
                continue
            if name.startswith(layers_path):
                idx = name[len(layers_path) :].split(".")[0]
                if idx.isdigit() and int(idx) > layer:
                    continue
            out.append((name, p))
        return out

    # -- heads ---------------------------------------------------------------------------------
    def output_embeddings(self) -> Optional[nn.Module]:
        get = getattr(self.model, "get_output_embeddings", None)
        return get() if callable(get) else None

    def base_model(self) -> nn.Module:
        return getattr(self.model, "base_model", self.model)

    def logits_at(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        positions: Sequence[Tuple[int, int]],
    ) -> Tensor:
        """Logits (n, vocab) at the given (row, position) pairs, fp32.

        Runs the head only at those positions when the model's logits are a plain linear head of
        the final hidden state; otherwise runs the whole model.
        """
        rows = torch.tensor([p[0] for p in positions], device=input_ids.device)
        cols = torch.tensor([p[1] for p in positions], device=input_ids.device)
        if self.plain_head:
            hidden = self.base_model()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            head = self.output_embeddings()
            picked = hidden[rows, cols]
            return head(picked.to(head.weight.dtype)).float()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[rows, cols].float()
