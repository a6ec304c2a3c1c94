"""Compute and cache a store's dataset-wide results ahead of time (what ``vlinterpret stats`` runs)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import xarray as xr

from vlinterpret_panel import cache
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.neighbors import fits_in_memory, prepare_layer_copy
from vlinterpret_panel.projection import check_hidden_layer, project_hidden_states
from vlinterpret_panel.stats import compute_head_statistics


def precompute(
    ds: xr.Dataset,
    *,
    hidden_layers: Sequence[int] | None = None,
    methods: Sequence[str] = ("pca",),
    batch_size: int = 32,
    search_index: bool | None = None,
    progress: bool = False,
) -> list[str]:
    """Compute and cache head statistics, the projections and the search copies of ``hidden_layers`` (default all).

    ``search_index``: write each layer's contiguous copy that nearest-token searches read (``neighbors``);
    ``None`` writes them only when a layer is too large to be kept in memory, where searches need them.
    The dashboard then opens on cached results; returns one line per cached result. Inside
    ``cluster.distributed_client`` the reading and the statistics run on the cluster.
    """
    if cache.cache_directory(ds.vli.identity) is None:
        raise VLIError("the dataset has no store path; open it with vlinterpret_panel.open_dataset to cache results")
    layers = (
        range(ds.sizes["hidden_layer"])
        if hidden_layers is None
        else [check_hidden_layer(ds, layer) for layer in hidden_layers]
    )
    done = []
    started = time.perf_counter()
    table = compute_head_statistics(ds, batch_size=batch_size, progress=progress)
    done.append(
        f"head statistics: {len(table.data_vars)} statistics x {table.sizes['example']} examples "
        f"({time.perf_counter() - started:.1f} s)"
    )
    for method in methods:
        for hidden_layer in layers:
            started = time.perf_counter()
            points = project_hidden_states(ds, hidden_layer, method=method, progress=progress)  # type: ignore[arg-type]
            done.append(
                f"projection {method} hidden layer {hidden_layer}: {points.sizes['point']} tokens "
                f"({time.perf_counter() - started:.1f} s)"
            )
    if search_index is None:
        search_index = not fits_in_memory(ds)
    for hidden_layer in layers if search_index else ():
        started = time.perf_counter()
        prepare_layer_copy(ds, hidden_layer)
        done.append(f"search copy hidden layer {hidden_layer} ({time.perf_counter() - started:.1f} s)")
    return done
