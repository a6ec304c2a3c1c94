"""Attention heatmap: the full query × key matrix of the selected head (or the head mean), modality blocks marked.

Plot coordinates are token positions, query 0 at the top (the schema's row-0-at-top convention);
a tap on a row makes that query the selected token. Large maps are rasterised with datashader.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn
import param
import xarray as xr
from holoviews.operation.datashader import rasterize

from vlinterpret_panel.ui.common import PLOT_SIZE, SELECTED_COLOR, dynamic_map, guarded
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View

RASTERIZE_ABOVE_TOKENS = 400
LABEL_TICKS_UP_TO = 64


def matrix_image(matrix: np.ndarray) -> hv.Image:
    """A (query, key) matrix as an image whose plot y is the query position (flip for row 0 = top)."""
    n_queries, n_keys = matrix.shape
    return hv.Image(matrix[::-1], bounds=(0, 0, n_keys, n_queries), kdims=["key", "query"], vdims=["attention"])


def token_ticks(token_text: np.ndarray) -> list[tuple[float, str]] | None:
    """Token labels as axis ticks when there are few enough to read; else None (hover tells)."""
    if len(token_text) > LABEL_TICKS_UP_TO:
        return None
    return [(position + 0.5, f"{position}:{text}") for position, text in enumerate(token_text)]


def modality_boundaries(modality: np.ndarray) -> list[float]:
    """Positions where the modality changes: the edges of the modality blocks."""
    return [float(position) for position in np.flatnonzero(modality[1:] != modality[:-1]) + 1]


class AttentionHeatmap(View):
    """The attention matrix of the selected layer and head, with the selected token's row outlined."""

    show_mean = param.Boolean(default=False, doc="show the layer's head mean beside the selected head")

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        matrix = dynamic_map(self._matrix, streams=self.streams("example", "layer", "head"))
        if ds.sizes["query"] > RASTERIZE_ABOVE_TOKENS:
            matrix = rasterize(matrix, aggregator="mean").opts(cmap="inferno", colorbar=True, tools=["hover"])
        self._matrix_plot = matrix
        self._blocks = dynamic_map(self._block_edges, streams=self.streams("example"))
        self._marker = dynamic_map(self._selected_rows, streams=self.streams("example", "tokens", "direction"))
        self.tap = hv.streams.Tap(source=matrix, x=None, y=None)
        self.tap.add_subscriber(self._tapped)
        mean = dynamic_map(self._head_mean, streams=self.streams("example", "layer"))
        if ds.sizes["query"] > RASTERIZE_ABOVE_TOKENS:
            mean = rasterize(mean, aggregator="mean").opts(cmap="inferno", colorbar=True, tools=["hover"])
        self._mean_plot = mean * self._blocks

    def _head_mean(self, example: str, layer: int, ds: xr.Dataset) -> hv.Image:
        return self._matrix(example, layer, None, ds).opts(frame_width=PLOT_SIZE - 60, frame_height=PLOT_SIZE - 60)

    def _beside(self, show_mean: bool) -> pn.viewable.Viewable | None:
        """The head mean's plot, built only while it is shown (so hidden it costs no click anything)."""
        return pn.pane.HoloViews(self._mean_plot, linked_axes=False) if show_mean else None

    def _empty(self, message: str) -> hv.Image:
        return hv.Image(np.zeros((1, 1)), kdims=["key", "query"], vdims=["attention"]).opts(title=message[:80])

    def _matrix(self, example: str, layer: int, head: int | None, ds: xr.Dataset) -> hv.Image:
        @guarded(self.selection, self._empty)
        def draw() -> hv.Image:
            matrix = ds.vli.attention_map(example, layer, head)
            ticks = token_ticks(matrix["query_text"].values)
            head_name = "mean of heads" if head is None else f"head {head}"
            return matrix_image(matrix.values).opts(
                title=f"layer {layer}, {head_name} (rows: queries)",
                frame_width=PLOT_SIZE + 80,
                frame_height=PLOT_SIZE + 80,
                invert_yaxis=True,
                xticks=ticks,
                yticks=ticks,
                xrotation=90,
                fontsize={"ticks": 7},
                clim=(0, float(np.nanmax(matrix.values)) or 1.0),
                tools=["hover", "tap"],
            )

        return draw()

    def _block_edges(self, example: str, ds: xr.Dataset) -> hv.Segments:
        tokens = ds.vli.tokens(example)
        n_tokens = tokens.n_tokens
        edges = modality_boundaries(tokens.modality)
        segments = [(edge, 0, edge, n_tokens) for edge in edges] + [(0, edge, n_tokens, edge) for edge in edges]
        return hv.Segments(segments, ["x0", "y0", "x1", "y1"]).opts(
            color="white", line_width=1, line_dash="dashed", alpha=0.7
        )

    def _selected_rows(self, example: str, tokens: list[int], direction: str, ds: xr.Dataset) -> hv.Rectangles:
        n_tokens = ds.vli.tokens(example).n_tokens
        if direction == "from":  # the selected tokens' rows
            boxes = [(0, t, n_tokens, t + 1) for t in tokens if t < n_tokens]
        else:  # their columns
            boxes = [(t, 0, t + 1, n_tokens) for t in tokens if t < n_tokens]
        return hv.Rectangles(boxes).opts(fill_alpha=0, line_color=SELECTED_COLOR, line_width=2)

    def _tapped(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        n_tokens = self.ds.vli.tokens(self.selection.example).n_tokens
        position = int(np.floor(y if self.selection.direction == "from" else x))
        if 0 <= position < n_tokens:
            self.selection.select(tokens=[position])

    def __panel__(self) -> pn.viewable.Viewable:
        toggle = pn.widgets.Checkbox.from_param(self.param.show_mean, label="show the head mean beside")
        return pn.Column(
            toggle,
            pn.Row(
                pn.pane.HoloViews(self._matrix_plot * self._blocks * self._marker, linked_axes=False),
                pn.bind(self._beside, self.param.show_mean),
            ),
        )
