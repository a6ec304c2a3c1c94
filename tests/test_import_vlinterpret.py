"""Importing VL-InterpreT databases: values survive exactly, and hostile pickles never run."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import lz4.frame
import msgpack
import numpy as np
import pytest
import xarray as xr

import vlinterpret_panel as vli
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.importers.safe_pickle import safe_loads
from vlinterpret_panel.importers.vlinterpret import import_vlinterpret

# Ours, made by extract/make_vlinterpret_fixture.py (on every clone), and VL-InterpreT's own example
# database beside the repository (../shared/fixtures; CI has it): the same tests run on both.
COMMITTED = Path(__file__).resolve().parent / "fixtures" / "vlinterpret_small"
EXTERNAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vlinterpret_example_database1"


@pytest.fixture(params=[COMMITTED, EXTERNAL], ids=["committed", "vl-interpret"], scope="module")
def database(request: pytest.FixtureRequest) -> Path:
    """A VL-InterpreT database in its own format: 3 examples, 8 text and 6 image tokens on a 3 x 2 grid."""
    if not (request.param / "data.mdb").is_file():
        pytest.skip(f"VL-InterpreT example database not found at {request.param}")
    return request.param


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlinterpret_panel.cli", *args], capture_output=True, text=True, timeout=120
    )


def encode(value: Any) -> bytes:
    """A value as VL-InterpreT's VliLmdb stores it: msgpack, then an lz4 frame."""
    return lz4.frame.compress(msgpack.dumps(value, use_bin_type=True))


def write_database(path: Path, values: dict[str, bytes]) -> Path:
    """An LMDB database with ``values`` already encoded."""
    env = lmdb.open(str(path), map_size=64 * 1024**2)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key.encode(), value)
    env.close()
    return path


def read_fixture(database: Path) -> dict[str, dict[str, Any]]:
    """The fixture's examples, decoded independently of the importer's conversion code."""
    env = lmdb.open(str(database), readonly=True, lock=False)
    with env.begin() as txn:
        examples = {
            key.decode(): safe_loads(msgpack.loads(lz4.frame.decompress(value), raw=False), source="fixture")
            for key, value in txn.cursor()
            if key.isdigit()
        }
    env.close()
    return examples


def synthetic_example(seed: int, **overrides: Any) -> dict[str, Any]:
    """A small example in VL-InterpreT's format with real softmax attention (2 layers, 2 heads)."""
    rng = np.random.default_rng(seed)
    tokens = ["[CLS]", "two", "cat", "##s", "[SEP]", "IMG_0", "IMG_1", "IMG_2", "IMG_3"]
    logits = rng.normal(size=(2, 2, len(tokens), len(tokens)))
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    example = {
        "ex_id": seed,
        "image": rng.integers(0, 256, size=(20, 30, 3)),
        "tokens": tokens,
        "txt_len": 5,
        "img_coords": [(0, 0), (1, 0), (0, 1), (1, 1)],
        "attention": attention.astype(np.float32),
        "hidden_states": rng.normal(size=(3, len(tokens), 6)).astype(np.float32),
        "accuracy": 0.75,
        "custom_metrics": {"head importance": rng.random((2, 2)).astype(np.float32)},
    }
    example.update(overrides)
    return example


def synthetic_database(path: Path, protocol: int = pickle.HIGHEST_PROTOCOL, **overrides: Any) -> Path:
    examples = {str(i): encode(pickle.dumps(synthetic_example(i, **overrides), protocol=protocol)) for i in range(2)}
    return write_database(path, {**examples, "n_layers": encode(2), "n_heads": encode(2)})


def fingerprint(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())
    }


