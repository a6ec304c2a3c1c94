"""Head statistics agree with a plain NumPy loop over the unpadded records, and summaries are cached."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from vlinterpret_panel import cache, stats
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import ModelInfo, records_to_dataset
from vlinterpret_panel.store import open_dataset, write_shard
from vlinterpret_panel.synth import SynthSpec, synthetic_record

SPEC = SynthSpec(examples=7, layers=3, heads=3, tokens=28, hidden_size=8, image_size=32, seed=5)
NUM_HEADS = [3, 2, 3]  # layer 1 has a padded head
LAYER_KINDS = ["self", "cross_text_to_image", "self"]


def _records() -> list:
    """Synthetic records of varying length; layer 1 made a text→image cross-attention, with custom metrics."""
    records = []
    for index in range(SPEC.examples):
        record = synthetic_record(SPEC, index)
        modality = np.array(record.modality)
        cross = record.attention[1] * (modality == "image")[None, None, :]
        cross[:, modality != "text"] = 0
        with np.errstate(invalid="ignore"):
            cross = cross / cross.sum(axis=-1, keepdims=True)
        record.attention[1] = np.nan_to_num(cross)
        record.custom_metrics = {"probe": np.arange(9, dtype=np.float32).reshape(3, 3) + index}
        records.append(record)
    return records


def _model_info() -> ModelInfo:
    base = SPEC.model_info()
    return ModelInfo(
        name=base.name, layer_kind=LAYER_KINDS, num_heads=NUM_HEADS, hidden_layer_name=base.hidden_layer_name
    )


def reference_statistics(record, num_heads: list[int]) -> dict[str, np.ndarray]:
    """The statistics of one unpadded example, by explicit loops over heads and rows."""
    modality = list(record.modality)
    n_layers = record.attention.shape[0]
    text = [i for i, m in enumerate(modality) if m == "text"]
    image = [i for i, m in enumerate(modality) if m == "image"]
    special = [i for i, m in enumerate(modality) if m == "special"]
    position = record.patch_position.astype(float)
    out = {name: np.full((n_layers, max(num_heads)), np.nan) for name in stats.STATISTICS}

    def mean(values):
        return float(np.mean(values)) if values else np.nan

    for layer in range(n_layers):
        for head in range(num_heads[layer]):
            attention = record.attention[layer, head].astype(np.float64)
            queries = [q for q in range(len(modality)) if attention[q].sum() > 0.5]
            text_queries = [q for q in queries if q in text]
            image_queries = [q for q in queries if q in image]
            values = {
                "text_to_image": mean([attention[q, image].sum() for q in text_queries]),
                "image_to_text": mean([attention[q, text].sum() for q in image_queries]),
                "text_to_text": mean([attention[q, text].sum() for q in text_queries]),
                "image_to_image": mean([attention[q, image].sum() for q in image_queries]),
                "image_to_image_no_self": mean(
                    [sum(attention[q, k] for k in image if abs(q - k) > 1) for q in image_queries]
                ),
                "to_special": mean([attention[q, special].sum() for q in queries]),
                "entropy": mean([-sum(p * np.log(p) for p in attention[q] if p > 0) for q in queries]),
                "spatial_distance": mean(
                    [
                        sum(attention[q, k] * np.linalg.norm(position[q] - position[k]) for k in image)
                        / attention[q, image].sum()
                        for q in image_queries
                    ]
                ),
            }
            values["cross_modal"] = float(np.nanmean([values["text_to_image"], values["image_to_text"]]))
            values["intra_modal"] = float(np.nanmean([values["text_to_text"], values["image_to_image"]]))
            for name, value in values.items():
                out[name][layer, head] = value
    return out


@pytest.fixture(scope="module")
def records() -> list:
    return _records()


@pytest.fixture(scope="module")
def reference(records) -> dict[str, np.ndarray]:
    """Reference statistics stacked over examples: name -> (example, layer, head)."""
    per_example = [reference_statistics(record, NUM_HEADS) for record in records]
    return {name: np.stack([r[name] for r in per_example]) for name in stats.STATISTICS}


@pytest.fixture()
def store(tmp_path, records):
    """A store of the records in two shards of different padded lengths."""
    info = _model_info()
    path = tmp_path / "store"
    write_shard(records_to_dataset(records[:3], info), path)
    write_shard(records_to_dataset(records[3:], info), path)
    return path


def test_statistics_match_numpy_loops_on_padded_examples(store, records, reference):
    ds = open_dataset(store)
    assert len({len(r.tokens) for r in records}) > 2  # examples really differ in length
    computed = stats.head_statistics(ds).compute()
    for name in stats.STATISTICS:
        tolerance = 2e-3 if name in ("entropy", "spatial_distance") else 2e-4
        np.testing.assert_allclose(computed[name].values, reference[name], atol=tolerance, err_msg=name)


def test_a_task_reads_at_most_its_byte_budget_of_layers(store, reference, monkeypatch):
    """An example's layers are read by one task while they fit the budget, else by several: same values."""
    ds = open_dataset(store)
    layer_bytes = int(np.prod(ds["attention"].shape[2:])) * 4
    for budget, layers_per_task in ((10 * layer_bytes, (3,)), (2 * layer_bytes, (2, 1)), (1, (1, 1, 1))):
        monkeypatch.setattr(stats, "_TASK_BYTES", budget)
        table = stats.statistics_table(ds)
        assert table.chunks[1] == layers_per_task
        computed = table.sel(statistic="text_to_image").values
        np.testing.assert_allclose(computed, reference["text_to_image"], atol=2e-4)


