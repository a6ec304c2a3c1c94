"""``xr.open_dataset(STORE, engine="vlinterpret")``: a store opened through xarray's own entry point.

Registered in ``pyproject.toml`` under ``xarray.backends``. It returns what
``vlinterpret_panel.open_dataset`` returns (metadata read, every shard validated, data
read only when indexed), so ``ds.vli`` works the same; ``ds.close()`` closes the store's
shard files (they reopen if the dataset is read again). xarray wraps each variable in its
lazy indexing; ``chunks={}`` gives Dask arrays with the store's own blocks (one
``(example, layer)`` block per task, each variable's ``preferred_chunks``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xarray as xr
from xarray.backends import BackendEntrypoint

from vlinterpret_panel.shard_reader import close_file, file_key
from vlinterpret_panel.store import SHARD_SUFFIX, open_dataset, shard_paths


def _store_path(filename_or_obj: Any) -> Path | None:
    if isinstance(filename_or_obj, str | os.PathLike):
        return Path(filename_or_obj)
    return None


class VLInterpretBackendEntrypoint(BackendEntrypoint):
    """Opens a vlinterpret-panel store (a directory of shards, or one shard file) lazily."""

    description = "vlinterpret-panel stores: attention, hidden states and relevancy of vision-language models"
    url = "https://github.com/vlinterpret-panel/vlinterpret-panel/blob/main/docs/schema.md"
    open_dataset_parameters = ("filename_or_obj", "drop_variables")

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None) -> xr.Dataset:
        path = _store_path(filename_or_obj)
        if path is None:
            raise TypeError(f"engine='vlinterpret' opens a store path, not {type(filename_or_obj).__name__}")
        ds = open_dataset(path)
        if drop_variables is not None:
            ds = ds.drop_vars([drop_variables] if isinstance(drop_variables, str) else list(drop_variables))
        for variable in ds.variables.values():
            if variable.chunks is not None:
                variable.encoding["preferred_chunks"] = dict(zip(variable.dims, variable.chunks, strict=True))
        shards = shard_paths(path) if path.is_dir() else [path]

        def close() -> None:
            for shard in shards:
                if shard.exists():
                    close_file(file_key(shard))

        ds.set_close(close)
        return ds

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        path = _store_path(filename_or_obj)
        if path is None:
            return False
        return path.is_dir() and any(path.glob(f"*{SHARD_SUFFIX}"))
