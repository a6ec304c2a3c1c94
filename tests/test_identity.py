"""``ds.vli`` owns a dataset's identity: every cached read through a subset equals the uncached read of that subset.

A subset (``isel``, ``sel``, a boolean ``where``, a filtered list of ids) keeps the store's
signature, so a cache keyed by the signature and a position alone served the full store's
example 0 for the subset's example 0. Each test reads through the full store and through
subsets in both orders and compares with a computation from the subset's own arrays.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from vlinterpret_panel import open_dataset
from vlinterpret_panel.cache import dataset_identity
from vlinterpret_panel.schema import PAD

DEMO_STORE = Path(__file__).resolve().parents[1] / "datasets" / "single_stream"

Subset = Callable[[xr.Dataset], xr.Dataset]
SUBSETS: dict[str, Subset] = {
    "isel": lambda ds: ds.isel(example=[4, 1, 7]),
    "sel": lambda ds: ds.sel(example=[str(i) for i in ds.example.values[[6, 2]]]),
    "where": lambda ds: ds.where((ds.seq_len > int(np.median(ds.seq_len.values))).compute(), drop=True),
    "boolean mask": lambda ds: ds.isel(example=ds.seq_len.values % 2 == 0),
    "filtered list": lambda ds: ds.sel(example=[i for i in ds.example.values.tolist() if i.endswith(("3", "8"))]),
}


@pytest.fixture
def ds(small_store: Path, tmp_path: Path) -> xr.Dataset:
    """A fresh copy of the small store for each test, so no cache of another test can answer."""
    copy = tmp_path / "store"
    shutil.copytree(small_store, copy)
    return open_dataset(copy)


def _subsets(ds: xr.Dataset) -> list[tuple[str, xr.Dataset]]:
    return [(name, make(ds)) for name, make in SUBSETS.items()]


def _direct_map(subset: xr.Dataset, position: int, layer: int, head: int) -> np.ndarray:
    n_tokens = int(subset.seq_len.values[position])
    block = subset.attention.isel(example=position, layer=layer, head=head).values
    return block[:n_tokens, :n_tokens]


@pytest.mark.parametrize("full_first", [True, False])
def test_attention_maps_of_a_subset_are_the_subsets(ds: xr.Dataset, full_first: bool) -> None:
    for name, subset in _subsets(ds):
        if full_first:
            ds.vli.attention_map(0, 1, 0)
        for position in range(subset.sizes["example"]):
            cached = subset.vli.attention_map(position, 1, 0)
            np.testing.assert_array_equal(cached.values, _direct_map(subset, position, 1, 0), err_msg=name)
            assert cached.attrs["example"] == str(subset.example.values[position]), name
        np.testing.assert_array_equal(ds.vli.attention_map(0, 1, 0).values, _direct_map(ds, 0, 1, 0))


def test_the_issue_snippet_returns_example_4(ds: xr.Dataset) -> None:
    ds.vli.attention_map(0, 0, 0)
    subset_map = ds.isel(example=[4]).vli.attention_map(0, 0, 0)
    assert subset_map.attrs["example"] == str(ds.example.values[4])
    np.testing.assert_array_equal(subset_map.values, _direct_map(ds, 4, 0, 0))


@pytest.mark.parametrize("full_first", [True, False])
def test_token_tables_of_a_subset_are_the_subsets(ds: xr.Dataset, full_first: bool) -> None:
    for name, subset in _subsets(ds):
        if full_first:
            ds.vli.tokens(0)
        for position in range(subset.sizes["example"]):
            tokens = subset.vli.tokens(position)
            n_tokens = int(subset.seq_len.values[position])
            assert tokens.example_id == str(subset.example.values[position]), name
            assert tokens.token_text.tolist() == subset.token_text.values[position, :n_tokens].astype(str).tolist()
            assert tokens.index == position
        by_id = subset.vli.tokens(str(subset.example.values[-1]))
        assert by_id.index == subset.sizes["example"] - 1


@pytest.mark.parametrize("full_first", [True, False])
def test_head_summaries_of_a_subset_are_the_subsets(ds: xr.Dataset, full_first: bool) -> None:
    from vlinterpret_panel.stats import head_statistics

    for name, subset in _subsets(ds):
        if full_first:
            ds.vli.head_summary("text_to_image")
            ds.vli.head_summary("text_to_image", example=0)
        expected = head_statistics(subset, statistics=["text_to_image"])["text_to_image"].compute()
        summary = subset.vli.head_summary("text_to_image")
        np.testing.assert_allclose(summary.values, expected.mean("example").values, rtol=1e-6, err_msg=name)
        one = subset.vli.head_summary("text_to_image", example=0)
        np.testing.assert_allclose(one.values, expected.isel(example=0).values, rtol=1e-6, err_msg=name)
        assert one.attrs["example"] == str(subset.example.values[0])


@pytest.mark.parametrize("full_first", [True, False])
def test_projections_of_a_subset_are_the_subsets(ds: xr.Dataset, full_first: bool) -> None:
    from vlinterpret_panel.projection import project_hidden_states

    for name, subset in _subsets(ds):
        if full_first:
            ds.vli.projection(2)
        cached = subset.vli.projection(2)
        uncached = project_hidden_states(subset, 2, use_cache=False)
        assert cached.sizes["point"] == int((subset.modality.values != PAD).sum()), name
        assert cached["example"].values.tolist() == uncached["example"].values.tolist(), name
        np.testing.assert_allclose(cached["x"].values, uncached["x"].values, rtol=1e-5, err_msg=name)
        table = subset.vli.projection_table(2)
        assert set(table["example"]) == {str(i) for i in subset.example.values}, name


@pytest.mark.parametrize("full_first", [True, False])
def test_nearest_tokens_of_a_subset_are_the_subsets(ds: xr.Dataset, full_first: bool) -> None:
    for name, subset in _subsets(ds):
        if full_first:
            ds.vli.nearest_tokens(0, 1, 2, k=5)
        found = subset.vli.nearest_tokens(0, 1, 2, k=5)
        assert set(found["example"]) <= {str(i) for i in subset.example.values}, name
        ids = subset.example.values.astype(str)
        vectors = np.nan_to_num(subset.hidden_states.isel(hidden_layer=2).values.astype(np.float64))
        query = vectors[0, 1]
        real = np.argwhere(subset.modality.values != PAD)
        distances = sorted(
            (float(np.linalg.norm(vectors[e, t] - query)), ids[e], int(t)) for e, t in real if (e, t) != (0, 1)
        )
        np.testing.assert_allclose(found["distance"].values, [d for d, _, _ in distances[:5]], rtol=1e-5)


def test_an_examples_list_of_the_browser_is_the_subsets(ds: xr.Dataset) -> None:
    ds.vli.example_table()
    for name, subset in _subsets(ds):
        assert subset.vli.example_table().index.tolist() == subset.example.values.astype(str).tolist(), name


@pytest.fixture
def relevancy_ds(tmp_path: Path) -> xr.Dataset:
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_STORE, copy, ignore=shutil.ignore_patterns(".cache", ".index"))
    return open_dataset(copy)


@pytest.mark.parametrize("full_first", [True, False])
def test_relevancy_of_a_subset_is_the_subsets(relevancy_ds: xr.Dataset, full_first: bool) -> None:
    ds = relevancy_ds
    method = str(ds.relevancy_method.values[0])
    for name, subset in _subsets(ds):
        if full_first:
            ds.vli.relevancy(0, method)
        for position in range(min(3, subset.sizes["example"])):
            values = subset.vli.relevancy(position, method)
            n_tokens = int(subset.seq_len.values[position])
            expected = subset.relevancy.isel(example=position).sel(relevancy_method=method).values[:n_tokens]
            np.testing.assert_array_equal(values.values, expected, err_msg=name)
            assert values.attrs["example"] == str(subset.example.values[position])


def test_identity_names_the_store_version_and_the_selection(ds: xr.Dataset) -> None:
    whole = ds.vli.identity
    assert whole == dataset_identity(ds)
    assert ds.vli.identity is whole  # held by the accessor, computed once per object
    assert ds.isel(example=slice(None)).vli.identity == whole  # same examples, same identity
    assert ds.isel(example=[4]).vli.identity != whole
    assert ds.isel(layer=[2, 1]).vli.identity != whole  # layer 0 of the subset is layer 2
    in_memory = ds.isel(example=[0, 1]).compute()
    in_memory.attrs.pop("store_signature")
    again = in_memory.copy()
    assert in_memory.vli.identity != again.vli.identity  # no id(ds): objects never share a cache entry
