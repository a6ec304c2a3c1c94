"""The one result type of every relevancy method: a value per token, with how it was made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlinterpret_panel.schema import IMAGE, TEXT


@dataclass(frozen=True)
class Relevancy:
    """Relevancy of each token ``(T,)`` for ``target``; NaN for padded tokens.

    ``readout`` names the readout option used and ``readout_tokens`` the token(s) whose row
    was read (their own entries are 0). ``options`` holds every option with its resolved
    value, so a stored or plotted map can always say how it was computed.
    """

    method: str
    values: np.ndarray
    modality: Sequence[str]
    target: str
    readout: str
    readout_tokens: Sequence[int]
    options: Mapping[str, Any]

    def tokens(self, modality: str) -> np.ndarray:
        """Positions of the tokens of one modality ("text", "image", "special")."""
        return np.flatnonzero(np.asarray(self.modality) == modality)

    def part(self, modality: str) -> np.ndarray:
        """Relevancy of the tokens of one modality, in token order."""
        return self.values[self.tokens(modality)]

    @property
    def text(self) -> np.ndarray:
        """Relevancy of the text tokens."""
        return self.part(TEXT)

    @property
    def image(self) -> np.ndarray:
        """Relevancy of the image tokens."""
        return self.part(IMAGE)
