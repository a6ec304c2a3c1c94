"""The Hugging Face adapters on tiny random-weight models with real processors; nothing is downloaded.

For each family: extraction end to end into a store that validates with values checked,
softmax rows in the right blocks, batches equal single runs, token deletion keeps positions.
ViLT and CLIP: a single bright patch's token box covers exactly its pixels of the user's
image (through ViLT's resize-and-pad, CLIP's resize-and-crop). Attention gradients equal
finite differences through both capture mechanisms (dropout-module tap and attention function).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hf_tiny import (
    ANSWERS,
    grid_regions,
    save_tiny_vilt,
    scene,
    tiny_clip,
    tiny_llava,
    tiny_lxmert,
    tiny_vilt,
)
from vlinterpret_panel.adapters import ModelAdapter, ModelInput
from vlinterpret_panel.adapters.hf_clip import ClipAdapter
from vlinterpret_panel.adapters.hf_common import AttentionTap
from vlinterpret_panel.adapters.hf_llava import LlavaAdapter
from vlinterpret_panel.adapters.hf_lxmert import LxmertAdapter
from vlinterpret_panel.adapters.hf_vilt import ViltAdapter
from vlinterpret_panel.adapters.registry import load_adapter, register_builtin
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, read_sources
from vlinterpret_panel.schema import IMAGE, TEXT, validate
from vlinterpret_panel.store import open_dataset

TEXTS = ["what color is the square ?", "how many", "is there a red circle left of the blue square ?"]
SIZES = [(128, 192), (64, 64), (100, 150)]
FAMILIES = ("vilt", "clip", "lxmert", "llava")


def _build(family: str, directory: Path) -> ModelAdapter:
    if family == "vilt":
        return ViltAdapter(*tiny_vilt(directory))
    if family == "clip":
        return ClipAdapter(*tiny_clip(directory))
    if family == "lxmert":
        model, tokenizer = tiny_lxmert(directory)
        return LxmertAdapter(model, tokenizer, regions=grid_regions, answers=ANSWERS)
    return LlavaAdapter(*tiny_llava(directory))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelAdapter]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: _build(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of PNG images and a JSON file of questions about them."""
    root = tmp_path_factory.mktemp("inputs")
    entries = []
    for index, ((height, width), text) in enumerate(zip(SIZES, TEXTS, strict=True)):
        Image.fromarray(scene(height, width, index)).save(root / f"scene{index}.png")
        entries.append({"image": f"scene{index}.png", "question": text, "label": ANSWERS[index]})
    (root / "questions.json").write_text(json.dumps(entries))
    return root, root / "questions.json"


EXPECTED_KINDS = {
    "vilt": {"self"},
    "clip": {"text_self", "image_self"},
    "lxmert": {"text_self", "image_self", "cross_text_to_image", "cross_image_to_text"},
    "llava": {"self"},
}
QUERY_MODALITY = {"text_self": TEXT, "cross_text_to_image": TEXT, "image_self": IMAGE, "cross_image_to_text": IMAGE}


