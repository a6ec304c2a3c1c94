"""The store: round trips, lazy opening, atomic and concurrent appends, bad files."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask.array
import numpy as np
import pytest
import xarray as xr

from tests.conftest import SMALL_SPEC
from vlinterpret_panel import shard_reader
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import PAD, records_to_dataset
from vlinterpret_panel.store import example_ids, open_dataset, shard_paths, write_records, write_shard
from vlinterpret_panel.synth import SynthSpec, synthetic_record, write_synthetic_store

ATTENTION_STEP = 1 / 65534  # uint16 packing of [0, 1]


def _assert_example_matches(ds: xr.Dataset, spec: SynthSpec, index: int) -> None:
    """Stored example equals its freshly generated record, within the storage precision."""
    record = synthetic_record(spec, index)
    stored = ds.sel(example=record.example_id).compute()
    n = len(record.tokens)
    assert int(stored.seq_len) == n
    assert stored.token_text.values[:n].tolist() == list(record.tokens)
    assert stored.modality.values[:n].tolist() == list(record.modality)
    assert (stored.modality.values[n:] == PAD).all()
    np.testing.assert_allclose(stored.attention.values[..., :n, :n], record.attention, atol=ATTENTION_STEP / 2 + 1e-7)
    assert np.isnan(stored.attention.values[..., n:, :]).all()
    np.testing.assert_allclose(stored.hidden_states.values[:, :n], record.hidden_states, rtol=2.0**-10, atol=1e-6)
    h, w = record.image.shape[:2]
    assert (int(stored.image_height), int(stored.image_width)) == (h, w)
    np.testing.assert_array_equal(stored.image.values[:h, :w], record.image)
    assert (stored.image.values[h:] == 0).all()
    np.testing.assert_array_equal(stored.token_box.values[:n], record.token_box)
    assert str(stored.text.values) == record.text
    assert str(stored.prediction.values) == record.prediction


def test_round_trip_across_shards_of_different_sizes(small_store: Path) -> None:
    ds = open_dataset(small_store)
    assert len(shard_paths(small_store)) == 3
    assert ds.sizes["example"] == SMALL_SPEC.examples
    lengths = ds.seq_len.values
    assert len(set(lengths.tolist())) > 1 and len(set(ds.image_height.values.tolist())) > 1
    for index in range(SMALL_SPEC.examples):
        _assert_example_matches(ds, SMALL_SPEC, index)
    assert ds.attention.dtype == np.float32


def test_float32_precision_is_exact(tmp_path: Path) -> None:
    spec = SynthSpec(examples=2, layers=2, heads=2, tokens=16, hidden_size=8, image_size=24, seed=11)
    write_synthetic_store(tmp_path / "s", spec, precision="float32")
    ds = open_dataset(tmp_path / "s")
    record = synthetic_record(spec, 1)
    n = len(record.tokens)
    np.testing.assert_array_equal(ds.attention.sel(example=record.example_id).values[..., :n, :n], record.attention)
    np.testing.assert_array_equal(ds.hidden_states.sel(example=record.example_id).values[:, :n], record.hidden_states)


def test_open_reads_no_data_and_a_slice_reads_one_chunk(small_store: Path, reads: list) -> None:
    ds = open_dataset(small_store)
    assert isinstance(ds.attention.data, dask.array.Array)
    assert isinstance(ds.hidden_states.data, dask.array.Array)
    assert reads == [], "opening must read no data variable"
    ds.attention.isel(example=5, layer=1, head=0).compute()
    assert [name for name, _ in reads] == ["attention"]
    (index,) = [index for _, index in reads]
    assert (index[0], index[1]) == (slice(1, 2), slice(1, 2))  # example 5 is the 2nd of shard 2; layer 1
    reads.clear()
    ds.image.isel(example=9).compute()
    assert len(reads) == 1


def test_append_and_example_ids(tmp_path: Path) -> None:
    store = tmp_path / "s"
    spec = SynthSpec(examples=5, layers=2, heads=2, tokens=16, hidden_size=8, image_size=24, seed=2)
    records = [synthetic_record(spec, i) for i in range(5)]
    write_shard(records_to_dataset(records[:2], spec.model_info()), store)
    assert example_ids(store) == {r.example_id for r in records[:2]}
    write_shard(records_to_dataset(records[2:], spec.model_info()), store)
    ds = open_dataset(store)
    assert ds.example.values.tolist() == [r.example_id for r in records]


def test_duplicate_examples_keep_the_first_copy(tmp_path: Path) -> None:
    spec = SynthSpec(examples=2, layers=1, heads=1, tokens=12, hidden_size=4, image_size=16)
    ds = records_to_dataset([synthetic_record(spec, 0)], spec.model_info())
    write_shard(ds, tmp_path / "s")
    write_shard(ds, tmp_path / "s")
    assert open_dataset(tmp_path / "s").sizes["example"] == 1


def test_store_refuses_a_second_model(tmp_path: Path) -> None:
    spec = SynthSpec(examples=1, layers=1, heads=1, tokens=12, hidden_size=4, image_size=16)
    write_synthetic_store(tmp_path / "s", spec)
    other = records_to_dataset([synthetic_record(spec, 0)], spec.model_info())
    other.attrs["model_name"] = "other"
    write_shard(other, tmp_path / "s")
    with pytest.raises(VLIError, match="model 'other' differs"):
        open_dataset(tmp_path / "s")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such store"),
        (lambda p: p.mkdir(), "has no shards"),
        (lambda p: (p.mkdir(), (p / "shard-1.nc").write_bytes(b"not netcdf at all")), "not a readable netCDF"),
        (
            lambda p: (p.mkdir(), xr.Dataset({"x": ("a", [1, 2])}).to_netcdf(p / "shard-1.nc")),
            "not a vlinterpret-panel",
        ),
    ],
    ids=["missing", "empty", "corrupt", "foreign"],
)
def test_bad_stores_give_one_clear_message(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "store"
    make(path)
    with pytest.raises(VLIError, match=message) as raised:
        open_dataset(path)
    assert str(path) in str(raised.value)


def test_good_shards_open_beside_a_corrupt_one_when_asked(small_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "mixed"
    store.mkdir()
    for shard in shard_paths(small_store):
        (store / shard.name).write_bytes(shard.read_bytes())
    truncated = store / "shard-99999999999999999999-deadbeef.nc"
    truncated.write_bytes(shard_paths(small_store)[0].read_bytes()[:5000])
    with pytest.raises(VLIError, match=truncated.name):
        open_dataset(store)
    with pytest.warns(UserWarning, match="skipping shard"):
        ds = open_dataset(store, on_bad_shard="skip")
    assert ds.sizes["example"] == SMALL_SPEC.examples
    assert truncated.name in ds.attrs["skipped_shards"][0]


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from vlinterpret_panel.synth import SynthSpec, write_synthetic_store
    import vlinterpret_panel.store as store

    spec = SynthSpec(examples=40, layers=2, heads=2, tokens=20, hidden_size=8, image_size=24, seed=4)
    real_replace = os.replace
    done = 0

    def replace_then_stall(src, dst):
        global done
        if done == 3:  # the 4th shard is fully written to its temporary file, never renamed
            print("stalled", flush=True)
            time.sleep(60)
        real_replace(src, dst)
        done += 1

    store.os.replace = replace_then_stall
    write_synthetic_store(sys.argv[1], spec, examples_per_shard=3)
    """
)


