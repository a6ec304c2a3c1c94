"""Chosen and contrastive targets: parsing, resolution, a hand-worked two-class map, storage in a store."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlinterpret_panel import open_dataset
from vlinterpret_panel.adapters import AttentionCapture, ForwardCapture, HiddenCapture, ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import ExampleSource, extract
from vlinterpret_panel.relevancy import compute_relevancy
from vlinterpret_panel.relevancy.capture import capture_for
from vlinterpret_panel.relevancy.targets import Target, entry_name, split_entry, step_title
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT

# The hand-worked model: three tokens [CLS, word, patch], one self-attention head whose row of the
# [CLS] query is ATTENTION_ROW, and two answers whose logits read that row: logit_c = Σ_k w_ck · A[0, k].
ATTENTION_ROW = [0.2, 0.5, 0.3]
WEIGHTS = {"yes": [0.0, 2.0, 1.0], "no": [0.0, 2.5, -1.0]}  # logits: yes 1.3, no 0.95 -> "yes" is predicted


class HandWorkedAdapter(ModelAdapter):
    """One attention map and a linear read-out of its first row: every gradient is a weight."""

    name = "hand_worked"

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        rows = torch.tensor([ATTENTION_ROW, [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64)
        attention = rows[None].clone().requires_grad_(torch.is_grad_enabled())  # [head, query, key]
        logits = torch.stack(
            [attention[0, 0] @ torch.tensor(weights, dtype=torch.float64) for weights in WEIGHTS.values()]
        )
        return ForwardCapture(
            tokens=["[CLS]", "red", "patch"],
            modality=[SPECIAL, TEXT, IMAGE],
            token_box=np.array([[np.nan] * 4, [np.nan] * 4, [0, 0, 8, 8]], dtype=np.float32),
            attentions=[AttentionCapture("layer", "self", attention, [0, 1, 2], [0, 1, 2])],
            hidden_states=[HiddenCapture("embeddings", torch.zeros(3, 2), [0, 1, 2])],
            output=logits,
            output_labels=list(WEIGHTS),
            readout_tokens={"answer": 0},
        )


def _image_file(tmp_path: pathlib.Path) -> str:
    """A black 8x8 PNG: the hand-worked model ignores the image."""
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return str(image)


def _hand_store(tmp_path: pathlib.Path, relevancy: list[str], targets: list[str]) -> pathlib.Path:
    """A store of the one labelled hand-worked example, extracted with ``relevancy`` for ``targets``."""
    store = tmp_path / "store"
    sources = [ExampleSource("hand", "red", _image_file(tmp_path), label="no")]
    extract(HandWorkedAdapter(), sources, store, relevancy=relevancy, targets=targets, progress=False)
    return store


def _item(label: str | None = "no") -> ModelInput:
    return ModelInput("hand", np.zeros((8, 8, 3), np.uint8), "red", label=label)


@pytest.mark.parametrize(
    ("spec", "parsed", "written"),
    [
        (None, Target(), "predicted"),
        ("label", Target("label"), "label"),
        (3, Target("3"), "3"),
        ("red vs  blue", Target("red", "blue"), "red vs blue"),
        ("predicted vs runner-up", Target("predicted", "runner-up"), "predicted vs runner-up"),
    ],
)
def test_targets_are_read_and_written_the_same_way(spec: object, parsed: Target, written: str) -> None:
    assert Target.parse(spec) == parsed  # type: ignore[arg-type]
    assert str(parsed) == written
    assert Target.parse(written) == parsed


@pytest.mark.parametrize("spec", ["runner-up vs red", "red vs red", "a vs b vs c", " vs blue"])
def test_a_target_that_explains_nothing_is_refused(spec: str) -> None:
    with pytest.raises(VLIError, match="target"):
        Target.parse(spec)


def test_targets_resolve_to_output_indices() -> None:
    logits, labels = np.array([0.5, 3.0, 2.0]), ["red", "blue", "green"]
    assert Target().resolve(logits, labels) == (1, None)
    assert Target("predicted", "runner-up").resolve(logits, labels) == (1, 2)
    assert Target("red", "runner-up").resolve(logits, labels) == (0, 1)  # the best answer other than red
    assert Target("runner-up").resolve(logits, labels) == (2, None)  # the best answer other than the prediction
    assert Target("label", "predicted").resolve(logits, labels, label="green") == (2, 1)
    assert Target("2").resolve(logits, labels) == (2, None)
    with pytest.raises(VLIError, match="no ground-truth label"):
        Target("label").resolve(logits, labels)
    with pytest.raises(VLIError, match="both sides are 'blue'"):
        Target("blue", "predicted").resolve(logits, labels)
    with pytest.raises(VLIError, match="outside the model's 3 outputs"):
        Target("7").resolve(logits, labels)


def test_store_entries_name_method_and_target() -> None:
    assert entry_name("generic", Target()) == "generic"
    assert entry_name("generic", Target.parse("predicted vs runner-up")) == "generic [predicted vs runner-up]"
    assert split_entry("generic [red vs blue]") == ("generic", Target("red", "blue"))
    assert split_entry("rollout") == ("rollout", Target())


def test_the_contrast_explains_why_one_answer_and_not_the_other_as_worked_by_hand() -> None:
    """Generic relevancy of the [CLS] row is (∇A ⊙ A)⁺ there: for one answer w_c ⊙ A[0], for a contrast
    (w_A - w_B) ⊙ A[0]. "yes" alone: the word 2·0.5 = 1.0, the patch 1·0.3 = 0.3, the word wins.
    "yes vs no": the word (2 - 2.5)·0.5 = -0.25 -> 0, the patch (1 + 1)·0.3 = 0.6: the patch is why "yes"
    and not "no", though the word carries both answers' logits."""
    adapter = HandWorkedAdapter()
    maps = {}
    for spec in ("predicted", "predicted vs runner-up", "label", "no vs yes"):
        captured, record, _ = capture_for(adapter, _item(), ["generic"], target=spec)
        maps[spec] = (compute_relevancy(captured, "generic").values, record.relevancy_target)
    np.testing.assert_allclose(maps["predicted"][0], [0.0, 1.0, 0.3])
    np.testing.assert_allclose(maps["predicted vs runner-up"][0], [0.0, 0.0, 0.6])
    np.testing.assert_allclose(maps["label"][0], [0.0, 1.25, 0.0])  # "no": the word 2.5·0.5; the patch -0.3 -> 0
    np.testing.assert_allclose(maps["no vs yes"][0], [0.0, 0.25, 0.0])
    assert [target for _, target in maps.values()] == ["yes", "yes vs no", "no", "no vs yes"]
    gradcam, _, _ = capture_for(adapter, _item(), ["attention_gradcam"], target="predicted vs runner-up")
    # Grad-CAM: the head's mean gradient over its block, (0 + -0.5 + 2) / 9, times the attention row.
    np.testing.assert_allclose(
        compute_relevancy(gradcam, "attention_gradcam").values, [0.0, 1.5 / 9 * 0.5, 1.5 / 9 * 0.3]
    )


