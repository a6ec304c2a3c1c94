"""Export the data behind the current view as netCDF or CSV (every plot has Bokeh's PNG save tool)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import panel as pn
import xarray as xr

from vlinterpret_panel.ui.common import heading
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View


def current_view_data(ds: xr.Dataset, selection: Selection) -> xr.Dataset:
    """The selected attention map, the selected token's attention per token and on the image, and the tokens."""
    example, layer, head, tokens = selection.example, selection.layer, selection.head, selection.tokens
    matrix = ds.vli.attention_map(example, layer, head)
    per_token = ds.vli.token_attention(example, layer, head, tokens, selection.direction)
    on_image = ds.vli.token_attention_on_image(example, layer, head, tokens, selection.direction, selection.smooth)
    info = ds.vli.tokens(example)
    data = xr.Dataset(
        {
            "attention": matrix.reset_coords(drop=True),
            "token_attention": per_token.reset_coords(drop=True),
            "attention_on_image": on_image,
            "token_text": ("token", info.token_text),
            "modality": ("token", info.modality),
        }
    )
    data.attrs = {
        "example": example,
        "layer": int(layer),
        "head": "mean" if head is None else int(head),
        "tokens": np.asarray(tokens, dtype=np.int32),
        "direction": selection.direction,
        "smooth": int(selection.smooth),
        "source_store": str(ds.attrs.get("store_path", "")),
        "model_name": str(ds.attrs.get("model_name", "")),
    }
    return data


def current_view_table(ds: xr.Dataset, selection: Selection) -> pd.DataFrame:
    """One row per token: position, text, modality and the selected token's attention."""
    data = current_view_data(ds, selection)
    return pd.DataFrame(
        {
            "token": data["token"].values,
            "token_text": data["token_text"].values,
            "modality": data["modality"].values,
            f"attention_{selection.direction}_selected": data["token_attention"].values,
        }
    )


class ExportPanel(View):
    """Download buttons for the data behind the current selection."""

    def _stem(self) -> str:
        head = "mean" if self.selection.head is None else self.selection.head
        return f"{self.selection.example}_L{self.selection.layer}_H{head}"

    def _netcdf(self) -> io.BytesIO:
        return io.BytesIO(current_view_data(self.ds, self.selection).to_netcdf())

    def _csv(self) -> io.BytesIO:
        return io.BytesIO(current_view_table(self.ds, self.selection).to_csv(index=False).encode())

    def __panel__(self) -> pn.viewable.Viewable:
        netcdf = pn.widgets.FileDownload(callback=self._netcdf, filename="view.nc", label="data (netCDF)", width=118)
        csv = pn.widgets.FileDownload(callback=self._csv, filename="view.csv", label="tokens (CSV)", width=118)

        def rename(*events: object) -> None:
            netcdf.filename, csv.filename = f"{self._stem()}.nc", f"{self._stem()}.csv"

        self.selection.param.watch(rename, ["example", "layer", "head"])
        rename()
        return pn.Column(heading("Export"), "PNG: the save tool above each plot.", pn.Row(netcdf, csv))
