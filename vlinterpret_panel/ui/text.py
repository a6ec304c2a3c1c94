"""Text view: the example's text and special tokens, coloured by attention (or relevancy); a tap selects a token.

Tokens are shown as the tokenizer wrote them, found by ``modality`` (never by a literal [SEP]).
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import xarray as xr
from bokeh.palettes import Oranges256

from vlinterpret_panel.maps import ExampleTokens
from vlinterpret_panel.schema import SPECIAL, TEXT
from vlinterpret_panel.ui.common import SELECTED_COLOR, dynamic_map, fit_title, guarded
from vlinterpret_panel.ui.scales import SIGNED_TEXT_PALETTE, map_scale
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View

CHARACTER_WIDTH = 1.0
LINE_WIDTH = 48.0
TEXT_WIDTH = 380
# Light to mid orange: the top of the scale stays light enough for the black token text on it.
TEXT_PALETTE = list(reversed(Oranges256))[:176]
LINE_HEIGHT = 1.6


def token_layout(tokens: ExampleTokens) -> pd.DataFrame:
    """Boxes of the text and special tokens laid out in wrapped lines (y grows downwards)."""
    rows, x, line = [], 0.0, 0
    for position in tokens.tokens_of(TEXT, SPECIAL):
        text = str(tokens.token_text[position])
        width = max(2.0, len(text) * CHARACTER_WIDTH + 1.0)
        if x + width > LINE_WIDTH and x > 0:
            x, line = 0.0, line + 1
        y0 = line * LINE_HEIGHT
        rows.append(
            {"x0": x, "y0": y0, "x1": x + width, "y1": y0 + LINE_HEIGHT * 0.85, "token": position, "text": text}
        )
        x += width + 0.4
    return pd.DataFrame(rows, columns=["x0", "y0", "x1", "y1", "token", "text"])


def coloured_tokens(
    layout: pd.DataFrame,
    values: np.ndarray,
    label: str,
    title: str,
    selected: list[int] | None = None,
    scale: str = "per map",
    width: int = TEXT_WIDTH,
) -> hv.Rectangles:
    """Token boxes coloured by ``values`` (one per token position) on the colour range ``scale``; ``selected`` outlined.

    ``token_labels`` writes the token strings on them.
    """
    table = layout.assign(
        value=values[layout["token"].to_numpy()] if len(layout) else [],
        selected=layout["token"].isin(selected or []).astype(int),
    )
    lines = max(1.0, float(table["y1"].max()) if len(table) else 1.0)
    colour_range = map_scale(table["value"].to_numpy(), "per map" if scale == "shared" else scale)
    if colour_range.all_zero and len(table):
        title = f"{title}: all 0"
    return hv.Rectangles(table, ["x0", "y0", "x1", "y1"], ["value", "token", "text", "selected"]).opts(
        color="value",
        cmap=SIGNED_TEXT_PALETTE if colour_range.signed else TEXT_PALETTE,
        line_color=hv.dim("selected").categorize({1: SELECTED_COLOR, 0: "#666"}),
        line_width=hv.dim("selected") * 2 + 1,
        hover_tooltips=[("token", "@token"), ("text", "@text"), (label or "value", "@value")],
        tools=["hover"],
        title=fit_title(title, width),
        invert_yaxis=True,
        xaxis=None,
        yaxis=None,
        frame_width=width,
        frame_height=int(max(60, 26 * lines / LINE_HEIGHT)),
        colorbar_position="bottom",
        **colour_range.options(label or "value"),
    )


def token_labels(layout: pd.DataFrame) -> hv.Labels:
    """The token strings, centred on their boxes."""
    centres = layout.assign(x=(layout["x0"] + layout["x1"]) / 2, y=(layout["y0"] + layout["y1"]) / 2)
    return hv.Labels(centres, ["x", "y"], "text").opts(text_font_size="9pt", text_color="black")


class TextView(View):
    """The tokens of the text, coloured by the attention of the selected query; a tap makes a token the query."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self._tokens = dynamic_map(
            self._coloured, streams=self.streams("example", "layer", "head", "tokens", "direction", "scale")
        )
        self._labels = dynamic_map(self._token_strings, streams=self.streams("example"))
        self.tap = hv.streams.Tap(source=self._tokens, x=None, y=None)
        self.tap.add_subscriber(self._tapped)

    def _empty(self, message: str) -> hv.Rectangles:
        info = self.ds.vli.tokens(self.selection.example)
        return coloured_tokens(token_layout(info), np.zeros(info.n_tokens), "", message)

    def _coloured(
        self,
        example: str,
        layer: int,
        head: int | None,
        tokens: list[int],
        direction: str,
        scale: str,
        ds: xr.Dataset,
    ) -> hv.Rectangles:
        @guarded(self.selection, self._empty)
        def draw() -> hv.Rectangles:
            info = ds.vli.tokens(example)
            values = ds.vli.token_attention(example, layer, head, tokens, direction).values
            names = ", ".join(f"{t}:{info.token_text[t]}" for t in tokens[:4]) + (" …" if len(tokens) > 4 else "")
            title = f"attention {direction} {names}"
            return coloured_tokens(token_layout(info), values, "attention", title, selected=tokens, scale=scale)

        return draw()

    def _token_strings(self, example: str, ds: xr.Dataset) -> hv.Labels:
        return token_labels(token_layout(ds.vli.tokens(example)))

    def _tapped(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        layout = token_layout(self.ds.vli.tokens(self.selection.example))
        hit = layout[(layout.x0 <= x) & (x <= layout.x1) & (layout.y0 <= y) & (y <= layout.y1)]
        if len(hit):
            self.selection.select(tokens=[int(hit["token"].iloc[0])])

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.pane.HoloViews(self._tokens * self._labels, linked_axes=False)
