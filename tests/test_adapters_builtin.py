"""The built-in models' adapters (``adapters/builtin.py``) on the committed weights, offline.

Extraction end to end into stores that validate with values checked; the VQA models' stored
accuracy equals ``evaluate_vqa`` on the same held-out seeds; a bright patch's token has the
patch's exact pixel box (also on a resized image); attention rows are softmax rows in each
module's block; the captured maps' gradients equal the model's own (``retain_grad``) and are
zero only where the output cannot depend on them; token deletion matches the model's own; a padded
batch gives each example what it gets alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlinterpret_panel.adapters import ModelInput
from vlinterpret_panel.adapters.builtin import BuiltinAdapter
from vlinterpret_panel.adapters.registry import builtin_names, load_adapter
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.models import world
from vlinterpret_panel.models.registry import evaluate_vqa, images_to_pixels, texts_to_ids
from vlinterpret_panel.relevancy.inputs import KIND_STREAMS
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT, validate
from vlinterpret_panel.store import open_dataset, shard_paths

MODELS = ("single_stream", "dual_stream", "dual_encoder")
HELDOUT = world.HELDOUT_SEED_START
QUESTION = "what color is the circle?"
CAPTION = "a red circle and a blue square"


@pytest.fixture(scope="module")
def adapters() -> dict[str, BuiltinAdapter]:
    return {name: load_adapter(name) for name in MODELS}


def _text(name: str) -> str:
    return CAPTION if name == "dual_encoder" else QUESTION


def _scene_text(name: str) -> str:
    return "caption" if name == "dual_encoder" else "question"


def test_registered_under_their_names(adapters: dict[str, BuiltinAdapter]) -> None:
    assert set(MODELS) <= set(builtin_names())
    adapter = load_adapter("builtin:dual_stream")
    assert isinstance(adapter, BuiltinAdapter) and adapter.name == "dual_stream"
    assert len(adapter.config["weights_sha256"]) == 64


@pytest.mark.parametrize("name", MODELS)
def test_extraction_end_to_end(adapters: dict[str, BuiltinAdapter], name: str, tmp_path: Path) -> None:
    """50 held-out scenes into a store; every shard validates with values checked; VQA accuracy is the model's."""
    count = 50 if name != "dual_encoder" else 8
    sources = scene_sources(count, seed=HELDOUT, text=_scene_text(name))
    report = extract(adapters[name], sources, tmp_path / "store", batch_size=16, examples_per_shard=25, progress=False)
    assert report.written == count and not report.failures
    for shard in shard_paths(tmp_path / "store"):
        validate(open_dataset(shard), source=str(shard), check_values=True)
    ds = open_dataset(tmp_path / "store")
    assert ds.attrs["model_name"] == name
    scene, example = world.vqa_example_for_seed(HELDOUT)
    wanted_mask = np.logical_or.reduce(scene.masks) if name == "dual_encoder" else example.target_mask
    np.testing.assert_array_equal(ds.target_mask.isel(example=0).values, wanted_mask)
    answered_no = ds.label.values == "no" if "label" in ds else np.zeros(count, bool)
    assert ((ds.target_mask.sum(("image_y", "image_x")) > 0).values == ~answered_no).all()
    first = ds.isel(example=0)
    n_text = len(world.encode(str(first.text.values)))
    modality = first.modality.values[: int(first.seq_len)].tolist()
    assert modality[0] == SPECIAL and modality[n_text - 1] == SPECIAL
    assert modality[-16:] == [IMAGE] * 16
    if name == "dual_encoder":
        assert modality[n_text] == SPECIAL and first.token_text.values[n_text] == "<image_cls>"
        assert dict(zip(ds.readout.values, first.readout_token.values, strict=True)) == {"text": 0, "image": n_text}
        assert ds.layer_kind.values.tolist() == ["text_self"] * 4 + ["image_self"] * 4
        return
    assert set(ds.label.values) <= set(world.ANSWERS) and set(ds.prediction.values) <= set(world.ANSWERS)
    accuracy = float(ds.correct.mean())
    assert accuracy == evaluate_vqa(adapters[name].model, num_examples=count, batch_size=count)
    if name == "dual_stream":
        assert ds.layer_kind.values.tolist()[4:8] == [
            "cross_text_to_image",
            "cross_image_to_text",
            "text_self",
            "image_self",
        ]
        assert ds.hidden_layer_name.values.tolist()[-1] == "cross_layers.1"


