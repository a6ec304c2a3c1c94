"""What a gradient-based relevancy map explains: an answer, or one answer against another.

A target is written as text, the same in the Python API, the command line and the store:

* ``predicted`` (the default): the predicted answer's logit;
* ``label``: the ground-truth answer's logit (the example must have a label);
* an answer by name (``red``) or by output index (``3``);
* ``runner-up``: the most probable answer other than the prediction;
* a contrast ``A vs B``: logit(A) - logit(B), e.g. ``predicted vs runner-up`` ("why this answer rather than
  the next best?"), ``red vs blue``, ``label vs predicted``. In a contrast, ``runner-up`` is the
  highest-scoring answer other than A.

A similarity model (the dual encoder) has one output, the score of the example's caption: its targets are
``predicted`` and ``predicted vs CAPTION``, the score minus the image's score with another caption ("why this
caption rather than that one?"), e.g. ``predicted vs a blue circle at the top left``.

A generated answer is explained token by token (``relevancy.answer``), so there a target is read at each
step, over the model's vocabulary: ``predicted`` is the token the model generated, ``runner-up`` the most
probable other token at that step (the second of the stored alternatives), a name is a vocabulary token the
same at every step (``red``), an index a vocabulary id; ``label`` has no per-token meaning and is refused.
``predicted vs runner-up`` asks, at every step, why this token rather than the next best.

A saturated classifier (probability about 1) gives gradients of its winning logit that say little about the
evidence; the contrast of two logits is the usual way to explain it (why A rather than B).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vlinterpret_panel.errors import VLIError

PREDICTED, LABEL, RUNNER_UP = "predicted", "label", "runner-up"
VERSUS = " vs "
CAPTION = "this caption"
"""How a similarity model's explained target names the example's own caption (``this caption vs a red square``)."""
CAPTION_CONTRAST = f"{CAPTION}{VERSUS}"
"""What a recorded caption contrast starts with; the other caption follows."""


@dataclass(frozen=True)
class Target:
    """A target as written: ``answer`` (``predicted``, ``label``, a name or an index) and, for a contrast,
    ``versus`` (the same, or ``runner-up``)."""

    answer: str = PREDICTED
    versus: str | None = None

    @classmethod
    def parse(cls, spec: str | int | Target | None) -> Target:
        """Read ``predicted``, ``label``, ``red``, ``3``, ``A vs B`` (``None`` is ``predicted``)."""
        if isinstance(spec, Target):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, int | np.integer):
            return cls(str(int(spec)))
        parts = [part.strip() for part in str(spec).split(VERSUS)]
        if len(parts) > 2 or not all(parts):
            raise VLIError(f"target {spec!r}: write an answer (predicted, label, a name, an index) or 'A vs B'")
        if parts[0] == RUNNER_UP and len(parts) == 2:
            raise VLIError(f"target {spec!r}: 'runner-up' is the second answer of a contrast ('A vs runner-up')")
        if len(parts) == 2 and parts[0] == parts[1]:
            raise VLIError(f"target {spec!r}: an answer against itself explains nothing")
        return cls(parts[0], parts[1] if len(parts) == 2 else None)

    @property
    def is_default(self) -> bool:
        """The predicted answer alone: what every map explained before targets could be chosen."""
        return self.answer == PREDICTED and self.versus is None

    def __str__(self) -> str:
        return self.answer if self.versus is None else f"{self.answer}{VERSUS}{self.versus}"

    def resolve(self, logits: np.ndarray, labels: list[str], label: str | None = None) -> tuple[int, int | None]:
        """Output indices (A, B or None) of this target for one example's ``logits`` over ``labels``."""
        first = _index(self.answer, logits, labels, label, None)
        if self.versus is None:
            return first, None
        second = _index(self.versus, logits, labels, label, first)
        if second == first:
            raise VLIError(f"target {self}: both sides are {labels[first]!r} for this example; nothing to contrast")
        return first, second

    def contrast_caption(self) -> str:
        """The second caption of a similarity model's contrast ``predicted vs CAPTION`` (or ``this caption vs CAPTION``,
        as it is recorded): its score with this example's image is subtracted from the example's own; ``VLIError``
        for any other target of such a model."""
        if self.answer not in (PREDICTED, CAPTION) or self.versus in (None, PREDICTED, LABEL, RUNNER_UP, CAPTION):
            raise VLIError(
                f"target {self}: a similarity model explains its caption's score, or the score against another "
                "caption: 'predicted vs a red square at the top left'"
            )
        return self.versus

    def check_for_generation(self) -> None:
        """``VLIError`` for a target with no per-token meaning (``label``: a generated answer has no label per step)."""
        if LABEL in (self.answer, self.versus):
            raise VLIError(
                f"target {self}: 'label' explains an answer model's ground-truth answer; a generated answer is "
                "explained token by token (use predicted, runner-up, a vocabulary token or 'A vs B' of those)"
            )

    def resolve_steps(
        self, logits: np.ndarray, generated: Sequence[int], token_id: Callable[[str], int]
    ) -> tuple[list[int], list[int] | None]:
        """Vocabulary ids (A per step, B per step or None) of this target for a generated answer.

        ``logits`` ``[steps, vocab]`` are the logits that predicted each of the ``generated`` ids;
        ``token_id`` looks a vocabulary token up by name (``GenerativeAdapter.token_id``). A step where
        both sides are the same token explains nothing: its gradient, and so its map, is 0.
        """
        self.check_for_generation()
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != len(generated):
            raise VLIError(f"{len(generated)} generated tokens need [steps, vocab] logits, not {logits.shape}")
        token_id = functools.cache(token_id)  # a named side is looked up once, not at every step
        first = [
            _step_index(self.answer, row, token, token_id, token) for row, token in zip(logits, generated, strict=True)
        ]
        if self.versus is None:
            return first, None
        second = [
            _step_index(self.versus, row, token, token_id, a)
            for row, token, a in zip(logits, generated, first, strict=True)
        ]
        return first, second


