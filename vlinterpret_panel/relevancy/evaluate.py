"""Evaluation of relevancy methods: perturbation tests and localisation against ground-truth masks.

Follows the protocol of Chefer et al. (``../shared/RELEVANCY-REFERENCE.md`` beside the repository):

- each example is explained once, for the model's **predicted** output on the clean input;
- perturbation: tokens are *deleted* from the sequence through the adapter's
  ``forward(..., keep_tokens=...)`` (kept tokens keep their original positions), image
  tokens and text tokens separately; special tokens ([CLS], [SEP], the image [CLS]) are never
  removed. Positive test: the most relevant tokens go first (lower AUC is better); negative
  test: the least relevant first (higher AUC is better). At fraction f the ``floor((1 - f) n)``
  tokens of the modality ranked last (positive) or first (negative) are kept, for f = 0, 0.1, …, 0.9;
  equal values are ranked in a seeded random order (the same for every method of an example);
- accuracy is measured against the ground-truth label (VQA), or, for a similarity model (dual
  encoder), as retrieval top-1: the true caption must score above 7 distractor captions of
  other scenes (the perturbed image is scored against every caption; when text is deleted, only
  the true caption is perturbed);
- AUC: trapezoid area of accuracy (%) over the fraction removed, the unperturbed point included
  (so at most 90 for these steps);
- localisation, on examples whose target mask is not empty: pointing game (the top image patch
  covers a mask pixel), IoU of the patch map upsampled to pixels and thresholded at its mean,
  and average precision of the soft pixel map (scikit-learn).

``random`` gives every token a seeded uniform value: the floor every method must beat.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlinterpret_panel.adapters.base import ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy.capture import capture_for, relevancy_values
from vlinterpret_panel.relevancy.localisation import pointing_hit
from vlinterpret_panel.relevancy.registry import LAYER_RULES, needs
from vlinterpret_panel.relevancy.targets import PREDICTED, RUNNER_UP, Target
from vlinterpret_panel.schema import IMAGE, TEXT

FRACTIONS: tuple[float, ...] = tuple(step / 10 for step in range(10))
METHODS: tuple[str, ...] = (
    "random",
    "raw_attention",
    "rollout",
    "attention_gradcam",
    "generic",
    "transformer_attribution",
    "attnlrp",
)
MODALITIES: tuple[str, ...] = (IMAGE, TEXT)
TESTS: tuple[str, ...] = ("positive", "negative")
NUM_CANDIDATES = 8


@dataclass
class EvalExample:
    """One example to explain, with the distractor captions of a similarity model (empty for VQA)."""

    item: ModelInput
    distractors: list[str] = field(default_factory=list)


def world_examples(count: int, *, captions: bool, start: int = world.HELDOUT_SEED_START) -> list[EvalExample]:
    """Held-out examples of the built-in world: VQA questions, or captions with 7 distractors each.

    Caption examples take the union of all object masks as target (the caption names every
    object); distractors are captions of other scenes naming a different set of objects,
    drawn with a fixed seed.
    """
    if not captions:
        examples = []
        for seed in range(start, start + count):
            scene, question = world.vqa_example_for_seed(seed)
            item = ModelInput(f"seed{seed}", scene.image, question.question, question.answer, question.target_mask)
            examples.append(EvalExample(item))
        return examples
    scenes = [world.scene_for_seed(seed) for seed in range(start, start + count)]
    keys = [world.caption_key(scene) for scene in scenes]
    captions_text = [world.make_caption(scene) for scene in scenes]
    rng = np.random.default_rng(0)
    examples = []
    for index, scene in enumerate(scenes):
        others = [j for j in rng.permutation(count) if keys[j] != keys[index]][: NUM_CANDIDATES - 1]
        if len(others) < NUM_CANDIDATES - 1:
            raise VLIError(
                f"{count} scenes give fewer than {NUM_CANDIDATES - 1} distractor captions; use more examples"
            )
        mask = np.any(np.stack(scene.masks), axis=0)
        item = ModelInput(f"seed{start + index}", scene.image, captions_text[index], None, mask)
        examples.append(EvalExample(item, [captions_text[j] for j in others]))
    return examples


def explain(
    adapter: ModelAdapter, example: EvalExample, methods: Sequence[str], seed: int, target: str = PREDICTED
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Relevancy ``(T,)`` of each method for ``target`` (``relevancy.targets``), the token boxes and modalities
    (one model run).

    ``capture_for`` runs what the methods declare they need (gradients, the LRP pass);
    ``random`` draws from ``numpy.random.default_rng(seed)``.
    """
    captured, record, _ = capture_for(adapter, example.item, methods, target=caption_target(adapter, example, target))
    values = relevancy_values(captured, methods, {"random": {"seed": seed}})
    return values, np.asarray(record.token_box), list(record.modality)


