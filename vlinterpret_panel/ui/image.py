"""Image view: the example's image with the selected token's attention over its patches or boxes.

Plot coordinates are pixels with row 0 at the top (the schema's ``token_box`` convention), so a tap
at ``(x, y)`` is looked up in the boxes directly. Tap a patch to make it the query; box- or
lasso-select several to average them.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn
import xarray as xr

from vlinterpret_panel.ui.common import OVERLAY_ALPHA, OVERLAY_CMAP, PLOT_SIZE, SELECTED_COLOR, dynamic_map, guarded
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View

MAP_PIXELS = 128


def image_element(pixels: np.ndarray) -> hv.RGB:
    """An RGB image whose plot y is the pixel row (flip for row 0 = top; pair with ``invert_yaxis``)."""
    height, width = pixels.shape[:2]
    return hv.RGB(pixels[::-1], bounds=(0, 0, width, height), kdims=["x", "y"])


def map_element(values: np.ndarray, label: str) -> hv.Image:
    """A per-pixel map (row 0 = top) in the same coordinates as ``image_element``.

    Sent as float32 on a grid of at most ``MAP_PIXELS`` a side: maps are patch-level, so a finer
    grid only makes every click's message to the browser larger (1 MB for a 384-pixel image).
    """
    height, width = values.shape
    stride = max(1, int(np.ceil(max(height, width) / MAP_PIXELS)))
    sampled = values[stride // 2 :: stride, stride // 2 :: stride].astype(np.float32)
    return hv.Image(sampled[::-1], bounds=(0, 0, width, height), kdims=["x", "y"], vdims=[label])


def image_plot_size(pixels: np.ndarray) -> dict[str, int]:
    """Frame size keeping the image's aspect ratio within the standard plot size."""
    height, width = pixels.shape[:2]
    scale = PLOT_SIZE / max(height, width)
    return {"frame_width": max(1, round(width * scale)), "frame_height": max(1, round(height * scale))}


class ImageView(View):
    """The image with attention from (or to) the selected token(s) painted on it."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self.opacity = pn.widgets.FloatSlider(
            label="overlay opacity", start=0, end=1, step=0.05, value=OVERLAY_ALPHA, width=180
        )
        self._image = dynamic_map(self._picture, streams=self.streams("example"))
        opacity = hv.streams.Params(self.opacity, ["value"], rename={"value": "opacity"})
        overlay_streams = self.streams("example", "layer", "head", "tokens", "direction", "smooth")
        self._overlay = dynamic_map(self._attention, streams=[*overlay_streams, opacity])
        self._patches = dynamic_map(self._patch_centres, streams=self.streams("example"))
        self.tap = hv.streams.Tap(source=self._image, x=None, y=None)
        self.tap.add_subscriber(self._tapped)
        self.lasso = hv.streams.Selection1D(source=self._patches)
        self.lasso.add_subscriber(self._lassoed)

    def _picture(self, example: str, ds: xr.Dataset) -> hv.RGB:
        tokens = ds.vli.tokens(example)
        return image_element(tokens.image).opts(
            invert_yaxis=True, xaxis=None, yaxis=None, title=tokens.text[:60], **image_plot_size(tokens.image)
        )

    def _empty(self, message: str) -> hv.Overlay:
        return map_element(np.full((1, 1), np.nan), "attention").opts(title=message[:80]) * hv.Rectangles([])

    def _attention(
        self,
        example: str,
        layer: int,
        head: int | None,
        tokens: list[int],
        direction: str,
        smooth: bool,
        ds: xr.Dataset,
        opacity: float,
    ) -> hv.Overlay:
        """The token's attention on the image, with the selected patches outlined (one plot update per click)."""

        @guarded(self.selection, self._empty)
        def draw() -> hv.Overlay:
            painted = ds.vli.token_attention_on_image(example, layer, head, tokens, direction, smooth)
            finite = painted.values[np.isfinite(painted.values)]
            top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            return map_element(painted.values, "attention").opts(
                cmap=OVERLAY_CMAP, clim=(0, top), colorbar=True, tools=["hover"], invert_yaxis=True, alpha=opacity
            ) * self._selected_boxes(ds, example, tokens)

        return draw()

    def _patch_centres(self, example: str, ds: xr.Dataset) -> hv.Points:
        tokens = ds.vli.tokens(example)
        image_tokens = tokens.image_tokens()
        boxes = tokens.token_box[image_tokens]
        centres = {
            "x": (boxes[:, 0] + boxes[:, 2]) / 2,
            "y": (boxes[:, 1] + boxes[:, 3]) / 2,
            "token": image_tokens,
            "token_text": tokens.token_text[image_tokens],
        }
        return hv.Points(centres, ["x", "y"], ["token", "token_text"]).opts(
            size=4,
            color="white",
            alpha=0.25,
            nonselection_alpha=0.25,
            selection_color=SELECTED_COLOR,
            tools=["box_select", "lasso_select", "tap"],
        )

    @staticmethod
    def _selected_boxes(ds: xr.Dataset, example: str, tokens: list[int]) -> hv.Rectangles:
        info = ds.vli.tokens(example)
        boxes = [tuple(info.token_box[t]) for t in tokens if t < info.n_tokens and np.isfinite(info.token_box[t]).all()]
        return hv.Rectangles(boxes).opts(fill_alpha=0, line_color=SELECTED_COLOR, line_width=2)

    def _tapped(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        token = self.ds.vli.tokens(self.selection.example).token_at(x, y)
        if token is not None:
            self.selection.select(tokens=[token])

    def _lassoed(self, index: list[int]) -> None:
        if len(index) < 2:
            return  # a single hit is a tap, handled by _tapped
        image_tokens = self.ds.vli.tokens(self.selection.example).image_tokens()
        self.selection.select(tokens=sorted(int(image_tokens[i]) for i in index if i < len(image_tokens)))

    def __panel__(self) -> pn.viewable.Viewable:
        plot = self._image * self._overlay * self._patches
        controls = pn.Row(
            pn.widgets.RadioButtonGroup.from_param(self.selection.param.direction, label="attention"),
            pn.widgets.Checkbox.from_param(self.selection.param.smooth, label="smooth"),
            self.opacity,
        )
        return pn.Column(controls, pn.pane.HoloViews(plot, linked_axes=False))