@pytest.mark.parametrize("family", FAMILIES)
def test_extraction_end_to_end_gives_a_valid_store(
    family: str, adapters: dict[str, ModelAdapter], inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    report = extract(adapters[family], read_sources(*inputs), store, batch_size=2, progress=False)
    assert report.written == 3 and not report.failures
    ds = open_dataset(store)
    validate(ds, source=str(store), check_values=True)
    ds = ds.load()
    assert set(ds.layer_kind.values.tolist()) == EXPECTED_KINDS[family]
    for index, (height, width) in enumerate(SIZES):
        example = ds.isel(example=index)
        np.testing.assert_array_equal(example.image.values[:height, :width], scene(height, width, index))
        n = int(example.seq_len)
        modality = example.modality.values[:n]
        assert {TEXT, IMAGE} <= set(modality.tolist())
        attention = example.attention.values[:, :, :n, :n]
        assert np.nanmin(attention) >= 0
        row_sum = np.nansum(attention, axis=-1)
        for layer, kind in enumerate(ds.layer_kind.values):
            rows = row_sum[layer, : int(ds.layer_heads[layer])]
            if kind == "self":
                np.testing.assert_allclose(rows, 1, atol=1e-3)
            else:
                own = modality == QUERY_MODALITY[kind]
                other = np.isin(modality, [TEXT, IMAGE]) & ~own
                np.testing.assert_allclose(rows[:, own], 1, atol=1e-3)
                np.testing.assert_array_equal(rows[:, other], 0)
        boxes = example.token_box.values[:n]
        image_boxes = boxes[modality == IMAGE]
        assert np.isfinite(image_boxes).all() and np.isnan(boxes[modality == TEXT]).all()
        assert (image_boxes[:, [0, 2]] <= width).all() and (image_boxes[:, [1, 3]] <= height).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_equals_single_runs(family: str, adapters: dict[str, ModelAdapter]) -> None:
    adapter = adapters[family]
    images = [scene(h, w, i) for i, (h, w) in enumerate(SIZES)]
    with torch.no_grad():
        batch = adapter.forward_batch(images, TEXTS)
        for image, text, together in zip(images, TEXTS, batch, strict=True):
            alone = adapter.forward(image, text)
            assert together.tokens == alone.tokens and together.modality == alone.modality
            np.testing.assert_array_equal(together.token_box, alone.token_box)
            torch.testing.assert_close(together.output, alone.output, atol=1e-5, rtol=1e-5)
            for a, b in zip(together.attentions, alone.attentions, strict=True):
                torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-5, rtol=1e-5)
            for a, b in zip(together.hidden_states, alone.hidden_states, strict=True):
                torch.testing.assert_close(a.states, b.states, atol=1e-4, rtol=1e-4, equal_nan=True)


def _single_bright_token(capture, stage: int = 0) -> int:
    """The one image token whose first hidden state differs from all the (identical) dark patches'."""
    states = capture.hidden_states[stage].states.detach().numpy()
    image_rows = [i for i, m in enumerate(capture.modality) if m == IMAGE]
    background = np.median(states[image_rows], axis=0)
    distinct = [
        i
        for i in image_rows
        if not np.allclose(states[i][np.isfinite(states[i])], background[np.isfinite(background)], atol=1e-5)
    ]
    assert len(distinct) == 1, f"expected one bright patch token, found {len(distinct)}"
    return distinct[0]


def _assert_box_covers_exactly(image: np.ndarray, box: np.ndarray) -> None:
    x0, y0, x1, y1 = box
    assert float(x0).is_integer() and float(y1).is_integer()
    inside = np.zeros(image.shape[:2], bool)
    inside[int(y0) : int(y1), int(x0) : int(x1)] = True
    bright = image.max(axis=2) > 0
    np.testing.assert_array_equal(inside, bright)


def test_vilt_token_box_of_a_bright_patch_through_resize_and_padding(tmp_path: Path) -> None:
    model, processor = tiny_vilt(tmp_path)
    with torch.no_grad():
        model.vilt.embeddings.position_embeddings.zero_()  # patch tokens then differ by their pixels only
    adapter = ViltAdapter(model, processor)
    # ViLT resizes the short side to 64 (the long one to at most 106) and floors both to multiples of 16:
    # 96 x 150 becomes 64 x 96 (x scale 1.5625, y scale 1.5), so patch (1, 3) is x 75..100, y 24..48.
    image = np.zeros((96, 150, 3), np.uint8)
    image[24:48, 75:100] = 255
    taller = scene(150, 96, 7)  # becomes 96 x 64: the first image is padded below in the batch
    with torch.no_grad():
        for capture in (adapter.forward(image, "what color"), adapter.forward_batch([image, taller], ["a", "b"])[0]):
            token = _single_bright_token(capture)
            np.testing.assert_array_equal(capture.patch_position[token], [1, 3])
            np.testing.assert_allclose(capture.token_box[token], [75, 24, 100, 48])
            _assert_box_covers_exactly(image, capture.token_box[token])


