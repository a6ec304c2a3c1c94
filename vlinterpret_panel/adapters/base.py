"""The adapter protocol: run a model on one image-text pair, capture what the schema stores.

A model-specific adapter implements one method, ``forward``, which runs the model with
attention outputs on and returns a ``ForwardCapture``: the attention probabilities of each
attention module (as tensors still in the autograd graph), hidden states, the token layout
and the output scores. Everything generic lives here, in two steps: ``run_model`` (the
forward pass, the prediction, the explained target and, on request, the gradients of that
target with respect to every attention map: a ``ModelRun``) and ``to_record`` (the
``ExampleRecord`` the store keeps: each module's attention placed in the schema's full
``(query, key)`` frame by ``attention_frame``, hidden states by ``hidden_frame``).
``run`` does both.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.targets import CAPTION_CONTRAST, VERSUS, Target
from vlinterpret_panel.schema import ExampleRecord, ModelInfo


@dataclass
class AttentionCapture:
    """One attention module's post-softmax probabilities for one example.

    ``probabilities`` is ``[heads, queries, keys]``; ``query_tokens`` and ``key_tokens``
    give the position of each of its rows and columns in the example's full token sequence.
    """

    name: str
    kind: str
    probabilities: torch.Tensor
    query_tokens: Sequence[int]
    key_tokens: Sequence[int]


@dataclass
class HiddenCapture:
    """Hidden states ``[tokens, features]`` of the tokens ``token_indices`` after a stage.

    Tokens a stage does not update keep their previous state, so a dual-stream model can
    report its text and image streams as separate stages in execution order.
    """

    name: str
    states: torch.Tensor
    token_indices: Sequence[int]


@dataclass
class ForwardCapture:
    """What one forward pass of a model exposes, in the model's own terms."""

    tokens: Sequence[str]
    modality: Sequence[str]
    token_box: np.ndarray
    attentions: Sequence[AttentionCapture]
    hidden_states: Sequence[HiddenCapture]
    output: torch.Tensor
    output_labels: Sequence[str] | None = None
    readout_tokens: Mapping[str, int] = field(default_factory=dict)
    patch_position: np.ndarray | None = None
    score_captions: Callable[[Sequence[str]], torch.Tensor] | None = None
    """A similarity model's scores ``[len(captions)]`` of this example's image against other captions, in the same
    autograd graph as ``output`` (the second side of a caption contrast, ``relevancy.targets``; the captions a
    contrast is offered against), one pass of the text tower; None where unsupported."""


@dataclass
class ModelInput:
    """One image-text pair to run, with what is known about it.

    ``answer_masks`` (generated answers, built-in world): given the generated tokens, the
    ground-truth mask of the object each one names (None where it names none).
    """

    example_id: str
    image: np.ndarray
    text: str
    label: str | None = None
    target_mask: np.ndarray | None = None
    answer_masks: Callable[[list[str]], list[np.ndarray | None]] | None = None


@dataclass
class ModelRun:
    """One example's forward pass, what the model predicted and the output explained.

    ``attention_gradient`` (the schema's ``(layer, head, T, T)`` frame) is the gradient of the
    ``target`` output with respect to each attention map, when gradients were asked for.
    """

    capture: ForwardCapture
    prediction: str | None
    score: float
    target: str
    attention_gradient: np.ndarray | None = None
    top_answers: list[tuple[str, float]] | None = None


TOP_ANSWERS = 5
"""Answers stored per example with their probabilities (``top_answer``): what the dashboard offers to explain."""


