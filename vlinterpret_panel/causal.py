"""Causal explanations: the smallest input that still produces an output, and the fewest patches it needs.

For one output of one example (a generated token, or a VQA model's answer) the *sufficient
set* is the smallest set of image patches and prompt tokens that, kept alone (every other
patch and prompt token deleted, positions unchanged), still makes the model give that output
at least ``threshold`` of its original probability. The *necessary set* is the fewest
patches whose deletion changes the output (another token or answer becomes the most
probable). Both are found by searches that a relevancy map orders and that re-running the
model decides (``search``): grow the most relevant units until the output is kept, then
drop any kept unit the output does not need, least relevant first; every claim is a rerun.

A ``Probe`` runs the model on kept sets. ``probe_for`` builds one from a live model and a
stored example; the results are kept beside the store's shards (``save`` / ``load``) so the
shards stay immutable.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import xarray as xr

from vlinterpret_panel import answers
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.maps import ExampleTokens
from vlinterpret_panel.schema import IMAGE, TEXT

DEFAULT_THRESHOLD = 0.9
CAUSAL_DIR = "causal"
MAX_PREFIX_TRIALS = 64
Progress = Callable[[float, str], None]


class CancelledError(VLIError):
    """The search was cancelled by its caller."""


@dataclass
class CausalExplanation:
    """One output's sufficient and necessary sets, as ``search`` verified them by reruns.

    ``kept`` and ``necessary`` are positions on the example's ``token`` axis; ``units`` the
    positions that could be deleted (image patches and prompt words; special tokens and
    earlier answer tokens always stay).
    """

    example: str
    step: int
    token: str
    threshold: float
    method: str
    probability: float
    kept: list[int]
    kept_probability: float
    units: list[int]
    necessary: list[int]
    changed_to: str
    reruns: int
    seconds: float
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def kept_share(self) -> float:
        """The kept probability as a share of the original."""
        return self.kept_probability / self.probability if self.probability > 0 else float("nan")

    def summary(self) -> str:
        """One line: the set's size and the probability it keeps."""
        return (
            f"{len(self.kept)} of {len(self.units)} patches and prompt tokens keep {self.token!r} at "
            f"p = {self.kept_probability:.3f} ({self.kept_share:.0%} of {self.probability:.3f})"
        )