def test_clip_token_box_of_a_bright_patch_through_resize_and_crop(tmp_path: Path) -> None:
    model, processor = tiny_clip(tmp_path)
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.zero_()
    adapter = ClipAdapter(model, processor)
    # 64 x 96 resizes to 32 x 48, centre-cropped to 32 x 32 (8 pixels off each side, 16 in the image):
    # patch (1, 2) of the crop is x 48..64, y 16..32 of the image.
    image = np.zeros((64, 96, 3), np.uint8)
    image[16:32, 48:64] = 255
    with torch.no_grad():
        capture = adapter.forward(image, "a red square")
    token = _single_bright_token(capture)
    np.testing.assert_array_equal(capture.patch_position[token], [1, 2])
    _assert_box_covers_exactly(image, capture.token_box[token])
    # Patches left of the crop's edge start 16 pixels into the image.
    first_patch = capture.modality.index(IMAGE)
    np.testing.assert_allclose(capture.token_box[first_patch], [16, 0, 32, 16])


def _finite_difference_check(
    adapter: ModelAdapter,
    item: ModelInput,
    perturb: Callable[[int, int, int, int, float], object],
    layers: list[int],
    delta: float = 1e-6,
    rel: float = 1e-3,
) -> None:
    """Compare ``run(..., gradients=True)`` with central differences of the target's logit."""
    record, _ = adapter.run(item, gradients=True)
    labels = adapter.labels
    target = labels.index(record.relevancy_target)
    rng = np.random.default_rng(1)
    n = len(record.tokens)
    checked = 0
    for layer in layers:
        for _ in range(3):
            head, query, key = int(rng.integers(record.attention.shape[1])), int(rng.integers(n)), int(rng.integers(n))
            if record.attention[layer, head, query, key] == 0:  # masked (causal) entries are no free variables
                continue
            scores = []
            for sign in (1, -1):
                with perturb(layer, head, query, key, sign * delta), torch.no_grad():
                    scores.append(float(adapter.forward(item.image, item.text).output.double()[target]))
            estimate = (scores[0] - scores[1]) / (2 * delta)
            captured = record.attention_gradient[layer, head, query, key]
            assert captured == pytest.approx(estimate, rel=rel, abs=1e-6), (layer, head, query, key)
            checked += 1
    assert checked >= len(layers)