def test_padded_heads_and_missing_blocks_are_nan(store):
    computed = stats.head_statistics(open_dataset(store)).compute()
    assert computed["entropy"].sel(layer=1, head=2).isnull().all()
    assert computed["entropy"].sel(layer=1, head=[0, 1]).notnull().all()
    cross = computed.sel(layer=1, head=[0, 1])
    assert cross["image_to_text"].isnull().all()  # a text→image module has no image queries
    np.testing.assert_allclose(cross["text_to_image"], 1.0, atol=1e-4)
    np.testing.assert_allclose(cross["cross_modal"], cross["text_to_image"])


def test_head_statistics_is_lazy_and_includes_custom_metrics(store, records):
    ds = open_dataset(store)
    lazy = stats.head_statistics(ds)
    assert lazy["entropy"].chunks is not None
    assert "custom:probe" in lazy
    np.testing.assert_allclose(lazy["custom:probe"].isel(example=4).values, records[4].custom_metrics["probe"])
    only = stats.head_statistics(ds, statistics=["entropy"])
    assert list(only.data_vars) == ["entropy"]
    with pytest.raises(VLIError, match="statistics"):
        stats.head_statistics(ds, statistics=["text_to_sound"])


def test_head_summary_of_one_example_by_index_and_id(store, reference):
    ds = open_dataset(store)
    by_index = stats.head_summary(ds, "text_to_text", example=5)
    by_id = stats.head_summary(ds, "text_to_text", example=str(ds.example.values[5]))
    assert by_index.dims == ("layer", "head")
    np.testing.assert_allclose(by_index.values, reference["text_to_text"][5], atol=2e-4)
    np.testing.assert_array_equal(by_index.values, by_id.values)
    assert by_index.attrs["statistic"] == "text_to_text"
    assert by_index.attrs["example"] == str(ds.example.values[5])
    with pytest.raises(VLIError, match="example"):
        stats.head_summary(ds, "text_to_text", example="no-such-example")


def test_head_summary_mean_spread_and_subset(store, reference):
    ds = open_dataset(store)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected_mean = np.nanmean(reference["image_to_image"], axis=0)
    mean = stats.head_summary(ds, "image_to_image")
    np.testing.assert_allclose(mean.values, expected_mean, atol=2e-4)
    assert mean.attrs["n_examples"] == ds.sizes["example"]

    correct = ds["correct"].compute() == 1
    subset = np.flatnonzero(correct.values)
    assert 0 < len(subset) < ds.sizes["example"]
    spread = stats.head_summary(ds, "image_to_image", where=correct, aggregate="std")
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected_spread = np.nanstd(reference["image_to_image"][subset], axis=0)
    np.testing.assert_allclose(spread.values, expected_spread, atol=2e-4)
    assert spread.attrs["n_examples"] == len(subset)

    custom = stats.head_summary(ds, "custom:probe", where=correct)
    expected_custom = np.arange(9).reshape(3, 3) + subset.mean()
    np.testing.assert_allclose(custom.values, expected_custom, atol=1e-5)
    with pytest.raises(VLIError, match="where"):
        stats.head_summary(ds, "entropy", where=correct & False)


