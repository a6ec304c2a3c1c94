"""Evaluation of the relevancy of generated tokens (the built-in generative model): localisation and deletion.

Held-out scenes of the built-in world, half described ("describe the scene"), half asked a
question. Each answer is generated greedily and explained token by token by every method in
one ``capture_answer`` run (``random``, seeded per example, is the floor; ``raw_attention``
the attention baseline). Every generated token that names an object (its ground-truth mask,
``world.generated_token_masks``, is not empty: a description's colour, shape and place
words, an answer's words) is scored:

- **localisation** of its relevancy over the image patches against that object's mask:
  pointing game (the top patch covers a mask pixel), IoU of the patch map thresholded at its
  mean, average precision of the soft map (as ``relevancy.evaluate.localisation``);
- **deletion** on its probability: image patches are deleted from the sequence (the model
  runs the prompt and the answer before the token with the remaining patches, which keep their
  positions), most relevant first (positive test: lower AUC is better) or least relevant first
  (negative: higher is better), fractions 0, 0.1, ..., 0.9; equal values in a seeded random
  order. The score is the probability the model gives the generated token; AUC = trapezoid area
  of the mean probability (%) over the fraction (at most 90).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlinterpret_panel.adapters.base import ModelInput
from vlinterpret_panel.adapters.generative import GenerationOptions, GenerativeAdapter, capture_answer
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy.answer import ANSWER_METHODS, GRADIENT_METHODS
from vlinterpret_panel.relevancy.evaluate import FRACTIONS, TESTS, keep_mask, localisation
from vlinterpret_panel.relevancy.targets import PREDICTED, entry_name
from vlinterpret_panel.schema import IMAGE

PLACE_WORDS = frozenset(word for quadrant in world.QUADRANTS for word in quadrant.split())


def token_kind(task: str, token: str) -> str:
    """What a scored token is: a description's colour, shape or place word, or a question's answer word."""
    if task == "question":
        return "answer"
    if token in world.COLOR_NAMES:
        return "colour"
    if token in world.SHAPES:
        return "shape"
    return "place" if token in PLACE_WORDS else "other"


@dataclass
class AnswerEvaluation:
    """Per method: mean probability per (test, fraction), and localisation per token kind ("all" overall)."""

    model: str
    methods: list[str]
    examples: int
    tokens: dict[str, int]
    probability: dict[tuple[str, str], np.ndarray]
    pointing: dict[tuple[str, str], float]
    iou: dict[tuple[str, str], float]
    average_precision: dict[tuple[str, str], float]
    answers_correct: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def auc(self, method: str, test: str) -> float:
        """Trapezoid area of the mean probability (%) over the fraction removed, 0 to 0.9."""
        curve = 100.0 * self.probability[method, test]
        return float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(FRACTIONS)))


def answer_examples(count: int, start: int = world.HELDOUT_SEED_START) -> list[tuple[str, ModelInput]]:
    """``count`` held-out scenes, alternately described and asked their question, with per-token ground truth."""
    from functools import partial

    examples = []
    for seed in range(start, start + count):
        task = "describe" if (seed - start) % 2 == 0 else "question"
        scene, example = world.generative_example_for_seed(seed, task)
        item = ModelInput(
            f"seed{seed}",
            scene.image,
            example.prompt,
            example.reference,
            example.target_mask,
            answer_masks=partial(world.generated_token_masks, scene, example),
        )
        examples.append((task, item))
    return examples


def evaluate_answers(
    adapter: GenerativeAdapter,
    examples: Sequence[tuple[str, ModelInput]],
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    target: str = PREDICTED,
) -> AnswerEvaluation:
    """Localisation and deletion scores of every method on the object-naming tokens of ``examples``' answers.

    ``target`` (``relevancy.targets``, read per generated token) is what the gradient methods explain; they are
    listed as their store entries then (``generic [predicted vs runner-up]``). The deletion test always scores
    the generated token's probability.
    """
    score_deletions = getattr(adapter, "deletion_probabilities", None)
    if score_deletions is None:
        raise VLIError(
            f"{adapter.name}: the deletion test needs an adapter that deletes image patches (the built-in one)"
        )
    if not examples:
        raise VLIError("evaluate needs at least one example")
    started = time.perf_counter()
    options = GenerationOptions(methods=list(ANSWER_METHODS), targets=[target])
    chosen = options.chosen_targets()[0]
    methods = ["random"] + [
        entry_name(method, chosen) if method in GRADIENT_METHODS else method for method in ANSWER_METHODS
    ]
    curves: dict[tuple[str, str], list[np.ndarray]] = {(m, t): [] for m in methods for t in TESTS}
    local: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    tokens: dict[str, int] = {}
    correct: dict[str, list[bool]] = {"question": [], "describe": []}
    for index, (task, item) in enumerate(examples):
        record, _ = capture_answer(adapter, item, options)
        answer = record.answer
        assert answer is not None and answer.relevancy is not None and answer.target_masks is not None
        scene = world.scene_for_seed(int(item.example_id.removeprefix("seed")))
        if task == "describe":
            correct[task].append(world.description_correct(scene, str(record.prediction)))
        else:
            correct[task].append(world.answer_correct(str(item.label), str(record.prediction)))
        modality = list(record.modality)
        image = np.asarray(modality) == IMAGE
        boxes = np.asarray(record.token_box)
        rng = np.random.default_rng([seed, index])
        relevancy = {method: np.asarray(values) for method, values in answer.relevancy.items()}
        relevancy["random"] = rng.random((len(answer.tokens), len(modality)))
        tie_breaker = rng.random(len(modality))
        grid = np.asarray(record.patch_position)
        requests, cells = [], []
        for step, token in enumerate(answer.tokens):
            mask = answer.target_masks[step].astype(bool)
            if not mask.any():
                continue
            kind = token_kind(task, token)
            for name in (kind, "all"):
                tokens[name] = tokens.get(name, 0) + 1
            for method in methods:
                values = relevancy[method][step]
                for name in (kind, "all"):
                    local.setdefault((method, name), []).append(localisation(values[image], boxes[image], mask))
                for test in TESTS:
                    for fraction in FRACTIONS:
                        keep = keep_mask(values, modality, IMAGE, fraction, test, tie_breaker)
                        kept = grid[keep & image]
                        requests.append((step, kept[:, 0] * int(grid[image, 1].max() + 1) + kept[:, 1]))
                    cells.append((method, test))
        if requests:
            scored = np.asarray(score_deletions(record, requests)).reshape(len(cells), len(FRACTIONS))
            for (method, test), curve in zip(cells, scored, strict=True):
                curves[method, test].append(curve)
        if progress is not None:
            progress(index + 1)
    if not tokens:
        raise VLIError("no generated token named an object: nothing to score")
    means = {key: np.mean(values, axis=0) for key, values in local.items()}
    return AnswerEvaluation(
        model=adapter.name,
        methods=methods,
        examples=len(examples),
        tokens=tokens,
        probability={key: np.mean(values, axis=0) for key, values in curves.items()},
        pointing={key: float(value[0]) for key, value in means.items()},
        iou={key: float(value[1]) for key, value in means.items()},
        average_precision={key: float(value[2]) for key, value in means.items()},
        answers_correct={task: float(np.mean(hits)) for task, hits in correct.items() if hits},
        seconds=time.perf_counter() - started,
    )


KINDS = ("all", "colour", "shape", "place", "answer")


def write_answer_report(result: AnswerEvaluation, out: Path, header: Sequence[str] = ()) -> list[Path]:
    """Write ``results.md`` (tables), ``results.csv`` (every number) and ``probability.png`` (deletion curves)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out / "results.csv", out / "results.md", out / "probability.png"
    kinds = [kind for kind in KINDS if kind in result.tokens]
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        curve_columns = [f"{t}_prob_{f:.1f}" for t in TESTS for f in FRACTIONS]
        local_columns = [f"{score}_{kind}" for kind in kinds for score in ("pointing", "iou", "ap")]
        writer.writerow(["method", "positive_auc", "negative_auc", *local_columns, *curve_columns])
        for method in result.methods:
            local = [
                f"{scores[method, kind]:.4f}"
                for kind in kinds
                for scores in (result.pointing, result.iou, result.average_precision)
            ]
            curve = [f"{v:.4f}" for t in TESTS for v in result.probability[method, t]]
            aucs = [f"{result.auc(method, t):.4f}" for t in TESTS]
            writer.writerow([method, *aucs, *local, *curve])
    lines = [
        f"# Relevancy of generated tokens: {result.model}",
        "",
        *header,
        f"- examples: {result.examples} held-out scenes, half described, half asked a question; "
        + ", ".join(f"{task} correct {100 * value:.1f} %" for task, value in result.answers_correct.items()),
        "- scored tokens (they name an object): " + ", ".join(f"{kind} {result.tokens[kind]}" for kind in kinds),
        "- deletion: image patches removed most relevant first (positive, ↓ better) or least relevant first "
        "(negative, ↑ better); AUC of the generated token's mean probability (%) over the fraction 0 … 0.9 (max 90)",
        f"- time: {result.seconds:.0f} s",
        *[f"- {note}" for note in result.notes],
        "",
        "| method | deletion pos AUC ↓ | deletion neg AUC ↑ | pointing ↑ | IoU ↑ | AP ↑ |",
        "|---|---|---|---|---|---|",
    ]
    for method in result.methods:
        key = (method, "all")
        lines.append(
            f"| {method} | {result.auc(method, 'positive'):.1f} | {result.auc(method, 'negative'):.1f} | "
            f"{result.pointing[key]:.3f} | {result.iou[key]:.3f} | {result.average_precision[key]:.3f} |"
        )
    lines += ["", "Pointing game by kind of token:", "", "| method | " + " | ".join(kinds[1:]) + " |"]
    lines.append("|---|" + "---|" * len(kinds[1:]))
    for method in result.methods:
        lines.append(f"| {method} | " + " | ".join(f"{result.pointing[method, kind]:.3f}" for kind in kinds[1:]) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    _plot(result, png_path)
    return [csv_path, md_path, png_path]


def _plot(result: AnswerEvaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, test in zip(axes, TESTS, strict=True):
        for method in result.methods:
            axis.plot(FRACTIONS, 100 * result.probability[method, test], marker="o", markersize=3, label=method)
        arrow = "lower" if test == "positive" else "higher"
        axis.set_title(f"{test} test ({arrow} is better)")
        axis.set_xlabel("fraction of image patches removed")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("probability of the generated token (%)")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{result.model}: deletion test on {result.tokens['all']} object-naming generated tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate_answers_to_directory(
    adapter: GenerativeAdapter,
    count: int,
    out: Path,
    *,
    seed: int = 0,
    progress: bool = False,
    target: str = PREDICTED,
) -> tuple[list[Path], AnswerEvaluation]:
    """Evaluate ``adapter`` on ``count`` held-out scenes (gradient methods explaining ``target``) into ``out``."""
    from tqdm.auto import tqdm

    torch.set_num_threads(1)
    examples = answer_examples(count)
    with tqdm(total=count, unit="example", disable=not progress, desc="evaluate") as bar:
        result = evaluate_answers(
            adapter, examples, seed=seed, progress=lambda done: bar.update(done - bar.n), target=target
        )
    header = [f"- explained target of the gradient methods, per generated token: {target}", "- torch threads: 1"]
    weights = adapter.config.get("weights_sha256")
    if weights:
        header.insert(0, f"- weights sha256: {str(weights)[:16]}")
    return write_answer_report(result, out, header), result
