"""The store: a directory of netCDF4 shards, written atomically, opened lazily as one Dataset.

Each shard holds a few whole examples. A writer never touches an existing shard: it
writes a hidden temporary file and renames it into place, so readers and crashes only
ever see complete shards, and two writers appending at once never lose each other's
examples. Opening reads metadata and index coordinates only; every data variable is a
Dask array whose chunks are one (example, layer) slice, the unit a dashboard click reads.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.packing import bitround_hidden, is_packed, pack_attention, unpack_attention
from vlinterpret_panel.schema import (
    COORDINATE_ATTRS,
    PACKED_VARIABLES,
    SCHEMA_VERSION,
    ExampleRecord,
    ModelInfo,
    records_to_dataset,
    validate,
)
from vlinterpret_panel.shard_reader import (
    PADDED_DIMS,
    STORE_IO_LOCK,
    ShardInfo,
    close_file,
    load_index,
    read_shard_info,
    save_index,
    shard_skeleton,
    store_array,
)

SHARD_SUFFIX = ".nc"
SHARD_PREFIX = "shard-"
TEMP_SUFFIX = ".partial"

Precision = Literal["float16", "float32"]
COORDINATE_NAMES = tuple(COORDINATE_ATTRS)

# Hidden states are unbounded: float32, their mantissa rounded to float16's 10 bits before the write
# (``packing.bitround``, netCDF-C's BitRound bit for bit), so they compress to about half.


HIDDEN_VARIABLES = ("hidden_states", "answer_hidden_states")

MIN_CHUNK_BYTES = 64 * 2**10
"""Smallest HDF5 chunk worth its per-chunk cost; small models' per-layer maps are grouped up to it."""


