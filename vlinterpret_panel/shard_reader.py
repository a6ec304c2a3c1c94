"""Read our netCDF shards as Dask arrays whose every task reads one chunk from one file.

Why not ``xr.open_mfdataset``: concatenating many shards of different token counts makes
Dask pad, rechunk and concatenate lazily, and every later click then pays for optimising
that whole graph (seconds on a 2 GB store). Here each variable of the whole store is one
Dask array built from a plain task dict: a task reads one (example, layer) block from its
shard, decodes it and pads it to the store's common size. Computing one block culls the
graph to that single task, so a click costs one read. Only our own encodings are decoded
(packed uint16 attention, NaN fills, character-array strings); foreign files are refused
before any of this by ``validate``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array
import netCDF4
import numpy as np
from xarray.backends.locks import HDF5_LOCK

from vlinterpret_panel import chunk_reader
from vlinterpret_panel.cache import LRUCache
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.packing import unpack_into
from vlinterpret_panel.schema import VARIABLES

# Shards may differ in size along these dims; blocks are padded to the store's largest.
PADDED_DIMS = ("token", "query", "key", "head", "image_y", "image_x", "step", "rank", "answer_rank")
# Variables read one example (and one layer) per task: the unit a click needs.
_BLOCK_DIMS = ("layer", "hidden_layer")
# Data variables with this many dims or more are read one example per task.
_PER_EXAMPLE_MIN_NDIM = 3

# What a block of padding or of a shard without the variable holds: the schema's fill values.
FILL_VALUES: dict[str, Any] = {name: variable.fill for name, variable in VARIABLES.items()}


FileKey = tuple[str, int, int]  # (path, size, mtime_ns): a rewritten shard gets a new handle

MAX_OPEN_FILES = 256
CHUNK_CACHE_BYTES = 4 * 2**20


def _close(key: FileKey, nc: netCDF4.Dataset) -> None:
    nc.close()


# One open netCDF4.Dataset per shard version and process, shared by every open store and
# session. Files are opened, read and closed only under HDF5_LOCK: libhdf5 is not
# thread-safe, and closing a file from a garbage collector while another thread reads
# (as per-store file managers did) crashes it.
_OPEN_FILES: LRUCache[FileKey, netCDF4.Dataset] = LRUCache(MAX_OPEN_FILES, on_evict=_close)
# xarray's netCDF writer opens and closes files outside HDF5_LOCK, so writes of shards and our
# reads are serialised by this lock too (taken before HDF5_LOCK, reentrant for nested use).
STORE_IO_LOCK = threading.RLock()


class _HDF5Calls:
    """``STORE_IO_LOCK`` then ``HDF5_LOCK``, as one context manager: what every libhdf5 call here holds (netCDF4's,
    and h5py's where ``chunk_reader`` locates chunks: conda-forge gives both one libhdf5)."""

    def __enter__(self) -> None:
        STORE_IO_LOCK.acquire()
        HDF5_LOCK.acquire()

    def __exit__(self, *exc: object) -> None:
        HDF5_LOCK.release()
        STORE_IO_LOCK.release()


HDF5_CALLS = _HDF5Calls()


def _open(key: FileKey) -> netCDF4.Dataset:
    nc = netCDF4.Dataset(key[0], mode="r")
    nc.set_auto_maskandscale(False)
    for variable in nc.variables.values():
        # netCDF's default 64 MiB cache per variable and open file grows to gigabytes over a
        # large store; every task reads whole chunks once, so a small cache loses nothing.
        variable.set_var_chunk_cache(size=CHUNK_CACHE_BYTES)
    return nc


def _dataset(key: FileKey) -> netCDF4.Dataset:
    """The open file for ``key``; call with HDF5_LOCK held (opening and closing happen under it)."""
    return _OPEN_FILES.get(key, lambda: _open(key))


def file_key(path: Path) -> FileKey:
    """The handle key of a shard as it is on disk now."""
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def close_file(key: FileKey) -> None:
    """Close a shard's handle (e.g. after it failed validation)."""
    with HDF5_CALLS:
        _OPEN_FILES.pop(key)


@dataclass
class VariableInfo:
    """One variable of a shard: its dims, in-memory dtype, attributes and how it is packed."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    attrs: dict[str, Any]
    scale_factor: float | None
    fill_value: Any


@dataclass
class ShardInfo:
    """Metadata of one shard, read without touching any data variable's values."""

    path: Path
    attrs: dict[str, Any]
    sizes: dict[str, int]
    coords: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, Any]]]
    variables: dict[str, VariableInfo]
    handle: FileKey


