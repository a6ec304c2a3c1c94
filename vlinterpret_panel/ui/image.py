"""Image view: the example's image with the selected token's attention over its patches or boxes.

Plot coordinates are pixels with row 0 at the top (the schema's ``token_box`` convention), so a tap
at ``(x, y)`` is looked up in the boxes directly. Tap a patch to make it the query; box- or
lasso-select several to average them.
"""

from __future__ import annotations

from functools import partial

import holoviews as hv
import numpy as np
import panel as pn
import xarray as xr

from vlinterpret_panel.ui.common import IMAGE_SIZE, SELECTED_COLOR, checkbox, dynamic_map, fit_title, guarded
from vlinterpret_panel.ui.scales import (
    SCALE_HELP,
    MapScale,
    colorbar_options,
    map_scale,
    title_colorbar,
)
from vlinterpret_panel.ui.selection import Selection, batched_widget
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


def overlay_element(values: np.ndarray, scale: MapScale, quantity: str, opacity: float) -> hv.Image:
    """A per-pixel map to lay over ``image_element``: transparent at 0, brightest and most opaque at the top
    (a signed map: at both ends, blue below 0 and red above).

    The colour range and colorbar follow ``scale`` (``ui.scales``); an all-zero map draws nothing
    and has no colorbar (the title of the plot says so).
    """
    return map_element(values, quantity).opts(
        cmap=scale.overlay_palette(opacity), invert_yaxis=True, tools=["hover"], **scale.options(quantity)
    )


def difference_overlay(pixels: np.ndarray, difference: np.ndarray, label: str, size: dict[str, int]) -> hv.Overlay:
    """A signed map (e.g. one map minus another) over a faded image, on a symmetric diverging scale: red where
    it is positive, blue where negative, white at 0; ``label`` titles the plot and its colorbar."""
    top = float(np.nanmax(np.abs(difference))) if difference.size else 0.0
    picture = image_element(pixels).opts(invert_yaxis=True, xaxis=None, yaxis=None, alpha=0.35, framewise=True, **size)
    heat = map_element(difference, "difference").opts(
        cmap="RdBu_r",
        clim=(-top or -1.0, top or 1.0),
        invert_yaxis=True,
        alpha=0.85,
        tools=["hover"],
        clabel=label,
        hooks=[partial(title_colorbar, label)],
        **colorbar_options(),
    )
    return (picture * heat).opts(title=fit_title(label, size["frame_width"] + 60))


def image_plot_size(pixels: np.ndarray, size: int = IMAGE_SIZE) -> dict[str, int]:
    """Frame size keeping the image's aspect ratio within ``size`` pixels."""
    height, width = pixels.shape[:2]
    scale = size / max(height, width)
    return {"frame_width": max(1, round(width * scale)), "frame_height": max(1, round(height * scale))}


def scale_controls(selection: Selection) -> list[pn.viewable.Viewable]:
    """The colour-range and overlay-opacity widgets every map view shows."""
    scale = batched_widget(
        pn.widgets.Select,
        selection,
        "scale",
        label="colour range",
        width=110,
        description="; ".join(f"{name}: {text}" for name, text in SCALE_HELP.items()),
    )
    opacity = batched_widget(
        pn.widgets.FloatSlider, selection, "opacity", label="overlay opacity", step=0.05, width=140
    )
    return [scale, opacity]


class ImageView(View):
    """The image with attention from (or to) the selected token(s) painted on it."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self._image = dynamic_map(self._picture, streams=self.streams("example"))
        overlay_fields = ("example", "layer", "head", "tokens", "direction", "smooth", "scale", "opacity")
        self._overlay = dynamic_map(self._attention, streams=self.streams(*overlay_fields))
        self._patches = dynamic_map(self._patch_centres, streams=self.streams("example"))
        self.tap = hv.streams.Tap(source=self._image, x=None, y=None)
        self.tap.add_subscriber(self._tapped)
        self.lasso = hv.streams.Selection1D(source=self._patches)
        self.lasso.add_subscriber(self._lassoed)

    def _picture(self, example: str, ds: xr.Dataset) -> hv.RGB:
        tokens = ds.vli.tokens(example)
        size = image_plot_size(tokens.image)
        return image_element(tokens.image).opts(
            invert_yaxis=True, xaxis=None, yaxis=None, title=fit_title(tokens.text, size["frame_width"]), **size
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
        scale: str,
        opacity: float,
        ds: xr.Dataset,
    ) -> hv.Overlay:
        """The token's attention on the image, with the selected patches outlined (one plot update per click)."""

        @guarded(self.selection, self._empty)
        def draw() -> hv.Overlay:
            values = ds.vli.token_attention(example, layer, head, tokens, direction).values
            painted = ds.vli.values_on_image(example, values, smooth=smooth).values
            image_values = values[ds.vli.tokens(example).image_tokens()]
            map_range = map_scale(image_values, "per map" if scale == "shared" else scale)
            heat = overlay_element(painted, map_range, "attention", opacity)
            if map_range.all_zero:
                heat = heat.opts(title="no attention on the image here: all 0")
            return heat * self._selected_boxes(ds, example, tokens)

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
            selection_alpha=0.25,
            tools=["box_select", "lasso_select"],
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
        controls = pn.Column(
            pn.Row(
                batched_widget(pn.widgets.RadioButtonGroup, self.selection, "direction", label="attention", width=90),
                checkbox(self.selection, "smooth", "smooth"),
            ),
            pn.Row(*scale_controls(self.selection)),
        )
        return pn.Column(controls, pn.pane.HoloViews(plot, linked_axes=False))