@pytest.mark.parametrize("name", MODELS)
def test_batch_equals_single_runs(adapters: dict[str, BuiltinAdapter], name: str) -> None:
    """Texts of different lengths in one padded batch give each example's own tokens, maps, states and output."""
    adapter = adapters[name]
    images = [world.scene_for_seed(HELDOUT + i).image for i in range(3)]
    texts = [_text(name), "what?", "is there a red circle?"]
    with torch.no_grad():
        batch = adapter.forward_batch(images, texts)
        singles = [adapter.forward(image, text) for image, text in zip(images, texts, strict=True)]
    for together, alone in zip(batch, singles, strict=True):
        assert together.tokens == alone.tokens and together.readout_tokens == alone.readout_tokens
        torch.testing.assert_close(together.output, alone.output.detach(), atol=1e-5, rtol=1e-5)
        for a, b in zip(together.attentions, alone.attentions, strict=True):
            assert list(a.query_tokens) == list(b.query_tokens) and list(a.key_tokens) == list(b.key_tokens)
            torch.testing.assert_close(a.probabilities, b.probabilities.detach(), atol=1e-5, rtol=1e-5)
        for a, b in zip(together.hidden_states, alone.hidden_states, strict=True):
            torch.testing.assert_close(a.states, b.states.detach(), atol=1e-4, rtol=1e-4)


def _bright_patch_image(height: int, width: int, row: int, col: int) -> np.ndarray:
    """A dark image whose patch (row, col) of the 4x4 grid is white."""
    image = np.full((height, width, 3), 20, np.uint8)
    cell_height, cell_width = height // 4, width // 4
    image[row * cell_height : (row + 1) * cell_height, col * cell_width : (col + 1) * cell_width] = 255
    return image


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_bright_patch_token_has_its_pixel_box(adapters: dict[str, BuiltinAdapter], name: str, size: tuple) -> None:
    """Only the token of the bright patch embeds differently from an all-dark image, and its box is that patch."""
    height, width = size
    adapter = adapters[name]
    with torch.no_grad():
        bright = adapter.forward(_bright_patch_image(height, width, 1, 2), _text(name))
        dark = adapter.forward(np.full((height, width, 3), 20, np.uint8), _text(name))
    embedding_change = (bright.hidden_states[0].states - dark.hidden_states[0].states).abs().amax(dim=1)
    changed = np.flatnonzero(embedding_change.numpy() > 1e-4)
    assert changed.size == 1
    token = int(bright.hidden_states[0].token_indices[changed[0]])
    assert bright.modality[token] == IMAGE and bright.tokens[token] == "<patch_1_2>"
    assert tuple(bright.patch_position[token]) == (1, 2)
    cell_height, cell_width = height / 4, width / 4
    np.testing.assert_array_equal(
        bright.token_box[token], [2 * cell_width, cell_height, 3 * cell_width, 2 * cell_height]
    )
    boxes = bright.token_box[np.asarray(bright.modality) == IMAGE]
    assert boxes.min() == 0 and boxes[:, 2].max() == width and boxes[:, 3].max() == height
    assert np.isnan(bright.token_box[np.asarray(bright.modality) != IMAGE]).all()


