"""Raw attention: the head-mean attention of the last module the readout token queries."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vlinterpret_panel.relevancy.common import mean_attention, read_out
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.registry import ATTENTION, register
from vlinterpret_panel.relevancy.result import Relevancy


def last_module_row(captured: Captured, token: int, map_of_layer: Callable[[int], np.ndarray]) -> np.ndarray:
    """Readout row where each key column comes from the last module in which ``token`` attends it.

    Single stream: the last layer's row. Dual stream: text columns from the last text
    self-attention, image columns from the last text-to-image cross-attention (as in
    Chefer et al.'s LXMERT baselines). ``map_of_layer(layer)`` gives the ``(n, n)`` map.
    """
    row = np.zeros(captured.n_tokens)
    for layer in range(len(captured.layer_kind)):
        queries, keys = captured.block(layer)
        if queries[token]:
            row[keys] = map_of_layer(layer)[token, keys]
    return row


@register("raw_attention", needs=[ATTENTION])
def raw_attention(captured: Captured, *, readout: str | None = None) -> Relevancy:
    """E_h[A_last][readout]: what the readout token attends to in the last layer, heads averaged."""
    return read_out(
        captured,
        "raw_attention",
        readout,
        lambda token, _: last_module_row(captured, token, lambda layer: mean_attention(captured, layer)),
        {},
    )