def test_killed_writer_leaves_completed_examples_intact(tmp_path: Path) -> None:
    store = tmp_path / "s"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert process.stdout.readline().strip() == "stalled"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert any(p.name.endswith(".partial") for p in store.iterdir()), "the kill must land mid-write"
    ds = open_dataset(store)
    spec = SynthSpec(examples=40, layers=2, heads=2, tokens=20, hidden_size=8, image_size=24, seed=4)
    assert ds.sizes["example"] == 9
    for index in range(9):
        _assert_example_matches(ds, spec, index)


APPENDER = textwrap.dedent(
    """
    import sys
    from vlinterpret_panel.schema import records_to_dataset
    from vlinterpret_panel.store import write_shard
    from vlinterpret_panel.synth import SynthSpec, synthetic_record

    spec = SynthSpec(examples=40, layers=2, heads=2, tokens=16, hidden_size=8, image_size=24, seed=8)
    for index in range(int(sys.argv[2]), 40, 2):
        write_shard(records_to_dataset([synthetic_record(spec, index)], spec.model_info()), sys.argv[1])
    """
)


def test_two_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    store = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(store), str(k)], env=env) for k in (0, 1)]
    deadline = time.time() + 120
    for writer in writers:
        assert writer.wait(timeout=max(1, deadline - time.time())) == 0
    ds = open_dataset(store)
    assert sorted(ds.example.values.tolist()) == [f"synth-{i:07d}" for i in range(40)]


