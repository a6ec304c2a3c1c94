"""Relevancy view: a method and its target, image and text relevancy side by side, all methods compared."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.maps import example_index, example_tokens, values_on_image
from vlinterpret_panel.ui.common import OVERLAY_ALPHA, OVERLAY_CMAP, PLOT_SIZE, dynamic_map, guarded, heading
from vlinterpret_panel.ui.image import image_element, image_plot_size, map_element
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.text import coloured_tokens, token_labels, token_layout

COMPARISON_SIZE = 180


def relevancy_values(ds: xr.Dataset, example: str, method: str) -> tuple[np.ndarray, str]:
    """The per-token relevancy of ``example`` by ``method`` (real tokens) and the output it explains."""
    index = example_index(ds, example)
    n_tokens = example_tokens(ds, example).n_tokens
    methods = [str(m) for m in ds.indexes["relevancy_method"]]
    if method not in methods:
        raise VLIError(f"relevancy method {method!r} is not in this store ({', '.join(methods)})")
    where = {"example": index, "relevancy_method": methods.index(method)}
    values = ds["relevancy"].isel(where).values[:n_tokens].astype(float)
    target = str(ds["relevancy_target"].isel(where).values) if "relevancy_target" in ds else ""
    return values, target


class RelevancyView(pn.viewable.Viewer):
    """What the output depends on, by the relevancy methods stored with the examples."""

    def __init__(self, ds: xr.Dataset, selection: Selection, **params) -> None:
        super().__init__(**params)
        self._ds, self.selection = ds, selection
        self.methods = [str(m) for m in ds.indexes["relevancy_method"]] if "relevancy" in ds else []
        if not self.methods:
            return
        streams = [hv.streams.Params(selection, ["example", "relevancy_method", "smooth"])]
        self._image = dynamic_map(self._on_image, streams=streams)
        self._text = dynamic_map(self._on_text, streams=[hv.streams.Params(selection, ["example", "relevancy_method"])])
        self._all_methods = dynamic_map(self._comparison, streams=[hv.streams.Params(selection, ["example", "smooth"])])

    def _empty_image(self, message: str) -> hv.Overlay:
        blank = np.zeros((1, 1, 3), dtype=np.uint8)
        return image_element(blank).opts(title=message[:80]) * map_element(np.full((1, 1), np.nan), "relevancy")

    def _image_with(self, example: str, method: str, smooth: bool, size: dict[str, int] | None = None) -> hv.Overlay:
        tokens = example_tokens(self._ds, example)
        values, target = relevancy_values(self._ds, example, method)
        painted = values_on_image(self._ds, example, np.nan_to_num(values), smooth=smooth).values
        finite = painted[np.isfinite(painted)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        size = size or image_plot_size(tokens.image)
        picture = image_element(tokens.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, title=method, **size)
        heat = map_element(painted, "relevancy").opts(
            cmap=OVERLAY_CMAP, clim=(0, top), alpha=OVERLAY_ALPHA, invert_yaxis=True, tools=["hover"]
        )
        return (picture * heat).opts(title=f"{method} → {target}" if target else method)

    def _on_image(self, example: str, relevancy_method: str, smooth: bool) -> hv.Overlay:
        return guarded(self.selection, self._empty_image)(self._image_with)(example, relevancy_method, smooth)

    def _empty_text(self, message: str) -> hv.Overlay:
        info = example_tokens(self._ds, self.selection.example)
        layout = token_layout(info)
        return coloured_tokens(layout, np.zeros(info.n_tokens), "", message) * token_labels(layout)

    def _text_with(self, example: str, method: str) -> hv.Overlay:
        values, target = relevancy_values(self._ds, example, method)
        info = example_tokens(self._ds, example)
        layout = token_layout(info)
        title = f"text relevancy for {target}"
        return coloured_tokens(layout, np.nan_to_num(values), "relevancy", title) * token_labels(layout)

    def _on_text(self, example: str, relevancy_method: str) -> hv.Overlay:
        return guarded(self.selection, self._empty_text)(self._text_with)(example, relevancy_method)

    def _comparison(self, example: str, smooth: bool) -> hv.Layout:
        size = {"frame_width": COMPARISON_SIZE, "frame_height": COMPARISON_SIZE}
        return hv.Layout([self._image_with(example, method, smooth, size) for method in self.methods]).cols(4)

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