class ModelAdapter(abc.ABC):
    """Base class of every adapter; subclasses implement ``forward`` and set ``name``."""

    name: str = "model"
    config: Mapping[str, Any] = {}

    @abc.abstractmethod
    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        """Run the model on ``image`` (uint8 HxWx3) and ``text`` with attentions captured.

        ``keep_tokens`` (bool per token of the unperturbed layout) deletes the False tokens
        from the sequence, keeping the others' original positions, for perturbation tests;
        adapters that cannot delete tokens raise ``NotImplementedError``.
        """

    def info(self, capture: ForwardCapture) -> ModelInfo:
        """The layer layout common to all examples, read off one capture."""
        return ModelInfo(
            name=self.name,
            layer_kind=[a.kind for a in capture.attentions],
            num_heads=[int(a.probabilities.shape[0]) for a in capture.attentions],
            hidden_layer_name=[h.name for h in capture.hidden_states],
            layer_name=[a.name for a in capture.attentions],
            config=self.config,
        )

    def run_model(
        self, item: ModelInput, *, target: str | int | Target | None = None, gradients: bool = False
    ) -> ModelRun:
        """The forward pass of one example; with ``gradients``, also d(target score)/d(each attention map).

        ``target`` names the explained output (``relevancy.targets``: ``predicted``, the default; ``label``;
        an answer's name or index; a contrast ``A vs B``). Gradients need autograd, so this never runs under
        ``no_grad``.
        """
        with torch.set_grad_enabled(gradients):
            capture = self.forward(item.image, item.text)
            return self.explain(capture, target=target, gradients=gradients, label=item.label)

    def explain(
        self,
        capture: ForwardCapture,
        *,
        target: str | int | Target | None = None,
        gradients: bool = False,
        label: str | None = None,
    ) -> ModelRun:
        """Prediction, score and target of a ``forward`` capture, and the target's gradients when asked
        (``label``: the example's ground truth, for the ``label`` target)."""
        prediction, score, target_score, target_name = self._target(capture, Target.parse(target), label)
        top = top_answers(capture)
        gradient = None
        if gradients:
            if not target_score.requires_grad:
                raise VLIError(
                    f"{self.name}: the output does not depend on the attention maps through autograd; "
                    "gradients need the model run with grad enabled and eager attention"
                )
            maps = [a.probabilities for a in capture.attentions]
            raw = torch.autograd.grad(target_score, maps, allow_unused=True)
            grads = [torch.zeros_like(m) if g is None else g for m, g in zip(maps, raw, strict=True)]
            gradient = attention_frame(capture, grads)
        return ModelRun(capture, prediction, score, target_name, gradient, top)

    def to_record(self, item: ModelInput, run: ModelRun) -> tuple[ExampleRecord, ModelInfo]:
        """The schema record of ``item``'s run, and the model's layer layout."""
        capture = run.capture
        record = ExampleRecord(
            example_id=item.example_id,
            image=item.image,
            text=item.text,
            tokens=list(capture.tokens),
            modality=list(capture.modality),
            token_box=np.asarray(capture.token_box, dtype=np.float32),
            attention=attention_frame(capture, [a.probabilities for a in capture.attentions]),
            hidden_states=hidden_frame(capture),
            label=item.label,
            prediction=run.prediction,
            score=run.score,
            top_answers=run.top_answers,
            readout_tokens=dict(capture.readout_tokens),
            patch_position=capture.patch_position,
            target_mask=item.target_mask,
            relevancy_target=run.target,
            attention_gradient=run.attention_gradient,
        )
        record.check()
        return record, self.info(capture)

    def run(
        self, item: ModelInput, *, target: str | int | Target | None = None, gradients: bool = False
    ) -> tuple[ExampleRecord, ModelInfo]:
        """Run one example into its schema record (``run_model`` then ``to_record``)."""
        return self.to_record(item, self.run_model(item, target=target, gradients=gradients))

    def _target(
        self, capture: ForwardCapture, target: Target, label: str | None
    ) -> tuple[str | None, float, torch.Tensor, str]:
        """Prediction, its score, the scalar whose gradients explain ``target``, and the target resolved to
        answer names (``red``, ``red vs blue``)."""
        output = capture.output.reshape(-1)
        if capture.output_labels is None:
            if output.numel() != 1:
                raise VLIError(f"{self.name}: an output without labels must be one score (a similarity)")
            if target.is_default:
                return None, float(output.detach()), output[0], "score"
            caption = target.contrast_caption()
            if capture.score_captions is None:
                raise VLIError(f"{self.name}: this model cannot score a second caption; target {str(target)!r}")
            contrast = output[0] - capture.score_captions([caption])[0]
            return None, float(output.detach()), contrast, f"{CAPTION_CONTRAST}{caption}"
        labels = list(capture.output_labels)
        logits = output.detach().float()
        predicted = int(logits.argmax())
        probabilities = torch.softmax(logits, dim=0)
        first, second = target.resolve(logits.numpy(), labels, label)
        if second is None:
            return labels[predicted], float(probabilities[predicted]), output[first], labels[first]
        contrast = output[first] - output[second]
        return labels[predicted], float(probabilities[predicted]), contrast, f"{labels[first]}{VERSUS}{labels[second]}"