def test_shard_of_another_schema_version_is_named_and_skippable(small_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "versions"
    store.mkdir()
    for shard in shard_paths(small_store):
        (store / shard.name).write_bytes(shard.read_bytes())
    spec = SynthSpec(examples=1, layers=3, heads=2, tokens=30, hidden_size=16, image_size=48, seed=3)
    future = records_to_dataset([synthetic_record(spec, 99)], spec.model_info())
    future.attrs["schema_version"] = "2.0"
    future_path = store / "shard-99999999999999999999-future00.nc"
    future.to_netcdf(future_path)
    with pytest.raises(VLIError, match=f"{future_path.name}: schema version 2.0"):
        open_dataset(store)
    with pytest.warns(UserWarning, match="schema version 2.0"):
        ds = open_dataset(store, on_bad_shard="skip")
    assert ds.sizes["example"] == SMALL_SPEC.examples
    assert "synth-0000099" not in ds.example.values


def test_written_shards_are_ordinary_readable_files(tmp_path: Path) -> None:
    spec = SynthSpec(examples=1, layers=1, heads=1, tokens=12, hidden_size=4, image_size=16)
    previous = os.umask(0o022)
    try:
        (shard,) = write_synthetic_store(tmp_path / "s", spec)
    finally:
        os.umask(previous)
    assert shard.stat().st_mode & 0o777 == 0o644


def test_shard_index_is_a_cache_that_follows_the_shards(tmp_path: Path) -> None:
    spec = SynthSpec(examples=4, layers=1, heads=1, tokens=12, hidden_size=4, image_size=16, seed=6)
    store = tmp_path / "s"
    (first, second) = write_synthetic_store(store, spec, examples_per_shard=2)
    assert open_dataset(store).sizes["example"] == 4
    index = store / ".index" / f"{first.name}.json"
    assert index.exists()
    index.write_text("{ not json")
    assert open_dataset(store).sizes["example"] == 4  # a broken index is re-made, never trusted
    replacement = records_to_dataset([synthetic_record(spec, 9)], spec.model_info())
    write_shard(replacement, tmp_path / "other")
    os.replace(shard_paths(tmp_path / "other")[0], second)  # same name, new content
    ds = open_dataset(store)
    assert ds.example.values.tolist() == ["synth-0000000", "synth-0000001", "synth-0000009"]
    _assert_example_matches(ds, spec, 9)


def test_store_whose_index_cannot_be_written_still_opens(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "readonly"
    store.mkdir()
    for shard in shard_paths(small_store):
        (store / shard.name).write_bytes(shard.read_bytes())

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(shard_reader.tempfile, "mkstemp", refuse)
    ds = open_dataset(store)
    assert not list((store / ".index").glob("*.json"))
    _assert_example_matches(ds, SMALL_SPEC, 7)


CONCURRENT_READERS = textwrap.dedent(
    """
    import gc, random, sys, threading, time
    from vlinterpret_panel.store import open_dataset

    def session(seed):
        rng, started = random.Random(seed), time.time()
        while time.time() - started < 6:
            ds = open_dataset(sys.argv[1])  # each dashboard session opens the store
            for _ in range(3):
                example = rng.randrange(ds.sizes["example"])
                ds.attention.isel(example=example, layer=rng.randrange(ds.sizes["layer"])).mean("head").compute()
                ds.hidden_states.isel(example=example).compute()
            del ds
            gc.collect()

    threads = [threading.Thread(target=session, args=(seed,)) for seed in range(6)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    print("done")
    """
)


def test_many_threads_opening_and_reading_one_store_do_not_crash(small_store: Path) -> None:
    # libhdf5 segfaulted when garbage-collected file managers closed files under a reader.
    result = subprocess.run(
        [sys.executable, "-c", CONCURRENT_READERS, str(small_store)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"


def test_examples_of_shards_without_labels_read_as_unknown(tmp_path: Path) -> None:
    spec = SynthSpec(examples=2, layers=1, heads=1, tokens=12, hidden_size=4, image_size=16, seed=12)
    labelled, unlabelled = synthetic_record(spec, 0), synthetic_record(spec, 1)
    unlabelled.label = unlabelled.prediction = unlabelled.score = None
    write_shard(records_to_dataset([labelled], spec.model_info()), tmp_path / "s")
    write_shard(records_to_dataset([unlabelled], spec.model_info()), tmp_path / "s")
    ds = open_dataset(tmp_path / "s")
    assert ds.correct.values.tolist() == [int(labelled.label == labelled.prediction), -1]
    assert ds.label.values.tolist() == [labelled.label, ""]
    assert np.isnan(ds.score.values[1])


def test_tiny_layers_share_a_chunk_and_large_ones_keep_their_own(tmp_path: Path) -> None:
    import netCDF4

    tiny = SynthSpec(examples=6, layers=3, heads=2, tokens=8, hidden_size=4, image_size=16, seed=2)
    large = SynthSpec(examples=2, layers=2, heads=8, tokens=96, hidden_size=8, image_size=16, seed=3)
    chunkings = {}
    for name, spec in (("tiny", tiny), ("large", large)):
        (shard,) = write_synthetic_store(tmp_path / name, spec, examples_per_shard=spec.examples)
        with netCDF4.Dataset(shard) as nc:
            chunkings[name] = nc["attention"].chunking()[:2]
        _assert_example_matches(open_dataset(tmp_path / name), spec, spec.examples - 1)
    assert chunkings["tiny"] == [6, 3]  # 2 x 8 x 8 uint16 per layer: everything in one chunk
    assert chunkings["large"] == [1, 1]  # 8 x 96 x 96 uint16 = 147 kB per layer: one (example, layer) per chunk


def test_a_reopened_store_reuses_its_shards_tasks_and_reads_the_same(tmp_path: Path) -> None:
    spec = SynthSpec(examples=4, layers=2, heads=2, tokens=12, hidden_size=8, image_size=24, seed=5)
    records = [synthetic_record(spec, i) for i in range(4)]
    store = tmp_path / "s"
    write_shard(records_to_dataset(records[:2], spec.model_info()), store)
    first = open_dataset(store)
    write_shard(records_to_dataset(records[2:], spec.model_info()), store)
    grown = open_dataset(store)

    def tasks(ds: xr.Dataset) -> list:
        graph = ds.attention.data.__dask_graph__()
        return [graph[key] for key in sorted(k for k in graph if isinstance(k, tuple))]

    old = tasks(first)
    assert all(a is b for a, b in zip(old, tasks(grown)[: len(old)], strict=True))  # the first shard's, reused
    assert len(tasks(grown)) == 2 * len(old)
    np.testing.assert_array_equal(grown.attention.values[:2], first.attention.values)
    expected = [r.attention for r in records[2:]]
    n = len(records[2].tokens)
    np.testing.assert_allclose(grown.attention.values[2, ..., :n, :n], expected[0], atol=1e-4)


def _raw_attention(shard: Path) -> dict[str, np.ndarray]:
    """The attention variables of a shard as stored: the packed integers, no decoding."""
    import netCDF4

    with netCDF4.Dataset(shard) as nc:
        nc.set_auto_maskandscale(False)
        return {name: nc[name][...] for name in ("attention", "answer_attention") if name in nc.variables}


def _lean_and_stacked(records: list, info, tmp_path: Path) -> tuple[Path, Path]:
    """The same records written the lean way (``write_records``) and by packing a padded float32 stack."""
    stacked = write_shard(records_to_dataset(records, info), tmp_path / "stacked")
    lean = write_records(records, info, tmp_path / "lean")
    return lean, stacked


def _assert_same_shards(lean: Path, stacked: Path) -> None:
    raw_lean, raw_stacked = _raw_attention(lean), _raw_attention(stacked)
    assert raw_lean.keys() == raw_stacked.keys() and raw_lean
    for name in raw_lean:
        assert raw_lean[name].dtype == np.uint16
        np.testing.assert_array_equal(raw_lean[name], raw_stacked[name], err_msg=name)
    a, b = open_dataset(lean).load(), open_dataset(stacked).load()
    assert sorted(a.data_vars) == sorted(b.data_vars)
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    for name in a.variables:
        assert a[name].attrs == b[name].attrs, name


def test_the_lean_path_stores_exactly_what_packing_a_float_stack_stores(tmp_path: Path) -> None:
    """Varied lengths, a layer with fewer heads (its missing heads NaN in the records), a NaN-free float64 input."""
    spec = SynthSpec(examples=6, layers=3, heads=4, tokens=30, hidden_size=8, image_size=24, seed=8, vary_length=True)
    records = [synthetic_record(spec, i) for i in range(spec.examples)]
    info = dataclasses.replace(spec.model_info(), num_heads=[4, 2, 4])
    for record in records:
        record.attention[1, 2:] = np.nan
    records[0].attention = records[0].attention.astype(np.float64)
    assert len({len(r.tokens) for r in records}) > 1
    _assert_same_shards(*_lean_and_stacked(records, info, tmp_path))


def test_the_lean_path_stores_generated_answers_exactly_as_before(tmp_path: Path) -> None:
    from vlinterpret_panel.adapters.generative import GenerationOptions
    from vlinterpret_panel.adapters.registry import load_adapter
    from vlinterpret_panel.extract import run_batch, scene_sources

    items = [source.load() for source in scene_sources(3, text="describe")]
    options = GenerationOptions(max_new_tokens=5, rows="all", methods=["raw_attention"])
    results = run_batch(load_adapter("generative"), items, [], options)
    records = [result[0] for result in results]
    assert all(r.answer is not None and r.answer.attention is not None for r in records)
    _assert_same_shards(*_lean_and_stacked(records, results[0][1], tmp_path))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda a: a.__setitem__((0, 0, 1, 2), np.nan), "attention has NaN outside padding"),
        (lambda a: a.__setitem__((1, 1, 3), a[1, 1, 3] * 0.5), "attention rows must sum to 1"),
    ],
)
def test_the_lean_path_refuses_bad_attention_as_the_float_path_does(tmp_path: Path, damage, message: str) -> None:
    spec = SynthSpec(examples=2, layers=2, heads=2, tokens=20, hidden_size=8, image_size=24, seed=4)
    records = [synthetic_record(spec, i) for i in range(2)]
    damage(records[1].attention)
    for write in (
        lambda: write_shard(records_to_dataset(records, spec.model_info()), tmp_path / "stacked"),
        lambda: write_records(records, spec.model_info(), tmp_path / "lean"),
    ):
        with pytest.raises(VLIError, match=message):
            write()
    assert not shard_paths(tmp_path / "lean") and not shard_paths(tmp_path / "stacked")


def test_a_float32_store_unpacks_packed_attention(tmp_path: Path) -> None:
    spec = SynthSpec(examples=2, layers=2, heads=2, tokens=20, hidden_size=8, image_size=24, seed=4)
    records = [synthetic_record(spec, i) for i in range(2)]
    packed = records_to_dataset(records, spec.model_info(), packed_attention=True)
    assert packed.attention.dtype == np.uint16
    shard = write_shard(packed, tmp_path / "s", precision="float32")
    stored = open_dataset(shard).attention.values
    n = len(records[0].tokens)
    np.testing.assert_allclose(stored[0, ..., :n, :n], records[0].attention, atol=1e-4)
    assert np.isnan(stored[0, ..., n:, :]).all()


def _netcdf_bitround(values: np.ndarray, path: Path) -> np.ndarray:
    """``values`` as netCDF-C's own BitRound (10 significant bits) stores them: the reference."""
    import netCDF4

    with netCDF4.Dataset(path, "w") as nc:
        dims = [f"d{axis}" for axis in range(values.ndim)]
        for dim, size in zip(dims, values.shape, strict=True):
            nc.createDimension(dim, size)
        variable = nc.createVariable(
            "h", "f4", dims, fill_value=np.nan, quantize_mode="BitRound", significant_digits=10
        )
        variable[:] = values
    with netCDF4.Dataset(path) as nc:
        nc.set_auto_maskandscale(False)
        return nc["h"][:]


@pytest.mark.parametrize("lean", [True, False])
def test_hidden_states_are_rounded_bit_for_bit_as_netcdf_bitround_does(tmp_path: Path, lean: bool) -> None:
    spec = SynthSpec(examples=3, layers=2, heads=2, tokens=24, hidden_size=16, image_size=24, seed=6, vary_length=True)
    records = [synthetic_record(spec, i) for i in range(3)]
    special = np.array([0.0, -0.0, 1e-40, -3.5e-39, 3.0e38, -1.7e38, 1.0, -1.0, 0.1, 65504.0, np.inf, -np.inf])
    records[0].hidden_states[0, 0, : special.size] = special
    records[1].hidden_states = records[1].hidden_states.astype(np.float32)
    originals = [r.hidden_states.copy() for r in records]
    info = spec.model_info()
    dataset = records_to_dataset(records, info)
    before = dataset.hidden_states.values.copy()
    shard = write_records(records, info, tmp_path / "s") if lean else write_shard(dataset, tmp_path / "s")
    np.testing.assert_array_equal(dataset.hidden_states.values, before)  # the caller's data is not rounded
    for record, original in zip(records, originals, strict=True):
        np.testing.assert_array_equal(record.hidden_states, original)
    import netCDF4

    with netCDF4.Dataset(shard) as nc:
        nc.set_auto_maskandscale(False)
        stored = nc["hidden_states"][:]
        assert nc["hidden_states"].getncattr("_QuantizeBitRoundNumberOfSignificantBits") == 10
    reference = _netcdf_bitround(before, tmp_path / "reference.nc")
    assert np.isnan(before).any()  # padding rows: netCDF-C rounds its NaN fill too
    np.testing.assert_array_equal(stored.view(np.uint32), reference.view(np.uint32))