def caption_target(adapter: ModelAdapter, example: EvalExample, target: str) -> str:
    """``target`` for ``example``, a caption contrast's ``runner-up`` resolved to the distractor caption the model
    scores highest with the example's image (the closest wrong caption); other targets as they are."""
    parsed = Target.parse(target)
    if not example.distractors or parsed.versus != RUNNER_UP:
        return target
    with torch.no_grad():
        score_captions = adapter.forward(example.item.image, example.item.text).score_captions
        if score_captions is None:
            raise VLIError(f"{adapter.name} cannot score a second caption: no caption contrast to evaluate")
        scores = score_captions(example.distractors)
    return str(Target(parsed.answer, example.distractors[int(scores.argmax())]))


def keep_mask(
    values: np.ndarray,
    modality: Sequence[str],
    part: str,
    fraction: float,
    test: str,
    tie_breaker: np.ndarray | None = None,
) -> np.ndarray:
    """Bool per token: delete ``fraction`` of the ``part`` tokens, most relevant first (positive) or least (negative).

    Equal values are ordered by ``tie_breaker`` (one number per token; default: token order),
    so a method that gives many tokens 0 (Grad-CAM after its clamp) does not delete them by
    position. Tokens of other modalities and special tokens stay.
    """
    labels = np.asarray(modality)
    tokens = np.flatnonzero(labels == part)
    n_keep = int(np.floor((1.0 - fraction) * len(tokens) + 1e-9))
    secondary = np.arange(len(tokens)) if tie_breaker is None else np.asarray(tie_breaker)[tokens]
    order = np.lexsort((secondary, values[tokens]))
    kept = order[:n_keep] if test == "positive" else order[::-1][:n_keep]
    keep = labels != part
    keep[tokens[kept]] = True
    return keep


