"""Generated answers: capture, relevancy of every generated token, SDPA recording, storage, bad input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import scene, tiny_llava, tiny_qwen2vl

from vlinterpret_panel.adapters import sdpa_recording
from vlinterpret_panel.adapters.base import ModelInput
from vlinterpret_panel.adapters.generative import (
    Generated,
    GenerationOptions,
    GenerativeAdapter,
    LayerCallback,
    Trace,
    capture_answer,
    check_generative,
)
from vlinterpret_panel.adapters.hf_common import CAPTURE_ATTENTION, register_capture_attention, tapping
from vlinterpret_panel.adapters.hf_generation import HFGenerativeAdapter
from vlinterpret_panel.adapters.hf_llava import LlavaAdapter
from vlinterpret_panel.adapters.hf_qwen2vl import Qwen2VLAdapter
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.relevancy.answer import ANSWER_METHODS, GRADIENT_METHODS, LayerAttention, causal_bias
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.registry import compute_relevancy
from vlinterpret_panel.relevancy.targets import Target, entry_name
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT, records_to_dataset, validate
from vlinterpret_panel.store import open_dataset, write_shard

# The hand-worked example: 3 context tokens, one layer, one head, scores all 0, so the causal
# attention is A = [[1,0,0],[1/2,1/2,0],[1/3,1/3,1/3]]; values V = (1, 2, 3); the generated
# token (position 3) is predicted by row 2 with logit = O[2] = A[2] . V, so dO[2] = 1 and
# dA[2, j] = V[j] = (1, 2, 3), other rows 0.
#   raw attention  A[2]                                   = (1/3, 1/3, [own] 0)
#   rollout        ((A + I) rows renormalised)[2]          = (1/6, 1/6, 0)
#   Grad-CAM       w = mean(dA over the 3x3 block) = 6/9;  (w A[2])+ = (2/9, 2/9, 0)
#   generic        (I + (dA * A)+)[2] = (1/3, 2/3, 1 + 1)  = (1/3, 2/3, 0)
HAND_WORKED = {
    "raw_attention": [1 / 3, 1 / 3, 0.0, 0.0],
    "rollout": [1 / 6, 1 / 6, 0.0, 0.0],
    "attention_gradcam": [2 / 9, 2 / 9, 0.0, 0.0],
    "generic": [1 / 3, 2 / 3, 0.0, 0.0],
}
# A second vocabulary token, "no", has the logit O'[2] = A[2] . W with W = (0, 1, 1): 2/3 < 2, so "yes" is
# generated and "no" is the runner-up. Explaining "no" alone, dA[2] = W = (0, 1, 1):
#   Grad-CAM  w = 2/9; (w A[2])+ = (2/27, 2/27, 0);   generic  (I + (dA * A)+)[2] = (0, 1/3, 0)
# Explaining "yes vs no" (predicted vs runner-up), dA[2] = V - W = (1, 1, 2):
#   Grad-CAM  w = 4/9; (w A[2])+ = (4/27, 4/27, 0);   generic  (I + (dA * A)+)[2] = (1/3, 1/3, 0)
HAND_WORKED_TARGETS = {
    "attention_gradcam [no]": [2 / 27, 2 / 27, 0.0, 0.0],
    "generic [no]": [0.0, 1 / 3, 0.0, 0.0],
    "attention_gradcam [predicted vs runner-up]": [4 / 27, 4 / 27, 0.0, 0.0],
    "generic [predicted vs runner-up]": [1 / 3, 1 / 3, 0.0, 0.0],
}
VOCABULARY = ("yes", "no")


class HandWorkedAdapter(GenerativeAdapter):
    """A one-layer, one-head 'model' whose attention and logit are the hand-worked example's."""

    name = "hand-worked"
    layer_names = ("layer.0",)
    num_heads = 1

    def __init__(self, first_token: str = "yes") -> None:
        self.first_token = first_token

    def token_id(self, token: str) -> int:
        if token not in VOCABULARY:
            raise VLIError(f"{token!r} is not in the vocabulary")
        return VOCABULARY.index(token)

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> object:
        raise NotImplementedError

    def generate(self, image: np.ndarray, text: str, *, max_new_tokens: int, top_k: int) -> Generated:
        return Generated(
            tokens=["<img>", "is", "it", self.first_token],
            modality=[IMAGE, TEXT, TEXT, SPECIAL if self.first_token == "</s>" else TEXT],
            token_box=np.array([[0, 0, 8, 8]] + [[np.nan] * 4] * 3, np.float32),
            answer_positions=np.array([3]),
            answer_ids=[0],
            probabilities=np.array([0.75]),
            alternatives=np.array([[self.first_token, "no"][:top_k]], dtype=object),
            alternative_probabilities=np.array([[0.75, 0.25][:top_k]]),
            text=self.first_token,
            inputs=None,
        )

    def trace(
        self, generated: Generated, on_layer: LayerCallback, *, rows: Sequence[int], all_hidden: bool = False
    ) -> Trace:
        zeros = torch.zeros(1, 4, 1)
        # Two value columns, V = (1, 2, 3, 4) and W = (0, 1, 1, 0): the logits of "yes" and "no".
        values = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [3.0, 1.0], [4.0, 0.0]]], requires_grad=torch.is_grad_enabled())
        attention = torch.softmax(causal_bias(4)[0], dim=-1)
        output = (attention @ values[0])[None]  # [1, T, 2]: O = A V, one head of two dimensions
        on_layer(0, LayerAttention(zeros, zeros, values.detach(), causal_bias(4), 1.0, output=output))
        logits = output[0, list(rows)].reshape(len(rows), 2)
        return Trace(
            logits=logits,
            hidden_states=np.zeros((2, len(rows), 1), np.float32),
            hidden_layer_name=["embeddings", "layer.0"],
        )