def test_vilt_attention_gradients_equal_finite_differences(tmp_path: Path) -> None:
    model, processor = tiny_vilt(tmp_path)
    adapter = ViltAdapter(model.double(), processor)
    item = ModelInput("g", scene(64, 96, 3), "what color is the square ?")

    class Perturb:
        def __init__(self, layer: int, head: int, query: int, key: int, delta: float) -> None:
            self.module = model.vilt.encoder.layer[layer].attention.attention.dropout
            self.where, self.delta = (0, head, query, key), delta

        def __enter__(self) -> None:
            def bump(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                output = output.clone()
                output[self.where] += self.delta
                return output

            self.handle = self.module.register_forward_hook(bump)

        def __exit__(self, *exc: object) -> None:
            self.handle.remove()

    _finite_difference_check(adapter, item, Perturb, [0, 1])


def test_llava_attention_gradients_equal_finite_differences(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = tiny_llava(tmp_path)
    adapter = LlavaAdapter(model.double(), processor)
    item = ModelInput("g", scene(40, 40, 2), "how many")
    language_layers = [layer.self_attn for layer in model.model.language_model.layers]
    record = AttentionTap.record

    class Perturb:
        """Adds ``delta`` to one probability of one language layer as the capturing attention records it."""

        def __init__(self, layer: int, head: int, query: int, key: int, delta: float) -> None:
            self.module, self.where, self.delta = language_layers[layer], (0, head, query, key), delta

        def __enter__(self) -> None:
            def bumped(tap: AttentionTap, probabilities: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
                if module is self.module:
                    probabilities = probabilities.clone()
                    probabilities[self.where] += self.delta
                return record(tap, probabilities, module)

            monkeypatch.setattr(AttentionTap, "record", bumped)

        def __exit__(self, *exc: object) -> None:
            monkeypatch.setattr(AttentionTap, "record", record)

    # Llama's RMSNorm computes in float32 even in a float64 model: its rounding (about 1e-7) needs a
    # large step, and the step's curvature error then needs a looser tolerance than ViLT's.
    _finite_difference_check(adapter, item, Perturb, [0, 1], delta=1e-2, rel=5e-2)


@pytest.mark.parametrize("family", ["vilt", "clip", "lxmert"])
def test_deleted_tokens_leave_the_others_embeddings_and_positions(
    family: str, adapters: dict[str, ModelAdapter]
) -> None:
    adapter = adapters[family]
    image, text = scene(64, 96, 5), "what color is the square ?"
    with torch.no_grad():
        full = adapter.forward(image, text)
        keep = np.ones(len(full.tokens), bool)
        keep[[2, full.modality.index(IMAGE) + 1]] = False  # one text token, one image token
        kept = adapter.forward(image, text, keep_tokens=keep)
    assert kept.tokens == [t for t, k in zip(full.tokens, keep, strict=True) if k]
    np.testing.assert_array_equal(kept.token_box, full.token_box[keep])
    # The first hidden stage holds the embeddings, positions included: unchanged for kept tokens.
    torch.testing.assert_close(
        kept.hidden_states[0].states, full.hidden_states[0].states[torch.as_tensor(keep)], equal_nan=True
    )
    assert not torch.allclose(kept.output, full.output)


def test_llava_deletion_is_causal(adapters: dict[str, ModelAdapter]) -> None:
    adapter = adapters["llava"]
    image, text = scene(40, 40, 4), "what color is the square ?"
    with torch.no_grad():
        full = adapter.forward(image, text)
        deleted = len(full.tokens) - 4
        keep = np.ones(len(full.tokens), bool)
        keep[deleted] = False
        kept = adapter.forward(image, text, keep_tokens=keep)
    last = kept.hidden_states[-1].states
    torch.testing.assert_close(last[:deleted], full.hidden_states[-1].states[:deleted])
    assert not torch.allclose(last[deleted:], full.hidden_states[-1].states[deleted + 1 :])


def test_load_adapter_specs(tmp_path: Path) -> None:
    checkpoint = save_tiny_vilt(tmp_path / "vilt")
    by_family = load_adapter(f"vilt:{checkpoint}")
    by_config = load_adapter(str(checkpoint), name="tiny")
    assert isinstance(by_family, ViltAdapter) and isinstance(by_config, ViltAdapter)
    assert by_config.name == "tiny" and by_family.name == str(checkpoint)
    halved = load_adapter(f"vilt:{checkpoint}", dtype="bfloat16")
    assert halved.model.dtype == torch.bfloat16
    record, _ = halved.run(ModelInput("bf16", scene(48, 64, 0), "what color"))
    assert np.isfinite(record.attention).all() and record.prediction in ANSWERS
    factory = load_adapter("py:tests.test_adapters_hf:_custom_adapter", directory=str(tmp_path / "custom"))
    assert isinstance(factory, LxmertAdapter)
    register_builtin("tiny_builtin", lambda **options: by_family)
    assert load_adapter("tiny_builtin") is by_family and load_adapter("builtin:tiny_builtin") is by_family
    for spec, message in [
        (str(tmp_path / "nowhere"), "cannot load the model configuration"),
        ("builtin:no_such_model", "unknown built-in model 'no_such_model'"),
        ("py:tests.hf_tiny:scene_does_not_exist", "has no 'scene_does_not_exist'"),
        ("py:tests.hf_tiny:scene", "not a ModelAdapter"),
        ("lxmert:" + str(checkpoint), "LXMERT"),
        (f"vilt:{checkpoint}?dtype", "use a torch dtype name"),
    ]:
        with pytest.raises(VLIError, match=message):
            if spec.endswith("?dtype"):
                load_adapter(spec.removesuffix("?dtype"), dtype="float33")
            else:
                load_adapter(spec, **({"height": 8, "width": 8, "seed": 0} if spec.endswith(":scene") else {}))


def _custom_adapter(directory: str) -> LxmertAdapter:
    """A ``py:`` factory, as a user would write one for a custom adapter."""
    model, tokenizer = tiny_lxmert(Path(directory))
    return LxmertAdapter(model, tokenizer, regions="tests.hf_tiny:grid_regions")


def _captured_and_returned(family: str, directory: Path, image: np.ndarray, text: str) -> tuple:
    """(captured maps, maps transformers returns, captured output, transformers' output) for one pair."""
    if family == "lxmert":
        model, tokenizer = tiny_lxmert(directory)
        features, boxes = grid_regions(image)
        reference = model(
            **tokenizer([text], return_tensors="pt"),
            visual_feats=torch.from_numpy(features)[None],
            visual_pos=torch.from_numpy(boxes)[None],
            output_attentions=True,
        )
        capture = LxmertAdapter(model, tokenizer, regions=grid_regions).forward(image, text)
        # transformers returns the language and relational layers and one direction of each cross layer.
        self_layers = model.config.l_layers + model.config.r_layers
        captured = capture.attentions[:self_layers] + capture.attentions[self_layers::4]
        assert {c.kind for c in captured[self_layers:]} == {"cross_text_to_image"}
        returned = reference.language_attentions + reference.vision_attentions + reference.cross_encoder_attentions
        return captured, returned, capture.output, reference.question_answering_score[0]
    model, processor = (tiny_clip if family == "clip" else tiny_llava)(directory)
    model.set_attn_implementation("eager")
    if family == "clip":
        reference = model(**processor(images=[image], text=[text], return_tensors="pt"), output_attentions=True)
        capture = ClipAdapter(model, processor).forward(image, text)
        returned = reference.text_model_output.attentions + reference.vision_model_output.attentions
        return capture.attentions, returned, capture.output, reference.logits_per_image[0, 0]
    prompt = f"USER: <image>\n{text} ASSISTANT:"
    reference = model(**processor(images=[image], text=[prompt], return_tensors="pt"), output_attentions=True)
    capture = LlavaAdapter(model, processor).forward(image, text)
    return capture.attentions, reference.attentions, capture.output, reference.logits[0, -1]


@pytest.mark.parametrize("family", ["clip", "llava", "lxmert"])
def test_captured_attention_equals_what_transformers_returns(family: str, tmp_path: Path) -> None:
    with torch.no_grad():
        captured, returned, output, reference_output = _captured_and_returned(
            family, tmp_path, scene(48, 64, 3), "what color is the square ?"
        )
    torch.testing.assert_close(output, reference_output)
    assert len(captured) == len(returned)
    for mine, theirs in zip(captured, returned, strict=True):
        torch.testing.assert_close(mine.probabilities, theirs[0])


def test_clip_scores_a_second_caption_as_its_own_forward_does(tmp_path: Path) -> None:
    """A caption contrast's second score, from the image embedding of the first pass, equals CLIP's score of that
    caption in a pass of its own; the contrast's target names both."""
    adapter = ClipAdapter(*tiny_clip(tmp_path))
    image = scene(64, 64, 3)
    with torch.no_grad():
        own = adapter.forward(image, "a red square")
        other = float(adapter.forward(image, "a blue circle at the top").output)
        both = own.score_captions(["a blue circle at the top", "a red square"])
        assert both.tolist() == pytest.approx([other, float(own.output)], rel=1e-5)  # padded in one batch
    run = adapter.run_model(ModelInput("e", image, "a red square"), target="predicted vs a blue circle at the top")
    assert run.target == "this caption vs a blue circle at the top"