class Probe(Protocol):
    """Runs the model with only some tokens kept and reads the explained output."""

    units: np.ndarray
    patches: np.ndarray
    target: str

    def __call__(self, kept_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Per kept set (token positions), the target's probability and the most probable output."""


def search(
    probe: Probe,
    relevance: np.ndarray,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    lock: threading.Lock | None = None,
) -> tuple[list[int], float, list[int], str, float, int]:
    """The sufficient and the necessary set of ``probe``'s output, guided by ``relevance`` (one value per unit).

    Returns (kept units, their probability, necessary patches, what the output changes to
    without them ("" when no set of patches changes it), the full input's probability,
    reruns). Raises ``CancelledError`` when ``cancel`` is set between reruns; holds ``lock`` (a
    model shared with other sessions) during each rerun only.
    """
    if not 0 < threshold <= 1:
        raise VLIError(f"the threshold is a share of the probability in (0, 1], not {threshold}")
    units = np.asarray(probe.units)
    relevance = np.nan_to_num(np.asarray(relevance, dtype=np.float64))
    if relevance.shape != units.shape:
        raise VLIError(f"{relevance.shape[0]} relevancy values for {units.shape[0]} units")
    order = units[np.argsort(-relevance, kind="stable")]
    reruns = 0

    def run(sets: Sequence[np.ndarray], fraction: float, message: str) -> tuple[np.ndarray, list[str]]:
        nonlocal reruns
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled")
        if progress is not None:
            progress(fraction, message)
        reruns += len(sets)
        with lock or contextlib.nullcontext():
            return probe([np.sort(np.asarray(s, dtype=np.int64)) for s in sets])

    (full,), _ = run([units], 0.0, "running the full input")
    goal = threshold * full
    # 1. The shortest prefix of the relevance order that keeps the output, first on a coarse grid.
    stride = max(1, int(np.ceil(len(order) / MAX_PREFIX_TRIALS)))
    sizes = list(range(0, len(order) + 1, stride))
    if sizes[-1] != len(order):
        sizes.append(len(order))
    found = len(order)
    probabilities, _ = run([order[:k] for k in sizes], 0.1, f"growing the kept set over {len(sizes)} sizes")
    first = next((i for i, p in enumerate(probabilities) if p >= goal), len(sizes) - 1)
    found = sizes[first]
    if stride > 1 and first > 0:
        finer = list(range(sizes[first - 1] + 1, found))
        if finer:
            probabilities, _ = run([order[:k] for k in finer], 0.2, "refining the kept set's size")
            found = next((k for k, p in zip(finer, probabilities, strict=True) if p >= goal), found)
    kept = list(order[:found])
    # 2. Drop what the output does not need, least relevant first; each drop is verified by a rerun.
    grown = list(reversed(kept))
    for index, unit in enumerate(grown):
        trial = [u for u in kept if u != unit]
        (probability,), _ = run([np.array(trial)], 0.3 + 0.35 * index / len(grown), "pruning the kept set")
        if probability >= goal:
            kept = trial
    (kept_probability,), _ = run([np.array(kept)], 0.7, "verifying the kept set")
    # 3. Necessity: delete the most relevant patches until another output wins, then restore what is not needed.
    patches = [u for u in order if u in set(probe.patches.tolist())]
    others = [u for u in units if u not in set(patches)]
    necessary: list[int] = []
    changed_to = ""
    if patches:
        sets = [np.array(others + patches[k:]) for k in range(1, len(patches) + 1)]
        _, winners = run(sets, 0.75, "deleting patches until the output changes")
        count = next((k for k, w in enumerate(winners, start=1) if w != probe.target), None)
        if count is not None:
            necessary = patches[:count]
            for unit in list(reversed(necessary)):
                trial = [u for u in necessary if u != unit]
                _, (winner,) = run([np.array([u for u in units if u not in set(trial)])], 0.9, "pruning")
                if winner != probe.target:
                    necessary = trial
            _, (changed_to,) = run([np.array([u for u in units if u not in set(necessary)])], 0.95, "verifying")
            if changed_to == probe.target:  # pruning is verified step by step, so this cannot happen; say so if it does
                raise VLIError("the necessary set did not verify")
    if progress is not None:
        progress(1.0, "done")
    return [int(u) for u in kept], float(kept_probability), [int(u) for u in necessary], changed_to, float(full), reruns


# Probes of the live models


class _GenerativeProbe:
    """The built-in generative model's token at one step, with only some patches and prompt tokens kept."""

    def __init__(self, adapter: Any, tokens: ExampleTokens, step: int, answer: pd.DataFrame) -> None:
        self.adapter, self.image = adapter, tokens.image
        self.token_text = list(tokens.token_text)
        modality = np.asarray(tokens.modality)
        self.position = int(answer["position"].iloc[step])
        start = int(answer["position"].iloc[0])
        before = np.arange(len(modality)) < min(self.position, start)
        self.patches = np.flatnonzero(before & (modality == IMAGE))
        self.units = np.flatnonzero(before & ((modality == IMAGE) | (modality == TEXT)))
        self.target = str(answer["token"].iloc[step])

    def __call__(self, kept_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        return self.adapter.kept_outputs(self.image, self.token_text, self.position, self.units, kept_sets, self.target)


class _AnswerProbe:
    """A VQA model's answer with only some patches and text tokens kept."""

    def __init__(self, adapter: Any, tokens: ExampleTokens) -> None:
        self.adapter = adapter
        self.image, self.text = tokens.image, tokens.text
        modality = np.asarray(tokens.modality)
        self.n_tokens = len(modality)
        self.patches = np.flatnonzero(modality == IMAGE)
        self.units = np.flatnonzero((modality == IMAGE) | (modality == TEXT))
        self.always = np.flatnonzero(~np.isin(np.arange(self.n_tokens), self.units))
        capture = adapter.forward(self.image, self.text)
        self.labels = list(capture.output_labels)
        self.target = self.labels[int(capture.output.argmax())]

    def __call__(self, kept_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        import torch

        masks = []
        for kept in kept_sets:
            mask = np.zeros(self.n_tokens, dtype=bool)
            mask[self.always] = True
            mask[np.asarray(kept, dtype=np.int64)] = True
            masks.append(mask)
        with torch.no_grad():
            outputs = self.adapter.outputs([self.image] * len(masks), [self.text] * len(masks), masks)
        probabilities = torch.stack([o.reshape(-1) for o in outputs]).softmax(dim=-1).numpy()
        target = self.labels.index(self.target)
        return probabilities[:, target], [self.labels[i] for i in probabilities.argmax(axis=1)]


def probe_for(adapter: object, ds: xr.Dataset, example: str, step: int = 0) -> Probe:
    """A probe of ``adapter`` on stored ``example``: its generated token ``step``, or its answer."""
    tokens = ds.vli.tokens(example)
    if answers.has_answers(ds):
        if not hasattr(adapter, "kept_outputs"):
            name = getattr(adapter, "name", "?")
            raise VLIError(f"the model {name!r} cannot rerun a generated token with tokens deleted")
        answer = ds.vli.answer(example)
        if not 0 <= step < len(answer):
            raise VLIError(f"example {example!r} has {len(answer)} generated tokens; there is no step {step}")
        return _GenerativeProbe(adapter, tokens, step, answer)
    if not getattr(adapter, "is_vqa", False) or not hasattr(adapter, "outputs"):
        raise VLIError(
            f"causal explanations need a VQA or generative model; {getattr(adapter, 'name', '?')!r} is neither"
        )
    return _AnswerProbe(adapter, tokens)


def explain(
    adapter: object,
    ds: xr.Dataset,
    example: str,
    *,
    step: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    method: str | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    lock: threading.Lock | None = None,
) -> CausalExplanation:
    """The causal explanation of ``example``'s output (generated token ``step``) by the live ``adapter``."""
    started = time.perf_counter()
    with lock or contextlib.nullcontext():
        probe = probe_for(adapter, ds, example, step)
    choices = answers.output_map_choices(ds)
    method = method or ("generic" if "generic" in choices else choices[0])
    if method not in choices:
        raise VLIError(f"no stored map {method!r} to guide the search; stored: {', '.join(choices)}")
    relevance = answers.output_map(ds, example, method, step)[probe.units]
    kept, kept_probability, necessary, changed_to, full, reruns = search(
        probe, relevance, threshold=threshold, progress=progress, cancel=cancel, lock=lock
    )
    return CausalExplanation(
        example=example,
        step=step,
        token=probe.target,
        threshold=threshold,
        method=method,
        probability=full,
        kept=kept,
        kept_probability=kept_probability,
        units=[int(u) for u in probe.units],
        necessary=necessary,
        changed_to=changed_to,
        reruns=reruns,
        seconds=time.perf_counter() - started,
    )


# Kept beside the shards


def has_causal(ds: xr.Dataset) -> bool:
    """Whether the store of ``ds`` keeps any causal explanation."""
    store = ds.attrs.get("store_path")
    return store is not None and any((Path(store) / CAUSAL_DIR).glob("*.json"))


def explanation_path(store: str | os.PathLike, example: str) -> Path:
    """The file holding ``example``'s causal explanations in ``store``."""
    return Path(store) / CAUSAL_DIR / f"{urllib.parse.quote(example, safe='')}.json"


def load(store: str | os.PathLike, example: str) -> list[CausalExplanation]:
    """``example``'s stored explanations (none when the file is missing); ``VLIError`` for a damaged file."""
    path = explanation_path(store, example)
    if not path.is_file():
        return []
    try:
        return [CausalExplanation(**entry) for entry in json.loads(path.read_text())]
    except (json.JSONDecodeError, TypeError) as error:
        raise VLIError(f"{path}: not a file of causal explanations ({error})") from None


def save(store: str | os.PathLike, explanation: CausalExplanation) -> Path:
    """Add ``explanation`` to its example's file (replacing one of the same step, threshold and method), atomically."""
    path = explanation_path(store, explanation.example)
    kept = [
        e
        for e in load(store, explanation.example)
        if (e.step, e.threshold, e.method) != (explanation.step, explanation.threshold, explanation.method)
    ]
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps([asdict(e) for e in [*kept, explanation]], indent=1))
    os.replace(partial, path)
    return path
