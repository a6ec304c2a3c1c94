"""Analysis results cached beside a store, so a dashboard or notebook computes them once.

A result is a netCDF file (a ``.npy`` file for large arrays) under ``<store>/.cache/`` (``<dir>/.<file>.cache/`` for a
single-file store), named by what was computed (``kind`` and its parameters) and by the
store's ``store_signature``. The signature changes whenever a shard is added, removed or
rewritten, so a changed store never serves an old result; saving a result deletes every
entry made for another signature. Datasets without ``store_path`` are simply not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

CACHE_DIRECTORY = ".cache"
_SUFFIXES = (".nc", ".npy")
_MEMORY_ENTRIES = 16
_memory: OrderedDict[tuple[str, int], xr.Dataset] = OrderedDict()
_UNSAVED = -1  # the "mtime" of a result that could not be written beside its store


def cache_directory(ds: xr.Dataset) -> Path | None:
    """Where results for the store ``ds`` was opened from are cached; None if it has no path."""
    store_path = ds.attrs.get("store_path")
    if not store_path or not ds.attrs.get("store_signature"):
        return None
    store = Path(store_path)
    return store / CACHE_DIRECTORY if store.is_dir() else store.parent / f".{store.name}{CACHE_DIRECTORY}"


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(ds: xr.Dataset, kind: str, params: Mapping[str, Any], *, suffix: str = ".nc") -> Path | None:
    """The file holding result ``kind`` computed with ``params`` on this version of the store."""
    directory = cache_directory(ds)
    if directory is None:
        return None
    return directory / f"{kind}-{_digest(dict(params))}-{_digest(ds.attrs['store_signature'])}{suffix}"


def _drop_other_versions(path: Path) -> None:
    """Delete every cached file made for another store signature than ``path``'s."""
    current = path.name.rsplit("-", 1)[1].split(".")[0]
    for entry in path.parent.iterdir():
        if entry.suffix in _SUFFIXES and entry.name.rsplit("-", 1)[-1].split(".")[0] != current:
            entry.unlink(missing_ok=True)


def load(ds: xr.Dataset, kind: str, params: Mapping[str, Any]) -> xr.Dataset | None:
    """The cached result, in memory, or None when it was never computed for this store version."""
    path = cache_path(ds, kind, params)
    if path is None:
        return None
    if not path.exists():
        return _memory.get((str(path), _UNSAVED))
    key = (str(path), path.stat().st_mtime_ns)
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    try:
        with xr.open_dataset(path, engine="netcdf4") as cached:
            result = cached.load()
    except (OSError, ValueError):  # a damaged cache file is recomputed, never trusted
        return None
    _remember(key, result)
    return result


def _remember(key: tuple[str, int], result: xr.Dataset) -> None:
    """Keep ``result`` in the in-memory layer, dropping the least recently used beyond ``_MEMORY_ENTRIES``."""
    _memory[key] = result
    while len(_memory) > _MEMORY_ENTRIES:
        _memory.popitem(last=False)


def save(ds: xr.Dataset, kind: str, params: Mapping[str, Any], result: xr.Dataset) -> Path | None:
    """Write ``result`` atomically beside the store and drop entries of older store versions.

    A store on read-only media still works: the failure to write is a warning, not an error,
    and the result is kept in this process's memory (``_MEMORY_ENTRIES`` at most) instead, so
    a dashboard does not compute it again on every request.
    """
    path = cache_path(ds, kind, params)
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
        try:
            result.to_netcdf(temporary, engine="netcdf4")
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        warnings.warn(
            f"could not cache {kind} beside the store ({error}); kept in memory until this process ends",
            stacklevel=2,
        )
        _remember((str(path), _UNSAVED), result)
        return None
    _drop_other_versions(path)
    return path


def cached_array(ds: xr.Dataset, kind: str, params: Mapping[str, Any], write: Callable[[Path], None]) -> Path | None:
    """The ``.npy`` file of a large array cached beside the store, written on a miss.

    ``write(path)`` creates it (e.g. with ``numpy.lib.format.open_memmap``) under a temporary
    name that is then renamed, like every cache entry; read it with ``read_rows``. Returns
    None for datasets without a store path or when the cache cannot be written (with a warning).
    """
    path = cache_path(ds, kind, params, suffix=".npy")
    if path is None:
        return None
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.partial.npy")
            try:
                write(temporary)
                os.replace(temporary, path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        except OSError as error:
            warnings.warn(f"could not cache {kind} beside the store ({error})", stacklevel=2)
            return None
        _drop_other_versions(path)
    return path


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a 2-D ``.npy`` file, read into memory (no mapping, so memory stays bounded)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-ordered 2-D array")
        stop = min(stop, shape[0])
        handle.seek(handle.tell() + start * shape[1] * dtype.itemsize)
        rows = np.fromfile(handle, dtype=dtype, count=max(0, stop - start) * shape[1])
    return rows.reshape(-1, shape[1])


def cached(
    ds: xr.Dataset, kind: str, params: Mapping[str, Any], compute: Callable[[], xr.Dataset], *, use_cache: bool = True
) -> xr.Dataset:
    """Return the cached result ``kind`` for ``params``, computing and saving it on a miss."""
    if use_cache:
        hit = load(ds, kind, params)
        if hit is not None:
            return hit
    result = compute()
    if use_cache:
        save(ds, kind, params, result)
    return result


def clear(ds: xr.Dataset) -> int:
    """Delete every cached result of the store; return how many files were removed."""
    directory = cache_directory(ds)
    if directory is None or not directory.exists():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if entry.suffix in _SUFFIXES:
            entry.unlink(missing_ok=True)
            removed += 1
    _memory.clear()
    return removed
