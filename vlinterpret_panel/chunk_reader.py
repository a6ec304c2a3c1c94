"""Read a shard's zstd-compressed chunks without libhdf5: the bytes by ``pread``, decompressed in parallel.

libhdf5 is not thread-safe, so every netCDF4 read holds one process-wide lock, decompression
included: with two threads, the head statistics spent a third of their time waiting for it.
A shard never changes once written, so where each chunk of a variable lies in the file is read
once (with h5py, which locates chunks without decompressing them) and kept; a read is then
``os.pread`` of the chunk's bytes and zstd decompression, both releasing the GIL, in any thread.

Only what our writer makes is read this way: chunked variables whose one filter is zstd (no
shuffle, no checksum), every chunk written. For anything else (another filter, a missing chunk,
h5py or zstandard not installed, bytes that do not decompress to one chunk) ``read`` returns
None and the caller reads through netCDF4 as before, which also reports a damaged file.
"""

from __future__ import annotations

import itertools
import os
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from vlinterpret_panel.cache import LRUCache

ZSTD_FILTER = 32015  # the HDF5 filter id netCDF registers for zstd


@dataclass(frozen=True)
class ChunkLayout:
    """Where each chunk of one variable of one shard lies: chunk start -> (byte offset, stored size)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    compressed: bool
    offsets: dict[tuple[int, ...], tuple[int, int]]


# Per (shard path, size, mtime, variable); None: not a variable this module reads.
_LAYOUTS: LRUCache[tuple[str, int, int, str], ChunkLayout | None] = LRUCache(8192)
_LOCAL = threading.local()


def _layout(path: str, name: str, lock: AbstractContextManager) -> ChunkLayout | None:
    """Read the chunk index of ``name`` in ``path`` (no data), or None if it is not ours to read.

    Under ``lock``, the one netCDF4's calls take: where h5py and netCDF4 share one libhdf5 (conda-forge),
    their calls must not run at once."""
    try:
        import h5py
        import zstandard  # noqa: F401  (needed to read; checked here, once per variable)
    except ImportError:
        return None
    try:
        with lock, h5py.File(path, "r") as file:
            dataset = file.get(name)
            if not isinstance(dataset, h5py.Dataset) or dataset.chunks is None or dataset.dtype.kind not in "fiu":
                return None
            plist = dataset.id.get_create_plist()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            if filters not in ([], [ZSTD_FILTER]):
                return None
            offsets: dict[tuple[int, ...], tuple[int, int]] = {}
            for i in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(i)
                if info.filter_mask:  # this chunk was stored without its filter
                    return None
                offsets[tuple(info.chunk_offset)] = (info.byte_offset, info.size)
            return ChunkLayout(
                tuple(dataset.shape), tuple(dataset.chunks), np.dtype(dataset.dtype), bool(filters), offsets
            )
    except (OSError, ValueError, KeyError):
        return None


def _decompressor():
    """This thread's zstd decompressor (one is not safe to share between threads)."""
    if not hasattr(_LOCAL, "decompressor"):
        import zstandard

        _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return _LOCAL.decompressor


def read(
    handle: tuple[str, int, int], name: str, index: tuple[slice, ...], lock: AbstractContextManager
) -> np.ndarray | None:
    """The stored values of ``name[index]`` (slices with explicit bounds, within the variable), or None to
    read it through netCDF4 instead. ``lock`` guards libhdf5 when a variable's chunks are first located."""
    layout = _LAYOUTS.get((*handle, name), lambda: _layout(handle[0], name, lock))
    if layout is None or len(index) != len(layout.shape):
        return None
    starts = [s.start or 0 for s in index]
    stops = [s.stop for s in index]
    if any(not 0 <= start < stop <= n for start, stop, n in zip(starts, stops, layout.shape, strict=True)):
        return None
    out = np.empty([stop - start for start, stop in zip(starts, stops, strict=True)], dtype=layout.dtype)
    chunk_bytes = int(np.prod(layout.chunks)) * layout.dtype.itemsize
    first = [start // size for start, size in zip(starts, layout.chunks, strict=True)]
    last = [(stop - 1) // size for stop, size in zip(stops, layout.chunks, strict=True)]
    fd = os.open(handle[0], os.O_RDONLY)
    try:
        for position in itertools.product(*(range(a, b + 1) for a, b in zip(first, last, strict=True))):
            origin = tuple(p * size for p, size in zip(position, layout.chunks, strict=True))
            located = layout.offsets.get(origin)
            if located is None:
                return None
            stored = os.pread(fd, located[1], located[0])
            try:
                data = _decompressor().decompress(stored, max_output_size=chunk_bytes) if layout.compressed else stored
            except Exception:  # zstandard.ZstdError: damaged bytes; netCDF4 reports them
                return None
            if len(data) != chunk_bytes:
                return None
            chunk = np.frombuffer(data, dtype=layout.dtype).reshape(layout.chunks)
            overlap = [
                (max(start, o), min(stop, o + size), o, start)
                for start, stop, o, size in zip(starts, stops, origin, layout.chunks, strict=True)
            ]
            out[tuple(slice(low - start, high - start) for low, high, _, start in overlap)] = chunk[
                tuple(slice(low - o, high - o) for low, high, o, _ in overlap)
            ]
    finally:
        os.close(fd)
    return out