def top_answers(capture: ForwardCapture, count: int = TOP_ANSWERS) -> list[tuple[str, float]] | None:
    """The ``count`` most probable answers with their probabilities (None for a model without answers)."""
    if capture.output_labels is None:
        return None
    probabilities = torch.softmax(capture.output.detach().reshape(-1).float(), dim=0)
    top = torch.topk(probabilities, min(count, len(probabilities)))
    labels = list(capture.output_labels)
    return [(labels[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]


def attention_frame(capture: ForwardCapture, maps: Sequence[torch.Tensor]) -> np.ndarray:
    """Place each module's ``[heads, q, k]`` map in the ``(layer, head, T, T)`` frame."""
    n_tokens = len(capture.tokens)
    n_heads = max(int(m.shape[0]) for m in maps)
    frame = np.zeros((len(maps), n_heads, n_tokens, n_tokens), dtype=np.float32)
    for layer, (module, values) in enumerate(zip(capture.attentions, maps, strict=True)):
        heads = int(values.shape[0])
        rows = np.asarray(module.query_tokens)
        cols = np.asarray(module.key_tokens)
        if tuple(values.shape[1:]) != (len(rows), len(cols)):
            raise VLIError(
                f"attention module {module.name!r} has shape {tuple(values.shape)}, "
                f"expected (heads, {len(rows)}, {len(cols)}) from its query/key tokens"
            )
        frame[layer, :heads][:, *_block_index(rows, cols)] = values.detach().float().cpu().numpy()
        frame[layer, heads:] = np.nan
    return frame


def hidden_frame(capture: ForwardCapture) -> np.ndarray:
    """Hidden states ``(stage, T, feature)``: stages stacked, carrying forward tokens a stage did not update."""
    n_tokens = len(capture.tokens)
    width = max(int(h.states.shape[-1]) for h in capture.hidden_states)
    frame = np.full((len(capture.hidden_states), n_tokens, width), np.nan, dtype=np.float32)
    for stage, hidden in enumerate(capture.hidden_states):
        if stage:
            frame[stage] = frame[stage - 1]
        states = hidden.states.detach().float().cpu().numpy()
        frame[stage, np.asarray(hidden.token_indices), : states.shape[-1]] = states
        frame[stage, np.asarray(hidden.token_indices), states.shape[-1] :] = np.nan
    return frame


def _block_index(rows: np.ndarray, cols: np.ndarray) -> tuple[slice | np.ndarray, slice | np.ndarray]:
    """Index of the ``rows`` x ``cols`` block of a map: slices for runs of consecutive tokens (the usual case).

    Slice assignment copies a ViLT-sized map about ten times faster than fancy indexing.
    """

    def run(tokens: np.ndarray) -> slice | None:
        if len(tokens) and tokens[-1] - tokens[0] + 1 == len(tokens) and (np.diff(tokens) == 1).all():
            return slice(int(tokens[0]), int(tokens[-1]) + 1)
        return None

    row_run, col_run = run(rows), run(cols)
    if row_run is None and col_run is None:
        return rows[:, None], cols[None, :]
    return (rows if row_run is None else row_run), (cols if col_run is None else col_run)


KeepMasks = np.ndarray | Sequence[np.ndarray] | None
"""Token deletion for a batch: None, one bool mask (one pair), or one mask per pair."""


class BatchedAdapter(ModelAdapter):
    """An adapter whose model runs several examples per pass: implement ``run_examples`` only.

    ``forward`` is one example of it, ``forward_batch`` (used by extraction when no
    gradients are needed) the whole batch without token deletion.
    """

    batch_keep_rows: bool = False
    """True when ``run_examples`` takes ``keep_tokens`` with one row per pair (rows keeping equally
    many tokens), so perturbation tests score many deletions of one example in one pass."""

    @abc.abstractmethod
    def run_examples(
        self, images: Sequence[np.ndarray], texts: Sequence[str], keep_tokens: np.ndarray | None
    ) -> list[ForwardCapture]:
        """Run pairs ``(images[i], texts[i])`` in one pass (padding masked), split per pair."""

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        return self.run_examples([image], [text], keep_tokens)[0]

    def forward_batch(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> list[ForwardCapture]:
        """Run several examples in one pass, split per example."""
        return self.run_examples(images, texts, None)

    def outputs(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        keep_tokens: KeepMasks = None,
    ) -> list[torch.Tensor]:
        """Each pair's ``ForwardCapture.output``; override to skip building captures when only scores are wanted."""
        masks = None if keep_tokens is None else np.asarray(keep_tokens)  # one mask, or one row per pair
        return [capture.output for capture in self.run_examples(images, texts, masks)]
