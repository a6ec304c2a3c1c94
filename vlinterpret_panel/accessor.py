"""``ds.vli``: the analysis API that notebooks and dashboard views share.

Each method delegates to the module that owns the computation (``maps``, ``stats``,
``projection``, ``neighbors``), so nothing is computed in two places. Import
``vlinterpret_panel`` (or this module) to register the accessor.
"""

from __future__ import annotations

from typing import Any

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

    def head_stats(self, **kwargs: Any) -> xr.Dataset:
        """Per (example, layer, head) statistics, lazily (see ``stats.head_statistics``)."""
        from vlinterpret_panel.stats import head_statistics

        return head_statistics(self._ds, **kwargs)

    def head_summary(self, statistic: str, **kwargs: Any) -> xr.DataArray:
        """A ``(layer, head)`` summary of one statistic for an example or a subset (see ``stats``)."""
        from vlinterpret_panel.stats import head_summary

        return head_summary(self._ds, statistic, **kwargs)

    def projection(self, hidden_layer: int, **kwargs: Any) -> xr.Dataset:
        """2-D projection of all tokens' hidden states at one layer, in one shared map."""
        from vlinterpret_panel.projection import project_hidden_states

        return project_hidden_states(self._ds, hidden_layer, **kwargs)

    def nearest_tokens(self, example: int | str, token: int, hidden_layer: int, k: int = 10, **kwargs: Any):
        """The ``k`` nearest tokens across the dataset in hidden space, with their examples and texts."""
        from vlinterpret_panel.neighbors import nearest_tokens

        return nearest_tokens(self._ds, example, token, hidden_layer, k=k, **kwargs)
