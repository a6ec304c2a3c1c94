"""The adapter protocol (``adapters/base.py``) on a tiny pure-torch model whose every number is known.

The model has two streams: a text self-attention layer, an image self-attention layer and a
cross layer (text queries on image keys), with different head counts, so one run exercises
the placement of every block in the schema frame, head padding, targets, and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlinterpret_panel.adapters import AttentionCapture, ForwardCapture, HiddenCapture, ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT, records_to_dataset, validate

LABELS = ["yes", "no", "red"]
N_TEXT, N_IMAGE, WIDTH = 3, 4, 8


class TinyTwoStream(torch.nn.Module):
    """Text self-attention (2 heads), image self-attention (1 head), text-to-image cross-attention (2 heads)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)

        def weight(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.5)

        self.text_embedding = weight(32, WIDTH)
        self.image_projection = weight(3, WIDTH)
        self.heads = {"text": 2, "image": 1, "cross": 2}
        self.query = torch.nn.ParameterDict({k: weight(h, WIDTH, WIDTH) for k, h in self.heads.items()})
        self.key = torch.nn.ParameterDict({k: weight(h, WIDTH, WIDTH) for k, h in self.heads.items()})
        self.value = torch.nn.ParameterDict({k: weight(h, WIDTH, WIDTH) for k, h in self.heads.items()})
        self.classifier = weight(WIDTH, len(LABELS))
        self.perturbation: tuple[str, int, int, int, float] | None = None  # (module, head, query, key, delta)

    def attend(self, name: str, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.einsum("td,hde->hte", queries, self.query[name])
        k = torch.einsum("td,hde->hte", keys, self.key[name])
        v = torch.einsum("td,hde->hte", keys, self.value[name])
        probabilities = torch.softmax(q @ k.transpose(1, 2) / WIDTH**0.5, dim=-1)
        if self.perturbation is not None and self.perturbation[0] == name:
            _, head, query, key, delta = self.perturbation
            bump = torch.zeros_like(probabilities)
            bump[head, query, key] = delta
            probabilities = probabilities + bump
        return probabilities, queries + torch.tanh((probabilities @ v).sum(0))

    def forward(self, image: np.ndarray, text: str) -> dict[str, torch.Tensor]:
        ids = torch.tensor([ord(c) % 32 for c in text[: N_TEXT - 1]] + [0] * (N_TEXT - 1 - len(text[: N_TEXT - 1])))
        text_states = torch.cat([self.text_embedding[:1], self.text_embedding[ids]])  # a [CLS]-like first token
        quadrants = [
            image[: image.shape[0] // 2, : image.shape[1] // 2],
            image[: image.shape[0] // 2, image.shape[1] // 2 :],
        ]
        quadrants += [
            image[image.shape[0] // 2 :, : image.shape[1] // 2],
            image[image.shape[0] // 2 :, image.shape[1] // 2 :],
        ]
        colours = torch.tensor(np.array([q.reshape(-1, 3).mean(0) / 255 for q in quadrants]), dtype=torch.float64)
        image_states = colours @ self.image_projection
        embedded = (text_states, image_states)
        text_map, text_states = self.attend("text", text_states, text_states)
        image_map, image_states = self.attend("image", image_states, image_states)
        cross_map, text_states = self.attend("cross", text_states, image_states)
        logits = text_states[0] @ self.classifier
        return {
            "maps": (text_map, image_map, cross_map),
            "embedded": embedded,
            "text": text_states,
            "image": image_states,
            "logits": logits,
        }


class TinyAdapter(ModelAdapter):
    """The whole model-specific part of an adapter: one ``forward``."""

    name = "tiny-two-stream"

    def __init__(self) -> None:
        self.model = TinyTwoStream()

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        out = self.model(image, text)
        text_at, image_at = range(N_TEXT), range(N_TEXT, N_TEXT + N_IMAGE)
        height, width = image.shape[:2]
        boxes = np.full((N_TEXT + N_IMAGE, 4), np.nan, np.float32)
        for i, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            boxes[N_TEXT + i] = [col * width / 2, row * height / 2, (col + 1) * width / 2, (row + 1) * height / 2]
        text_map, image_map, cross_map = out["maps"]
        return ForwardCapture(
            tokens=["[CLS]", "t1", "t2", "p0", "p1", "p2", "p3"],
            modality=[SPECIAL, TEXT, TEXT] + [IMAGE] * N_IMAGE,
            token_box=boxes,
            attentions=[
                AttentionCapture("text", "text_self", text_map, text_at, text_at),
                AttentionCapture("image", "image_self", image_map, image_at, image_at),
                AttentionCapture("cross", "cross_text_to_image", cross_map, text_at, image_at),
            ],
            hidden_states=[
                HiddenCapture("embeddings", torch.cat(out["embedded"]), list(text_at) + list(image_at)),
                HiddenCapture("text", out["text"], text_at),
            ],
            output=out["logits"],
            output_labels=LABELS,
            readout_tokens={"answer": 0},
        )


@pytest.fixture(scope="module")
def adapter() -> TinyAdapter:
    return TinyAdapter()


@pytest.fixture(scope="module")
def item() -> ModelInput:
    image = np.zeros((20, 30, 3), np.uint8)
    image[:10, 15:] = (200, 40, 10)
    image[10:, :15] = (10, 90, 220)
    return ModelInput("tiny-0", image, "red?", label="red")


def test_attention_lands_in_its_block_with_padded_heads(adapter: TinyAdapter, item: ModelInput) -> None:
    record, info = adapter.run(item)
    maps = [m.detach().numpy() for m in adapter.model(item.image, item.text)["maps"]]
    attention = record.attention
    assert attention.shape == (3, 2, 7, 7)
    np.testing.assert_allclose(attention[0, :, :3, :3], maps[0], rtol=1e-6)
    np.testing.assert_allclose(attention[1, 0, 3:, 3:], maps[1][0], rtol=1e-6)
    np.testing.assert_allclose(attention[2, :, :3, 3:], maps[2], rtol=1e-6)
    assert np.isnan(attention[1, 1]).all(), "the image layer has one head: the second is NaN padding"
    assert (attention[0, :, 3:] == 0).all() and (attention[0, :, :, 3:] == 0).all()
    assert (attention[2, :, 3:] == 0).all(), "image tokens are no queries of the text-to-image layer"
    assert info.layer_kind == ["text_self", "image_self", "cross_text_to_image"]
    assert info.num_heads == [2, 1, 2]
    # The hidden stage that updates only the text stream carries the image tokens forward.
    np.testing.assert_array_equal(record.hidden_states[1, 3:], record.hidden_states[0, 3:])
    validate(records_to_dataset([record], info), check_values=True)


def test_prediction_score_and_targets(adapter: TinyAdapter, item: ModelInput) -> None:
    logits = adapter.model(item.image, item.text)["logits"].detach()
    record, _ = adapter.run(item)
    assert record.prediction == LABELS[int(logits.argmax())]
    assert record.score == pytest.approx(float(torch.softmax(logits, 0).max()))
    assert record.relevancy_target == record.prediction
    assert adapter.run(item, target="no")[0].relevancy_target == "no"
    assert adapter.run(item, target=2)[0].relevancy_target == "red"
    with pytest.raises(VLIError, match="unknown target 'maybe'"):
        adapter.run(item, target="maybe")


@pytest.mark.parametrize("target", [None, "no"])
def test_attention_gradients_equal_finite_differences(
    adapter: TinyAdapter, item: ModelInput, target: str | None
) -> None:
    record, _ = adapter.run(item, target=target, gradients=True)
    label = record.relevancy_target
    gradient = record.attention_gradient
    assert gradient is not None and gradient.shape == record.attention.shape
    rng = np.random.default_rng(0)
    blocks = {"text": (0, 0, 0), "image": (1, N_TEXT, N_TEXT), "cross": (2, 0, N_TEXT)}
    sizes = {"text": (2, N_TEXT, N_TEXT), "image": (1, N_IMAGE, N_IMAGE), "cross": (2, N_TEXT, N_IMAGE)}
    delta = 1e-6
    for module, (layer, row0, col0) in blocks.items():
        for _ in range(3):
            head, query, key = (int(rng.integers(n)) for n in sizes[module])
            scores = []
            for sign in (1, -1):
                adapter.model.perturbation = (module, head, query, key, sign * delta)
                with torch.no_grad():
                    scores.append(float(adapter.model(item.image, item.text)["logits"][LABELS.index(label)]))
            adapter.model.perturbation = None
            estimate = (scores[0] - scores[1]) / (2 * delta)
            captured = gradient[layer, head, row0 + query, col0 + key]
            assert captured == pytest.approx(estimate, rel=1e-4, abs=1e-7), (module, head, query, key)
    # Entries outside every module's block are not attention of the model: zero gradient.
    assert (gradient[0, :, 3:] == 0).all()


def test_gradients_need_a_graph(item: ModelInput) -> None:
    class Detached(TinyAdapter):
        def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
            capture = super().forward(image, text)
            capture.output = capture.output.detach()
            return capture

    with pytest.raises(VLIError, match="gradients need the model run with grad enabled"):
        Detached().run(item, gradients=True)


def test_similarity_output_without_labels(adapter: TinyAdapter, item: ModelInput) -> None:
    class Similarity(TinyAdapter):
        def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
            capture = super().forward(image, text)
            capture.output, capture.output_labels = capture.output[:1], None
            return capture

    record, _ = Similarity().run(item, gradients=True)
    assert record.prediction is None and record.relevancy_target == "score"
    assert np.abs(record.attention_gradient[2]).max() > 0
    with pytest.raises(VLIError, match="one score"):

        class NoLabels(TinyAdapter):
            def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
                capture = super().forward(image, text)
                capture.output_labels = None
                return capture

        NoLabels().run(item)


@pytest.mark.parametrize(
    ("rows", "cols"),
    [([1, 2, 3], [0, 1]), ([0, 2, 3], [1, 2]), ([1, 2], [0, 3]), ([3, 0], [2, 1, 0])],
    ids=["runs", "rows-scattered", "cols-scattered", "both-scattered"],
)
def test_block_index_places_a_map_as_fancy_indexing_does(rows: list[int], cols: list[int]) -> None:
    from vlinterpret_panel.adapters.base import _block_index

    values = np.arange(2 * len(rows) * len(cols), dtype=np.float32).reshape(2, len(rows), len(cols))
    expected = np.zeros((2, 4, 4), np.float32)
    expected[:, np.ix_(rows, cols)[0], np.ix_(rows, cols)[1]] = values
    placed = np.zeros((2, 4, 4), np.float32)
    placed[:, *_block_index(np.asarray(rows), np.asarray(cols))] = values
    np.testing.assert_array_equal(placed, expected)