@pytest.mark.parametrize("name", MODELS)
def test_attention_rows_are_softmax_in_their_block(adapters: dict[str, BuiltinAdapter], name: str) -> None:
    scene = world.scene_for_seed(HELDOUT + 1)
    record, info = adapters[name].run(ModelInput("x", scene.image, _text(name)))
    modality = np.asarray(record.modality)
    n_text = len(world.encode(_text(name)))
    is_text = np.arange(len(modality)) < n_text
    stream = {TEXT: is_text, IMAGE: ~is_text, "all": np.ones(len(modality), bool)}
    for layer, kind in enumerate(info.layer_kind):
        queries, keys = (stream[s] for s in KIND_STREAMS[kind])
        rows = record.attention[layer].sum(axis=-1)
        np.testing.assert_allclose(rows[:, queries], 1.0, atol=1e-5)
        np.testing.assert_array_equal(rows[:, ~queries], 0.0)
        assert (record.attention[layer][:, :, ~keys] == 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_gradients_are_the_models_own(adapters: dict[str, BuiltinAdapter], name: str) -> None:
    """d(explained output)/d(each map) equals retain_grad on the model's maps; zero only where nothing reads it."""
    adapter = adapters[name]
    scene, _ = world.vqa_example_for_seed(HELDOUT + 2)
    record, info = adapter.run(ModelInput("x", scene.image, _text(name)), gradients=True)
    text_ids, text_mask = texts_to_ids([_text(name)])
    output = adapter.model(text_ids, text_mask, images_to_pixels([scene.image]))
    for module in output.attentions:
        module.probs.retain_grad()
    logits = output.logits[0]
    (logits[0] if name == "dual_encoder" else logits[world.ANSWERS.index(record.prediction)]).backward()
    layout = adapter.forward(scene.image, _text(name)).attentions
    zero_layers = []
    for layer, module in enumerate(output.attentions):
        captured = record.attention_gradient[layer]
        rows, cols = np.asarray(layout[layer].query_tokens), np.asarray(layout[layer].key_tokens)
        block = captured[:, rows[:, None], cols[None, :]]
        own = torch.zeros_like(module.probs[0]) if module.probs.grad is None else module.probs.grad[0]
        np.testing.assert_allclose(block, own.numpy(), rtol=1e-5, atol=1e-7)
        if not np.abs(captured).any():
            zero_layers.append(info.layer_name[layer])
    # The answer is read at the text [CLS]: the last image updates of the dual stream never reach it.
    expected = ["cross_layers.1.image_cross", "cross_layers.1.image_self"] if name == "dual_stream" else []
    assert zero_layers == expected


@pytest.mark.parametrize("name", MODELS)
def test_keep_tokens_deletes_tokens_like_the_model(adapters: dict[str, BuiltinAdapter], name: str) -> None:
    adapter = adapters[name]
    scene, _ = world.vqa_example_for_seed(HELDOUT + 3)
    text = _text(name)
    with torch.no_grad():
        full = adapter.forward(scene.image, text)
        keep = np.ones(len(full.tokens), bool)
        keep[[2, len(keep) - 16, len(keep) - 1]] = False  # a word, the first and the last patch
        reduced = adapter.forward(scene.image, text, keep_tokens=keep)
        text_ids, text_mask = texts_to_ids([text])
        n_text = text_ids.shape[1]
        text_keep = torch.tensor([i for i in range(n_text) if i != 2])
        expected = adapter.model(
            text_ids, text_mask, images_to_pixels([scene.image]), text_keep=text_keep, image_keep=torch.arange(1, 15)
        ).logits
    assert reduced.tokens == [t for t, k in zip(full.tokens, keep, strict=True) if k]
    np.testing.assert_array_equal(reduced.patch_position, full.patch_position[keep])
    assert not torch.allclose(reduced.output, full.output)
    wanted = expected[0, 0:1] if name == "dual_encoder" else expected[0]
    torch.testing.assert_close(reduced.output, wanted)
    no_cls = np.ones(len(full.tokens), bool)
    no_cls[0] = False
    with pytest.raises(VLIError, match=r"\[CLS\]"):
        adapter.forward(scene.image, text, keep_tokens=no_cls)


def test_bad_inputs_raise_vli_errors(adapters: dict[str, BuiltinAdapter]) -> None:
    adapter = adapters["single_stream"]
    with pytest.raises(VLIError, match="uint8"):
        adapter.forward(np.zeros((64, 64), np.uint8), QUESTION)
    with pytest.raises(VLIError, match="limit is 24"):
        adapter.forward(np.zeros((64, 64, 3), np.uint8), " ".join(["red"] * 30))
    with pytest.raises(VLIError, match="image"):
        adapters["dual_encoder"].forward(
            np.zeros((64, 64, 3), np.uint8),
            CAPTION,
            keep_tokens=np.arange(len(world.encode(CAPTION)) + 17) != len(world.encode(CAPTION)),
        )


def test_default_shard_size_follows_the_bytes_of_an_example(
    adapters: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlinterpret_panel import extract as extraction

    adapter = adapters["single_stream"]
    record, _ = adapter.run(scene_sources(1)[0].load())
    example_bytes = 4 * (record.attention.size + record.hidden_states.size)
    monkeypatch.setattr(extraction, "SHARD_TARGET_BYTES", 3 * example_bytes)
    report = extraction.extract(adapter, scene_sources(7), tmp_path / "store", progress=False)
    sizes = sorted(open_dataset(shard).sizes["example"] for shard in report.shards)
    assert sizes == [1, 3, 3]
