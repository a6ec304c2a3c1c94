"""Layer/head comparison: several heads side by side, each with its matrix and the selected token on the image."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.ui.attention import matrix_image
from vlinterpret_panel.ui.common import OVERLAY_ALPHA, OVERLAY_CMAP
from vlinterpret_panel.ui.image import image_element, map_element
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View

TILE_SIZE = 200
MAX_HEADS = 8


def head_name(layer: int, head: int | None) -> str:
    """How a (layer, head) pair is named in the picker: ``L3 H2`` or ``L3 mean``."""
    return f"L{layer} mean" if head is None else f"L{layer} H{head}"


class HeadComparison(View):
    """Pick up to eight (layer, head) pairs; see their attention matrices and token maps side by side."""

    heads = param.List(default=[], doc="chosen (layer, head) names")

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self._pairs: dict[str, tuple[int, int | None]] = {}
        self.dataset_changed()
        self.heads = [head_name(self.selection.layer, self.selection.head)]
        self._add = pn.widgets.Button(label="add the selected head", width=180)
        self._add.on_click(self._add_selected)

    def dataset_changed(self) -> None:
        ds = self.ds
        heads = ds["layer_heads"].values if "layer_heads" in ds.coords else [ds.sizes["head"]] * ds.sizes["layer"]
        self._pairs = {
            head_name(layer, head): (layer, head)
            for layer in range(ds.sizes["layer"])
            for head in [None, *range(int(heads[layer]))]
        }

    def _add_selected(self, event: object = None) -> None:
        name = head_name(self.selection.layer, self.selection.head)
        if name not in self.heads:
            self.heads = [*self.heads, name][-MAX_HEADS:]

    def tiles(self, heads: list[str], example: str, tokens: list[int], direction: str, smooth: bool) -> hv.Layout:
        """One column per chosen head: its attention matrix above the selected token's map on the image."""
        info = self.ds.vli.tokens(example)
        size = {"frame_width": TILE_SIZE, "frame_height": TILE_SIZE}
        matrices, maps = [], []
        for name in heads[:MAX_HEADS]:
            layer, head = self._pairs[name]
            matrix = self.ds.vli.attention_map(example, layer, head).values
            matrices.append(matrix_image(matrix).opts(title=name, invert_yaxis=True, colorbar=False, **size))
            painted = self.ds.vli.token_attention_on_image(example, layer, head, tokens, direction, smooth).values
            top = float(np.nanmax(painted)) if np.isfinite(painted).any() else 1.0
            picture = image_element(info.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, **size)
            heat = map_element(painted, "attention").opts(cmap=OVERLAY_CMAP, clim=(0, top or 1.0), alpha=OVERLAY_ALPHA)
            maps.append((picture * heat).opts(title=f"{name}, token {direction}"))
        return hv.Layout(matrices + maps).cols(max(1, len(matrices))).opts(shared_axes=False)

    def _view(
        self, heads: list[str], ds: xr.Dataset, example: str, tokens: list[int], direction: str, smooth: bool
    ) -> pn.viewable.Viewable:
        if not heads:
            return pn.pane.Markdown("Choose heads to compare.")
        try:
            return pn.pane.HoloViews(self.tiles(heads, example, tokens, direction, smooth), linked_axes=False)
        except VLIError as error:
            return pn.pane.Alert(str(error), alert_type="warning")

    def __panel__(self) -> pn.viewable.Viewable:
        chooser = pn.widgets.MultiChoice.from_param(
            self.param.heads, options=list(self._pairs), label="heads to compare", max_items=MAX_HEADS, width=500
        )
        selection = self.selection
        view = pn.bind(
            self._view,
            self.param.heads,
            self.param.ds,
            selection.param.example,
            selection.param.tokens,
            selection.param.direction,
            selection.param.smooth,
        )
        return pn.Column(pn.Row(chooser, self._add), pn.param.ParamFunction(view, lazy=True, loading_indicator=True))
