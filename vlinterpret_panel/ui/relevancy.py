"""Relevancy view: a method and its target, image and text relevancy side by side, all methods compared."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn
import xarray as xr

from vlinterpret_panel.ui.common import OVERLAY_ALPHA, OVERLAY_CMAP, PLOT_SIZE, dynamic_map, guarded, heading
from vlinterpret_panel.ui.image import image_element, image_plot_size, map_element
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.text import coloured_tokens, token_labels, token_layout
from vlinterpret_panel.ui.view import View

COMPARISON_SIZE = 180


class RelevancyView(View):
    """What the output depends on, by the relevancy methods stored with the examples."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self._image = dynamic_map(self._on_image, streams=self.streams("example", "relevancy_method", "smooth"))
        self._text = dynamic_map(self._on_text, streams=self.streams("example", "relevancy_method"))
        self._all_methods = dynamic_map(self._comparison, streams=self.streams("example", "smooth"))

    @property
    def methods(self) -> list[str]:
        """The relevancy methods the store holds."""
        return self.ds.vli.relevancy_methods

    def _empty_image(self, message: str) -> hv.Overlay:
        blank = np.zeros((1, 1, 3), dtype=np.uint8)
        return image_element(blank).opts(title=message[:80]) * map_element(np.full((1, 1), np.nan), "relevancy")

    @staticmethod
    def _image_with(
        ds: xr.Dataset, example: str, method: str, smooth: bool, size: dict[str, int] | None = None
    ) -> hv.Overlay:
        tokens = ds.vli.tokens(example)
        relevancy = ds.vli.relevancy(example, method)
        values, target = relevancy.values, relevancy.attrs["target"]
        painted = ds.vli.values_on_image(example, np.nan_to_num(values), smooth=smooth).values
        finite = painted[np.isfinite(painted)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        size = size or image_plot_size(tokens.image)
        picture = image_element(tokens.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, title=method, **size)
        heat = map_element(painted, "relevancy").opts(
            cmap=OVERLAY_CMAP, clim=(0, top), alpha=OVERLAY_ALPHA, invert_yaxis=True, tools=["hover"]
        )
        return (picture * heat).opts(title=f"{method} → {target}" if target else method)

    def _on_image(self, example: str, relevancy_method: str, smooth: bool, ds: xr.Dataset) -> hv.Overlay:
        return guarded(self.selection, self._empty_image)(self._image_with)(ds, example, relevancy_method, smooth)

    def _empty_text(self, message: str) -> hv.Overlay:
        info = self.ds.vli.tokens(self.selection.example)
        layout = token_layout(info)
        return coloured_tokens(layout, np.zeros(info.n_tokens), "", message) * token_labels(layout)

    @staticmethod
    def _text_with(ds: xr.Dataset, example: str, method: str) -> hv.Overlay:
        relevancy = ds.vli.relevancy(example, method)
        layout = token_layout(ds.vli.tokens(example))
        title = f"text relevancy for {relevancy.attrs['target']}"
        return coloured_tokens(layout, np.nan_to_num(relevancy.values), "relevancy", title) * token_labels(layout)

    def _on_text(self, example: str, relevancy_method: str, ds: xr.Dataset) -> hv.Overlay:
        return guarded(self.selection, self._empty_text)(self._text_with)(ds, example, relevancy_method)

    def _comparison(self, example: str, smooth: bool, ds: xr.Dataset) -> hv.Layout:
        size = {"frame_width": COMPARISON_SIZE, "frame_height": COMPARISON_SIZE}
        methods = ds.vli.relevancy_methods
        return hv.Layout([self._image_with(ds, example, method, smooth, size) for method in methods]).cols(4)

    def __panel__(self) -> pn.viewable.Viewable:
        if not self.methods:
            return pn.pane.Markdown(
                "This store has no `relevancy` variable: extract with a relevancy method to see it here.",
                width=PLOT_SIZE * 2,
            )
        method = pn.widgets.Select.from_param(
            self.selection.param.relevancy_method, options=self.methods, label="method"
        )
        return pn.Column(
            method,
            pn.Row(pn.pane.HoloViews(self._image, linked_axes=False), pn.pane.HoloViews(self._text, linked_axes=False)),
            heading("All methods", level=4),
            pn.pane.HoloViews(self._all_methods, linked_axes=False),
        )