def _item(text: str = "what color is the square ?") -> ModelInput:
    return ModelInput("e0", scene(40, 48, 0), text, label="red")


def test_stored_relevancy_of_a_generated_token_equals_the_hand_worked_example(tmp_path: Path) -> None:
    record, info = capture_answer(HandWorkedAdapter(), _item(), GenerationOptions(methods=ANSWER_METHODS))
    for method, expected in HAND_WORKED.items():
        np.testing.assert_allclose(record.answer.relevancy[method][0], expected, atol=1e-6, err_msg=method)
    write_shard(records_to_dataset([record], info), tmp_path / "store")
    ds = open_dataset(tmp_path / "store")
    validate(ds, check_values=True)
    stored = ds["answer_relevancy"].sel(example="e0", step=0)
    for method, expected in HAND_WORKED.items():
        np.testing.assert_allclose(stored.sel(relevancy_method=method).values, expected, atol=1e-6, err_msg=method)
    np.testing.assert_allclose(
        ds["answer_attention"].isel(example=0, layer=0, head=0, step=0).values, [1 / 3] * 3 + [0], atol=1e-4
    )


def test_contrastive_and_chosen_targets_of_a_generated_token_equal_the_hand_worked_example(tmp_path: Path) -> None:
    options = GenerationOptions(methods=ANSWER_METHODS, targets=["no", "predicted vs runner-up"])
    record, info = capture_answer(HandWorkedAdapter(), _item(), options)
    relevancy = record.answer.relevancy
    assert sorted(relevancy) == sorted(["raw_attention", "rollout", *HAND_WORKED_TARGETS])
    for entry, expected in HAND_WORKED_TARGETS.items():
        np.testing.assert_allclose(relevancy[entry][0], expected, atol=1e-6, err_msg=entry)
    for method in ("raw_attention", "rollout"):  # read attention only: stored once, the same
        np.testing.assert_allclose(relevancy[method][0], HAND_WORKED[method], atol=1e-6)
    write_shard(records_to_dataset([record], info), tmp_path / "store")
    ds = open_dataset(tmp_path / "store")
    validate(ds, check_values=True)
    chosen = ds["answer_relevancy"].sel(example="e0", step=0, relevancy_method="generic [predicted vs runner-up]")
    np.testing.assert_allclose(chosen.values, HAND_WORKED_TARGETS["generic [predicted vs runner-up]"], atol=1e-6)


