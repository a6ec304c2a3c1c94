"""Adding an example with a live model: upload checks, text checks, failures that leave the store untouched."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from PIL import Image, ImageFile

from vlinterpret_panel import open_dataset
from vlinterpret_panel.adapters.base import ForwardCapture, ModelAdapter
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.live import (
    MAX_IMAGE_PIXELS,
    LiveModel,
    check_text,
    decode_image,
    fit_image,
    random_scene,
)

REPO = Path(__file__).resolve().parent.parent
METHODS = ["rollout", "generic"]


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _pixels(height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _snapshot(store: Path) -> dict[str, str]:
    """Every shard (and stray temporary file) of the store with a hash of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in store.iterdir()
        if p.name.endswith((".nc", ".partial"))
    }


def _assert_same_examples(ds: xr.Dataset, old: xr.Dataset) -> None:
    """Every example of ``old`` has the same attention in ``ds`` (which may be padded to more tokens)."""
    n = old.sizes["query"]
    for example in old.indexes["example"]:
        kept = ds.attention.sel(example=example).isel(query=slice(0, n), key=slice(0, n)).values
        np.testing.assert_array_equal(kept, old.attention.sel(example=example).values)


@pytest.fixture(scope="module")
def made_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("live") / "store"
    report = extract("single_stream", scene_sources(3), store, examples_per_shard=2, progress=False, relevancy=METHODS)
    assert report.written == 3
    return store


