"""``xr.open_dataset(STORE, engine="vlinterpret")`` opens a store lazily, as ``vli.open_dataset`` does."""

from __future__ import annotations

from pathlib import Path

import dask.array
import numpy as np
import pytest
import xarray as xr

from vlinterpret_panel import open_dataset, shard_reader
from vlinterpret_panel.backend import VLInterpretBackendEntrypoint
from vlinterpret_panel.store import shard_paths


def test_the_engine_opens_lazily_and_reads_one_block_per_slice(small_store: Path, reads: list) -> None:
    ds = xr.open_dataset(small_store, engine="vlinterpret")
    assert reads == [], "opening must read no data variable"
    reference = open_dataset(small_store)
    assert ds.sizes == reference.sizes and ds.attrs["store_signature"] == reference.attrs["store_signature"]
    one = ds.attention.isel(example=5, layer=1, head=0).values
    assert [name for name, _ in reads] == ["attention"]
    np.testing.assert_array_equal(one, reference.attention.isel(example=5, layer=1, head=0).values)
    np.testing.assert_array_equal(ds.vli.attention_map(5, 1, 0).values, reference.vli.attention_map(5, 1, 0).values)


def test_chunks_give_the_stores_own_blocks(small_store: Path, reads: list) -> None:
    ds = xr.open_dataset(small_store, engine="vlinterpret", chunks={})
    reference = open_dataset(small_store)
    assert isinstance(ds.attention.data, dask.array.Array)
    assert ds.attention.data.chunks == reference.attention.data.chunks
    reads.clear()
    ds.attention.isel(example=2, layer=0).compute()
    assert [name for name, _ in reads] == ["attention"]


def test_the_engine_is_guessed_for_a_store_and_close_closes_its_files(small_store: Path, tmp_path: Path) -> None:
    entry = VLInterpretBackendEntrypoint()
    assert entry.guess_can_open(small_store) and entry.guess_can_open(str(small_store))
    assert not entry.guess_can_open(tmp_path) and not entry.guess_can_open(b"bytes")
    ds = xr.open_dataset(small_store)  # no engine given: guessed
    assert ds.attention.isel(example=0, layer=0).values.size
    keys = {shard_reader.file_key(path) for path in shard_paths(small_store)}
    assert keys & {key for key in keys if key in shard_reader._OPEN_FILES}
    ds.close()
    assert not any(key in shard_reader._OPEN_FILES for key in keys)
    assert ds.attention.isel(example=0, layer=0).values.shape[0] == ds.sizes["head"]  # files reopen on demand


def test_drop_variables_and_bad_input(small_store: Path) -> None:
    ds = xr.open_dataset(small_store, engine="vlinterpret", drop_variables=["hidden_states"])
    assert "hidden_states" not in ds and "attention" in ds
    with pytest.raises(TypeError, match="opens a store path"):
        VLInterpretBackendEntrypoint().open_dataset(b"not a path")