def test_several_targets_live_in_one_store_and_old_entries_keep_their_names(tmp_path: pathlib.Path) -> None:
    adapter = HandWorkedAdapter()
    image = _image_file(tmp_path)
    sources = [ExampleSource("hand", "red", image, label="no"), ExampleSource("unlabelled", "red", image)]
    store = tmp_path / "store"
    report = extract(
        adapter,
        sources[:1],
        store,
        relevancy=["generic", "raw_attention"],
        targets=["predicted", "predicted vs runner-up", "label"],
        progress=False,
    )
    assert report.written == 1 and not report.failures
    ds = open_dataset(store)
    expected = ["generic", "generic [label]", "generic [predicted vs runner-up]", "raw_attention"]  # sorted
    assert ds.vli.relevancy_methods == expected
    assert (
        ds.attrs["extraction"]
        and '"targets": ["predicted", "predicted vs runner-up", "label"]' in ds.attrs["extraction"]
    )
    contrast = ds["relevancy"].sel(relevancy_method="generic [predicted vs runner-up]").isel(example=0)
    np.testing.assert_allclose(contrast.values[:3], [0.0, 0.0, 0.6], rtol=1e-6)
    explained = ds["relevancy_target"].isel(example=0).to_series().to_dict()
    assert explained == {
        "generic": "yes",
        "raw_attention": "yes",
        "generic [predicted vs runner-up]": "yes vs no",
        "generic [label]": "no",
    }
    assert ds.vli.relevancy("hand", "generic [label]").attrs["target"] == "no"
    # An example without a label cannot explain the label: it fails alone, with the reason.
    failed = extract(
        adapter, sources[1:], store, relevancy=["generic", "raw_attention"],
        targets=["predicted", "predicted vs runner-up", "label"], progress=False,
    )  # fmt: skip
    assert [f.error for f in failed.failures] == ["VLIError: target 'label': this example has no ground-truth label"]