def test_a_target_against_the_generated_token_itself_explains_nothing() -> None:
    options = GenerationOptions(methods=["generic", "attention_gradcam"], targets=["yes vs predicted"])
    record, _ = capture_answer(HandWorkedAdapter(), _item(), options)
    assert not any(values.any() for values in record.answer.relevancy.values())


@pytest.mark.parametrize(
    ("targets", "methods", "message"),
    [
        (["label"], ["generic"], r"'label' explains an answer model's ground-truth answer"),
        (["predicted vs label"], ["generic"], r"'label' explains"),
        (["maybe"], ["generic"], r"'maybe' is not in the vocabulary"),
        (["predicted vs runner-up"], ["raw_attention"], r"needs a gradient method"),
    ],
)
def test_a_generation_target_it_cannot_explain_is_one_clear_error(
    targets: list[str], methods: list[str], message: str
) -> None:
    with pytest.raises(VLIError, match=message):
        capture_answer(HandWorkedAdapter(), _item(), GenerationOptions(methods=methods, targets=targets))


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> LlavaAdapter:
    return LlavaAdapter(*tiny_llava(tmp_path_factory.mktemp("llava")), name="tiny-llava")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Qwen2VLAdapter:
    return Qwen2VLAdapter(*tiny_qwen2vl(tmp_path_factory.mktemp("qwen")), name="tiny-qwen2-vl")


def _eager_full_sequence(adapter: HFGenerativeAdapter, generated: Generated) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every language-model layer's eager attention ``[H, T, T]`` (in the graph) and the logits ``[T, V]``."""
    encoded, sequence = generated.inputs
    added = sequence.shape[1] - encoded["input_ids"].shape[1]
    extra = {
        k: torch.cat([v, v.new_zeros(1, added)], 1) if v.shape == encoded["input_ids"].shape else v
        for k, v in encoded.items()
        if k not in ("input_ids", "attention_mask")
    }
    register_capture_attention()
    with sdpa_recording.attention_implementation(adapter.model, CAPTURE_ATTENTION), tapping() as tap:
        output = adapter.model(input_ids=sequence, use_cache=False, **extra)
    maps = [tap.calls[call][0] for call in tap.calls_of(adapter._layers)]
    return maps, output.logits[0]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_sdpa_recording_equals_eager_attention_and_the_model_ran_sdpa(
    family: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = request.getfixturevalue(family)
    calls = {"sdpa": 0}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args: object, **kwargs: object) -> torch.Tensor:
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    def no_eager(*args: object, **kwargs: object) -> None:
        raise AssertionError("the eager attention path ran")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    from vlinterpret_panel.adapters import hf_common

    monkeypatch.setattr(hf_common, "capture_attention_forward", no_eager)
    record, _ = capture_answer(adapter, _item(), GenerationOptions(max_new_tokens=6, rows="all", methods=[]))
    assert calls["sdpa"] >= 2 * len(adapter._layers)  # generation and the trace both ran SDPA
    monkeypatch.undo()
    generated = adapter.generate(_item().image, _item().text, max_new_tokens=6, top_k=5)
    assert [generated.tokens[p] for p in generated.answer_positions] == list(record.answer.tokens)
    with torch.no_grad():
        maps, _ = _eager_full_sequence(adapter, generated)
    eager = torch.stack([m.float() for m in maps]).numpy()
    np.testing.assert_allclose(record.attention, eager, atol=1e-5)
    rows = generated.answer_positions - 1
    np.testing.assert_allclose(record.answer.attention, eager[:, :, rows], atol=1e-5)