class PerturbationScorer:
    """Whether the model is right on one example with some tokens deleted; memoised per keep mask.

    ``modality`` is the example's unperturbed token layout (the frame of every keep mask).
    With an adapter whose ``outputs`` takes one keep mask per pair (``batch_keep_rows``),
    ``correct_many`` scores all the deletions it is given in a few passes; otherwise one
    forward pass per deletion (and per distractor caption).
    """

    BATCH = 256
    """Most pairs per ``run_examples`` call."""

    def __init__(self, adapter: ModelAdapter, example: EvalExample, modality: Sequence[str]) -> None:
        self.adapter, self.example = adapter, example
        self.image_tokens = np.asarray(modality) == IMAGE
        self._cache: dict[tuple[str, bytes], bool] = {}
        self._distractors: list[tuple[np.ndarray, float]] | None = None
        self._labels: Sequence[str] | None = None

    def _outputs(self, texts: Sequence[str], keeps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The model's output vector for each (text, keep mask) with this example's image."""
        image = self.example.item.image
        with torch.no_grad():
            if getattr(self.adapter, "batch_keep_rows", False):
                outputs = []
                for start in range(0, len(texts), self.BATCH):
                    chunk = slice(start, start + self.BATCH)
                    images = [image] * len(texts[chunk])
                    outputs += self.adapter.outputs(images, texts[chunk], keeps[chunk])  # type: ignore[attr-defined]
            else:
                outputs = [
                    self.adapter.forward(image, t, keep_tokens=k).output for t, k in zip(texts, keeps, strict=True)
                ]
        return [output.detach().reshape(-1).numpy() for output in outputs]

    def _output_labels(self) -> Sequence[str] | None:
        """The labels of the model's outputs (from one unperturbed pass)."""
        if self._labels is None:
            with torch.no_grad():
                self._labels = self.adapter.forward(self.example.item.image, self.example.item.text).output_labels
        return self._labels

    def correct(self, keep: np.ndarray, part: str) -> bool:
        """Right answer (VQA) or true caption ranked first among the candidates (similarity)."""
        return self.correct_many([(keep, part)])[0]

    def correct_many(self, requests: Sequence[tuple[np.ndarray, str]]) -> list[bool]:
        """``correct`` of each (keep mask, deleted modality), computing the ones not seen yet together."""
        keys = [(part, np.packbits(keep).tobytes()) for keep, part in requests]
        todo = {key: request for key, request in zip(keys, requests, strict=True) if key not in self._cache}
        if todo:
            results = self._score_many(list(todo.values()))
            self._cache.update(zip(todo, results, strict=True))
        return [self._cache[key] for key in keys]

    def _score_many(self, requests: Sequence[tuple[np.ndarray, str]]) -> list[bool]:
        item = self.example.item
        if not self.example.distractors:
            labels = self._output_labels()
            if item.label is None or labels is None:
                raise VLIError(f"example {item.example_id!r}: accuracy needs a label and a model with labelled outputs")
            outputs = self._outputs([item.text] * len(requests), [keep for keep, _ in requests])
            return [labels[int(output.argmax())] == item.label for output in outputs]
        distractors = self._distractor_scores()
        texts, keeps = [], []
        for keep, part in requests:
            texts.append(item.text)
            keeps.append(keep)
            if part == IMAGE:  # every caption is scored on the same kept patches
                for caption, (image_tokens, _) in zip(self.example.distractors, distractors, strict=True):
                    distractor_keep = np.ones(len(image_tokens), bool)
                    distractor_keep[image_tokens] = keep[self.image_tokens]
                    texts.append(caption)
                    keeps.append(distractor_keep)
        scores = iter(float(output[0]) for output in self._outputs(texts, keeps))
        results = []
        for _, part in requests:
            own = next(scores)
            if part == IMAGE:
                others = [next(scores) for _ in self.example.distractors]
            else:  # text deletion perturbs only the true caption
                others = [score for _, score in distractors]
            results.append(own > max(others))
        return results

    def _distractor_scores(self) -> list[tuple[np.ndarray, float]]:
        """Each distractor caption's image-token flags and unperturbed score (computed once)."""
        if self._distractors is None:
            self._distractors = []
            for caption in self.example.distractors:
                with torch.no_grad():
                    capture = self.adapter.forward(self.example.item.image, caption)
                self._distractors.append((np.asarray(capture.modality) == IMAGE, float(capture.output.reshape(-1)[0])))
        return self._distractors


def patch_pixel_map(values: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Upsample image-token values to pixels: each pixel takes the value of the patch box covering it."""
    pixels = np.zeros(shape)
    for value, (x0, y0, x1, y1) in zip(values, boxes, strict=True):
        pixels[round(y0) : round(y1), round(x0) : round(x1)] = value
    return pixels


def localisation(values: np.ndarray, boxes: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """Pointing game (0/1), IoU at the mean threshold and average precision of one image map against a mask."""
    from sklearn.metrics import average_precision_score

    hit = float(pointing_hit(values, boxes, mask))
    pixels = patch_pixel_map(values, boxes, mask.shape)
    predicted = pixels > pixels.mean()
    union = np.logical_or(predicted, mask).sum()
    iou = float(np.logical_and(predicted, mask).sum() / union) if union else 0.0
    precision = float(average_precision_score(mask.ravel(), pixels.ravel()))
    return hit, iou, precision


@dataclass
class EvaluationResult:
    """Per method: accuracy per (modality, test, fraction) averaged over examples, and localisation scores."""

    model: str
    methods: list[str]
    examples: int
    localised_examples: int
    accuracy: dict[tuple[str, str, str], np.ndarray]
    pointing: dict[str, float]
    iou: dict[str, float]
    average_precision: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def auc(self, method: str, part: str, test: str) -> float:
        """Trapezoid area of accuracy (%) over the fraction removed, 0 to 0.9."""
        curve = 100.0 * self.accuracy[method, part, test]
        return float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(FRACTIONS)))


def evaluate(
    adapter: ModelAdapter,
    examples: Sequence[EvalExample],
    methods: Sequence[str] = METHODS,
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    target: str = PREDICTED,
) -> EvaluationResult:
    """Run the perturbation and localisation tests of ``methods`` explaining ``target`` on ``examples`` (see the
    module docstring)."""
    if not examples:
        raise VLIError("evaluate needs at least one example")
    started = time.perf_counter()
    methods = list(methods)
    correct = {(m, p, t): np.zeros((len(examples), len(FRACTIONS))) for m in methods for p in MODALITIES for t in TESTS}
    scores: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    for index, example in enumerate(examples):
        relevancies, boxes, modality = explain(adapter, example, methods, seed + index, target)
        scorer = PerturbationScorer(adapter, example, modality)
        tie_breaker = np.random.default_rng([seed, index]).random(len(modality))
        image_tokens = np.asarray(modality) == IMAGE
        mask = example.item.target_mask
        cells = list(itertools.product(relevancies, MODALITIES, TESTS, range(len(FRACTIONS))))
        requests = [
            (keep_mask(relevancies[m], modality, p, FRACTIONS[step], t, tie_breaker), p) for m, p, t, step in cells
        ]
        for (method, part, test, step), right in zip(cells, scorer.correct_many(requests), strict=True):
            correct[method, part, test][index, step] = right
        for method, values in relevancies.items():
            if mask is not None and mask.any():
                scores[method].append(localisation(values[image_tokens], boxes[image_tokens], mask))
        if progress is not None:
            progress(index + 1)
    localised = len(next(iter(scores.values())))
    means = {m: np.mean(scores[m], axis=0) if scores[m] else np.full(3, np.nan) for m in methods}
    return EvaluationResult(
        model=adapter.name,
        methods=methods,
        examples=len(examples),
        localised_examples=localised,
        accuracy={key: value.mean(axis=0) for key, value in correct.items()},
        pointing={m: float(means[m][0]) for m in methods},
        iou={m: float(means[m][1]) for m in methods},
        average_precision={m: float(means[m][2]) for m in methods},
        seconds=time.perf_counter() - started,
    )


def supported_methods(adapter: ModelAdapter) -> tuple[list[str], list[str]]:
    """The methods this adapter can be evaluated with, and notes on the ones left out."""
    from vlinterpret_panel.models.layers import BaseVLModel

    if isinstance(getattr(adapter, "model", None), BaseVLModel):
        return list(METHODS), []
    layer_rules = [m for m in METHODS if LAYER_RULES & needs([m])]
    note = f"{', '.join(layer_rules)} left out: their LRP rules exist only for the built-in models"
    return [m for m in METHODS if m not in layer_rules], [note]


TABLE_COLUMNS = (
    "method",
    "image_positive_auc",
    "image_negative_auc",
    "text_positive_auc",
    "text_negative_auc",
    "pointing_game",
    "mask_iou",
    "average_precision",
)


def result_rows(result: EvaluationResult) -> list[dict[str, float | str]]:
    """One row per method: the four AUCs and the three localisation scores."""
    rows = []
    for method in result.methods:
        row: dict[str, float | str] = {"method": method}
        for part in MODALITIES:
            for test in TESTS:
                row[f"{part}_{test}_auc"] = result.auc(method, part, test)
        row["pointing_game"] = result.pointing[method]
        row["mask_iou"] = result.iou[method]
        row["average_precision"] = result.average_precision[method]
        rows.append(row)
    return rows


def write_report(result: EvaluationResult, out: Path, header: Sequence[str] = ()) -> list[Path]:
    """Write ``results.csv`` (AUCs, localisation and every accuracy point), ``results.md`` and ``accuracy.png``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(result)
    csv_path, md_path, png_path = out / "results.csv", out / "results.md", out / "accuracy.png"
    curve_columns = [f"{p}_{t}_acc_{f:.1f}" for p in MODALITIES for t in TESTS for f in FRACTIONS]
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*TABLE_COLUMNS, *curve_columns])
        for row in rows:
            curves = [
                result.accuracy[str(row["method"]), p, t][s]
                for p in MODALITIES
                for t in TESTS
                for s in range(len(FRACTIONS))
            ]
            writer.writerow(
                [row[c] if c == "method" else f"{row[c]:.4f}" for c in TABLE_COLUMNS] + [f"{v:.4f}" for v in curves]
            )
    md_path.write_text(markdown_table(result, rows, header))
    plot_curves(result, png_path)
    return [csv_path, md_path, png_path]