def _decoded_dtype(variable: netCDF4.Variable, scale_factor: float | None) -> np.dtype:
    if variable.dtype is str or variable.dtype == np.dtype("S1"):
        return np.dtype(object)
    if scale_factor is not None:
        return np.dtype(np.float32)
    return np.dtype(variable.dtype)


def _values(variable: netCDF4.Variable) -> np.ndarray:
    """All values of a small variable (a coordinate), strings as Python str."""
    values = variable[...]
    values = np.ma.getdata(values)
    if values.dtype.kind in "SU" or values.dtype == object:
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.ravel()], dtype=object).reshape(
            values.shape
        )
    return np.asarray(values)


def read_shard_info(path: Path, coordinate_names: Sequence[str]) -> ShardInfo:
    """Open ``path`` and read its dims, attributes, coordinates and variable layout."""
    key = file_key(Path(path))
    try:
        with HDF5_CALLS:
            nc = _dataset(key)
            sizes = {name: len(dim) for name, dim in nc.dimensions.items()}
            attrs = {name: nc.getncattr(name) for name in nc.ncattrs()}
            coords, variables = {}, {}
            for name, variable in nc.variables.items():
                var_attrs = {key: variable.getncattr(key) for key in variable.ncattrs()}
                dims = tuple(d for d in variable.dimensions if not d.startswith("string"))
                if name in coordinate_names or name in sizes:
                    coords[name] = (dims, _values(variable), _public_attrs(var_attrs))
                    continue
                scale = var_attrs.get("scale_factor")
                variables[name] = VariableInfo(
                    dims=dims,
                    shape=tuple(sizes[d] for d in dims),
                    dtype=_decoded_dtype(variable, scale),
                    attrs=_public_attrs(var_attrs),
                    scale_factor=None if scale is None else float(scale),
                    fill_value=var_attrs.get("_FillValue"),
                )
    except VLIError:
        raise
    except Exception as error:  # netCDF4/HDF5 raise many types for foreign or broken files
        close_file(key)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VLIError(f"{path}: not a readable netCDF file ({reason})") from None
    sizes = {dim: size for dim, size in sizes.items() if not dim.startswith("string")}
    return ShardInfo(Path(path), attrs, sizes, coords, variables, key)


INDEX_DIR = ".index"


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a netCDF attribute or coordinate value."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _info_to_json(info: ShardInfo, signature: list[int]) -> dict[str, Any]:
    return {
        "signature": signature,
        "attrs": {k: _plain(v) for k, v in info.attrs.items()},
        "sizes": info.sizes,
        "coords": {
            name: [list(dims), _plain(values), str(values.dtype), {k: _plain(v) for k, v in attrs.items()}]
            for name, (dims, values, attrs) in info.coords.items()
        },
        "variables": {
            name: {
                "dims": list(var.dims),
                "shape": list(var.shape),
                "dtype": str(var.dtype),
                "attrs": {k: _plain(v) for k, v in var.attrs.items()},
                "scale_factor": var.scale_factor,
                "fill_value": _plain(var.fill_value),
            }
            for name, var in info.variables.items()
        },
    }


def _info_from_json(path: Path, data: dict[str, Any]) -> ShardInfo:
    coords = {
        name: (tuple(dims), np.array(values, dtype=np.dtype(dtype)), attrs)
        for name, (dims, values, dtype, attrs) in data["coords"].items()
    }
    variables = {
        name: VariableInfo(
            dims=tuple(var["dims"]),
            shape=tuple(var["shape"]),
            dtype=np.dtype(var["dtype"]),
            attrs=var["attrs"],
            scale_factor=var["scale_factor"],
            fill_value=var["fill_value"],
        )
        for name, var in data["variables"].items()
    }
    key = (str(path), *data["signature"])  # the file is opened on its first read only
    return ShardInfo(Path(path), data["attrs"], data["sizes"], coords, variables, key)