@pytest.mark.parametrize(("family", "target"), [("llava", "predicted"), ("qwen", "predicted vs runner-up")])
def test_answer_relevancy_equals_the_registered_methods_on_eager_maps(
    family: str, target: str, request: pytest.FixtureRequest
) -> None:
    """Recomputed maps and dA = dO V^T give what the registered methods give on eager maps and autograd dA,
    for the generated token's logit and for its contrast with the runner-up (from the eager logits)."""
    adapter = request.getfixturevalue(family)
    options = GenerationOptions(max_new_tokens=4, methods=ANSWER_METHODS, targets=[target])
    record, _ = capture_answer(adapter, _item(), options)
    generated = adapter.generate(_item().image, _item().text, max_new_tokens=4, top_k=5)
    maps, logits = _eager_full_sequence(adapter, generated)
    for step, (position, token) in enumerate(zip(generated.answer_positions, generated.answer_ids, strict=True)):
        row, size = int(position) - 1, int(position)
        explained = logits[row, token]
        if target != "predicted":
            ranked = [int(i) for i in torch.argsort(logits[row].detach(), descending=True)[:2]]
            explained = explained - logits[row, next(i for i in ranked if i != token)]
        gradients = torch.autograd.grad(explained, maps, retain_graph=True)
        captured = Captured(
            attention=torch.stack([m[:, :size, :size] for m in maps]).detach().double().numpy(),
            attention_gradient=torch.stack([g[:, :size, :size] for g in gradients]).double().numpy(),
            layer_kind=["self"] * len(maps),
            modality=generated.modality[:size],
            readout_tokens={"next_token": row},
        )
        for method in ANSWER_METHODS:
            expected = compute_relevancy(captured, method).values
            stored = record.answer.relevancy[
                entry_name(method, Target.parse(target)) if method in GRADIENT_METHODS else method
            ][step]
            np.testing.assert_allclose(stored[:size], expected, rtol=1e-4, atol=1e-6, err_msg=f"{method} step {step}")
            assert not stored[size:].any()


def test_hf_decoders_look_tokens_up_as_the_alternatives_name_them(llava: LlavaAdapter) -> None:
    generated = llava.generate(_item().image, _item().text, max_new_tokens=2, top_k=3)
    for step, token in enumerate(generated.answer_ids):
        assert llava.token_id(str(generated.alternatives[step][0])) == token
    with pytest.raises(VLIError, match=r"'square in the corner' is not one token of tiny-llava's vocabulary"):
        llava.token_id("square in the corner")


def test_layers_heads_and_rows_are_the_users_choice(llava: LlavaAdapter, tmp_path: Path) -> None:
    options = GenerationOptions(max_new_tokens=3, layers=[1], heads=[0, 2], methods=["raw_attention"])
    record, info = capture_answer(llava, _item(), options)
    assert record.attention is None and record.hidden_states is None
    assert record.answer.attention.shape == (1, 2, 3, len(record.tokens))
    full, _ = capture_answer(llava, _item(), GenerationOptions(max_new_tokens=3, methods=[]))
    np.testing.assert_allclose(record.answer.attention[0], full.answer.attention[1][[0, 2]], atol=1e-6)
    write_shard(records_to_dataset([record], info), tmp_path / "store")
    ds = open_dataset(tmp_path / "store")
    assert ds["layer"].values.tolist() == [1] and ds["head"].values.tolist() == [0, 2]
    assert "attention" not in ds and list(ds["relevancy_method"].values) == ["raw_attention"]
    assert ds["layer_name"].values.tolist() == ["model.language_model.layers.1.self_attn"]


