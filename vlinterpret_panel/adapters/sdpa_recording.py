"""Attention capture for Hugging Face decoders that run PyTorch SDPA (or any fused kernel).

Fused attention never materialises its probabilities, and ``output_attentions=True`` forces
the slow eager path, whose ``[layers, heads, T, T]`` maps alone take gigabytes at LLaVA scale.
Instead we register an attention function with transformers' ``AttentionInterface`` (its
documented extension point: no model code is copied or patched) that calls transformers' own
``sdpa_attention_forward`` and, while a ``recording`` block is active, hands that layer's
queries, keys (after rotary embeddings), values, mask and scaling to a callback as a
``LayerAttention``. The callback recomputes ``softmax(Q K^T * scaling + mask)`` for just the
rows it keeps, so memory stays at one layer's worth. Outside a ``recording`` block the
function is plain SDPA: ``generate`` runs at full speed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.answer import LayerAttention

RECORDING_ATTENTION = "vlinterpret_sdpa"


class _Recording:
    """One ``recording`` block: the modules to record (by identity) and the callback."""

    def __init__(self, modules: Sequence[nn.Module], on_layer: Callable[[int, LayerAttention], None]) -> None:
        self.layer_of = {id(module): index for index, module in enumerate(modules)}
        self.on_layer = on_layer


_ACTIVE: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("vli_sdpa_recording", default=None)


def _additive_bias(attention_mask: torch.Tensor | None, queries: int, keys: int, causal: bool) -> torch.Tensor:
    """The ``[1 or heads, queries, keys]`` additive mask SDPA applied for batch row 0.

    Without a mask, a causal module lets query ``i`` see keys up to ``i + keys - queries``
    (the queries are the last ones: a prefill, or one decoding step over the cached keys).
    """
    if attention_mask is None:
        if not causal:
            return torch.zeros(1, queries, keys)
        offset = keys - queries
        visible = torch.arange(keys)[None, :] <= torch.arange(queries)[:, None] + offset
        return torch.zeros(1, queries, keys).masked_fill(~visible, float("-inf"))
    mask = attention_mask[0, :, -queries:, :keys]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return mask.float()


def recording_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; inside ``recording``, also the layer's inputs to the callback."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    output, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    recording = _ACTIVE.get()
    layer = None if recording is None else recording.layer_of.get(id(module))
    if recording is None or layer is None:
        return output, None
    if query.shape[0] != 1:
        raise VLIError("attention is recorded one example at a time (batch size 1)")
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        raise VLIError(f"{type(module).__name__}: attention with a position bias or soft-capping is not recomputed")
    groups = int(getattr(module, "num_key_value_groups", 1))
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    with torch.no_grad():
        attention = LayerAttention(
            query=query[0].detach(),
            key=repeat_kv(key, groups)[0].detach(),
            value=repeat_kv(value, groups)[0].detach(),
            bias=_additive_bias(attention_mask, int(query.shape[2]), int(key.shape[2]), causal),
            scaling=float(query.shape[-1] ** -0.5 if scaling is None else scaling),
            output=output if output.requires_grad else None,
        )
    recording.on_layer(layer, attention)
    return output, None


def register_recording_attention() -> str:
    """Register ``RECORDING_ATTENTION`` (attention and mask functions: SDPA's) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(RECORDING_ATTENTION, recording_attention_forward)
    AttentionMaskInterface.register(RECORDING_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return RECORDING_ATTENTION


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` (all its sub-models) with attention implementation ``name`` inside the block."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    model.set_attn_implementation(name)  # type: ignore[operator]  # nn.Module's __getattr__ hides it
    try:
        yield
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)  # type: ignore[operator]


@contextlib.contextmanager
def recording(modules: Sequence[nn.Module], on_layer: Callable[[int, LayerAttention], None]) -> Iterator[None]:
    """Inside the block, each of ``modules`` (attention modules, in layer order) reports to ``on_layer``."""
    token = _ACTIVE.set(_Recording(modules, on_layer))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