def _signature(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _index_file(path: Path) -> Path:
    return path.parent / INDEX_DIR / f"{path.name}.json"


def load_index(path: Path, checked_by: str) -> ShardInfo | None:
    """The shard's metadata from its JSON index, if the shard is unchanged since ``checked_by`` validated it.

    Opening an HDF5 file and validating it costs tens of milliseconds; a store of many
    shards opens in a fraction of that from the index. The index is only a cache.
    """
    try:
        data = json.loads(_index_file(path).read_text())
        if data["signature"] == _signature(path) and data["checked_by"] == checked_by:
            return _info_from_json(path, data)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def save_index(info: ShardInfo, checked_by: str) -> None:
    """Record a validated shard's metadata in the index (silently skipped on a read-only store)."""
    index_file = _index_file(info.path)
    try:
        index_file.parent.mkdir(exist_ok=True)
        data = {**_info_to_json(info, _signature(info.path)), "checked_by": checked_by}
        handle, temporary = tempfile.mkstemp(dir=index_file.parent, prefix=".", suffix=".partial")
        with os.fdopen(handle, "w") as out:
            json.dump(data, out)
        os.replace(temporary, index_file)
    except (OSError, TypeError, ValueError):
        pass


def _public_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    hidden = {"_FillValue", "scale_factor", "add_offset", "coordinates", "_Encoding", "dtype"}
    return {key: value for key, value in attrs.items() if key not in hidden}


def _read_block(
    handle: FileKey,
    name: str,
    info: VariableInfo,
    index: tuple[slice, ...],
    padded_shape: tuple[int, ...],
    fill: Any,
) -> np.ndarray:
    """Read one block of ``name``, decode our packing and pad it to ``padded_shape``.

    Numbers are read by ``chunk_reader`` (outside libhdf5's one lock, so threads read in parallel) where it
    can; strings, and anything it declines, through netCDF4 under the lock.
    """
    raw = chunk_reader.read(handle, name, index, HDF5_CALLS) if info.dtype != object else None
    if raw is None:
        with HDF5_CALLS:
            raw = np.ma.getdata(_dataset(handle)[name][index])
    if info.scale_factor is not None:
        return _unpacked(raw, info, padded_shape, fill)
    if info.dtype == object:
        block = np.asarray(raw, dtype=object)
        if raw.dtype.kind == "S":
            block = np.vectorize(lambda v: v.decode(), otypes=[object])(raw) if raw.size else block
    else:
        block = raw
    if block.shape == padded_shape:
        return block
    out = np.full(padded_shape, fill, dtype=info.dtype)
    out[tuple(slice(0, n) for n in block.shape)] = block
    return out


def _unpacked(raw: np.ndarray, info: VariableInfo, padded_shape: tuple[int, ...], fill: Any) -> np.ndarray:
    """Decode packed integers straight into the padded float32 block: one pass, one allocation."""
    out = np.empty(padded_shape, dtype=np.float32)
    inside = tuple(slice(0, n) for n in raw.shape)
    for axis, size in enumerate(raw.shape):  # only the padding: along each axis, the part past the values
        if size != padded_shape[axis]:
            out[(*inside[:axis], slice(size, None))] = fill
    assert info.scale_factor is not None  # called for packed variables only
    unpack_into(out[inside], raw, info.scale_factor, info.fill_value)
    return out


def _chunk_edges(dim: str, size: int, ndim: int) -> list[tuple[int, int]]:
    """The [start, stop) ranges of a shard's blocks along ``dim``."""
    if (dim == "example" and ndim >= _PER_EXAMPLE_MIN_NDIM) or dim in _BLOCK_DIMS:
        return [(i, i + 1) for i in range(size)]
    return [(0, size)]


ShardBlocks = tuple[list[tuple[tuple[int, ...], tuple]], list[int], dict[str, list[int]]]
"""One shard's part of a store variable's graph: (block index, task) pairs, its example chunks, its other chunks."""

_SHARD_BLOCKS: LRUCache[tuple, ShardBlocks] = LRUCache(4096)
"""Per (shard version, variable, padded sizes): a shard never changes, so a reopened store (every counterfactual and
added example reopens the grown store) reuses its tasks instead of rebuilding ~17,000 of them (60 ms, and garbage
whose full collections stalled a server 0.2-0.45 s every few edits)."""


def _shard_blocks(
    name: str, shard: ShardInfo, dims: tuple[str, ...], sizes: dict[str, int], dtype: np.dtype, fill: Any
) -> ShardBlocks:
    """The read (or fill) task of each block of ``shard``'s ``name``, padded to ``sizes``."""
    n_examples = shard.sizes["example"]
    info = shard.variables.get(name)
    edges_by_dim = [_chunk_edges(dim, n_examples if dim == "example" else sizes[dim], len(dims)) for dim in dims]
    blocks: list[tuple[tuple[int, ...], tuple]] = []
    for block_index in itertools.product(*(range(len(edges)) for edges in edges_by_dim)):
        bounds = [edges[i] for edges, i in zip(edges_by_dim, block_index, strict=True)]
        padded_shape = tuple(stop - start for start, stop in bounds)
        if info is None:
            blocks.append((block_index, (np.full, padded_shape, fill, dtype)))
            continue
        local = tuple(
            slice(start, min(stop, shard.sizes[dim])) for dim, (start, stop) in zip(dims, bounds, strict=True)
        )
        blocks.append((block_index, (_read_block, shard.handle, name, info, local, padded_shape, fill)))
    example_chunks = [stop - start for start, stop in edges_by_dim[0]]
    other_chunks = {
        dim: [stop - start for start, stop in edges] for dim, edges in zip(dims[1:], edges_by_dim[1:], strict=True)
    }
    return blocks, example_chunks, other_chunks


def store_array(
    name: str, shards: Sequence[ShardInfo], sizes: dict[str, int], dtype: np.dtype | None = None
) -> tuple[tuple[str, ...], dask.array.Array, dict[str, Any]]:
    """One Dask array over every shard's ``name``, padded to ``sizes``; shards lacking it are fill."""
    template = next(shard.variables[name] for shard in shards if name in shard.variables)
    dims = template.dims
    dtype = dtype or template.dtype
    fill = FILL_VALUES.get(name, np.nan if dtype.kind == "f" else 0)
    graph_name = f"vli-{name}-{uuid.uuid4().hex[:12]}"
    graph: dict[tuple, Any] = {}
    example_chunks: list[int] = []
    other_chunks: dict[str, list[int]] = {}
    padded = tuple(sizes[dim] for dim in dims[1:])
    for shard in shards:
        key = (shard.handle, name, dims, padded, dtype.str, repr(fill))
        blocks, shard_examples, shard_others = _SHARD_BLOCKS.get(
            key, functools.partial(_shard_blocks, name, shard, dims, sizes, dtype, fill)
        )
        first_example_block = len(example_chunks)
        example_chunks.extend(shard_examples)
        for dim, sizes_along in shard_others.items():
            other_chunks.setdefault(dim, sizes_along)
        for block_index, task in blocks:
            graph[(graph_name, first_example_block + block_index[0], *block_index[1:])] = task
    chunks = (tuple(example_chunks), *(tuple(other_chunks[d]) for d in dims[1:]))
    array = dask.array.Array(graph, graph_name, chunks=chunks, dtype=dtype)
    return dims, array, template.attrs


def shard_skeleton(name: str, shard: ShardInfo) -> tuple[tuple[str, ...], np.ndarray, dict[str, Any]]:
    """One shard's variable as a zero-stride placeholder of the right dims, shape and dtype.

    Enough for the structural checks of ``validate``, at no memory and no I/O cost.
    """
    var = shard.variables[name]
    return var.dims, np.broadcast_to(np.zeros((), dtype=var.dtype), var.shape), var.attrs