def test_qwen2vl_image_tokens_follow_the_image_shape(qwen: Qwen2VLAdapter) -> None:
    wide = qwen.generate(scene(32, 96, 1), "what shape is it ?", max_new_tokens=1, top_k=1)
    tall = qwen.generate(scene(96, 32, 1), "what shape is it ?", max_new_tokens=1, top_k=1)
    grid = {
        name: np.asarray(g.patch_position)[np.asarray(g.modality) == IMAGE].max(axis=0) + 1
        for name, g in (("wide", wide), ("tall", tall))
    }
    assert grid["wide"][1] > grid["wide"][0] and grid["tall"][0] > grid["tall"][1]
    boxes = np.asarray(wide.token_box)[np.asarray(wide.modality) == IMAGE]
    assert boxes[:, 2].max() == pytest.approx(96) and boxes[:, 3].max() == pytest.approx(32)


def test_a_generation_that_stops_at_once_is_stored_as_generated(tmp_path: Path) -> None:
    record, info = capture_answer(HandWorkedAdapter(first_token="</s>"), _item())
    assert record.answer.tokens == ["</s>"] and record.prediction == "</s>"
    write_shard(records_to_dataset([record], info), tmp_path / "store")
    assert open_dataset(tmp_path / "store")["answer_token"].values.tolist() == [["</s>"]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (GenerationOptions(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (GenerationOptions(layers=[7]), "layers must be chosen among 0..1"),
        (GenerationOptions(heads=[9]), "heads must be chosen among 0..3"),
        (GenerationOptions(methods=["transformer_attribution"]), "cannot explain generated tokens"),
    ],
)
def test_bad_generation_options_are_one_clear_error(
    llava: LlavaAdapter, options: GenerationOptions, message: str
) -> None:
    with pytest.raises(VLIError, match=message):
        capture_answer(llava, _item(), options)


def test_a_prompt_longer_than_the_context_is_one_clear_error(llava: LlavaAdapter) -> None:
    with pytest.raises(VLIError, match=r"the prompt takes \d+ tokens .* the model's context holds 128"):
        llava.generate(_item().image, "is " * 200, max_new_tokens=4, top_k=1)


def test_an_image_the_processor_rejects_is_one_clear_error(qwen: Qwen2VLAdapter) -> None:
    with pytest.raises(VLIError, match="image"):
        qwen.generate(np.zeros((2, 600, 3), np.uint8), "is it red ?", max_new_tokens=2, top_k=1)  # aspect > 200


def test_generate_with_an_adapter_that_cannot_generate_is_one_clear_error(tmp_path: Path) -> None:
    from vlinterpret_panel.adapters.builtin import BuiltinAdapter

    with pytest.raises(VLIError, match="single_stream cannot generate"):
        check_generative(BuiltinAdapter("single_stream"))
    with pytest.raises(VLIError, match="cannot generate"):
        extract("single_stream", scene_sources(2), tmp_path / "store", generation=GenerationOptions(), progress=False)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*.nc"))


def test_a_failing_example_leaves_the_others_stored_and_nothing_half_written(
    llava: LlavaAdapter, tmp_path: Path
) -> None:
    from vlinterpret_panel.extract import ExampleSource

    good = tmp_path / "good.png"
    from PIL import Image

    Image.fromarray(scene(40, 48, 3)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    sources = [
        ExampleSource("ok", text="what color is it ?", image_path=str(good)),
        ExampleSource("too-long", text="is " * 200, image_path=str(good)),
        ExampleSource("broken", text="what color is it ?", image_path=str(tmp_path / "broken.png")),
    ]
    report = extract(llava, sources, tmp_path / "store", generation=GenerationOptions(max_new_tokens=3), progress=False)
    assert report.written == 1 and sorted(f.example_id for f in report.failures) == ["broken", "too-long"]
    assert not list((tmp_path / "store").glob("*.partial"))
    ds = open_dataset(tmp_path / "store")
    validate(ds, check_values=True)
    assert ds["example"].values.tolist() == ["ok"]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_recording_during_generation_equals_a_second_pass(
    family: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention-only methods record each KV-cached call's last row; a full second pass gives the same."""
    adapter = request.getfixturevalue(family)
    options = GenerationOptions(max_new_tokens=5, methods=["raw_attention", "rollout"])
    calls = {"trace": 0}
    real_trace = adapter.trace

    def counted_trace(*args: object, **kwargs: object) -> Trace:
        calls["trace"] += 1
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(adapter, "trace", counted_trace)
    recorded, _ = capture_answer(adapter, _item(), options)
    assert calls["trace"] == 0
    monkeypatch.setattr(adapter, "generate_recorded", lambda *args, **kwargs: None)
    traced, _ = capture_answer(adapter, _item(), options)
    assert calls["trace"] == 1
    assert recorded.answer.tokens == traced.answer.tokens
    np.testing.assert_allclose(recorded.answer.attention, traced.answer.attention, atol=1e-5)
    np.testing.assert_allclose(recorded.answer.hidden_states, traced.answer.hidden_states, atol=1e-4)
    for method in ("raw_attention", "rollout"):
        np.testing.assert_allclose(recorded.answer.relevancy[method], traced.answer.relevancy[method], atol=1e-5)


@pytest.fixture(scope="module")
def random_generative_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in generative model's architecture with seeded random weights (tests never need the trained ones)."""
    from vlinterpret_panel.models.generative import GenerativeConfig, GenerativeModel
    from vlinterpret_panel.models.registry import save_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("generative-weights")
    save_model(GenerativeModel(GenerativeConfig()), directory)
    return directory


def test_builtin_generative_trace_recomputes_the_models_own_attention(random_generative_weights: Path) -> None:
    from vlinterpret_panel.adapters.builtin_generative import BuiltinGenerativeAdapter

    adapter = BuiltinGenerativeAdapter(weights_dir=random_generative_weights)
    generated = adapter.generate(scene(64, 64, 2), "describe the scene", max_new_tokens=6, top_k=3)
    recorded: list[np.ndarray] = []
    with torch.no_grad():
        trace = adapter.trace(
            generated, lambda _, attention: recorded.append(attention.probabilities().numpy()), rows=[0]
        )
        pixels, text_ids = generated.inputs
        ids = torch.tensor([text_ids])
        own = adapter.model(pixels, ids, torch.ones_like(ids, dtype=torch.bool)).attentions
    np.testing.assert_allclose(np.stack(recorded), torch.stack([a[0] for a in own]).numpy(), atol=1e-6)
    assert trace.logits.shape == (1, adapter.model.config.vocab_size)


def test_deletion_keeping_every_patch_scores_the_generated_probability(random_generative_weights: Path) -> None:
    from vlinterpret_panel.adapters.builtin_generative import BuiltinGenerativeAdapter

    adapter = BuiltinGenerativeAdapter(weights_dir=random_generative_weights)
    record, _ = capture_answer(
        adapter, ModelInput("e", scene(64, 64, 4), "describe the scene"), GenerationOptions(max_new_tokens=5)
    )
    every = np.arange(16)
    scored = adapter.deletion_probabilities(record, [(step, every) for step in range(5)])
    np.testing.assert_allclose(scored, record.answer.probabilities, rtol=1e-5)
    fewer = adapter.deletion_probabilities(record, [(step, every[::2]) for step in range(5)])
    assert not np.allclose(fewer, scored)


def test_extract_generate_on_the_builtin_model_validates(random_generative_weights: Path, tmp_path: Path) -> None:
    from vlinterpret_panel.cli import main

    store = tmp_path / "store"
    code = main(
        [
            "extract", "generative", str(store), "--scenes", "3", "--scene-text", "describe", "--generate",
            "--max-new-tokens", "6", "--relevancy", "all", "--option", f"weights_dir={random_generative_weights}",
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    assert main(["validate", str(store)]) == 0
    ds = open_dataset(store)
    assert sorted(ds["relevancy_method"].values) == sorted(ANSWER_METHODS)
    assert ds.sizes["step"] <= 6 and "answer_target_mask" in ds and "attention" not in ds


def test_extract_generate_with_a_contrastive_target_stores_its_entries(
    random_generative_weights: Path, tmp_path: Path
) -> None:
    from vlinterpret_panel.cli import main

    store = tmp_path / "store"
    common = ["--scenes", "2", "--generate", "--max-new-tokens", "4", "--quiet"]
    common += ["--option", f"weights_dir={random_generative_weights}"]
    code = main(
        ["extract", "generative", str(store), "--relevancy", "rollout,generic", *common,
         "--target", "predicted", "--target", "predicted vs runner-up", "--target", "red vs blue"]
    )  # fmt: skip
    assert code == 0 and main(["validate", str(store)]) == 0
    ds = open_dataset(store)
    expected = ["rollout", "generic", "generic [predicted vs runner-up]", "generic [red vs blue]"]
    assert sorted(ds["relevancy_method"].values) == sorted(expected)
    contrast = ds["answer_relevancy"].sel(relevancy_method="generic [predicted vs runner-up]").values
    assert np.isfinite(contrast).any() and not np.allclose(
        contrast, ds["answer_relevancy"].sel(relevancy_method="generic").values, equal_nan=True
    )
    assert main(["extract", "generative", str(tmp_path / "bad"), *common, "--target", "label"]) == 2


def test_views_and_statistics_that_need_full_maps_say_so(tmp_path: Path) -> None:
    from vlinterpret_panel.ui.app import build_app
    from vlinterpret_panel.ui.dashboard import AnswerDashboard

    record, info = capture_answer(HandWorkedAdapter(), _item())
    write_shard(records_to_dataset([record], info), tmp_path / "store")
    ds = open_dataset(tmp_path / "store")
    with pytest.raises(VLIError, match=r"head statistics needs the full attention maps.*--rows all"):
        ds.vli.head_summary("text_to_image")
    with pytest.raises(VLIError, match=r"an attention map needs the full attention maps.*--rows all"):
        ds.vli.attention_map(0, 0)
    page = build_app(tmp_path / "store")  # the answer view alone, which reads the answer rows
    assert "--rows all" in AnswerDashboard(ds).summary() and page.main


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_extract_generate_on_tiny_hf_decoders_validates(family: str, tmp_path: Path) -> None:
    import json

    from PIL import Image

    from vlinterpret_panel.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for index, (height, width) in enumerate([(40, 48), (64, 32)]):
        Image.fromarray(scene(height, width, index)).save(images / f"img{index}.png")
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps([{"image": f"img{i}.png", "text": "what color is the square ?"} for i in range(2)]))
    store = tmp_path / "store"
    spec = "py:hf_tiny:tiny_decoder_adapter"
    common = ["--option", f"family={family}", "--option", f"directory={tmp_path / 'model'}", "--quiet"]
    code = main(["extract", spec, str(store), "--images", str(images), "--texts", str(texts), "--generate", *common])
    assert code == 0
    assert main(["validate", str(store)]) == 0
    ds = open_dataset(store)
    assert (
        ds.sizes["example"] == 2
        and ds.sizes["step"] == 32
        and sorted(ds.relevancy_method.values) == ["raw_attention", "rollout"]
    )


def test_max_new_tokens_zero_from_the_command_line_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from vlinterpret_panel.cli import main

    spec = "py:hf_tiny:tiny_decoder_adapter"
    options = ["--option", "family=llava", "--option", f"directory={tmp_path}", "--quiet"]
    code = main(
        ["extract", spec, str(tmp_path / "s"), "--scenes", "1", "--generate", "--max-new-tokens", "0", *options]
    )
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["vlinterpret extract: error: max_new_tokens must be at least 1, not 0"]
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())
