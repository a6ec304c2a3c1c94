"""What a gradient-based relevancy map explains: an answer, or one answer against another.

A target is written as text, the same in the Python API, the command line and the store:

* ``predicted`` (the default): the predicted answer's logit;
* ``label``: the ground-truth answer's logit (the example must have a label);
* an answer by name (``red``) or by output index (``3``);
* ``runner-up``: the most probable answer other than the prediction;
* a contrast ``A vs B``: logit(A) - logit(B), e.g. ``predicted vs runner-up`` ("why this answer rather than
  the next best?"), ``red vs blue``, ``label vs predicted``. In a contrast, ``runner-up`` is the
  highest-scoring answer other than A.

A saturated classifier (probability about 1) gives gradients of its winning logit that say little about the
evidence; the contrast of two logits is the usual way to explain it (why A rather than B).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlinterpret_panel.errors import VLIError

PREDICTED, LABEL, RUNNER_UP = "predicted", "label", "runner-up"
VERSUS = " vs "


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


def _index(answer: str, logits: np.ndarray, labels: list[str], label: str | None, other: int | None) -> int:
    """One side of a target as an output index."""
    if answer == PREDICTED:
        return int(np.argmax(logits))
    if answer == RUNNER_UP:
        ranked = [int(i) for i in np.argsort(-np.asarray(logits), kind="stable")]
        return ranked[1] if other is None else next(i for i in ranked if i != other)
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