@pytest.fixture(scope="module")
def imported(database: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[xr.Dataset, dict[str, dict[str, Any]]]:
    before = fingerprint(database)
    store = tmp_path_factory.mktemp("import") / "store"
    import_vlinterpret(database, store, normalize_attention=True)
    assert fingerprint(database) == before, "the importer must not write to the source database"
    return vli.open_dataset(store).load(), read_fixture(database)


def test_fixture_tokens_modality_text_and_image_match_source(imported) -> None:
    ds, source = imported
    assert ds["example"].values.tolist() == ["0", "1", "2"]
    for example_id, example in source.items():
        stored = ds.sel(example=example_id)
        assert stored["token_text"].values.tolist() == [str(t) for t in example["tokens"]]
        assert stored["modality"].values.tolist() == ["special"] + ["text"] * 6 + ["special"] + ["image"] * 6
        assert str(stored["text"].values) == f"text input for example {example_id} ."
        np.testing.assert_array_equal(stored["image"].values, example["image"].astype(np.uint8))
        assert example["image"].min() >= 0 and example["image"].max() <= 255
        assert (int(stored["image_height"]), int(stored["image_width"])) == example["image"].shape[:2]
        assert int(stored["correct"]) == int(example["accuracy"])
    assert ds["correct"].values.tolist() == [1, 0, 1]


def test_fixture_attention_is_the_source_rows_normalized_and_recoverable(imported) -> None:
    ds, source = imported
    assert json.loads(ds.attrs["extraction"])["attention_normalized"] is True
    for example_id, example in source.items():
        stored = ds.sel(example=example_id)
        row_sums = example["attention"].sum(-1, keepdims=True)
        np.testing.assert_array_equal(stored["attention"].values, (example["attention"] / row_sums).astype(np.float32))
        np.testing.assert_array_equal(stored["attention_row_sum"].values, row_sums[..., 0].astype(np.float32))
        recovered = stored["attention"].values * stored["attention_row_sum"].values[..., None]
        np.testing.assert_allclose(recovered, example["attention"], rtol=1e-6)
        assert np.all(stored["layer_kind"].values == "self")


def test_fixture_hidden_states_follow_their_tokens(imported) -> None:
    # VL-InterpreT's preprocessing sorted the image tokens (IMG_0, IMG_2, IMG_4, IMG_1, ...) in tokens and
    # attention but not in hidden_states; token IMG_k's hidden state is the source's row txt_len + k.
    ds, source = imported
    for example_id, example in source.items():
        hidden = ds["hidden_states"].sel(example=example_id).values
        txt_len = example["txt_len"]
        assert [str(t) for t in example["tokens"][txt_len:]] != [f"IMG_{k}" for k in range(6)]
        np.testing.assert_array_equal(hidden[:, :txt_len], example["hidden_states"][:, :txt_len].astype(np.float32))
        for position, token in enumerate(example["tokens"][txt_len:], start=txt_len):
            original = txt_len + int(str(token).removeprefix("IMG_"))
            np.testing.assert_array_equal(hidden[:, position], example["hidden_states"][:, original].astype(np.float32))
    assert json.loads(ds.attrs["extraction"])["realigned_hidden_states"] == ["0", "1", "2"]


def test_fixture_patch_positions_boxes_and_metrics(imported, database: Path) -> None:
    ds, source = imported
    height, width = source["0"]["image"].shape[:2]
    for example_id, example in source.items():
        stored = ds.sel(example=example_id)
        coords = np.array(example["img_coords"])  # (x, y), (0, 0) at the top left, on a 3 x 2 grid
        positions = stored["patch_position"].values
        np.testing.assert_array_equal(positions[:8], -1)
        np.testing.assert_array_equal(positions[8:], coords[:, ::-1])
        boxes = stored["token_box"].values
        assert np.isnan(boxes[:8]).all()
        cell_width, cell_height = width / 3, height / 2
        expected = np.stack(
            [
                coords[:, 0] * cell_width,
                coords[:, 1] * cell_height,
                (coords[:, 0] + 1) * cell_width,
                (coords[:, 1] + 1) * cell_height,
            ],
            1,
        )
        np.testing.assert_allclose(boxes[8:], expected, rtol=1e-6)
        for name, values in example["custom_metrics"].items():
            np.testing.assert_array_equal(
                stored["custom_metric"].sel(metric=name).values, np.asarray(values).astype(np.float32)
            )
    # Row 0 is the top: the token at (x=2, y=1) is the bottom-right cell.
    first = ds.sel(example="0")
    bottom_right = int(np.flatnonzero((first["patch_position"].values == [1, 2]).all(1))[0])
    np.testing.assert_allclose(
        first["token_box"].values[bottom_right], [2 * width / 3, height / 2, width, height], rtol=1e-6
    )
    extraction = json.loads(ds.attrs["extraction"])
    assert extraction["source"] == str(database.resolve())
    assert extraction["importer_version"] == "1"


def test_random_attention_is_refused_without_normalization(database: Path, tmp_path: Path) -> None:
    with pytest.raises(VLIError, match=r"do not sum to 1.*--normalize-attention"):
        import_vlinterpret(database, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_cli_imports_the_fixture_and_the_result_validates(database: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = run_cli("import-vlinterpret", str(database), str(store), "--normalize-attention")
    assert result.returncode == 0, result.stderr
    assert "imported 3 example(s)" in result.stdout
    validated = run_cli("validate", str(store))
    assert validated.returncode == 0, validated.stderr


def raw_values(database: Path) -> dict[bytes, bytes]:
    """Every value of a database, lz4 and msgpack undone (pickles stay bytes: nothing is unpickled)."""
    env = lmdb.open(str(database), readonly=True, lock=False)
    with env.begin() as txn:
        values = {key: msgpack.loads(lz4.frame.decompress(value), raw=False) for key, value in txn.cursor()}
    env.close()
    return values


def test_committed_fixture_is_what_its_script_writes(tmp_path: Path) -> None:
    from extract.make_vlinterpret_fixture import write

    written = raw_values(write(tmp_path / "db").parent)
    assert written == raw_values(COMMITTED)
    assert sorted(written) == [b"0", b"1", b"2", b"faiss", b"n_examples", b"n_heads", b"n_layers"]
    # As in VL-InterpreT's databases (written with NumPy 1.x): the importer's numpy.core spelling is
    # tested on every clone, not only where the external fixture lies.
    assert b"numpy.core.multiarray" in written[b"0"] and b"numpy._core" not in written[b"0"]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_attention_imports_exactly_for_every_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    database = synthetic_database(tmp_path / "db", protocol=protocol)
    import_vlinterpret(database, tmp_path / "store")
    ds = vli.open_dataset(tmp_path / "store").load()
    for index in range(2):
        example = synthetic_example(index)
        stored = ds.sel(example=str(index))
        np.testing.assert_array_equal(stored["attention"].values, example["attention"])
        np.testing.assert_array_equal(stored["hidden_states"].values, example["hidden_states"])
        np.testing.assert_array_equal(stored["image"].values, example["image"].astype(np.uint8))
        assert str(stored["text"].values) == "two cats"
        assert float(stored["score"]) == 0.75
    assert "correct" not in ds and "attention_row_sum" not in ds
    np.testing.assert_array_equal(ds["patch_position"].values[0, 5:], [[0, 0], [0, 1], [1, 0], [1, 1]])


def test_float16_precision_stays_within_the_documented_tolerance(tmp_path: Path) -> None:
    import_vlinterpret(synthetic_database(tmp_path / "db"), tmp_path / "store", precision="float16")
    stored = vli.open_dataset(tmp_path / "store").sel(example="1").load()
    example = synthetic_example(1)
    np.testing.assert_allclose(stored["attention"].values, example["attention"], rtol=0, atol=7.7e-6)
    np.testing.assert_allclose(stored["hidden_states"].values, example["hidden_states"], rtol=2**-10, atol=0)


def test_preprocessed_example_with_unknown_image_order_is_kept_and_warned(tmp_path: Path) -> None:
    tokens = ["[CLS]", "two", "cat", "##s", "[SEP]", "p0", "p1", "p2", "p3"]
    database = synthetic_database(tmp_path / "db", tokens=tokens, img_grid_size=np.array([2, 2]))
    with pytest.warns(UserWarning, match="do not reveal the original order"):
        import_vlinterpret(database, tmp_path / "store")
    ds = vli.open_dataset(tmp_path / "store")
    np.testing.assert_array_equal(ds["hidden_states"].sel(example="1").values, synthetic_example(1)["hidden_states"])
    assert json.loads(ds.attrs["extraction"])["unverified_hidden_state_order"] == ["0", "1"]


def test_import_into_an_existing_store_then_twice_is_refused(tmp_path: Path) -> None:
    database = synthetic_database(tmp_path / "db")
    (tmp_path / "store").mkdir()
    report = import_vlinterpret(database, tmp_path / "store", examples_per_shard=1)
    assert len(report.shards) == 2 and all(shard.parent == tmp_path / "store" for shard in report.shards)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(VLIError, match="already holds example"):
        import_vlinterpret(database, tmp_path / "store")
    assert vli.open_dataset(tmp_path / "store").sizes["example"] == 2


def test_accuracy_means_the_same_variable_in_every_shard(tmp_path: Path) -> None:
    examples = [synthetic_example(0, accuracy=True), synthetic_example(1, accuracy=0.25)]
    values = {str(i): encode(pickle.dumps(example)) for i, example in enumerate(examples)}
    import_vlinterpret(write_database(tmp_path / "db", values), tmp_path / "store", examples_per_shard=1)
    ds = vli.open_dataset(tmp_path / "store")
    assert "correct" not in ds
    assert ds["score"].values.tolist() == [1.0, 0.25]


class Touch:
    """A hostile payload: unpickling it creates ``marker`` through the global ``how`` names."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "builtins.exec":
            return exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return Path(self.marker).touch, ()


HOSTILE = {"os.system": "posix.system", "builtins.exec": "builtins.exec", "Path.touch": "builtins.getattr"}


@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_hostile_pickle_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(Touch(control, how)))  # the payload is live: plain pickle runs it
    assert control.exists()

    marker = tmp_path / "marker"
    hostile = synthetic_example(2, custom_metrics={"evil": Touch(marker, how)})
    good = {str(i): encode(pickle.dumps(synthetic_example(i))) for i in range(2)}
    database = write_database(tmp_path / "db", {**good, "2": encode(pickle.dumps(hostile))})
    with pytest.raises(VLIError) as refused:
        import_vlinterpret(database, tmp_path / "store")
    assert f"refusing to unpickle global '{HOSTILE[how]}'" in str(refused.value)
    assert str(database) in str(refused.value) and "key '2'" in str(refused.value)
    assert not marker.exists()
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_refuses_a_hostile_database_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    database = write_database(tmp_path / "db", {"0": encode(pickle.dumps(Touch(marker, "os.system")))})
    result = run_cli("import-vlinterpret", str(database), str(tmp_path / "store"), "--normalize-attention")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "refusing to unpickle global 'posix.system'" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "store").exists()


class Opaque:
    """A harmless-looking custom class: still not an array or a builtin value."""


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (collections.OrderedDict(tokens=["a"]), "global 'collections.OrderedDict'"),
        ({"tokens": Opaque()}, f"global '{__name__}.Opaque'"),
        ({"tokens": np.array(["a", 1], dtype=object)}, "dtype object"),
        ({"tokens": np.ma.masked_array([1.0, 2.0])}, "global 'numpy.ma.core._mareconstruct'"),
    ],
)
def test_non_array_objects_are_refused(tmp_path: Path, payload: Any, refused: str) -> None:
    database = write_database(tmp_path / "db", {"0": encode(pickle.dumps(payload))})
    with pytest.raises(VLIError, match="refusing to unpickle") as error:
        import_vlinterpret(database, tmp_path / "store")
    assert refused in str(error.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"not compressed at all", "not lz4-compressed"),
        (lz4.frame.compress(b"\xc1\xc1\xc1"), "not a msgpack value"),
        (encode(pickle.dumps(synthetic_example(0))[:-40]), "not a readable pickle"),
        (encode(pickle.dumps([1, 2])), "expected a dict of example fields"),
        (encode(pickle.dumps({"tokens": ["a"]})), "lacks field(s)"),
        (encode(pickle.dumps(synthetic_example(0, txt_len=99))), "txt_len 99"),
        (encode(pickle.dumps(synthetic_example(0, img_coords=[(0, 0)]))), "img_coords must give one (x, y) pair"),
        (encode(pickle.dumps(synthetic_example(0, image=np.full((4, 4, 3), 300)))), "outside 0-255"),
        (encode(pickle.dumps(synthetic_example(0, attention=np.full((2, 2, 9, 9), np.nan)))), "NaN or infinite"),
        (encode(pickle.dumps(synthetic_example(0, tokens=7))), "tokens must be a list"),
        (encode(pickle.dumps(synthetic_example(0, img_grid_size=[2]))), "img_grid_size must be two integers"),
    ],
)
def test_damaged_records_give_one_clear_error(tmp_path: Path, value: bytes, message: str) -> None:
    database = write_database(tmp_path / "db", {"0": value})
    with pytest.raises(VLIError) as error:
        import_vlinterpret(database, tmp_path / "store")
    assert message in str(error.value) and str(database) in str(error.value)
    assert not (tmp_path / "store").exists()


def test_a_directory_without_a_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VLIError, match=r"no data\.mdb"):
        import_vlinterpret(tmp_path, tmp_path / "store")
    with pytest.raises(VLIError, match="no such directory"):
        import_vlinterpret(tmp_path / "missing", tmp_path / "store")
