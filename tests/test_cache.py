"""Results cached beside a store: keyed by what was computed and by the store's signature."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from vlinterpret_panel import cache


def _store_ds(path, signature: str = "shard-a.nc:1:1") -> xr.Dataset:
    path.mkdir(exist_ok=True)
    return xr.Dataset(attrs={"store_path": str(path), "store_signature": signature})


def _result(value: float) -> xr.Dataset:
    return xr.Dataset({"v": ("x", np.full(3, value, dtype=np.float32))}, attrs={"note": "test"})


def test_datasets_without_a_store_are_not_cached():
    ds = xr.Dataset()
    assert cache.cache_directory(ds) is None
    calls = []
    result = cache.cached(ds, "thing", {}, lambda: calls.append(1) or _result(1.0))
    assert calls == [1] and float(result["v"][0]) == 1.0
    assert cache.save(ds, "thing", {}, _result(1.0)) is None


def test_computes_once_then_loads(tmp_path):
    ds = _store_ds(tmp_path / "store")
    calls = []

    def compute():
        calls.append(1)
        return _result(2.0)

    first = cache.cached(ds, "thing", {"a": 1}, compute)
    second = cache.cached(ds, "thing", {"a": 1}, compute)
    assert calls == [1]
    xr.testing.assert_identical(first, second)
    path = cache.cache_path(ds, "thing", {"a": 1})
    assert path.parent == tmp_path / "store" / cache.CACHE_DIRECTORY and path.exists()
    cache.cached(ds, "thing", {"a": 2}, compute)
    assert calls == [1, 1]  # other parameters, other entry


def test_a_new_store_signature_misses_and_drops_old_entries(tmp_path):
    old = _store_ds(tmp_path / "store", "shard-a.nc:1:1")
    cache.save(old, "thing", {}, _result(1.0))
    new = _store_ds(tmp_path / "store", "shard-a.nc:1:1|shard-b.nc:2:2")
    assert cache.load(new, "thing", {}) is None
    cache.save(new, "other", {}, _result(3.0))
    assert cache.load(old, "thing", {}) is None  # removed: made for another version of the store
    assert float(cache.load(new, "other", {})["v"][0]) == 3.0
    assert len(list((tmp_path / "store" / cache.CACHE_DIRECTORY).glob("*.nc"))) == 1


def test_single_file_store_caches_in_a_hidden_sibling_directory(tmp_path):
    shard = tmp_path / "one.nc"
    shard.write_bytes(b"")
    ds = xr.Dataset(attrs={"store_path": str(shard), "store_signature": "one.nc:0:0"})
    assert cache.cache_directory(ds) == tmp_path / ".one.nc.cache"


def test_unwritable_cache_warns_and_still_returns(tmp_path):
    ds = _store_ds(tmp_path / "store")
    (tmp_path / "store" / cache.CACHE_DIRECTORY).write_text("a file where the cache directory would go")
    calls = []

    def compute() -> xr.Dataset:
        calls.append(1)
        return _result(4.0)

    with pytest.warns(UserWarning, match="could not cache"):
        result = cache.cached(ds, "thing", {}, compute)
    assert float(result["v"][0]) == 4.0
    again = cache.cached(ds, "thing", {}, compute)  # kept in memory: not computed again
    assert float(again["v"][0]) == 4.0 and len(calls) == 1
    newer = _store_ds(tmp_path / "store", "shard-b.nc:2:2")
    assert cache.load(newer, "thing", {}) is None  # another store version has its own entry


def test_damaged_entry_is_recomputed_and_clear_removes_all(tmp_path):
    ds = _store_ds(tmp_path / "store")
    path = cache.save(ds, "thing", {}, _result(5.0))
    path.write_bytes(b"not netcdf")
    assert float(cache.cached(ds, "thing", {}, lambda: _result(6.0))["v"][0]) == 6.0
    assert cache.clear(ds) == 1
    assert cache.load(ds, "thing", {}) is None


def test_large_arrays_are_cached_as_npy_read_by_rows_and_dropped_with_old_versions(tmp_path):
    old = _store_ds(tmp_path / "store", "shard-a.nc:1:1")
    calls = []

    def write(path):
        calls.append(path)
        np.save(path, np.arange(6, dtype=np.float32).reshape(2, 3))

    first = cache.cached_array(old, "matrix", {"layer": 1}, write)
    again = cache.cached_array(old, "matrix", {"layer": 1}, write)
    assert len(calls) == 1 and first == again and first.suffix == ".npy"
    np.testing.assert_array_equal(cache.read_rows(first, 1, 5), [[3, 4, 5]])
    np.testing.assert_array_equal(cache.read_rows(first, 0, 2), np.arange(6).reshape(2, 3))
    assert cache.cached_array(xr.Dataset(), "matrix", {}, write) is None

    cache.save(old, "table", {}, _result(1.0))
    new = _store_ds(tmp_path / "store", "shard-a.nc:1:1|shard-b.nc:2:2")
    cache.cached_array(new, "matrix", {"layer": 1}, write)
    names = sorted(p.suffix for p in (tmp_path / "store" / cache.CACHE_DIRECTORY).iterdir())
    assert names == [".npy"] and len(calls) == 2
    assert cache.clear(new) == 1
