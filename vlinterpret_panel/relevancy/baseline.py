"""The random baseline: a seeded uniform value per token, the floor every method must beat."""

from __future__ import annotations

import numpy as np

from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.registry import register
from vlinterpret_panel.relevancy.result import Relevancy


@register("random", needs=[])
def random_relevancy(captured: Captured, *, seed: int = 0) -> Relevancy:
    """``numpy.random.default_rng(seed).random`` over the real tokens (NaN for padding); reads no attention."""
    values = np.full(len(captured.modality), np.nan)
    values[: captured.n_tokens] = np.random.default_rng(seed).random(captured.n_tokens)
    return Relevancy(
        method="random",
        values=values,
        modality=captured.modality,
        target=captured.target,
        readout="none",
        readout_tokens=(),
        options={"seed": seed},
    )
