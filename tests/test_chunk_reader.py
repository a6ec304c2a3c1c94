"""Chunks read outside libhdf5 (``chunk_reader``) equal netCDF4's reads, and anything unusual falls back to it."""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from pathlib import Path

import netCDF4
import numpy as np
import pytest

from vlinterpret_panel import chunk_reader, shard_reader
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.store import open_dataset, shard_paths
from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

REPO = Path(__file__).resolve().parents[1]


def _netcdf4(path: Path, name: str, index: tuple[slice, ...]) -> np.ndarray:
    with netCDF4.Dataset(path) as nc:
        nc.set_auto_maskandscale(False)
        return np.asarray(nc[name][index])


def _numeric_variables(path: Path) -> dict[str, tuple[int, ...]]:
    with netCDF4.Dataset(path) as nc:
        return {
            name: v.shape for name, v in nc.variables.items() if v.dtype != str and v.dtype.kind in "fiu" and v.ndim
        }


def _blocks(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Whole variable, a single element's row, and a block crossing chunk boundaries along the first two axes."""
    whole = tuple(slice(0, n) for n in shape)
    first = tuple(slice(0, 1) for _ in shape)
    crossing = tuple(slice(n // 3, max(n // 3 + 1, n - n // 4)) for n in shape)
    return [whole, first, crossing]


@pytest.mark.parametrize(
    "store",
    [
        "tiny",  # layers and examples share a chunk
        "large",  # one (example, layer) per chunk, partial edge chunks
        "generative",  # the shipped store: answer rows, relevancy, BitRound hidden states
    ],
)
def test_every_numeric_variable_reads_as_netcdf4_reads_it(tmp_path: Path, store: str) -> None:
    if store == "generative":
        path = shard_paths(REPO / "datasets" / "generative")[0]
    else:
        tokens = 8 if store == "tiny" else 60
        spec = SynthSpec(examples=5, layers=3, heads=2, tokens=tokens, hidden_size=8, image_size=24, seed=2)
        path = write_synthetic_store(tmp_path / store, spec, examples_per_shard=5)[0]
    key = shard_reader.file_key(path)
    read_by_chunks = 0
    for name, shape in _numeric_variables(path).items():
        for index in _blocks(shape):
            values = chunk_reader.read(key, name, index, nullcontext())
            if values is None:
                continue
            read_by_chunks += 1
            np.testing.assert_array_equal(values, _netcdf4(path, name, index), err_msg=f"{name}{index}")
    assert read_by_chunks >= 3 * 4  # attention, hidden states, image, and more: read without libhdf5


def test_after_locating_the_chunks_a_read_takes_no_lock(tmp_path: Path) -> None:
    spec = SynthSpec(examples=4, layers=2, heads=2, tokens=40, hidden_size=8, image_size=24, seed=3)
    path = write_synthetic_store(tmp_path / "s", spec, examples_per_shard=4)[0]
    tokens = _numeric_variables(path)["attention"][-1]
    key, block = shard_reader.file_key(path), (slice(1, 2), slice(0, 1), slice(0, 2), slice(0, tokens), slice(0, 9))
    entered = []

    class Recording:
        def __enter__(self) -> None:
            entered.append(threading.get_ident())

        def __exit__(self, *exc: object) -> None:
            pass

    assert chunk_reader.read(key, "attention", block, Recording()) is not None
    assert len(entered) == 1  # the chunk index, once
    for _ in range(3):
        chunk_reader.read(key, "attention", block, Recording())
    assert len(entered) == 1


def test_other_filters_and_damaged_chunks_fall_back_to_netcdf4(tmp_path: Path) -> None:
    shuffled = tmp_path / "shuffled.nc"
    values = np.arange(4 * 6 * 6, dtype=np.uint16).reshape(4, 6, 6)
    with netCDF4.Dataset(shuffled, "w") as nc:
        for dim, size in zip("abc", values.shape, strict=True):
            nc.createDimension(dim, size)
        nc.createVariable("v", "u2", ("a", "b", "c"), zlib=True, shuffle=True, chunksizes=(1, 6, 6))[:] = values
    index = (slice(0, 2), slice(0, 6), slice(0, 6))
    assert chunk_reader.read(shard_reader.file_key(shuffled), "v", index, nullcontext()) is None

    spec = SynthSpec(examples=2, layers=2, heads=2, tokens=40, hidden_size=8, image_size=24, seed=3)
    store = tmp_path / "damaged"
    path = write_synthetic_store(store, spec, examples_per_shard=2)[0]
    key = shard_reader.file_key(path)
    layout = chunk_reader._layout(str(path), "attention", nullcontext())
    assert layout is not None
    offset, size = layout.offsets[(0, 0, 0, 0, 0)]
    block = (slice(0, 1), slice(0, 1), slice(0, 2), slice(0, 9), slice(0, 9))
    assert chunk_reader.read(key, "attention", block, nullcontext()) is not None
    with open(path, "r+b") as file:  # the first attention chunk's zstd frame header overwritten, size and mtime kept
        file.seek(offset)
        file.write(b"\x00" * 8)
    os.utime(path, ns=(key[2], key[2]))
    chunk_reader._LAYOUTS.pop((*key, "attention"))
    assert chunk_reader.read(key, "attention", block, nullcontext()) is None
    with pytest.raises((VLIError, RuntimeError, OSError)):
        _ = open_dataset(store).attention.isel(example=0, layer=0).values
