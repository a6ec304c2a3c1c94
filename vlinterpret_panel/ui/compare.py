"""Head comparison: several heads side by side, each with its matrix and the selected token's map on the image.

The list starts with the selected layer and head (a shared link's too) and follows them until
the user edits it. Heads are drawn in (layer, head) order, the order the list shows them. The
maps share one colour range by default ("shared": the largest value of the compared maps), so
a head that attends the image weakly looks weak.
"""

from __future__ import annotations

import holoviews as hv
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.ui.attention import matrix_image, token_ticks
from vlinterpret_panel.ui.common import fit_title
from vlinterpret_panel.ui.image import image_element, overlay_element, scale_controls
from vlinterpret_panel.ui.scales import map_scale
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View

TILE_SIZE = 190
MAX_HEADS = 8


def head_name(layer: int, head: int | None) -> str:
    """How a (layer, head) pair is named in the picker: ``L3 H2`` or ``L3 mean``."""
    return f"L{layer} mean" if head is None else f"L{layer} H{head}"


class HeadComparison(View):
    """Pick up to eight (layer, head) pairs; see their attention matrices and token maps side by side."""

    heads = param.List(default=[], doc="chosen (layer, head) names, in (layer, head) order")
    follows_selection = param.Boolean(default=True, doc="the list is the selected head until the user edits it")

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self._pairs: dict[str, tuple[int, int | None]] = {}
        self.dataset_changed()
        self._chooser = pn.widgets.MultiSelect(label="heads to compare (ctrl-click for several)", size=8, width=220)
        self._chooser.options = list(self._pairs)
        self._chooser.param.watch(self._chosen, "value")
        self._add = pn.widgets.Button(label="add the selected head", width=180)
        self._add.on_click(self._add_selected)
        self.selection.param.watch(self._follow, ["layer", "head"])
        self._follow()

    def dataset_changed(self) -> None:
        ds = self.ds
        heads = ds["layer_heads"].values if "layer_heads" in ds.coords else [ds.sizes["head"]] * ds.sizes["layer"]
        self._pairs = {
            head_name(layer, head): (layer, head)
            for layer in range(ds.sizes["layer"])
            for head in [None, *range(int(heads[layer]))]
        }
        if hasattr(self, "_chooser"):
            self._chooser.options = list(self._pairs)

    def _ordered(self, names: list[str]) -> list[str]:
        """Known names in the picker's (layer, head) order, at most ``MAX_HEADS``."""
        order = list(self._pairs)
        return sorted((name for name in set(names) if name in self._pairs), key=order.index)[:MAX_HEADS]

    def _set_heads(self, names: list[str]) -> None:
        self.heads = self._ordered(names)
        if self._chooser.value != self.heads:
            self._chooser.value = list(self.heads)

    def _follow(self, *events: param.parameterized.Event) -> None:
        if self.follows_selection:
            self._set_heads([head_name(self.selection.layer, self.selection.head)])

    def _chosen(self, event: param.parameterized.Event) -> None:
        if list(event.new) != self.heads:
            self.follows_selection = False
            self._set_heads(list(event.new))

    def _add_selected(self, event: object = None) -> None:
        self.follows_selection = False
        self._set_heads([*self.heads, head_name(self.selection.layer, self.selection.head)])

    def tiles(
        self,
        heads: list[str],
        example: str,
        tokens: list[int],
        direction: str,
        smooth: bool,
        scale: str,
        opacity: float,
    ) -> hv.Layout:
        """One column per chosen head: its attention matrix above the selected token's map on the image."""
        ds = self.ds
        info = ds.vli.tokens(example)
        size = {"frame_width": TILE_SIZE, "frame_height": TILE_SIZE}
        chosen = [self._pairs[name] for name in self._ordered(heads)]
        matrices = [ds.vli.attention_map(example, layer, head).values for layer, head in chosen]
        rows = [ds.vli.token_attention(example, layer, head, tokens, direction).values for layer, head in chosen]
        image_rows = [row[info.image_tokens()] for row in rows]
        token_names = ", ".join(f"{t}:{info.token_text[t]}" for t in tokens[:2]) + (" …" if len(tokens) > 2 else "")
        ticks = token_ticks(info.token_text)
        plots, maps = [], []
        for (layer, head), matrix, row in zip(chosen, matrices, image_rows, strict=True):
            name = head_name(layer, head)
            matrix_range = map_scale(matrix, scale, shared_with=matrices)
            plots.append(
                matrix_image(matrix).opts(
                    title=fit_title(name, TILE_SIZE),
                    invert_yaxis=True,
                    xticks=ticks,
                    yticks=ticks,
                    xrotation=90,
                    fontsize={"ticks": 6},
                    **matrix_range.options("attention"),
                    **size,
                )
            )
            painted = ds.vli.token_attention_on_image(example, layer, head, tokens, direction, smooth).values
            map_range = map_scale(row, scale, shared_with=image_rows)
            picture = image_element(info.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, **size)
            heat = overlay_element(painted, map_range, "attention", opacity)
            zero = ": all 0" if map_range.all_zero else ""
            maps.append((picture * heat).opts(title=fit_title(f"{name}, {direction} {token_names}{zero}", TILE_SIZE)))
        return list(zip(plots, maps, strict=True))

    def _view(
        self,
        heads: list[str],
        ds: xr.Dataset,
        example: str,
        tokens: list[int],
        direction: str,
        smooth: bool,
        scale: str,
        opacity: float,
    ) -> pn.viewable.Viewable:
        if not heads:
            return pn.pane.Markdown("Choose heads to compare.")
        try:
            tiles = self.tiles(heads, example, tokens, direction, smooth, scale, opacity)
        except VLIError as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        # Separate plots, each in its own column: in one hv.Layout (a Bokeh grid), or as siblings of
        # one Column (whose frames Bokeh aligns), the maps under the matrices lost their colorbars.
        columns = [
            pn.Column(
                pn.Column(pn.pane.HoloViews(matrix, linked_axes=False)),
                pn.Column(pn.pane.HoloViews(on_image, linked_axes=False)),
            )
            for matrix, on_image in tiles
        ]
        return pn.FlexBox(*columns, flex_wrap="wrap", gap="8px 16px", sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        selection = self.selection
        view = pn.bind(
            self._view,
            self.param.heads,
            self.param.ds,
            selection.param.example,
            selection.param.tokens,
            selection.param.direction,
            selection.param.smooth,
            selection.param.scale,
            selection.param.opacity,
        )
        controls = pn.Column(self._add, *scale_controls(selection))
        return pn.Column(
            pn.Row(self._chooser, controls), pn.param.ParamFunction(view, lazy=True, loading_indicator=True)
        )
