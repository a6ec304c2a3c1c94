"""The schema: building datasets from records, and every check of ``validate``."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import PAD, ModelInfo, records_to_dataset, validate
from vlinterpret_panel.synth import SynthSpec, synthetic_record

SPEC = SynthSpec(examples=3, layers=2, heads=2, tokens=20, hidden_size=8, image_size=32, seed=5)


@pytest.fixture
def dataset() -> xr.Dataset:
    return records_to_dataset([synthetic_record(SPEC, i) for i in range(3)], SPEC.model_info())


def test_records_pad_tokens_and_images_explicitly(dataset: xr.Dataset) -> None:
    records = [synthetic_record(SPEC, i) for i in range(3)]
    lengths = [len(r.tokens) for r in records]
    assert len(set(lengths)) > 1, "the spec must produce examples of different lengths"
    assert dataset.sizes["token"] == max(lengths)
    for i, record in enumerate(records):
        n = len(record.tokens)
        assert int(dataset.seq_len[i]) == n
        assert (dataset.modality[i, n:] == PAD).all()
        assert np.isnan(dataset.attention[i, :, :, n:, :]).all()
        assert np.isnan(dataset.attention[i, :, :, :, n:]).all()
        np.testing.assert_array_equal(dataset.attention[i, :, :, :n, :n], record.attention)
        h, w = record.image.shape[:2]
        assert (int(dataset.image_height[i]), int(dataset.image_width[i])) == (h, w)
        np.testing.assert_array_equal(dataset.image[i, :h, :w], record.image)
    validate(dataset, check_values=True)


def test_padded_heads_are_nan_and_validated() -> None:
    info = ModelInfo(
        name="two-towers",
        layer_kind=["text_self", "image_self"],
        num_heads=[1, 2],
        hidden_layer_name=["embeddings", "layer.0", "layer.1"],
    )
    record = synthetic_record(SPEC, 0)
    ds = records_to_dataset([record], info)
    assert np.isnan(ds.attention[0, 0, 1]).all()
    assert not np.isnan(ds.attention[0, 1, 1, : len(record.tokens), : len(record.tokens)]).any()
    validate(ds, check_values=True)


def test_unknown_layer_kind_is_refused() -> None:
    with pytest.raises(VLIError, match="unknown layer kind"):
        ModelInfo(name="m", layer_kind=["sideways"], num_heads=[1], hidden_layer_name=["e"])


def test_record_shape_mismatch_names_the_array() -> None:
    record = synthetic_record(SPEC, 0)
    record.attention = record.attention[:, :, :-1]
    with pytest.raises(VLIError, match="attention has shape"):
        record.check()


def _broken(dataset: xr.Dataset, how: str) -> xr.Dataset:
    ds = dataset.copy(deep=True)
    if how == "missing variable":
        return ds.drop_vars("token_text")
    if how == "wrong dims":
        return ds.assign(seq_len=(("token",), np.arange(ds.sizes["token"])))
    if how == "length mismatch":
        return ds.isel(key=slice(0, -1))
    if how == "nan outside padding":
        ds.attention[0, 0, 0, 1, 1] = np.nan
        return ds
    if how == "rows not summing to one":
        ds.attention[1, 1, 0, 2, :3] += 0.3
        return ds
    if how == "not ours":
        ds.attrs.pop("schema")
        return ds
    if how == "other schema version":
        ds.attrs["schema_version"] = "7.0"
        return ds
    if how == "padding not explicit":
        ds.modality[0, 0] = PAD
        return ds
    raise AssertionError(how)


BAD_CASES = {
    "missing variable": "missing variable 'token_text'",
    "wrong dims": "variable 'seq_len' has dims",
    "length mismatch": "token/attention length mismatch",
    "nan outside padding": "attention has NaN outside padding",
    "rows not summing to one": "attention rows must sum to 1",
    "not ours": "not a vlinterpret-panel dataset",
    "other schema version": "schema version 7.0",
    "padding not explicit": "padding is not explicit",
}


@pytest.mark.parametrize("how", sorted(BAD_CASES))
def test_validate_names_each_problem_and_the_source(dataset: xr.Dataset, how: str) -> None:
    with pytest.raises(VLIError) as raised:
        validate(_broken(dataset, how), source="shard-x.nc", check_values=True)
    message = str(raised.value)
    assert message.startswith("shard-x.nc: ")
    assert BAD_CASES[how] in message
    assert "\n" not in message
