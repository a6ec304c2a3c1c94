"""Nearest tokens agree with a brute-force NumPy search over every real token."""

from __future__ import annotations

import numpy as np
import pytest

from vlinterpret_panel import cache, neighbors
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import records_to_dataset
from vlinterpret_panel.store import open_dataset
from vlinterpret_panel.synth import SynthSpec, synthetic_record, write_synthetic_store

SPEC = SynthSpec(examples=8, layers=2, heads=2, tokens=24, hidden_size=10, image_size=32, seed=4)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("neighbors") / "store"
    write_synthetic_store(path, SPEC, examples_per_shard=3)
    return open_dataset(path)


def brute_force(ds, example, token, hidden_layer, k, modality=None):
    hidden = ds["hidden_states"].isel(hidden_layer=hidden_layer).values
    labels = ds["modality"].values
    query = hidden[example, token]
    found = []
    for e in range(ds.sizes["example"]):
        for t in range(int(ds["seq_len"].values[e])):
            if (e, t) == (example, token) or (modality and labels[e, t] != modality):
                continue
            found.append((float(np.linalg.norm(hidden[e, t] - query)), e, t))
    return sorted(found)[:k]


@pytest.mark.parametrize("modality", [None, "image", "text"])
def test_matches_brute_force(ds, modality):
    result = neighbors.nearest_tokens(ds, 2, 5, 1, k=6, modality=modality)
    expected = brute_force(ds, 2, 5, 1, 6, modality)
    assert list(result.columns) == list(neighbors.COLUMNS)
    np.testing.assert_allclose(result["distance"], [d for d, _, _ in expected], rtol=1e-5)
    ids = ds["example"].values
    assert list(zip(result["example"], result["token"], strict=True)) == [(ids[e], t) for _, e, t in expected]
    assert ("synth-0000002", 5) not in set(zip(result["example"], result["token"], strict=True))
    if modality:
        assert set(result["modality"]) == {modality}
    texts = dict(zip(ids, ds["text"].values, strict=True))
    assert all(texts[e] == text for e, text in zip(result["example"], result["text"], strict=True))
    tokens = ds["token_text"].values
    assert result["token_text"].tolist() == [tokens[e, t] for _, e, t in expected]


def test_layers_are_searched_in_memory_from_the_store_or_from_a_cached_copy_with_the_same_answer(ds):
    in_memory = neighbors.nearest_tokens(ds, "synth-0000004", 3, 2, k=5, layer=neighbors.read_layer(ds, 2))
    streamed = neighbors.nearest_tokens(ds, "synth-0000004", 3, 2, k=5, batch_tokens=30, use_cache=False)
    assert in_memory.equals(streamed)
    copies = cache.cache_directory(ds).glob(f"{neighbors.CACHE_KIND}-2-*.npy")
    assert not list(copies)
    from_copy = neighbors.nearest_tokens(ds, "synth-0000004", 3, 2, k=5, batch_tokens=30)
    assert in_memory.equals(from_copy)
    (copy,) = cache.cache_directory(ds).glob(f"{neighbors.CACHE_KIND}-2-*.npy")
    assert np.load(copy, mmap_mode="r").shape == (int(ds["seq_len"].sum()), ds.sizes["feature"])
    again = neighbors.nearest_tokens(ds, 0, 1, 2, k=3)  # read from the copy
    assert again.equals(neighbors.nearest_tokens(ds, 0, 1, 2, k=3, use_cache=False))


@pytest.mark.parametrize("in_memory", [True, False])  # held in memory; copied to disk
def test_prepare_search_makes_the_layer_ready_for_fast_queries(tmp_path, monkeypatch, in_memory):
    path = tmp_path / "store"
    write_synthetic_store(path, SPEC, examples_per_shard=3)
    fresh = open_dataset(path)
    monkeypatch.setattr(neighbors, "fits_in_memory", lambda ds: in_memory)
    assert not fresh.vli.search_ready(1)
    fresh.vli.prepare_search(1)
    assert fresh.vli.search_ready(1)
    assert not fresh.vli.search_ready(0)
    copies = list(cache.cache_directory(fresh).glob(f"{neighbors.CACHE_KIND}-1-*.npy"))
    assert len(copies) == (not in_memory)
    ready = fresh.vli.nearest_tokens(2, 5, 1, k=6)
    assert ready.equals(neighbors.nearest_tokens(fresh, 2, 5, 1, k=6, use_cache=False))


def test_identical_token_in_another_example_is_found_at_distance_zero():
    records = [synthetic_record(SPEC, index) for index in range(3)]
    records[2].hidden_states[1, 4] = records[0].hidden_states[1, 7]
    ds = records_to_dataset(records, SPEC.model_info())
    result = neighbors.nearest_tokens(ds, 0, 7, 1, k=1)
    assert (result["example"][0], result["token"][0], result["distance"][0]) == ("synth-0000002", 4, 0.0)


def test_k_larger_than_the_candidates_returns_them_all(ds):
    n_special = int((ds["modality"].values == "special").sum())
    result = neighbors.nearest_tokens(ds, 0, 1, 0, k=10_000, modality="special")
    assert len(result) == n_special - (ds["modality"].values[0, 1] == "special")
    assert result["distance"].is_monotonic_increasing


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 99, 1), {}, "token"),
        ((0, 1, 9), {}, "hidden_layer"),
        (("nope", 1, 1), {}, "example"),
        ((0, 1, 1), {"k": 0}, "k"),
        ((0, 1, 1), {"modality": "audio"}, "modality"),
    ],
)
def test_bad_arguments_name_themselves(ds, args, kwargs, match):
    with pytest.raises(VLIError, match=match):
        neighbors.nearest_tokens(ds, *args, **kwargs)
