"""Extraction (``extract.py``, ``vlinterpret extract``) with a tiny ViLT checkpoint on disk, offline.

Inputs are read from a folder and a JSON/CSV file; failing examples are reported and never
dropped silently; a second run resumes; two Dask workers store the same values as one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.hf_tiny import save_tiny_vilt, scene
from vlinterpret_panel.adapters import ForwardCapture, ModelInput
from vlinterpret_panel.adapters.hf_vilt import ViltAdapter
from vlinterpret_panel.cli import main
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import FAILURES_FILE, extract, read_sources, run_batch, scene_sources
from vlinterpret_panel.schema import validate
from vlinterpret_panel.store import open_dataset, shard_paths

QUESTIONS = ["what color is the square ?", "how many shapes", "is there a red circle ?", "what is left of it ?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vilt(tmp_path_factory.mktemp("checkpoint") / "tiny-vilt")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Five good examples of different image sizes and one unreadable image."""
    root = tmp_path_factory.mktemp("inputs")
    entries = []
    for index in range(5):
        Image.fromarray(scene(48 + 16 * index, 96 - 8 * index, index)).save(root / f"img{index}.png")
        entries.append({"image": f"img{index}.png", "question": QUESTIONS[index % 4], "label": "red"})
    (root / "broken.png").write_bytes(b"this is not a png")
    entries.append({"image": "broken.png", "text": "what color"})
    (root / "questions.json").write_text(json.dumps(entries))
    return root, root / "questions.json"