def _index(answer: str, logits: np.ndarray, labels: list[str], label: str | None, other: int | None) -> int:
    """One side of a target as an output index."""
    if answer == PREDICTED:
        return int(np.argmax(logits))
    if answer == RUNNER_UP:
        return _runner_up(logits, int(np.argmax(logits)) if other is None else other)
    if answer == LABEL:
        if label is None:
            raise VLIError("target 'label': this example has no ground-truth label")
        answer = label
    if answer in labels:
        return labels.index(answer)
    if answer.lstrip("-").isdigit():
        index = int(answer)
        if not 0 <= index < len(labels):
            raise VLIError(f"target index {index} is outside the model's {len(labels)} outputs")
        return index
    raise VLIError(f"unknown target {answer!r}; the model's answers are e.g. {labels[:8]}")


def step_title(entry: str, generated: str, alternatives: Sequence[str]) -> str:
    """What a stored answer entry explains at one step, in tokens: ``'red' vs 'blue': generic`` (the bare
    method name's entry: ``'red': generic``). ``alternatives`` are the step's most probable tokens, best first
    (they name the runner-up); a side given as a vocabulary index stays an index."""
    method, target = split_entry(entry)

    def named(side: str, other: str | None) -> str:
        if side == PREDICTED:
            return repr(generated)
        if side == RUNNER_UP:
            return next((repr(token) for token in alternatives if repr(token) != other), "the runner-up")
        return side if side.lstrip("-").isdigit() else repr(side)

    first = named(target.answer, None)
    return f"{first}: {method}" if target.versus is None else f"{first} vs {named(target.versus, first)}: {method}"


def _runner_up(logits: np.ndarray, other: int) -> int:
    """The highest-scoring index other than ``other`` (ties: the lowest index)."""
    best = np.argsort(-np.asarray(logits), kind="stable")[:2]
    return int(best[1] if int(best[0]) == other else best[0])


def _step_index(answer: str, logits: np.ndarray, generated: int, token_id: Callable[[str], int], other: int) -> int:
    """One side of a target at one generation step, as a vocabulary id; ``other`` is what a runner-up differs from
    (the first side, or for a first side the generated token)."""
    if answer == PREDICTED:
        return int(generated)
    if answer == RUNNER_UP:
        return _runner_up(logits, other)
    if answer.lstrip("-").isdigit():
        index = int(answer)
        if not 0 <= index < logits.shape[0]:
            raise VLIError(f"target index {index} is outside the model's vocabulary of {logits.shape[0]} tokens")
        return index
    return token_id(answer)


def entry_name(method: str, target: Target) -> str:
    """The store's ``relevancy_method`` entry of ``method`` explaining ``target``: the bare name for the
    predicted answer (as stores before targets), else ``method [target]``."""
    return method if target.is_default else f"{method} [{target}]"


def split_entry(entry: str) -> tuple[str, Target]:
    """Inverse of ``entry_name``: (method, target) of a stored ``relevancy_method`` entry."""
    if entry.endswith("]") and " [" in entry:
        method, spec = entry[:-1].split(" [", 1)
        return method, Target.parse(spec)
    return entry, Target()


def methods_and_targets(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """The methods and the targets (as ``--target`` takes them; ``[]`` for the prediction alone) that a store's
    ``relevancy_method`` entries were extracted with, so an example added later gets the same entries."""
    split = [split_entry(entry) for entry in entries]
    methods = list(dict.fromkeys(method for method, _ in split))
    targets = list(dict.fromkeys(str(target) for _, target in split))
    return methods, [] if targets == [PREDICTED] else targets
