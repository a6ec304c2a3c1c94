"""What identifies a dataset, and the caches of what was read or computed from it.

* ``DatasetIdentity`` / ``dataset_identity(ds)``: the one name of the data behind a Dataset
  object: the store's version (its ``store_signature``) plus a digest of every index the
  object holds (example ids, layers, heads, tokens...), so a subset (``isel``, ``sel``,
  ``where``) never shares a cache entry with the store or another subset, where the same
  position means another example. A Dataset built in memory gets a name of its own, never
  reused (not ``id(ds)``, which Python recycles). ``ds.vli.identity`` holds it per object.
* ``LRUCache``: the one bounded, thread-safe, least-recently-used cache of the package;
  in-process caches (tokens, attention blocks, tables, open shard files) are instances of it
  keyed by an identity.
* Results cached beside a store, so a dashboard or notebook computes them once: a netCDF
  file (a ``.npy`` file for large arrays) under ``<store>/.cache/`` (``<dir>/.<file>.cache/``
  for a single-file store), named by what was computed (``kind`` and its parameters), the
  identity's selection and the store's signature. The signature changes whenever a shard
  is added, removed or rewritten, so a changed store never serves an old result; saving a
  result deletes every entry made for another signature. Datasets without ``store_path``
  are simply not cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import xarray as xr

CACHE_DIRECTORY = ".cache"
_SUFFIXES = (".nc", ".npy")
_UNSAVED = -1  # the "mtime" of a result that could not be written beside its store

_Key = TypeVar("_Key", bound=Hashable)
_Value = TypeVar("_Value")


class LRUCache(Generic[_Key, _Value]):
    """At most ``max_entries`` values, the least recently used dropped first; safe across threads.

    ``get`` computes a missing value outside the lock (two threads may compute the same value
    once each; the last one is kept). ``on_evict(key, value)`` runs for every value dropped,
    popped or cleared, e.g. to close a file.
    """

    def __init__(self, max_entries: int, *, on_evict: Callable[[_Key, _Value], None] | None = None) -> None:
        if max_entries < 1:
            raise ValueError("an LRUCache holds at least one entry")
        self.max_entries = max_entries
        self._items: OrderedDict[_Key, _Value] = OrderedDict()
        self._lock = threading.Lock()
        self._on_evict = on_evict

    def get(self, key: _Key, compute: Callable[[], _Value]) -> _Value:
        """The value for ``key``, computed by ``compute()`` and kept when missing."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        self.put(key, value)
        return value

    def peek(self, key: _Key) -> _Value | None:
        """The value for ``key`` if kept (marked as recently used), else None; computes nothing."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: _Key, value: _Value) -> None:
        """Keep ``value`` for ``key``, dropping the least recently used beyond ``max_entries``."""
        with self._lock:
            replaced = self._items.pop(key, None)
            self._items[key] = value
            dropped = []
            while len(self._items) > self.max_entries:
                dropped.append(self._items.popitem(last=False))
        if replaced is not None and replaced is not value:
            dropped.append((key, replaced))
        self._evicted(dropped)

    def pop(self, key: _Key) -> _Value | None:
        """Forget ``key``; its value (after ``on_evict``), or None when it was not kept."""
        with self._lock:
            value = self._items.pop(key, None)
        if value is not None:
            self._evicted([(key, value)])
        return value

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            dropped = list(self._items.items())
            self._items.clear()
        self._evicted(dropped)

    def _evicted(self, dropped: list[tuple[_Key, _Value]]) -> None:
        if self._on_evict is not None:
            for key, value in dropped:
                self._on_evict(key, value)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


@dataclass(frozen=True)
class DatasetIdentity:
    """The data behind one Dataset object: which store version and which selection of it.

    ``store_signature`` is None for a Dataset built in memory; its ``instance`` then names
    the object for its whole life and is never given to another. ``selection`` digests every
    index of the object (see ``selection_digest``). ``key`` is what caches are keyed by.
    """

    store_path: str | None
    store_signature: str | None
    selection: str
    instance: str | None = None

    @property
    def stored(self) -> bool:
        """Whether the data come from a store on disk (results can be cached beside it)."""
        return bool(self.store_path and self.store_signature)

    @property
    def key(self) -> tuple[str, ...]:
        """A hashable name for in-process caches."""
        if self.stored:
            return ("store", str(self.store_path), str(self.store_signature), self.selection)
        return ("memory", str(self.instance), self.selection)


def _index_bytes(values: Any) -> bytes:
    array = np.asarray(values)
    if array.dtype.kind in "OUS":
        return "\n".join(map(str, array.tolist())).encode()
    return array.tobytes()


def selection_digest(ds: xr.Dataset) -> str:
    """A short digest of every dimension's size and index values: what each position of ``ds`` means."""
    digest = hashlib.sha256()
    for dim in sorted(map(str, ds.sizes)):
        digest.update(f"\x00{dim}:{ds.sizes[dim]}:".encode())
        if dim in ds.indexes:
            digest.update(_index_bytes(ds.indexes[dim].values))
    return digest.hexdigest()[:16]