def test_read_sources_from_json_and_csv(tmp_path: Path) -> None:
    Image.fromarray(scene(32, 32, 0)).save(tmp_path / "a.png")
    Image.fromarray(scene(32, 40, 1)).save(tmp_path / "b.png")
    (tmp_path / "q.csv").write_text("image,caption,label\na.png,a red square,\nb.png,two circles,x\na.png,a box,\n")
    sources = read_sources(tmp_path, tmp_path / "q.csv")
    assert [s.example_id for s in sources] == ["a-0", "b", "a-2"]
    assert [s.text for s in sources] == ["a red square", "two circles", "a box"]
    assert [s.label for s in sources] == [None, "x", None]
    loaded = sources[1].load()
    np.testing.assert_array_equal(loaded.image, scene(32, 40, 1))
    (tmp_path / "q.json").write_text(json.dumps([{"id": "one", "image": "b.png", "text": "hi"}]))
    assert read_sources(tmp_path, tmp_path / "q.json")[0].example_id == "one"
    bad = {
        "missing.json": ([{"image": "zzz.png", "text": "x"}], "no image"),
        "notext.json": ([{"image": "a.png"}], "needs 'image' and 'text'"),
        "twice.json": (
            [{"id": "d", "image": "a.png", "text": "x"}, {"id": "d", "image": "b.png", "text": "y"}],
            "twice",
        ),
        "object.json": ({"image": "a.png"}, "expected a list"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(VLIError, match=message):
            read_sources(tmp_path, tmp_path / name)
    (tmp_path / "q.txt").write_text("")
    with pytest.raises(VLIError, match=r"\.json or \.csv"):
        read_sources(tmp_path, tmp_path / "q.txt")
    with pytest.raises(VLIError, match="not a folder"):
        read_sources(tmp_path / "nope", tmp_path / "q.json")


def test_scene_sources_carry_questions_answers_and_masks() -> None:
    first, second = (source.load() for source in scene_sources(2, seed=5))
    assert first.example_id == "scene-0000005" and second.example_id == "scene-0000006"
    assert first.text and first.label and first.target_mask is not None
    assert scene_sources(1, text="caption")[0].load().label is None
    with pytest.raises(VLIError, match="one of question, caption, describe, not 'poem'"):
        scene_sources(1, text="poem")


def test_extract_reports_failures_and_resumes(checkpoint: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    sources = read_sources(*inputs)
    report = extract(str(checkpoint), sources, store, batch_size=2, examples_per_shard=2, progress=False)
    assert (report.written, report.skipped, len(report.shards)) == (5, 0, 3)
    assert [f.example_id for f in report.failures] == ["broken"]
    assert "cannot read the image" in report.failures[0].error
    assert json.loads((store / FAILURES_FILE).read_text())[0]["example_id"] == "broken"
    with open_dataset(store) as ds:
        validate(ds, check_values=True)
        assert sorted(ds.example.values.tolist()) == [f"img{i}" for i in range(5)]
        assert ds.attrs["model_name"] == str(checkpoint)
        extraction = json.loads(ds.attrs["extraction"])
    shard_failures = []
    for path in shard_paths(store):
        with open_dataset(path) as shard:
            shard_failures += json.loads(shard.attrs["extraction"])["failures"]
    assert [f["example_id"] for f in shard_failures] == ["broken"]
    assert extraction["adapter"] == str(checkpoint) and extraction["precision"] == "float16"

    again = extract(str(checkpoint), sources, store, batch_size=2, examples_per_shard=2, progress=False)
    assert (again.written, again.skipped, len(again.failures)) == (0, 5, 1)
    first_shard = shard_paths(store)[0]
    with open_dataset(first_shard) as shard:
        lost = set(shard.example.values.tolist())
    first_shard.unlink()
    fixed = [s for s in sources if s.example_id != "broken"]
    resumed = extract(str(checkpoint), fixed, store, batch_size=2, examples_per_shard=2, progress=False)
    assert resumed.written == len(lost) and resumed.skipped == 5 - len(lost) and not resumed.failures
    assert not (store / FAILURES_FILE).exists()
    with open_dataset(store) as ds:
        assert len(ds.example) == 5


def test_one_bad_example_in_a_batch_costs_only_itself(tmp_path: Path) -> None:
    from tests.hf_tiny import tiny_vilt

    class Fragile(ViltAdapter):
        def run_examples(self, images, texts, keep_tokens) -> list[ForwardCapture]:
            if "boom" in texts:
                raise ValueError("this text breaks the model")
            return super().run_examples(images, texts, keep_tokens)

    adapter = Fragile(*tiny_vilt(tmp_path))
    items = [ModelInput(f"e{i}", scene(40, 60, i), text) for i, text in enumerate(["what", "boom", "how many"])]
    results = run_batch(adapter, items)
    assert isinstance(results[1], ValueError)
    batched = [r[0] for r in results if not isinstance(r, BaseException)]
    assert [r.example_id for r in batched] == ["e0", "e2"]
    alone = adapter.run(items[2])[0]
    np.testing.assert_allclose(batched[1].attention, alone.attention, atol=1e-6)


def test_two_workers_store_the_same_values_as_one(checkpoint: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    sources = [s for s in read_sources(*inputs) if s.example_id != "broken"]
    options = {"batch_size": 2, "examples_per_shard": 2, "progress": False}
    single = extract(str(checkpoint), sources, tmp_path / "one", **options)
    parallel = extract(str(checkpoint), sources, tmp_path / "two", workers=2, **options)
    assert single.written == parallel.written == 5 and not parallel.failures
    one = open_dataset(tmp_path / "one").sortby("example").load()
    two = open_dataset(tmp_path / "two").sortby("example").load()
    validate(two, check_values=True)
    for name in ("attention", "hidden_states", "token_box", "score"):
        np.testing.assert_allclose(two[name].values, one[name].values, rtol=1e-6, atol=1e-7, equal_nan=True)
    for name in ("token_text", "modality", "prediction", "image"):
        np.testing.assert_array_equal(two[name].values, one[name].values)


def test_an_existing_dask_scheduler_stores_the_same_values(
    checkpoint: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    from distributed import LocalCluster

    sources = [s for s in read_sources(*inputs) if s.example_id != "broken"][:3]
    options = {"batch_size": 2, "examples_per_shard": 2, "progress": False}
    single = extract(str(checkpoint), sources, tmp_path / "one", **options)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        remote = extract(str(checkpoint), sources, tmp_path / "remote", scheduler=cluster.scheduler_address, **options)
    assert not remote.failures, remote.failures
    assert single.written == remote.written == 3 and len(remote.shards) == 2
    with open_dataset(tmp_path / "one") as one, open_dataset(tmp_path / "remote") as other:
        one, other = one.sortby("example").load(), other.sortby("example").load()
    np.testing.assert_allclose(other.attention.values, one.attention.values, rtol=1e-6, atol=1e-7, equal_nan=True)
    with pytest.raises(VLIError, match=r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:9'"):
        extract(str(checkpoint), sources, tmp_path / "x", scheduler="tcp://127.0.0.1:9", **options)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vlinterpret_panel.cli", "extract", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_extract_exit_codes(
    checkpoint: Path, inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    images, texts = inputs
    first = _cli(str(checkpoint), str(store), "--images", str(images), "--texts", str(texts), "--quiet")
    assert first.returncode == 1, first.stderr
    assert "wrote 5 example(s)" in first.stdout and "1 failed" in first.stdout
    assert "failed: broken: VLIError" in first.stderr and "Traceback" not in first.stderr
    # The other cases in-process: the same handler, without another interpreter start.
    tolerant = ["extract", str(checkpoint), str(store), "--images", str(images), "--texts", str(texts)]
    assert main([*tolerant, "--allow-failures"]) == 0
    output = capsys.readouterr()
    assert "skipped 5 already stored" in output.out
    assert "example/s" in output.err, "the progress bar reports examples per second"
    for args, message in [
        ((str(checkpoint), str(store)), "give --images DIR and --texts FILE"),
        ((str(tmp_path / "nowhere"), str(store), "--scenes", "2"), "cannot load the model configuration"),
        ((str(checkpoint), str(store), "--scenes", "2", "--option", "oops"), "write KEY=VALUE"),
        ((str(checkpoint), str(store), "--scenes", "2", "--target", "red vs red"), "an answer against itself"),
        ((str(checkpoint), str(store), "--scenes", "2", "--target", "label"), "needs a gradient or LRP"),
    ]:
        assert main(["extract", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def test_a_failed_background_write_stops_the_extraction_and_keeps_the_shards_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third shard's write fails in the background writer: the extraction raises that error, every other
    shard it wrote stays whole and readable (at most one more was in flight), no temporary file is left, and
    a rerun extracts only what is missing."""
    from vlinterpret_panel import extract as extract_module

    original, calls = extract_module.write_records, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_module, "write_records", failing)
    store = tmp_path / "s"
    sources = scene_sources(10)
    with pytest.raises(OSError, match="disk full"):
        extract("single_stream", sources, store, examples_per_shard=2, progress=False)
    assert len(calls) in (3, 4)  # the failure, and at most the next chunk's write, already queued
    assert len(shard_paths(store)) == len(calls) - 1
    ds = open_dataset(store)
    assert ds.sizes["example"] == 2 * (len(calls) - 1)
    assert {str(e) for e in ds.example.values}.isdisjoint({s.example_id for s in sources[4:6]})
    assert not [p for p in store.iterdir() if p.name.startswith(".") and p.suffix == ".partial"]
    monkeypatch.setattr(extract_module, "write_records", original)
    extract("single_stream", sources, store, examples_per_shard=2, progress=False)
    assert sorted(str(e) for e in open_dataset(store).example.values) == sorted(s.example_id for s in sources)
