"""Transformer Attribution (Chefer et al., arXiv 2012.09838): the combination step over LRP relevances.

The LRP propagation that produces R^A_b, the relevance of each block's attention
probabilities, is not implemented here: it needs relevance rules through our own model
layers (``vlinterpret_panel.models.layers``). This module combines given relevances.
"""

from __future__ import annotations

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.common import read_out
from vlinterpret_panel.relevancy.generic import propagate_relevance
from vlinterpret_panel.relevancy.inputs import CROSS_KINDS, Captured
from vlinterpret_panel.relevancy.registry import register
from vlinterpret_panel.relevancy.result import Relevancy


@register("transformer_attribution")
def transformer_attribution(captured: Captured, *, readout: str | None = None, start_layer: int = 0) -> Relevancy:
    """Π_b (I + E_h[(∇A_b ⊙ R^A_b)⁺]) read at the readout row; R^A_b from ``captured.attention_relevance``.

    Defined for self-attention stacks (single stream, each tower of a dual encoder); no
    renormalisation, as in the original. Their ViT evaluation used ``start_layer=1``.
    """
    relevance_of_attention = captured.require("attention_relevance", "transformer_attribution")
    captured.require("attention_gradient", "transformer_attribution")
    if any(kind in CROSS_KINDS for kind in captured.layer_kind):
        raise VLIError("transformer_attribution is defined for self-attention stacks; this model has cross-attention")
    relevance = propagate_relevance(captured, relevance_of_attention, start_layer)
    return read_out(
        captured, "transformer_attribution", readout, lambda token, _: relevance[token], {"start_layer": start_layer}
    )
