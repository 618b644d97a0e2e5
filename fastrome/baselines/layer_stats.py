"""Key statistics the way the published ROME code computes them, as a baseline.

One layer per pass: a full-model forward with a hook that records the down projection's input and
stops the pass right after it; the non-pad rows are gathered and ``mom2 += xᵀx`` runs as a plain
fp32 matrix product (both triangles); documents are truncated one per sequence (no packing). The
text, its order, the truncation and the batching are fastrome's, so the two compute the same
second moment over the same tokens and differ only in how.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastrome.adapter import ModelAdapter
from fastrome.corpus import Corpus
from fastrome.keys import StopForward, input_device
from fastrome.stats.collect import length_batches, token_sequences
from fastrome.tokens import pad_id, right_pad


@torch.no_grad()
def layer_stats_reference(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    *,
    corpus: Corpus,
    tokens: int,
    max_len: int = 1024,
    batch_tokens: int = 8192,
    module_template: Optional[str] = None,
) -> Tuple[Tensor, int]:
    """``(mom2, count)``: the fp32 (d, d) sum of ``k kᵀ`` over ``count`` keys at ``layer``."""
    adapter = ModelAdapter(model, module_template)
    adapter.check_layer(layer)
    seen: Dict[str, Tensor] = {}

    def stop(module, args, output):
        seen["x"] = args[0]
        raise StopForward

    handle = adapter.module(layer).register_forward_hook(stop)
    mom2: Optional[Tensor] = None
    count = 0
    device = input_device(adapter)
    try:
        for batch in length_batches(token_sequences(corpus, tokenizer, tokens, max_len, "truncate"), batch_tokens):
            ids, mask = right_pad(batch, pad_id(tokenizer), device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            x = seen.pop("x")
            feats = x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool().to(x.device)].float()
            if mom2 is None:
                mom2 = feats.new_zeros(feats.shape[1], feats.shape[1])
            mom2.addmm_(feats.t(), feats)
            count += feats.shape[0]
    finally:
        handle.remove()
    if mom2 is None:
        raise ValueError(f"corpus: {corpus.id} gave no sequences")
    return mom2, count


def all_layers_reference(
    model: nn.Module, tokenizer: Any, layers: Sequence[int], **kw: Any
) -> Dict[int, Tuple[Tensor, int]]:
    """One full pass per layer, as the published code does for several layers."""
    return {layer: layer_stats_reference(model, tokenizer, layer, **kw) for layer in layers}
