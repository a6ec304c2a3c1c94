"""The dashboard page over one store."""

from __future__ import annotations

import os

import holoviews as hv
import numpy as np
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.store import open_dataset

hv.extension("bokeh")


class StoreOverview(pn.viewable.Viewer):
    """Browse a store: pick an example and a layer, see its image and head-mean attention."""

    example = param.Integer(default=0, bounds=(0, 0), doc="index of the example shown")
    layer = param.Integer(default=0, bounds=(0, 0), doc="attention module shown")

    def __init__(self, ds: xr.Dataset, **params):
        self._ds = ds
        super().__init__(**params)
        self.param.example.bounds = (0, ds.sizes["example"] - 1)
        self.param.layer.bounds = (0, ds.sizes["layer"] - 1)

    @param.depends("example")
    def _image(self) -> hv.RGB:
        example = self._ds.isel(example=self.example)
        height, width = int(example.image_height), int(example.image_width)
        pixels = example["image"].isel(image_y=slice(0, height), image_x=slice(0, width)).values
        return hv.RGB(pixels[::-1], bounds=(0, 0, width, height)).opts(
            title=str(example.text.values), frame_width=320, aspect=width / height, xaxis=None, yaxis=None
        )

    @param.depends("example", "layer")
    def _attention(self) -> hv.HeatMap:
        example = self._ds.isel(example=self.example)
        n_tokens = int(example.seq_len)
        mean = example["attention"].isel(layer=self.layer, query=slice(0, n_tokens), key=slice(0, n_tokens))
        matrix = mean.mean("head", skipna=True).values
        labels = [f"{i}:{t}" for i, t in enumerate(example["token_text"].values[:n_tokens])]
        query, key = np.meshgrid(np.arange(n_tokens), np.arange(n_tokens), indexing="ij")
        table = {
            "key": np.array(labels)[key.ravel()],
            "query": np.array(labels)[query.ravel()],
            "attention": matrix.ravel(),
        }
        return hv.HeatMap(table, ["key", "query"], "attention").opts(
            cmap="viridis",
            colorbar=True,
            frame_width=420,
            frame_height=420,
            xaxis=None,
            yaxis=None,
            invert_yaxis=True,
            tools=["hover"],
            title=f"layer {self.layer}: mean over heads (rows: queries)",
        )

    def __panel__(self) -> pn.viewable.Viewable:
        ds = self._ds
        summary = pn.pane.Markdown(
            f"**{ds.attrs['model_name']}** · {ds.sizes['example']} examples · "
            f"{ds.sizes['layer']} layers × {ds.sizes['head']} heads · up to {ds.sizes['token']} tokens"
        )
        controls = pn.Column(
            summary,
            pn.widgets.IntSlider.from_param(self.param.example),
            pn.widgets.IntSlider.from_param(self.param.layer),
            width=320,
        )
        return pn.Row(controls, pn.pane.HoloViews(self._image), pn.pane.HoloViews(self._attention))


def build_app(store: str | os.PathLike) -> pn.viewable.Viewable:
    """The dashboard page for the store at ``store``."""
    ds = open_dataset(store)
    return pn.template.FastListTemplate(title="vlinterpret-panel", main=[StoreOverview(ds)])
