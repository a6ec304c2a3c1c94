"""AttnLRP (Achtibat et al., ICML 2024): the relevance each token's embedding receives, as a relevancy map.

The relevance comes from ``relevancy.attnlrp_rules`` (the rules through the built-in models'
layers); this module reads it out like every other method. Unlike the attention-based methods
the values are signed: a negative token speaks against the explained answer. A token's value
is its embedding's relevance summed over features, as the paper's heatmaps are.
"""

from __future__ import annotations

from vlinterpret_panel.relevancy.common import read_out
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.registry import ATTNLRP, register
from vlinterpret_panel.relevancy.result import Relevancy


@register("attnlrp", needs=[ATTNLRP])
def attnlrp(captured: Captured, *, readout: str | None = None) -> Relevancy:
    """Each token's AttnLRP relevance (signed), read at the adapter's readout; the readout tokens are 0."""
    values = captured.require("token_relevance", "attnlrp")[: captured.n_tokens]
    return read_out(captured, "attnlrp", readout, lambda token, _: values, {})
