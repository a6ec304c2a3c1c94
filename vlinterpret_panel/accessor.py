"""``ds.vli``: the analysis API that notebooks and dashboard views share.

Each method delegates to the module that owns the computation (``maps``, ``stats``,
``projection``, ``neighbors``), so nothing is computed in two places. Import
``vlinterpret_panel`` (or this module) to register the accessor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import xarray as xr


@xr.register_dataset_accessor("vli")
class VLIAccessor:
    """Analysis of a schema Dataset; every method stays lazy until its result is shown."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def attention_map(self, example: int | str, layer: int, head: int | None = None) -> xr.DataArray:
        """One ``(query, key)`` attention map trimmed to the example's real tokens; head None = mean."""
        from vlinterpret_panel.maps import attention_map

        return attention_map(self._ds, example, layer, head)

    def token_attention_on_image(
        self,
        example: int | str,
        layer: int,
        head: int | None,
        token: int | list[int],
        direction: str = "from",
        smooth: bool = False,
    ) -> xr.DataArray:
        """Attention from (or to) token(s) over the image, as an ``(image_y, image_x)`` array."""
        from vlinterpret_panel.maps import token_attention_on_image

        return token_attention_on_image(self._ds, example, layer, head, token, direction=direction, smooth=smooth)

    def token_attention(
        self, example: int | str, layer: int, head: int | None, token: int | list[int], direction: str = "from"
    ) -> xr.DataArray:
        """Attention from (the row) or to (the column) token(s), one value per token."""
        from vlinterpret_panel.maps import token_attention

        return token_attention(self._ds, example, layer, head, token, direction=direction)

    def values_on_image(self, example: int | str, values: Any, smooth: bool = False) -> xr.DataArray:
        """One value per token (attention, relevancy...) painted over the example's image."""
        from vlinterpret_panel.maps import values_on_image

        return values_on_image(self._ds, example, values, smooth=smooth)

    def statistics(self) -> list[str]:
        """Names of the head statistics this dataset offers (built-in, then ``custom:<metric>``)."""
        from vlinterpret_panel.stats import available_statistics

        return available_statistics(self._ds)

    def head_stats(self, statistics: Sequence[str] | None = None) -> xr.Dataset:
        """Per (example, layer, head) statistics, lazily (see ``stats.head_statistics``)."""
        from vlinterpret_panel.stats import head_statistics

        return head_statistics(self._ds, statistics=statistics)

    def head_summary(
        self,
        statistic: str,
        *,
        example: int | str | None = None,
        where: xr.DataArray | None = None,
        normalize: str = "raw",
        aggregate: str = "mean",
    ) -> xr.DataArray:
        """A ``(layer, head)`` summary of one statistic for an example or a subset (see ``stats.head_summary``)."""
        from vlinterpret_panel.stats import head_summary

        return head_summary(self._ds, statistic, example=example, where=where, normalize=normalize, aggregate=aggregate)

    def compute_stats(self, *, progress: bool = False) -> xr.Dataset:
        """Every built-in statistic of every example, in memory and cached beside the store."""
        from vlinterpret_panel.stats import compute_head_statistics

        return compute_head_statistics(self._ds, progress=progress)

    def projection(
        self, hidden_layer: int, *, method: str = "pca", sample_size: int | None = None, seed: int = 0, **kwargs: Any
    ) -> xr.Dataset:
        """2-D projection of all tokens' hidden states at one layer, in one shared map (see ``projection``)."""
        from vlinterpret_panel.projection import project_hidden_states

        return project_hidden_states(
            self._ds, hidden_layer, method=method, sample_size=sample_size, seed=seed, **kwargs
        )

    def nearest_tokens(
        self, example: int | str, token: int, hidden_layer: int, k: int = 10, *, modality: str | None = None
    ) -> pd.DataFrame:
        """The ``k`` nearest tokens across the dataset in hidden space, with their examples and texts."""
        from vlinterpret_panel.neighbors import nearest_tokens

        return nearest_tokens(self._ds, example, token, hidden_layer, k=k, modality=modality)