def test_zscore_is_per_head_across_layers_and_clipped():
    values = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [100.0, 5.0]] + [[2.0, 5.0]] * 8)
    summary = xr.DataArray(values, dims=("layer", "head"))
    scored = stats.zscore_per_head(summary)
    first = (values[:, 0] - values[:, 0].mean()) / values[:, 0].std()
    np.testing.assert_allclose(scored.values[:, 0], np.clip(first, -3, 3))
    assert scored.values[3, 0] == 3.0  # the outlier is clipped
    np.testing.assert_array_equal(scored.values[:, 1], 0.0)  # a constant head scores 0


def test_zscore_summary_keeps_raw_values(store):
    ds = open_dataset(store)
    raw = stats.head_summary(ds, "entropy", example=0)
    scored = stats.head_summary(ds, "entropy", example=0, normalize="zscore")
    np.testing.assert_allclose(scored["raw"].values, raw.values)
    assert np.nanmax(np.abs(scored.values)) <= 3
    assert scored.attrs["units"] == "z-score"


def test_aggregates_are_cached_beside_the_store_and_invalidated_by_new_shards(store, records, monkeypatch):
    ds = open_dataset(store)
    first = stats.head_summary(ds, "entropy")
    entries = list((store / cache.CACHE_DIRECTORY).glob("*.nc"))
    assert len(entries) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(stats, "head_statistics", fail)
    reopened = open_dataset(store)
    again = stats.head_summary(reopened, "entropy")
    np.testing.assert_array_equal(first.values, again.values)
    one = stats.head_summary(reopened, "entropy", example=2)  # served from the table too
    assert one.dims == ("layer", "head")
    monkeypatch.undo()

    extra = synthetic_record(SPEC, 50)
    write_shard(records_to_dataset([extra], _model_info()), store)
    grown = open_dataset(store)
    updated = stats.head_summary(grown, "entropy")
    assert updated.attrs["n_examples"] == ds.sizes["example"] + 1
    entries_after = list((store / cache.CACHE_DIRECTORY).glob("*.nc"))
    assert len(entries_after) == 1 and entries_after != entries


def test_in_memory_dataset_without_a_store_just_computes(records, reference):
    ds = records_to_dataset(records, _model_info())
    summary = stats.head_summary(ds, "to_special", example=1)
    np.testing.assert_allclose(summary.values, reference["to_special"][1], atol=1e-5)
    assert cache.cache_directory(ds) is None


def test_spatial_distance_falls_back_to_box_centres(store, reference):
    ds = open_dataset(store).drop_vars("patch_position")
    computed = stats.head_statistics(ds, statistics=["spatial_distance"])["spatial_distance"].compute()
    np.testing.assert_allclose(computed.values, reference["spatial_distance"], atol=2e-3)


def test_cli_stats_precomputes_and_caches(store, capsys):
    from vlinterpret_panel.cli import main

    assert main(["stats", str(store), "--hidden-layer", "1", "--quiet"]) == 0
    output = capsys.readouterr().out
    assert "head statistics: 10 statistics x 7 examples" in output
    assert "projection pca hidden layer 1" in output
    names = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in (store / ".cache").glob("*.nc"))
    assert names == ["head-statistics", "projection-pca"]
    assert main(["stats", str(store), "--hidden-layer", "99", "--quiet"]) == 2
    assert "hidden_layer" in capsys.readouterr().err


def test_accessor_answers_the_same_as_the_functions(store):
    ds = open_dataset(store)
    assert ds.vli.statistics() == [*stats.STATISTICS, "custom:probe"]
    xr.testing.assert_identical(ds.vli.head_summary("entropy", example=1), stats.head_summary(ds, "entropy", example=1))
    lazy = ds.vli.head_stats(statistics=["to_special"])
    np.testing.assert_allclose(lazy["to_special"].values, ds.vli.compute_stats()["to_special"].values, atol=1e-6)
    points = ds.vli.projection(1, sample_size=30)
    assert points.sizes["point"] == int(ds["seq_len"].sum())
    near = ds.vli.nearest_tokens(0, 1, 1, k=2, modality="image")
    assert len(near) == 2 and set(near["modality"]) == {"image"}
