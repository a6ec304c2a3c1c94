"""The evaluation on cases whose answers are known: a fake model that needs exactly one text and one image token."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from vlinterpret_panel.adapters.base import AttentionCapture, ForwardCapture, HiddenCapture, ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.evaluate import (
    FRACTIONS,
    EvalExample,
    PerturbationScorer,
    evaluate,
    keep_mask,
    localisation,
    result_rows,
    world_examples,
    write_report,
)

N_WORDS = N_PATCHES = 10
PATCH = 8
TOKENS = ["[CLS]", *[f"w{i}" for i in range(N_WORDS)], "[SEP]", *[f"p{i}" for i in range(N_PATCHES)]]
MODALITY = ["special", *["text"] * N_WORDS, "special", *["image"] * N_PATCHES]
FIRST_PATCH = N_WORDS + 2


class KeyTokenAdapter(ModelAdapter):
    """Answers "yes" (the label) only while the text token ``key_word`` and the patch ``key_patch`` are both kept.

    Its one attention layer's [CLS] row is 1 on both key tokens and 0.1 elsewhere, so raw
    attention is the perfect relevancy; ``inverted=True`` makes it the worst one.
    Image: one row of 8-pixel patches, 8 × 80 pixels.
    """

    name = "key-token"

    def __init__(self, key_word: int, key_patch: int, inverted: bool = False) -> None:
        self.key_text = 1 + key_word
        self.key_image = FIRST_PATCH + key_patch
        self.inverted = inverted
        self.calls: list[np.ndarray] = []

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        keep = np.ones(len(TOKENS), bool) if keep_tokens is None else np.asarray(keep_tokens, bool)
        assert keep[[0, N_WORDS + 1]].all(), "special tokens must never be removed"
        self.calls.append(keep)
        kept = np.flatnonzero(keep)
        row = np.full(len(TOKENS), 0.1)
        row[[self.key_text, self.key_image]] = 1.0
        if self.inverted:
            row = 1.1 - row
        probabilities = torch.zeros(1, len(TOKENS), len(TOKENS))
        probabilities[0] = torch.from_numpy(row / row.sum()).float()
        probabilities = probabilities[:, kept][:, :, kept].requires_grad_(True)
        present = float(keep[self.key_text] and keep[self.key_image])
        output = torch.stack([torch.tensor(present), torch.tensor(1.0 - present)]) + 0 * probabilities.sum()
        boxes = np.full((len(TOKENS), 4), np.nan, np.float32)
        columns = np.arange(N_PATCHES)
        boxes[FIRST_PATCH:] = np.stack([columns * PATCH, 0 * columns, (columns + 1) * PATCH, 0 * columns + PATCH], 1)
        return ForwardCapture(
            tokens=[TOKENS[i] for i in kept],
            modality=[MODALITY[i] for i in kept],
            token_box=boxes[kept],
            attentions=[AttentionCapture("layer", "self", probabilities, range(len(kept)), range(len(kept)))],
            hidden_states=[HiddenCapture("embeddings", torch.zeros(len(kept), 2), range(len(kept)))],
            output=output,
            output_labels=["yes", "no"],
            readout_tokens={"answer": 0},
        )


def _examples(count: int) -> list[EvalExample]:
    image = np.zeros((PATCH, PATCH * N_PATCHES, 3), np.uint8)
    mask = np.zeros(image.shape[:2], bool)
    mask[:, 3 * PATCH : 4 * PATCH] = True  # patch 3, the key patch
    return [EvalExample(ModelInput(f"e{i}", image, "text", "yes", mask)) for i in range(count)]


def test_keep_mask_deletes_by_rank_and_never_touches_other_tokens() -> None:
    values = np.array([9.0, 0.3, 0.1, 0.2, 5.0, 7.0])
    modality = ["special", "text", "text", "text", "image", "image"]
    # Two of the three text tokens go at 0.6: floor(0.4 * 3) = 1 kept.
    assert keep_mask(values, modality, "text", 0.6, "positive").tolist() == [True, False, True, False, True, True]
    assert keep_mask(values, modality, "text", 0.6, "negative").tolist() == [True, True, False, False, True, True]
    assert keep_mask(values, modality, "image", 0.0, "positive").all()
    # floor((1 - 0.9) * 10) must be 1, not 0 (floating point).
    assert keep_mask(np.arange(10.0), ["image"] * 10, "image", 0.9, "positive").sum() == 1


def test_perfect_relevancy_reaches_the_bounds_and_random_lies_between() -> None:
    adapter = KeyTokenAdapter(key_word=4, key_patch=3)
    result = evaluate(adapter, _examples(30), ["random", "raw_attention"], seed=0)
    for part in ("image", "text"):
        # Deleting 10% removes exactly the key token: accuracy 100 -> 0 after the first step, area 100 * 0.1 / 2.
        assert result.auc("raw_attention", part, "positive") == pytest.approx(5.0)
        # The key token is kept to the end (at 0.9 one token of ten is left): accuracy 100 over [0, 0.9].
        assert result.auc("raw_attention", part, "negative") == pytest.approx(90.0)
        assert 15.0 < result.auc("random", part, "positive") < 75.0
        assert 15.0 < result.auc("random", part, "negative") < 75.0
    assert result.pointing["raw_attention"] == 1.0
    assert result.iou["raw_attention"] == pytest.approx(1.0)
    assert result.average_precision["raw_attention"] == pytest.approx(1.0)
    assert result.pointing["random"] < 0.5


def test_worst_relevancy_reaches_the_opposite_bounds() -> None:
    adapter = KeyTokenAdapter(key_word=0, key_patch=3, inverted=True)
    result = evaluate(adapter, _examples(2), ["raw_attention"])
    for part in ("image", "text"):
        # The key token is the least relevant: removed first by the negative test, last by the positive test.
        assert result.auc("raw_attention", part, "negative") == pytest.approx(5.0)
        assert result.auc("raw_attention", part, "positive") == pytest.approx(90.0)
    assert result.pointing["raw_attention"] == 0.0


def test_deletion_goes_through_keep_tokens_one_modality_at_a_time() -> None:
    adapter = KeyTokenAdapter(key_word=1, key_patch=1)
    evaluate(adapter, _examples(1), ["raw_attention"])
    perturbed = [keep for keep in adapter.calls if not keep.all()]
    assert perturbed
    text = np.array(MODALITY) == "text"
    for keep in perturbed:
        assert keep[text].all() or keep[~text].all()


def test_localisation_of_a_map_peaked_on_and_off_the_mask() -> None:
    boxes = np.array([[0, 0, 8, 8], [8, 0, 16, 8]], float)
    mask = np.zeros((8, 16), bool)
    mask[2:5, 10:13] = True
    hit, iou, precision = localisation(np.array([0.1, 0.9]), boxes, mask)
    assert (hit, iou, precision) == (1.0, pytest.approx(9 / 64), pytest.approx(9 / 64))
    hit, iou, _ = localisation(np.array([0.9, 0.1]), boxes, mask)
    assert (hit, iou) == (0.0, 0.0)


class CaptionAdapter(KeyTokenAdapter):
    """A similarity model: the true caption scores 1 while the key patch is kept, distractors 0.5."""

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        capture = super().forward(image, text, keep_tokens=keep_tokens)
        keep = self.calls[-1]
        score = (1.0 if keep[self.key_image] else 0.0) if text == "true caption" else 0.5
        capture.output = torch.tensor([score]) + 0 * capture.attentions[0].probabilities.sum()
        capture.output_labels = None
        return capture


def test_retrieval_accuracy_scores_distractors_on_the_same_kept_patches() -> None:
    adapter = CaptionAdapter(key_word=0, key_patch=2)
    example = EvalExample(ModelInput("c", _examples(1)[0].item.image, "true caption"), ["other"] * 7)
    scorer = PerturbationScorer(adapter, example, MODALITY)
    keep = np.ones(len(TOKENS), bool)
    assert scorer.correct(keep, "image")
    keep[FIRST_PATCH + 2] = False
    adapter.calls.clear()
    assert not scorer.correct(keep, "image")
    # The 7 distractors ran with the same patches deleted (and their text kept).
    assert len(adapter.calls) == 8 and all(not call[FIRST_PATCH + 2] for call in adapter.calls)


def test_report_files(tmp_path) -> None:
    result = evaluate(KeyTokenAdapter(key_word=2, key_patch=3), _examples(2), ["random", "raw_attention"])
    paths = write_report(result, tmp_path / "out", ["- model: fake"])
    assert [p.name for p in paths] == ["results.csv", "results.md", "accuracy.png"]
    with paths[0].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["random", "raw_attention"]
    assert float(rows[1]["image_positive_auc"]) == pytest.approx(result_rows(result)[1]["image_positive_auc"], abs=1e-4)
    assert len([c for c in rows[0] if c.startswith("text_negative_acc_")]) == len(FRACTIONS)
    assert "| raw_attention | 5.0 | 90.0 | 5.0 | 90.0 | 1.000 | 1.000 | 1.000 |" in paths[1].read_text()
    assert paths[2].stat().st_size > 10_000


def test_world_examples_have_labels_masks_and_distinct_distractors() -> None:
    questions = world_examples(4, captions=False)
    assert all(e.item.label and not e.distractors for e in questions)
    captions = world_examples(12, captions=True)
    assert all(len(e.distractors) == 7 and e.item.text not in e.distractors for e in captions)
    assert all(e.item.target_mask.any() for e in captions)
    with pytest.raises(VLIError, match="distractor"):
        world_examples(3, captions=True)


def test_cli_evaluate_writes_the_report(tmp_path, capsys) -> None:
    from vlinterpret_panel.cli import main

    out = tmp_path / "single_stream"
    assert main(["evaluate", "single_stream", "--examples", "2", "--out", str(out), "--quiet"]) == 0
    assert "evaluated 2 examples" in capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert "| transformer_attribution |" in table and "| generic |" in table
    assert main(["evaluate", "single_stream", "--examples", "0", "--out", str(out)]) == 2
    assert "at least 1" in capsys.readouterr().err
    contrast = tmp_path / "contrast"
    arguments = ["evaluate", "single_stream", "--examples", "2", "--out", str(contrast), "--quiet"]
    assert main([*arguments, "--target", "predicted vs runner-up"]) == 0
    assert "- explained target: predicted vs runner-up" in (contrast / "results.md").read_text()
    assert main(["evaluate", "dual_encoder", "--examples", "1", "--out", str(contrast), "--target", "label"]) == 2
    assert "scores one caption; target 'label': use 'predicted vs runner-up'" in capsys.readouterr().err


def test_ties_are_broken_by_the_tie_breaker_not_by_position() -> None:
    values = np.zeros(4)
    modality = ["image"] * 4
    assert keep_mask(values, modality, "image", 0.5, "positive").tolist() == [True, True, False, False]
    breaker = np.array([0.9, 0.1, 0.8, 0.2])
    # Among equal values the tie-breaker ranks tokens 1 < 3 < 2 < 0; positive keeps the lowest ranked.
    assert keep_mask(values, modality, "image", 0.5, "positive", breaker).tolist() == [False, True, False, True]
    assert keep_mask(values, modality, "image", 0.5, "negative", breaker).tolist() == [True, False, True, False]
