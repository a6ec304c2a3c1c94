"""Transformer Attribution (Chefer et al., arXiv 2012.09838): the combination step over LRP relevances.

R^A_b, the LRP relevance of each module's attention probabilities, comes from
``relevancy.lrp`` (rules through the built-in models' own layers); this module combines it
with the attention gradients. Cross-attention (the dual-stream model's co-attention) takes the
generic method's cross-attention rules with R^A in place of A, as that paper's bi-modal
follow-up does for its gradient-weighted maps.
"""

from __future__ import annotations

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.common import read_out
from vlinterpret_panel.relevancy.generic import propagate_relevance
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.registry import ATTENTION, GRADIENTS, LRP, register
from vlinterpret_panel.relevancy.result import Relevancy


@register("transformer_attribution", needs=[ATTENTION, GRADIENTS, LRP])
def transformer_attribution(captured: Captured, *, readout: str | None = None, start_layer: int = 0) -> Relevancy:
    """Π_b (I + E_h[(∇A_b ⊙ R^A_b)⁺]) read at the readout row; R^A_b from ``captured.attention_relevance``.

    Self-attention stacks as in the original (no renormalisation; their ViT evaluation used
    ``start_layer=1``); cross modules by the generic method's co-attention rules.
    """
    if captured.attention_relevance is None:
        raise VLIError(
            "transformer_attribution needs the LRP relevance of each attention map: get it with "
            "relevancy.capture.capture_for(adapter, item, ['transformer_attribution']), which supports "
            "the built-in models only (there are no LRP rules for Hugging Face models)"
        )
    captured.require("attention_gradient", "transformer_attribution")
    relevance = propagate_relevance(captured, captured.attention_relevance, start_layer)
    return read_out(
        captured, "transformer_attribution", readout, lambda token, _: relevance[token], {"start_layer": start_layer}
    )
