"""Relevancy view: a method and its target, image and text relevancy side by side, all methods compared."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn
import xarray as xr

from vlinterpret_panel.ui.common import IMAGE_SIZE, dynamic_map, fit_title, guarded, heading
from vlinterpret_panel.ui.image import image_element, image_plot_size, map_element, overlay_element, scale_controls
from vlinterpret_panel.ui.scales import map_scale
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.text import coloured_tokens, token_labels, token_layout
from vlinterpret_panel.ui.view import View

COMPARISON_SIZE = 180
TARGET_COLOR = "#7CFC00"


def relevancy_scale(scale: str) -> str:
    """Relevancy has no fixed range (its units depend on the method): ``fixed`` shows each map on its own."""
    return "per map" if scale == "fixed" else scale


def target_outline(ds: xr.Dataset, example: str) -> hv.Path:
    """The outline of the example's ground-truth target mask (empty when the store has none, or it is empty)."""
    if "target_mask" not in ds:
        return hv.Path([])
    import contourpy

    info = ds.vli.tokens(example)
    height, width = info.image.shape[:2]
    mask = ds["target_mask"].isel(example=info.index, image_y=slice(0, height), image_x=slice(0, width)).values
    if not mask.any():
        return hv.Path([])
    padded = np.pad(mask.astype(np.float64), 1)  # closes outlines that touch the image's edge
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    return hv.Path([np.asarray(line) - 0.5 for line in lines]).opts(
        color=TARGET_COLOR, line_width=2, line_dash="dashed"
    )


class RelevancyView(View):
    """What the output depends on, by the relevancy methods stored with the examples."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        image_fields = ("example", "relevancy_method", "smooth", "scale", "opacity")
        self._image = dynamic_map(self._on_image, streams=self.streams(*image_fields))
        self._text = dynamic_map(self._on_text, streams=self.streams("example", "relevancy_method"))
        self._all_methods = dynamic_map(self._comparison, streams=self.streams("example", "smooth", "scale", "opacity"))

    @property
    def methods(self) -> list[str]:
        """The relevancy methods the store holds."""
        return self.ds.vli.relevancy_methods

    def _empty_image(self, message: str) -> hv.Overlay:
        blank = np.zeros((1, 1, 3), dtype=np.uint8)
        return image_element(blank).opts(title=message[:80]) * map_element(np.full((1, 1), np.nan), "relevancy")

    @staticmethod
    def _image_with(
        ds: xr.Dataset,
        example: str,
        method: str,
        smooth: bool,
        scale: str,
        opacity: float,
        size: dict[str, int] | None = None,
    ) -> hv.Overlay:
        tokens = ds.vli.tokens(example)
        relevancy = ds.vli.relevancy(example, method)
        values, target = relevancy.values, relevancy.attrs["target"]
        image_tokens = tokens.image_tokens()
        others = [ds.vli.relevancy(example, m).values[image_tokens] for m in ds.vli.relevancy_methods]
        colour_range = map_scale(np.nan_to_num(values[image_tokens]), relevancy_scale(scale), shared_with=others)
        painted = ds.vli.values_on_image(example, np.nan_to_num(values), smooth=smooth).values
        size = size or image_plot_size(tokens.image)
        picture = image_element(tokens.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, **size)
        heat = overlay_element(painted, colour_range, "relevancy", opacity)
        title = f"{method} → {target}" if target else method
        title += ": all 0" if colour_range.all_zero else ""
        return (picture * heat * target_outline(ds, example)).opts(title=fit_title(title, size["frame_width"]))

    def _on_image(
        self, example: str, relevancy_method: str, smooth: bool, scale: str, opacity: float, ds: xr.Dataset
    ) -> hv.Overlay:
        draw = guarded(self.selection, self._empty_image)(self._image_with)
        return draw(ds, example, relevancy_method, smooth, scale, opacity)

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

    def _comparison(self, example: str, smooth: bool, scale: str, opacity: float, ds: xr.Dataset) -> hv.Layout:
        size = {"frame_width": COMPARISON_SIZE, "frame_height": COMPARISON_SIZE}
        methods = ds.vli.relevancy_methods
        maps = [self._image_with(ds, example, method, smooth, scale, opacity, size) for method in methods]
        return hv.Layout(maps).cols(4)

    def __panel__(self) -> pn.viewable.Viewable:
        if not self.methods:
            text = (
                "This store's relevancy is per generated token (`answer_relevancy`): see the **Answer** tab."
                if self.ds.vli.answer_methods
                else "This store has no `relevancy` variable: extract with a relevancy method to see it here."
            )
            return pn.pane.Markdown(text, width=IMAGE_SIZE * 2)
        ranking = self.ds.vli.relevancy_ranking()
        options = {
            (f"{m} (top patch on the target in {ranking[m]:.0%})" if m in ranking else m): m for m in self.methods
        }
        method = pn.widgets.Select.from_param(
            self.selection.param.relevancy_method, options=options, label="method", width=330
        )
        notes = []
        if ranking:
            notes.append("Methods are ranked by the pointing game on this store's examples; the best is shown first.")
        if "target_mask" in self.ds:
            notes.append(f'<span style="color:{TARGET_COLOR}">- - -</span> the ground-truth target\'s outline.')
        return pn.Column(
            pn.Row(method, *scale_controls(self.selection)),
            pn.pane.HTML(" ".join(notes), sizing_mode="stretch_width"),
            pn.Row(pn.pane.HoloViews(self._image, linked_axes=False), pn.pane.HoloViews(self._text, linked_axes=False)),
            heading("All methods", level=4),
            pn.pane.HoloViews(self._all_methods, linked_axes=False),
        )