def _block_chunks(variable: xr.DataArray, stored_bytes: int) -> tuple[int, ...]:
    """Chunks of an ``(example, layer, ...)`` variable: one (example, layer) block, or several when tiny.

    A ViLT-sized layer (hundreds of KB) is one chunk, so a click reads one chunk. A tiny
    model's layer is a few KB, where HDF5's per-chunk cost would dominate the write (4,600
    chunks for 512 built-in examples); its layers, then examples, share a chunk up to
    ``MIN_CHUNK_BYTES``. Readers slice the block they want from any chunking.
    """
    n_examples, n_layers, *rest = variable.shape
    layer_bytes = stored_bytes * int(np.prod(rest))
    layers = int(np.clip(MIN_CHUNK_BYTES // max(1, layer_bytes), 1, n_layers))
    examples = 1
    if layers == n_layers:
        examples = int(np.clip(MIN_CHUNK_BYTES // max(1, layer_bytes * n_layers), 1, n_examples))
    return (examples, layers, *rest)


def _encoding(ds: xr.Dataset, precision: Precision) -> dict[str, dict]:
    """netCDF encoding: compression, and chunks that make one (example, layer) at most one read."""
    # No shuffle: netCDF4-python applies that filter with zlib only (asked with zstd, it is silently left out).
    compress = {"compression": "zstd", "complevel": 1}
    sizes = ds.sizes
    encoding: dict[str, dict] = {}
    for name, var in ds.data_vars.items():
        # Strings as character arrays: xarray decodes those lazily, unlike variable-length ones.
        enc: dict[str, Any] = dict(compress) if var.dtype.kind in "fiub" else {"dtype": "S1"}
        if var.dtype.kind == "f" and name not in PACKED_VARIABLES + HIDDEN_VARIABLES:
            enc["_FillValue"] = np.nan
        encoding[str(name)] = enc
    attention_bytes = 2 if precision == "float16" else 4
    for name in PACKED_VARIABLES:
        if name in ds:
            encoding[name].update(
                chunksizes=_block_chunks(ds[name], attention_bytes),
                **({} if precision == "float16" else {"dtype": "float32", "_FillValue": np.nan}),
            )
    for name in HIDDEN_VARIABLES:
        if name in ds:
            encoding[name].update(
                chunksizes=_block_chunks(ds[name], 4),
                dtype="float32",
                _FillValue=np.nan,
            )
    encoding["image"]["chunksizes"] = (1, sizes["image_y"], sizes["image_x"], sizes["channel"])
    return encoding


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _shard_paths(store: Path) -> list[Path]:
    """Completed shards in creation order (their names start with a timestamp)."""
    return sorted(p for p in store.glob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))


def write_shard(ds: xr.Dataset, store: str | os.PathLike, *, precision: Precision = "float16") -> Path:
    """Validate ``ds`` and add it to ``store`` as a new shard, atomically; return its path.

    The data are written to a hidden temporary file, flushed to disk, then renamed, so a
    crash leaves at most a stray ``.partial`` file that readers ignore. ``ds`` is not changed.
    """
    return _write_shard(ds, Path(store), precision, owned=False)


def _as_stored(ds: xr.Dataset, precision: Precision, *, owned: bool) -> xr.Dataset:
    """``ds`` as ``precision`` stores it: attention packed (or unpacked), hidden states rounded at float16.
    ``owned``: ``ds`` was built only to be written, so its hidden states may be rounded in place."""
    for variable in PACKED_VARIABLES:
        if variable in ds and is_packed(ds[variable]) != (precision == "float16"):
            repack = pack_attention if precision == "float16" else unpack_attention
            ds = ds.assign({variable: repack(ds[variable])})
    if precision == "float16":
        rounded = {name: bitround_hidden(ds[name], in_place=owned) for name in HIDDEN_VARIABLES if name in ds}
        ds = ds.assign(rounded)
    return ds


def _write_shard(ds: xr.Dataset, store: Path, precision: Precision, *, owned: bool) -> Path:
    validate(ds, source="data to write", check_values=True)
    if store.exists() and not store.is_dir():
        raise VLIError(f"{store}: is a file, not a store directory")
    store.mkdir(parents=True, exist_ok=True)
    name = f"{SHARD_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=store)
    os.close(handle)
    ds = _as_stored(ds, precision, owned=owned)
    try:
        with STORE_IO_LOCK:
            ds.to_netcdf(temporary, engine="netcdf4", format="NETCDF4", encoding=_encoding(ds, precision))
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes files private; shards are ordinary files
        final = store / name
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(store, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return final


def write_records(
    records: list[ExampleRecord],
    info: ModelInfo,
    store: str | os.PathLike,
    *,
    precision: Precision = "float16",
    extraction: dict[str, Any] | None = None,
) -> Path:
    """Write example records to ``store`` as one new shard (``write_shard``), the lean way.

    At float16 precision each record's attention is packed straight into the shard's uint16 array
    (``records_to_dataset(packed_attention=True)``), never stacked as padded float32, and the hidden
    states are rounded in place: the same values on disk, half the fresh memory, passes fewer.
    Values are validated as stored.
    """
    ds = records_to_dataset(records, info, extraction, packed_attention=precision == "float16")
    return _write_shard(ds, Path(store), precision, owned=True)


def _shard_dataset(shard: ShardInfo) -> xr.Dataset:
    """One shard's layout as a Dataset of placeholders, to validate its structure on its own."""
    return xr.Dataset(
        {name: shard_skeleton(name, shard) for name in shard.variables},
        coords=shard.coords,
        attrs=shard.attrs,
    )


def _open_shard(path: Path) -> ShardInfo:
    """Read one shard's metadata and check its structure (once per shard version, then indexed)."""
    checked_by = f"schema {SCHEMA_VERSION}"
    indexed = load_index(path, checked_by)
    if indexed is not None:
        return indexed
    shard = read_shard_info(path, COORDINATE_NAMES)
    try:
        validate(_shard_dataset(shard), source=str(path))
    except (VLIError, ValueError, KeyError) as error:
        close_file(shard.handle)
        message = str(error) if isinstance(error, VLIError) else f"{path}: not a vlinterpret-panel shard ({error})"
        raise VLIError(message) from None
    save_index(shard, checked_by)
    return shard


def _check_compatible(shards: list[ShardInfo]) -> None:
    """Refuse to combine shards of different models or layouts into one store."""
    first = shards[0]
    for shard in shards[1:]:
        if shard.attrs["model_name"] != first.attrs["model_name"]:
            raise VLIError(
                f"{shard.path}: model {shard.attrs['model_name']!r} differs from the store's "
                f"{first.attrs['model_name']!r}; keep one model per store"
            )
        for name in ("layer", "layer_kind", "hidden_layer_name", "relevancy_method", "metric", "readout"):
            mine, theirs = shard.coords.get(name), first.coords.get(name)
            if mine is not None and theirs is not None and mine[1].tolist() != theirs[1].tolist():
                raise VLIError(f"{shard.path}: its {name} {mine[1].tolist()} differs from the store's")
        if shard.sizes.get("feature") != first.sizes.get("feature"):
            raise VLIError(f"{shard.path}: hidden size {shard.sizes.get('feature')} differs from the store's")


def open_dataset(path: str | os.PathLike, *, on_bad_shard: Literal["raise", "skip"] = "raise") -> xr.Dataset:
    """Open a store (a shard directory or a single shard file) as one lazy Dataset.

    Reads each shard's metadata and coordinates only; data variables are Dask arrays whose
    tasks each read one block of one shard. Each shard's structure is validated.
    ``on_bad_shard="skip"`` leaves out unreadable or foreign shards with a warning (listed
    in ``attrs['skipped_shards']``) instead of failing, so the good part of a damaged
    store stays usable.
    """
    store = Path(path)
    if not store.exists():
        raise VLIError(f"{store}: no such store (neither a directory of shards nor a .nc file)")
    paths = [store] if store.is_file() else _shard_paths(store)
    if not paths:
        raise VLIError(f"{store}: the store has no shards (*.nc files)")
    shards: list[ShardInfo] = []
    skipped: list[str] = []
    for shard_path in paths:
        try:
            shards.append(_open_shard(shard_path))
        except VLIError as error:
            if on_bad_shard == "raise":
                raise
            warnings.warn(f"skipping shard: {error}", stacklevel=2)
            skipped.append(str(error))
    if not shards:
        raise VLIError(f"{store}: no readable shard; " + "; ".join(skipped))
    _check_compatible(shards)
    combined = _combine(shards)
    combined = _drop_duplicate_examples(combined)
    combined.attrs["shards"] = len(shards)
    combined.attrs["store_path"] = str(store.resolve())
    combined.attrs["store_signature"] = shard_signature(store) if store.is_dir() else _file_signature(store)
    if skipped:
        combined.attrs["skipped_shards"] = skipped
    return combined


def _combine(shards: list[ShardInfo]) -> xr.Dataset:
    """All shards as one Dataset, each variable one Dask array padded to common sizes."""
    first = shards[0]
    sizes = dict(first.sizes)
    coords: dict[str, Any] = {name: coord for name, coord in first.coords.items() if name not in PADDED_DIMS}
    for dim in PADDED_DIMS:
        present = [s for s in shards if dim in s.sizes]
        if not present:
            continue
        longest = max(present, key=lambda s: s.sizes[dim])
        sizes[dim] = longest.sizes[dim]
        # Index coordinates (token, key, step...) count from 0; heads may be a chosen subset.
        coords[dim] = longest.coords.get(dim, (dim, np.arange(sizes[dim], dtype=np.int32), {}))
    names = list(dict.fromkeys(name for shard in shards for name in shard.variables))
    data_vars = {name: store_array(name, shards, sizes) for name in names}
    coords["example"] = (
        "example",
        np.concatenate([s.coords["example"][1] for s in shards]),
        first.coords["example"][2],
    )
    return xr.Dataset(data_vars, coords=coords, attrs=dict(first.attrs))


def _drop_duplicate_examples(ds: xr.Dataset) -> xr.Dataset:
    """Keep the first copy of an example id written twice (e.g. by a re-run)."""
    ids = ds["example"].values
    _, first = np.unique(ids, return_index=True)
    if len(first) == len(ids):
        return ds
    return ds.isel(example=np.sort(first))


def example_ids(path: str | os.PathLike) -> set[str]:
    """Ids of the examples already stored, reading only the ``example`` coordinate."""
    store = Path(path)
    if not store.exists():
        return set()
    ids: set[str] = set()
    for shard_path in _shard_paths(store):
        ids.update(_open_shard(shard_path).coords["example"][1].tolist())
    return ids


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The completed shards of a store, oldest first."""
    return _shard_paths(Path(path))


def _file_signature(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def shard_signature(path: str | os.PathLike) -> str:
    """A string that changes whenever a shard is added, removed or rewritten (for caches)."""
    parts: Iterable[str] = (_file_signature(p) for p in _shard_paths(Path(path)))
    return "|".join(parts)