def test_a_target_needs_a_method_that_explains_one(tmp_path: pathlib.Path) -> None:
    with pytest.raises(VLIError, match="needs a gradient or LRP relevancy method"):
        extract(HandWorkedAdapter(), [], tmp_path, relevancy=["raw_attention"], targets=["label"], progress=False)


def test_cli_extract_stores_the_targets_asked_for(tmp_path: pathlib.Path) -> None:
    from vlinterpret_panel.cli import main

    store = tmp_path / "store"
    arguments = ["extract", "single_stream", str(store), "--scenes", "2", "--relevancy", "generic,rollout", "--quiet"]
    assert main([*arguments, "--target", "predicted", "--target", "predicted vs runner-up"]) == 0
    ds = open_dataset(store)
    assert ds.vli.relevancy_methods == ["generic", "generic [predicted vs runner-up]", "rollout"]
    explained = ds["relevancy_target"].sel(relevancy_method="generic [predicted vs runner-up]").values
    predicted = ds["prediction"].values
    assert all(str(text).startswith(f"{answer} vs ") for text, answer in zip(explained, predicted, strict=True))


def test_a_picked_answer_is_read_when_stored_computed_with_a_model_else_refused(tmp_path: pathlib.Path) -> None:
    from vlinterpret_panel.relevancy.chosen import COMPUTED, STORED, ChosenRelevancyReader, answer_choices

    adapter = HandWorkedAdapter()
    ds = open_dataset(_hand_store(tmp_path, ["generic"], ["predicted vs runner-up"]))
    choices = answer_choices(ds, "hand")
    assert [name for name, _ in choices] == ["yes", "no"]
    np.testing.assert_allclose([p for _, p in choices], [1 / (1 + np.exp(-0.35)), 1 / (1 + np.exp(0.35))], rtol=1e-6)
    stored = ChosenRelevancyReader().relevancy(ds, "hand", "generic", "yes", "no")
    assert (stored.source, stored.target) == (STORED, "yes vs no")
    np.testing.assert_allclose(stored.values[:3], [0.0, 0.0, 0.6], rtol=1e-3)  # float16 in the store
    with pytest.raises(VLIError, match="serve it with --model"):
        ChosenRelevancyReader().relevancy(ds, "hand", "generic", "no")
    computed = ChosenRelevancyReader(adapter).relevancy(ds, "hand", "generic", "no")
    assert (computed.source, computed.target) == (COMPUTED, "no")
    np.testing.assert_allclose(computed.values, [0.0, 1.25, 0.0])


def test_an_example_added_live_gets_the_stores_targets(tmp_path: pathlib.Path) -> None:
    from vlinterpret_panel.live import LiveModel
    from vlinterpret_panel.relevancy.targets import methods_and_targets

    adapter = HandWorkedAdapter()
    targets = ["predicted", "predicted vs runner-up"]
    store = _hand_store(tmp_path, ["generic", "rollout"], targets)
    entries = open_dataset(store).vli.relevancy_methods
    assert methods_and_targets(entries) == (["generic", "rollout"], targets)
    assert methods_and_targets(["generic", "rollout"]) == (["generic", "rollout"], [])
    added = LiveModel("hand_worked", adapter).add_example(store, np.zeros((8, 8, 3), np.uint8), "red")
    ds = open_dataset(store)
    assert ds.sizes["example"] == 2 and ds.vli.relevancy_methods == entries
    assert ds.vli.relevancy(added.example_id, "generic [predicted vs runner-up]").attrs["target"] == "yes vs no"


@pytest.mark.parametrize(
    ("entry", "title"),
    [
        ("generic", "'blue': generic"),
        ("generic [predicted vs runner-up]", "'blue' vs 'green': generic"),
        ("attention_gradcam [red vs predicted]", "'red' vs 'blue': attention_gradcam"),
        ("generic [blue vs runner-up]", "'blue' vs 'green': generic"),
        ("generic [green vs runner-up]", "'green' vs 'blue': generic"),
        ("generic [7]", "7: generic"),
    ],
)
def test_a_generated_tokens_entry_is_titled_by_the_tokens_it_explains_at_that_step(entry: str, title: str) -> None:
    assert step_title(entry, "blue", ["blue", "green", "yellow"]) == title


