"""Reading keys and values at the subject's last token in one batched forward pass.

The key is the input of the edited down projection and the value its output. A forward hook
records both at the requested positions and then stops the pass: nothing after the edited layer
is needed.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from fastrome.adapter import ModelAdapter
from fastrome.tokens import SubjectPrompt, right_pad


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been read."""


def input_device(adapter: ModelAdapter) -> torch.device:
    emb = adapter.model.get_input_embeddings()
    return emb.weight.device if emb is not None else next(adapter.model.parameters()).device


@torch.no_grad()
def capture_at(
    adapter: ModelAdapter, layer: int, prompts: Sequence[SubjectPrompt], pad: int
) -> Tuple[Tensor, Tensor]:
    """Keys (n, d_in) and values (n, d_out), fp32, at each prompt's subject-last token."""
    ids, mask = right_pad([p.ids for p in prompts], pad, input_device(adapter))
    rows = torch.arange(len(prompts))
    cols = torch.tensor([p.last for p in prompts])
    store = {}

    def hook(module, args, output):
        x = args[0]
        store["k"] = x[rows.to(x.device), cols.to(x.device)].float()
        store["v"] = output[rows.to(output.device), cols.to(output.device)].float()
        raise StopForward

    handle = adapter.module(layer).register_forward_hook(hook)
    try:
        adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "k" not in store:
        raise RuntimeError(f"the forward pass never reached {adapter.module_name(layer)}")
    return store["k"], store["v"]


@torch.no_grad()
def capture_residual(adapter: ModelAdapter, layer: int, prompts: Sequence[SubjectPrompt], pad: int) -> Tensor:
    """The residual stream after ``layer``'s block (n, d_out), fp32, at each prompt's subject-last token."""
    ids, mask = right_pad([p.ids for p in prompts], pad, input_device(adapter))
    rows = torch.arange(len(prompts))
    cols = torch.tensor([p.last for p in prompts])
    store = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        store["h"] = hidden[rows.to(hidden.device), cols.to(hidden.device)].float()
        raise StopForward

    handle = adapter.block(layer).register_forward_hook(hook)
    try:
        adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in store:
        raise RuntimeError(f"the forward pass never reached block {layer}")
    return store["h"]
