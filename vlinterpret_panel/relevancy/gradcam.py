"""Grad-CAM over attention: last-layer attention weighted by each head's mean gradient."""

from __future__ import annotations

import numpy as np

from vlinterpret_panel.relevancy.common import block_mask, head_maps, read_out
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.raw import last_module_row
from vlinterpret_panel.relevancy.registry import ATTENTION, GRADIENTS, register
from vlinterpret_panel.relevancy.result import Relevancy


def attention_gradcam_map(captured: Captured, layer: int) -> np.ndarray:
    """cam = (E_h[w_h·A_h])⁺ with w_h the mean of ∇A_h over the module's (query, key) block.

    Here the clamp comes *after* the head mean (Grad-CAM's own rule, unlike the generic
    method's Ā); the mean of the gradient is over the module's block, not the full frame.
    """
    gradient = captured.require("attention_gradient", "attention_gradcam")
    block = block_mask(captured, layer)
    head_gradients = head_maps(captured, gradient, layer)
    weights = head_gradients[:, block].mean(axis=1)
    attention = head_maps(captured, captured.attention, layer)
    return np.clip((weights[:, None, None] * attention).mean(axis=0), 0.0, None)


@register("attention_gradcam", needs=[ATTENTION, GRADIENTS])
def attention_gradcam(captured: Captured, *, readout: str | None = None) -> Relevancy:
    """Grad-CAM on the last attention module(s) the readout token queries (as raw attention)."""
    captured.require("attention_gradient", "attention_gradcam")
    return read_out(
        captured,
        "attention_gradcam",
        readout,
        lambda token, _: last_module_row(captured, token, lambda layer: attention_gradcam_map(captured, layer)),
        {},
    )