def test_a_generated_answers_target_resolves_at_every_step_over_the_vocabulary() -> None:
    logits = np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    vocabulary = ["a", "b", "c"]
    generated = [1, 0]
    assert Target.parse("predicted vs runner-up").resolve_steps(logits, generated, vocabulary.index) == (
        [1, 0],
        [2, 2],
    )
    assert Target.parse("c vs predicted").resolve_steps(logits, generated, vocabulary.index) == ([2, 2], [1, 0])
    assert Target.parse("a vs runner-up").resolve_steps(logits, generated, vocabulary.index) == ([0, 0], [1, 2])
    assert Target.parse("predicted").resolve_steps(logits, generated, vocabulary.index) == ([1, 0], None)
    # Alone, the runner-up is the most probable token other than the generated one (not the generated one).
    assert Target.parse("runner-up").resolve_steps(logits, generated, vocabulary.index) == ([2, 2], None)
    with pytest.raises(VLIError, match="outside the model's vocabulary of 3"):
        Target.parse("9").resolve_steps(logits, generated, vocabulary.index)
    with pytest.raises(VLIError, match="'label' explains"):
        Target.parse("label").resolve_steps(logits, generated, vocabulary.index)


DISTRACTOR = "a green square and a yellow triangle and a blue circle"


def _caption_item() -> ModelInput:
    from vlinterpret_panel.relevancy.evaluate import world_examples

    return world_examples(10, captions=True)[0].item


def test_a_caption_contrast_differentiates_this_captions_score_minus_the_others(builtin_adapters: dict) -> None:
    """Gradients of s(image, this) - s(image, other) at the image tower's maps equal those of two separate runs'
    scores subtracted; at the text tower's maps (this caption's own), they are this caption's alone."""
    adapter = builtin_adapters["dual_encoder"]
    item = _caption_item()
    contrast = adapter.run_model(item, target=f"predicted vs {DISTRACTOR}", gradients=True)
    own = adapter.run_model(item, gradients=True)
    other = adapter.run_model(ModelInput("other", item.image, DISTRACTOR), gradients=True)
    assert contrast.target == f"this caption vs {DISTRACTOR}"
    with torch.no_grad():
        other_score = float(adapter.forward(item.image, DISTRACTOR).output.reshape(-1)[0])
        scores = adapter.forward(item.image, item.text).score_captions([DISTRACTOR, item.text])
        assert scores.tolist() == pytest.approx([other_score, float(contrast.score)], rel=1e-5)
    kinds = [a.kind for a in contrast.capture.attentions]
    image_stream = 1 + 16  # the image [CLS] and 16 patches come last in both layouts
    block = slice(-image_stream, None)
    for layer, kind in enumerate(kinds):
        if kind == "image_self":
            expected = own.attention_gradient[layer][:, block, block] - other.attention_gradient[layer][:, block, block]
            np.testing.assert_allclose(
                contrast.attention_gradient[layer][:, block, block], expected, rtol=1e-5, atol=1e-5
            )
        else:
            np.testing.assert_allclose(
                contrast.attention_gradient[layer], own.attention_gradient[layer], rtol=1e-5, atol=1e-5
            )
    assert "image_self" in kinds and "text_self" in kinds


@pytest.mark.parametrize(
    ("target", "methods", "message"),
    [
        ("predicted vs runner-up", ["generic"], r"explains its caption's score, or the score against another caption"),
        ("red vs blue", ["generic"], r"explains its caption's score"),
        (f"predicted vs {DISTRACTOR}", ["attnlrp"], r"LRP and AttnLRP explain this caption's score only"),
    ],
)
def test_a_similarity_target_it_cannot_explain_is_one_clear_error(
    builtin_adapters: dict, target: str, methods: list[str], message: str
) -> None:
    with pytest.raises(VLIError, match=message):
        capture_for(builtin_adapters["dual_encoder"], _caption_item(), methods, target=target)


def test_cli_extract_stores_a_caption_contrast(tmp_path: pathlib.Path) -> None:
    from vlinterpret_panel.cli import main

    store = tmp_path / "store"
    arguments = ["extract", "dual_encoder", str(store), "--scenes", "2", "--scene-text", "caption", "--quiet"]
    target = f"predicted vs {DISTRACTOR}"
    assert main([*arguments, "--relevancy", "generic", "--target", "predicted", "--target", target]) == 0
    ds = open_dataset(store)
    entry = f"generic [{target}]"
    assert ds.vli.relevancy_methods == ["generic", entry]
    assert set(ds["relevancy_target"].sel(relevancy_method=entry).values) == {f"this caption vs {DISTRACTOR}"}
    assert not np.allclose(
        ds["relevancy"].sel(relevancy_method=entry).values, ds["relevancy"].sel(relevancy_method="generic").values
    )
