"""Shared hidden-state maps: one point per real token, fitted on a sample, seeded and cached."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from vlinterpret_panel import cache, projection
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.store import open_dataset
from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

SPEC = SynthSpec(examples=9, layers=2, heads=2, tokens=26, hidden_size=12, image_size=32, seed=8)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("projection") / "store"
    write_synthetic_store(path, SPEC, examples_per_shard=4)
    return open_dataset(path)


def _all_tokens(ds):
    """Reference matrix of every real token's hidden state at layer 1, in (example, token) order."""
    hidden = ds["hidden_states"].isel(hidden_layer=1).values
    seq_len = ds["seq_len"].values
    rows = [(e, t) for e in range(ds.sizes["example"]) for t in range(seq_len[e])]
    return rows, np.stack([hidden[e, t] for e, t in rows])


def test_one_point_per_real_token_with_labels(ds):
    result = projection.project_hidden_states(ds, 1, use_cache=False)
    rows, _ = _all_tokens(ds)
    assert result.sizes["point"] == len(rows) == int(ds["seq_len"].sum())
    examples = ds["example"].values
    assert list(zip(result["example"].values, result["token"].values, strict=True)) == [
        (examples[e], t) for e, t in rows
    ]
    tokens = ds["token_text"].values
    assert result["token_text"].values.tolist() == [tokens[e, t] for e, t in rows]
    assert set(result["modality"].values.tolist()) == {"text", "image", "special"}
    assert "correct" in result.coords and "label" in result.coords
    assert result.attrs["method"] == "pca" and result.attrs["hidden_layer"] == 1


def test_pca_on_a_full_sample_equals_sklearn_on_all_tokens(ds):
    result = projection.project_hidden_states(ds, 1, sample_size=10_000, use_cache=False)
    _, matrix = _all_tokens(ds)
    expected = PCA(n_components=2, random_state=0).fit_transform(matrix)
    np.testing.assert_allclose(np.stack([result["x"], result["y"]], axis=1), expected, atol=1e-3)


def test_fit_on_a_sample_applies_to_all_tokens_in_any_batch_size(ds):
    small_batches = projection.project_hidden_states(ds, 1, sample_size=40, batch_tokens=5, use_cache=False)
    one_batch = projection.project_hidden_states(ds, 1, sample_size=40, batch_tokens=10**6, use_cache=False)
    assert small_batches.attrs["sample_size"] == 40
    np.testing.assert_allclose(small_batches["x"], one_batch["x"], atol=1e-5)
    assert np.isfinite(small_batches["x"]).all() and np.isfinite(small_batches["y"]).all()
    other_seed = projection.project_hidden_states(ds, 1, sample_size=40, seed=1, use_cache=False)
    assert not np.allclose(other_seed["x"], one_batch["x"])


def test_tsne_is_seeded_and_works_on_fewer_than_30_tokens(ds):
    first = projection.project_hidden_states(ds, 2, method="tsne", sample_size=20, use_cache=False)
    again = projection.project_hidden_states(ds, 2, method="tsne", sample_size=20, use_cache=False)
    np.testing.assert_array_equal(first["x"], again["x"])
    assert np.isfinite(first["x"]).all()
    assert first.attrs["perplexity"] < 20


@pytest.mark.slow  # with umap-learn installed, numba compiles UMAP first (about 30 s)
def test_umap_is_optional(ds):
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(VLIError, match="umap-learn"):
            projection.project_hidden_states(ds, 1, method="umap", use_cache=False)
    else:
        result = projection.project_hidden_states(ds, 1, method="umap", sample_size=60, use_cache=False)
        assert np.isfinite(result["x"]).all()


def test_projection_is_cached_beside_the_store(ds, monkeypatch):
    first = projection.project_hidden_states(ds, 0, sample_size=50)
    assert any(cache.cache_directory(ds).glob("projection-pca-0-*.nc"))

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(projection, "_compute", fail)
    again = projection.project_hidden_states(ds, 0, sample_size=50)
    np.testing.assert_array_equal(first["x"], again["x"])
    assert again["token_text"].values.tolist() == first["token_text"].values.tolist()
    with pytest.raises(AssertionError, match="recomputed"):
        projection.project_hidden_states(ds, 0, sample_size=51)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_layer": 7}, "hidden_layer"),
        ({"hidden_layer": 1, "method": "mds"}, "method"),
        ({"hidden_layer": 1, "sample_size": 1}, "sample_size"),
    ],
)
def test_bad_arguments_name_themselves(ds, kwargs, match):
    with pytest.raises(VLIError, match=match):
        projection.project_hidden_states(ds, use_cache=False, **kwargs)