def markdown_table(result: EvaluationResult, rows: Sequence[dict[str, float | str]], header: Sequence[str] = ()) -> str:
    """The results as a markdown document: settings, then one table row per method."""
    lines = [
        f"# Relevancy evaluation: {result.model}",
        "",
        *header,
        f"- examples: {result.examples} (localisation on the {result.localised_examples} with a non-empty target mask)",
        "- steps: fraction removed 0, 0.1, …, 0.9; AUC = trapezoid of accuracy (%) over the fraction (max 90)",
        "- positive test: most relevant removed first (↓ better); negative: least relevant first (↑ better)",
        "- options: library defaults (adapter readout, start_layer=0, rollout renormalize=True); random seeded",
        f"- time: {result.seconds:.0f} s",
        *[f"- {note}" for note in result.notes],
        "",
        "| method | image pos AUC ↓ | image neg AUC ↑ | text pos AUC ↓ | text neg AUC ↑ | pointing ↑ | IoU ↑ | AP ↑ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[c]:.1f}" for c in TABLE_COLUMNS[1:5]] + [f"{row[c]:.3f}" for c in TABLE_COLUMNS[5:]]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: EvaluationResult, path: Path) -> None:
    """Accuracy against the fraction removed, one panel per (modality, test), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey=True)
    for row, part in enumerate(MODALITIES):
        for col, test in enumerate(TESTS):
            axis = axes[row][col]
            for method in result.methods:
                axis.plot(FRACTIONS, 100 * result.accuracy[method, part, test], marker="o", markersize=3, label=method)
            arrow = "lower" if test == "positive" else "higher"
            axis.set_title(f"{part} tokens, {test} test ({arrow} is better)")
            axis.grid(alpha=0.3)
            if row == 1:
                axis.set_xlabel("fraction of tokens removed")
            if col == 0:
                axis.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{result.model}: perturbation tests ({result.examples} examples)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate_to_directory(
    adapter: ModelAdapter, count: int, out: Path, *, seed: int = 0, progress: bool = False, target: str = PREDICTED
) -> tuple[list[Path], EvaluationResult]:
    """Evaluate ``adapter`` on ``count`` held-out examples of the built-in world and write the report to ``out``.

    ``target`` is what the gradient-based methods explain (``relevancy.targets``; the attention-only
    methods do not depend on it). For a similarity model, ``predicted vs runner-up`` contrasts each caption with
    the distractor the model scores highest (``caption_target``); the LRP methods explain the score only and are
    left out then.

    VQA models (labelled outputs) get questions; similarity models get captions with distractors.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(1)
    probe = world_examples(1, captions=False)[0].item
    with torch.no_grad():
        captions = adapter.forward(probe.image, probe.text).output_labels is None
    parsed = Target.parse(target)
    target = str(parsed)
    methods, notes = supported_methods(adapter)
    if captions and not parsed.is_default:
        # The evaluation resolves runner-up to a caption (``caption_target``); the rest is the model's own rule.
        try:
            Target(parsed.answer, "a caption" if parsed.versus == RUNNER_UP else parsed.versus).contrast_caption()
        except VLIError:
            raise VLIError(
                f"{adapter.name} scores one caption; target {target!r}: use 'predicted vs runner-up' (the distractor "
                "caption it scores highest) or 'predicted vs CAPTION'"
            ) from None
        left_out = [m for m in methods if LAYER_RULES & needs([m])]
        methods = [m for m in methods if m not in left_out]
        notes.append(f"{', '.join(left_out)} left out: they explain the caption's score only, not a caption contrast")
    examples = world_examples(count, captions=captions)
    with tqdm(total=count, unit="example", disable=not progress, desc="evaluate") as bar:
        result = evaluate(
            adapter, examples, methods, seed=seed, progress=lambda done: bar.update(done - bar.n), target=target
        )
    result.notes += notes
    weights = adapter.config.get("weights_sha256")
    accuracy = "retrieval top-1 among 8 captions" if captions else "VQA answer = ground-truth label"
    header = [f"- accuracy: {accuracy}", f"- explained target: {target}", "- torch threads: 1"]
    if weights:
        header.insert(0, f"- weights sha256: {str(weights)[:16]}")
    return write_report(result, out, header), result