def dataset_identity(ds: xr.Dataset) -> DatasetIdentity:
    """The identity of ``ds`` (computed afresh; ``ds.vli.identity`` keeps it per object)."""
    path, signature = ds.attrs.get("store_path"), ds.attrs.get("store_signature")
    if path and signature:
        return DatasetIdentity(str(path), str(signature), selection_digest(ds))
    return DatasetIdentity(None, None, selection_digest(ds), instance=uuid.uuid4().hex)


IdentityLike = DatasetIdentity | xr.Dataset


def _identity(of: IdentityLike) -> DatasetIdentity:
    return of if isinstance(of, DatasetIdentity) else dataset_identity(of)


# Results read back from disk (or kept when they could not be written), by (file, mtime).
_RESULTS: LRUCache[tuple[str, int], xr.Dataset] = LRUCache(16)


def cache_directory(of: IdentityLike) -> Path | None:
    """Where results for the store a dataset was opened from are cached; None if it has no path."""
    identity = _identity(of)
    if not identity.stored:
        return None
    store = Path(str(identity.store_path))
    return store / CACHE_DIRECTORY if store.is_dir() else store.parent / f".{store.name}{CACHE_DIRECTORY}"


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(of: IdentityLike, kind: str, params: Mapping[str, Any], *, suffix: str = ".nc") -> Path | None:
    """The file holding result ``kind`` computed with ``params`` on this selection of this store version."""
    identity = _identity(of)
    directory = cache_directory(identity)
    if directory is None:
        return None
    named = {**params, "selection": identity.selection}
    return directory / f"{kind}-{_digest(named)}-{_digest(identity.store_signature)}{suffix}"


def _drop_other_versions(path: Path) -> None:
    """Delete every cached file made for another store signature than ``path``'s."""
    current = path.name.rsplit("-", 1)[1].split(".")[0]
    for entry in path.parent.iterdir():
        if entry.suffix in _SUFFIXES and entry.name.rsplit("-", 1)[-1].split(".")[0] != current:
            entry.unlink(missing_ok=True)


def load(of: IdentityLike, kind: str, params: Mapping[str, Any]) -> xr.Dataset | None:
    """The cached result, in memory, or None when it was never computed for this store version."""
    path = cache_path(of, kind, params)
    if path is None:
        return None
    if not path.exists():
        return _RESULTS.peek((str(path), _UNSAVED))
    key = (str(path), path.stat().st_mtime_ns)
    kept = _RESULTS.peek(key)
    if kept is not None:
        return kept
    try:
        with xr.open_dataset(path, engine="netcdf4") as cached:
            result = cached.load()
    except (OSError, ValueError):  # a damaged cache file is recomputed, never trusted
        return None
    _RESULTS.put(key, result)
    return result


def save(of: IdentityLike, kind: str, params: Mapping[str, Any], result: xr.Dataset) -> Path | None:
    """Write ``result`` atomically beside the store and drop entries of older store versions.

    A store on read-only media still works: the failure to write is a warning, not an error,
    and the result is kept in this process's memory (``_RESULTS``, bounded) instead, so
    a dashboard does not compute it again on every request.
    """
    path = cache_path(of, kind, params)
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
        _RESULTS.put((str(path), _UNSAVED), result)
        return None
    _drop_other_versions(path)
    return path


def cached_array(of: IdentityLike, kind: str, params: Mapping[str, Any], write: Callable[[Path], None]) -> Path | None:
    """The ``.npy`` file of a large array cached beside the store, written on a miss.

    ``write(path)`` creates it (e.g. with ``numpy.lib.format.open_memmap``) under a temporary
    name that is then renamed, like every cache entry; read it with ``read_rows``. Returns
    None for datasets without a store path or when the cache cannot be written (with a warning).
    """
    path = cache_path(of, kind, params, suffix=".npy")
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
    of: IdentityLike,
    kind: str,
    params: Mapping[str, Any],
    compute: Callable[[], xr.Dataset],
    *,
    use_cache: bool = True,
) -> xr.Dataset:
    """Return the cached result ``kind`` for ``params``, computing and saving it on a miss."""
    identity = _identity(of)
    if use_cache:
        hit = load(identity, kind, params)
        if hit is not None:
            return hit
    result = compute()
    if use_cache:
        save(identity, kind, params, result)
    return result


def clear(of: IdentityLike) -> int:
    """Delete every cached result of the store; return how many files were removed."""
    directory = cache_directory(of)
    if directory is None or not directory.exists():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if entry.suffix in _SUFFIXES:
            entry.unlink(missing_ok=True)
            removed += 1
    _RESULTS.clear()
    return removed
