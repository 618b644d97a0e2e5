"""Reading keys and values at the subject's last token in one batched forward pass.

The key is the input of the edited down projection and the value its output. A forward hook
records both at the requested positions and then stops the pass: nothing after the edited layer
is needed.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from fastrome.adapter import ModelAdapter
from fastrome.tokens import SubjectPrompt, right_pad


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been read."""


def input_device(adapter: ModelAdapter) -> torch.device:
    emb = adapter.model.get_input_embeddings()
    return emb.weight.device if emb is not None else next(adapter.model.parameters()).device


def _read_at(
    adapter: ModelAdapter, module: torch.nn.Module, what: str, prompts: Sequence[SubjectPrompt], pad: int,
    read: Callable[[tuple, Any, Tensor, Tensor], Dict[str, Tensor]],
) -> Dict[str, Tensor]:
    """One batched forward pass up to ``module``; ``read(args, output, rows, cols)`` picks what is
    needed at each prompt's subject-last token, then the pass stops."""
    return _read_at_modules(adapter, [(module, what, read)], prompts, pad)


def _read_at_modules(
    adapter: ModelAdapter, reads: Sequence[Tuple[torch.nn.Module, str, Callable[..., Dict[str, Tensor]]]],
    prompts: Sequence[SubjectPrompt], pad: int,
) -> Dict[str, Tensor]:
    """One batched forward pass through several ``(module, what, read)``, in the order the model
    runs them; each ``read`` adds its picks, and the pass stops after the last module."""
    ids, mask = right_pad([p.ids for p in prompts], pad, input_device(adapter))
    rows = torch.arange(len(prompts))
    cols = torch.tensor([p.last for p in prompts])
    store: Dict[str, Tensor] = {}
    seen = set()

    def hook_for(i: int, read: Callable[..., Dict[str, Tensor]]):
        def hook(mod, args, output):
            store.update(read(args, output, rows, cols))
            seen.add(i)
            if i == len(reads) - 1:
                raise StopForward

        return hook

    handles = [module.register_forward_hook(hook_for(i, read)) for i, (module, _, read) in enumerate(reads)]
    try:
        adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [what for i, (_, what, _) in enumerate(reads) if i not in seen]
    if missing:
        raise RuntimeError(f"the forward pass never reached {missing[0]}")
    return store


def _at(t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return t[rows.to(t.device), cols.to(t.device)].float()


@torch.no_grad()
def capture_at(
    adapter: ModelAdapter, layer: int, prompts: Sequence[SubjectPrompt], pad: int
) -> Tuple[Tensor, Tensor]:
    """Keys (n, d_in) and values (n, d_out), fp32, at each prompt's subject-last token."""
    got = _read_at(
        adapter, adapter.module(layer), adapter.module_name(layer), prompts, pad,
        lambda args, output, rows, cols: {"k": _at(args[0], rows, cols), "v": _at(output, rows, cols)},
    )
    return got["k"], got["v"]


@torch.no_grad()
def capture_keys(
    adapter: ModelAdapter, layers: Sequence[int], prompts: Sequence[SubjectPrompt], pad: int
) -> Dict[int, Tensor]:
    """``{layer: keys (n, d_in)}``, fp32, at each prompt's subject-last token for several layers in
    one forward pass (it stops after the highest of them)."""
    layers = sorted(set(layers))

    def key_of(layer: int):
        return lambda args, output, rows, cols: {str(layer): _at(args[0], rows, cols)}

    got = _read_at_modules(adapter, [(adapter.module(layer), adapter.module_name(layer), key_of(layer))
                                     for layer in layers], prompts, pad) if layers else {}
    return {layer: got[str(layer)] for layer in layers}


@torch.no_grad()
def capture_residual(adapter: ModelAdapter, layer: int, prompts: Sequence[SubjectPrompt], pad: int) -> Tensor:
    """The residual stream after ``layer``'s block (n, d_out), fp32, at each prompt's subject-last token."""

    def read(args, output, rows, cols):
        return {"h": _at(output[0] if isinstance(output, (tuple, list)) else output, rows, cols)}

    return _read_at(adapter, adapter.block(layer), f"block {layer}", prompts, pad, read)["h"]