@pytest.fixture
def store(made_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(made_store, copy, ignore=shutil.ignore_patterns(".index"))
    return copy


@pytest.fixture(scope="module")
def live() -> LiveModel:
    return LiveModel("single_stream")


def test_png_and_jpeg_uploads_decode_to_their_pixels() -> None:
    pixels = _pixels()
    np.testing.assert_array_equal(decode_image(_encode(pixels)), pixels)
    jpeg = decode_image(_encode(pixels, "JPEG"))
    assert jpeg.shape == pixels.shape and jpeg.dtype == np.uint8
    grey = decode_image(_encode(pixels[..., 0]))
    np.testing.assert_array_equal(grey, np.repeat(pixels[..., :1], 3, axis=2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no image uploaded"),
        (b"hello, this is text\n", "not a PNG or JPEG"),
        (b"%PDF-1.4\n", "not a PNG or JPEG"),
        (_encode(np.zeros((8, 8, 3), np.uint8), "GIF"), "not a PNG or JPEG"),
        (_encode(np.zeros((8, 8, 3), np.uint8), "BMP"), "not a PNG or JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "damaged or truncated"),
    ],
)
def test_what_is_not_a_png_or_jpeg_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(VLIError, match=message):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_refused(fmt: str) -> None:
    data = _encode(_pixels(200, 200), fmt)
    with pytest.raises(VLIError, match="damaged or truncated"):
        decode_image(data[: len(data) // 2])


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width × height`` pixels (a decompression bomb's header)."""
    data = _encode(np.zeros((4, 4, 3), np.uint8))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    huge, just_over = _png_claiming(60_000, 60_000), _png_claiming(4097, 4096)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(VLIError, match="pixels"):
        decode_image(huge)
    with pytest.raises(VLIError, match="4097 × 4096 pixels; the limit is"):
        decode_image(just_over)
    assert decoded == [], "nothing may be decoded before the pixel count is checked"
    assert 4096 * 4096 <= MAX_IMAGE_PIXELS < 4097 * 4096


def test_the_pixel_and_byte_limits_apply() -> None:
    data = _encode(_pixels(100, 100))
    with pytest.raises(VLIError, match="100 × 100 pixels; the limit is 5,000"):
        decode_image(data, max_pixels=5000)
    with pytest.raises(VLIError, match="the limit is"):
        decode_image(data, max_bytes=len(data) - 1)
    assert decode_image(data, max_bytes=len(data), max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(VLIError, match=r"11\.0 MB; the limit is 10 MB"):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(11 * 2**20 - 8))


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "type a question"), ("   \t ", "type a question"), ("x" * 201, "201 characters"), ("a\nb", "one line")],
)
def test_empty_long_or_multiline_text_is_refused(text: str, message: str) -> None:
    with pytest.raises(VLIError, match=message):
        check_text(text)


def test_text_is_stripped() -> None:
    assert check_text("  what color is the circle?  ") == "what color is the circle?"


def test_fit_image_keeps_small_images_and_shrinks_large_ones() -> None:
    small = _pixels(30, 40)
    assert fit_image(small) is small
    large = fit_image(np.zeros((1000, 2000, 3), np.uint8), 512)
    assert large.shape == (256, 512, 3)


def test_adding_an_example_appends_one_shard_and_keeps_the_others(live: LiveModel, store: Path) -> None:
    before = _snapshot(store)
    old = open_dataset(store)
    draft = random_scene(7)
    added = live.add_example(store, draft.image, draft.question, label=draft.answer, target_mask=draft.target_mask)
    after = _snapshot(store)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {added.shard.name}
    ds = open_dataset(store)
    assert ds.sizes["example"] == old.sizes["example"] + 1
    new = ds.sel(example=added.example_id)
    assert str(new.text.values) == draft.question and str(new.label.values) == draft.answer
    assert str(new.prediction.values) == added.prediction
    np.testing.assert_array_equal(new.image.values[:64, :64], draft.image)
    assert sorted(ds.indexes["relevancy_method"]) == sorted(METHODS)
    assert np.isfinite(new.relevancy.values[:, : int(new.seq_len)]).all()
    assert np.isfinite(new.attention.values).any()
    _assert_same_examples(ds, old)


def test_a_large_upload_is_stored_shrunk(live: LiveModel, store: Path) -> None:
    image = np.repeat(np.repeat(random_scene(3).image, 10, axis=0), 10, axis=1)  # 640 × 640
    added = live.add_example(store, image, "what shape is the red object?")
    ds = open_dataset(store)
    assert int(ds.image_height.sel(example=added.example_id)) == 512
    assert str(ds.label.sel(example=added.example_id).values) == ""
    assert int(ds.correct.sel(example=added.example_id)) == -1  # no label: unknown, not "incorrect"


class _Exploding(ModelAdapter):
    """A model of the store's name that fails on every input."""

    name = "single_stream"

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        raise RuntimeError("out of memory in layer 3")


@pytest.mark.parametrize(
    ("image", "text", "message"),
    [
        (random_scene(1).image, "", "type a question"),
        (random_scene(1).image, "y" * 500, "500 characters"),
        (np.zeros((8, 8), np.uint8), "what?", "uint8 H×W×3"),
        (random_scene(1).image, "what color is the square?", "the model failed on this example: RuntimeError: out of"),
    ],
)
def test_a_failed_add_leaves_the_store_byte_for_byte(store: Path, image: np.ndarray, text: str, message: str) -> None:
    before = _snapshot(store)
    with pytest.raises(VLIError, match=message):
        LiveModel("single_stream", adapter=_Exploding()).add_example(store, image, text)
    assert _snapshot(store) == before
    assert open_dataset(store).sizes["example"] == 3


def test_a_store_of_another_model_is_refused(store: Path) -> None:
    other = _Exploding()
    other.name = "dual_stream"
    before = _snapshot(store)
    with pytest.raises(VLIError, match="serve the store with the model that made it"):
        LiveModel("dual_stream", adapter=other).add_example(store, random_scene(2).image, "is there a red circle?")
    assert _snapshot(store) == before


ADDER = textwrap.dedent(
    """
    import sys, time
    import vlinterpret_panel.store as store
    from vlinterpret_panel.live import LiveModel, random_scene

    def stall(src, dst):  # the shard is fully written to its temporary file, never renamed
        print("stalled", flush=True)
        time.sleep(60)

    store.os.replace = stall
    draft = random_scene(5)
    LiveModel("single_stream").add_example(sys.argv[1], draft.image, draft.question)
    """
)


def test_an_add_killed_mid_write_leaves_every_completed_example(store: Path) -> None:
    before = _snapshot(store)
    old = open_dataset(store)
    process = subprocess.Popen(
        [sys.executable, "-c", ADDER, str(store)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout.readline().strip() == "stalled"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    after = _snapshot(store)
    partial = [name for name in after if name.endswith(".partial")]
    assert partial, "the kill must land mid-write"
    assert {k: v for k, v in after.items() if k not in partial} == before
    ds = open_dataset(store)
    assert list(ds.indexes["example"]) == list(old.indexes["example"])
    _assert_same_examples(ds, old)


def _form(live: LiveModel, store: Path) -> tuple[object, list]:
    from vlinterpret_panel.ui.add_example import AddExample

    added: list = []
    return AddExample(live, store, added.append), added


def _run_to_end(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` on an event loop of its own thread: after a browser test in the same process,
    Playwright's sync API has a loop running in this one, where ``asyncio.run`` refuses."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()


@pytest.mark.parametrize(
    ("upload", "text", "message"),
    [
        (None, "what?", "choose a PNG or JPEG image to upload or draw a random scene"),
        (b"GIF89a not really", "what?", "the upload is not a PNG or JPEG image"),
        (_encode(_pixels(200, 200))[:900], "what?", "cannot read the image: it is damaged or truncated"),
        (_png_claiming(60_000, 60_000), "what?", "the image has too many pixels"),
        (_encode(_pixels()), "  ", "type a question or caption"),
        (_encode(_pixels()), "z" * 300, "the text has 300 characters; the limit is 200"),
    ],
    ids=["no-image", "not-an-image", "truncated", "bomb", "empty-text", "long-text"],
)
def test_the_form_shows_one_message_and_leaves_the_store(
    live: LiveModel, store: Path, upload: bytes | None, text: str, message: str
) -> None:
    form, added = _form(live, store)
    before = _snapshot(store)
    form.upload.value, form.text.value = upload, text
    _run_to_end(form._run())
    assert form.status.alert_type == "danger" and form.status.object.startswith(message)
    assert "Traceback" not in form.status.object and added == []
    assert not form.run_button.disabled and not form.progress.visible
    assert _snapshot(store) == before


def test_the_form_reports_a_model_that_raises(store: Path) -> None:
    form, added = _form(LiveModel("single_stream", adapter=_Exploding()), store)
    before = _snapshot(store)
    form._draw_scene()
    _run_to_end(form._run())
    assert form.status.object == "the model failed on this example: RuntimeError: out of memory in layer 3"
    assert added == [] and _snapshot(store) == before


def test_the_form_adds_a_drawn_scene_with_its_answer(live: LiveModel, store: Path) -> None:
    form, added = _form(live, store)
    form._draw_scene()
    assert form.preview.visible and form.text.value
    _run_to_end(form._run())
    assert form.status.alert_type == "success" and len(added) == 1
    ds = open_dataset(store)
    assert str(ds.text.sel(example=added[0].example_id).values) == form.text.value
    assert str(ds.label.sel(example=added[0].example_id).values) == form._draft.answer


def test_a_warm_up_runs_the_model_as_the_store_does_and_stores_nothing(live: LiveModel, store: Path) -> None:
    before = _snapshot(store)
    live.warm_up(open_dataset(store))
    assert _snapshot(store) == before


def test_the_store_check_waits_while_this_sessions_model_runs(live: LiveModel, store: Path) -> None:
    """A shard this session's own run wrote is shown by that run's callback; the periodic check does not race it."""
    from vlinterpret_panel.ui.session import LiveSession

    session = LiveSession(store, live, lambda: open_dataset(store))
    examples = session.dashboard.ds.sizes["example"]
    live.add_example(store, _pixels(), "what color is the square ?")
    session.dashboard.counterfactual.running = True
    session._poll()
    assert session.dashboard.ds.sizes["example"] == examples
    session.dashboard.counterfactual.running = False
    session._poll()
    assert session.dashboard.ds.sizes["example"] == examples + 1
