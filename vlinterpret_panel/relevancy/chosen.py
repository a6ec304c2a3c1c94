"""Relevancy of a stored example for an answer the user picks: read from the store, else computed with the model.

The dashboard's answer list offers the example's top answers (``top_answer``, stored at extraction; older
stores: the prediction and the label). Picking one asks for ``method``'s map of that answer, or of the answer
against a second one; a map the store holds (``--target``) is read, any other is computed by the live model
(``vlinterpret serve STORE --model SPEC``) on the stored image and text, and kept in a small cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from vlinterpret_panel.adapters.base import ModelAdapter, ModelInput, top_answers
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.capture import capture_for, relevancy_values
from vlinterpret_panel.relevancy.targets import VERSUS, Target, split_entry

STORED, COMPUTED = "stored", "computed with the model"
_CACHE_SIZE = 64


@dataclass(frozen=True)
class ChosenRelevancy:
    """One token-relevancy map of an example: its values over the real tokens, what it explains, where from."""

    values: np.ndarray
    target: str
    source: str


def answer_choices(ds: xr.Dataset, example: str, adapter: ModelAdapter | None = None) -> list[tuple[str, float]]:
    """The answers to offer for ``example``, most probable first, with their probabilities (NaN: unknown).

    Stored ``top_answer`` first; else the model's own top answers when it is at hand; else the prediction
    (its score) and the ground-truth label."""
    position = ds.vli.position(example)
    if "top_answer" in ds:
        names = ds["top_answer"].isel(example=position).values
        probabilities = ds["top_answer_probability"].isel(example=position).values
        stored = [(str(name), float(p)) for name, p in zip(names, probabilities, strict=True) if str(name)]
        if stored:
            return stored
    if adapter is not None:
        tokens = ds.vli.tokens(example)
        with torch.no_grad():
            found = top_answers(adapter.forward(tokens.image, tokens.text))
        if found:
            return found
    choices: list[tuple[str, float]] = []
    item = ds.isel(example=position)
    if "prediction" in ds and str(item["prediction"].values):
        score = float(item["score"].values) if "score" in ds else float("nan")
        choices.append((str(item["prediction"].values), score))
    if "label" in ds and str(item["label"].values) not in ("", *(name for name, _ in choices)):
        choices.append((str(item["label"].values), float("nan")))
    return choices


CAPTION_CHOICES = 30
"""Other captions offered to contrast a similarity model's caption with."""
CAPTIONS_SCANNED = 500
"""Examples whose captions are read to find them (a bounded read, whatever the store's size)."""


def scores_captions(ds: xr.Dataset) -> bool:
    """Whether the store's model scores an image with a caption (a dual encoder: no answers, no prediction)."""
    return "prediction" not in ds and "relevancy" in ds


def store_captions(ds: xr.Dataset) -> list[str]:
    """The distinct captions of the store's first ``CAPTIONS_SCANNED`` examples (one bounded read)."""
    scanned = ds["text"].isel(example=slice(0, CAPTIONS_SCANNED)).values
    return [caption for caption in dict.fromkeys(str(text) for text in scanned) if caption]


def caption_choices(
    ds: xr.Dataset, example: str, adapter: ModelAdapter | None = None, captions: Sequence[str] | None = None
) -> list[tuple[str, float]]:
    """Other captions (``captions``, default ``store_captions``) to contrast ``example``'s with: with a model, ranked
    by its score with this image, best first (the captions it confuses most), else in store order with NaN scores;
    at most ``CAPTION_CHOICES``."""
    tokens = ds.vli.tokens(example)
    others = [caption for caption in (store_captions(ds) if captions is None else captions) if caption != tokens.text]
    with torch.no_grad():
        score_captions = adapter.forward(tokens.image, tokens.text).score_captions if adapter and others else None
        if score_captions is None:
            return [(caption, float("nan")) for caption in others[:CAPTION_CHOICES]]
        scores = score_captions(others).tolist()  # the image once, the captions in one text pass
    ranked = sorted(zip(others, scores, strict=True), key=lambda pair: -pair[1])
    return ranked[:CAPTION_CHOICES]


class ChosenRelevancyReader:
    """Maps of chosen answers for one store: read when stored, else computed with ``adapter`` (cached)."""

    def __init__(self, adapter: ModelAdapter | None = None, lock: threading.Lock | None = None) -> None:
        self.adapter = adapter
        self._lock = lock or threading.Lock()
        self._cache: OrderedDict[tuple[str, str, str], ChosenRelevancy] = OrderedDict()

    def relevancy(self, ds: xr.Dataset, example: str, method: str, answer: str, versus: str = "") -> ChosenRelevancy:
        """``method``'s map of ``answer`` (or of ``answer`` against ``versus``) for ``example``."""
        wanted = f"{answer}{VERSUS}{versus}" if versus else answer
        stored = _stored(ds, example, method, wanted)
        if stored is not None:
            return stored
        key = (example, method, wanted)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self.adapter is None:
            raise VLIError(
                f"the store holds no {method} map of {wanted!r} for this example; serve it with --model to "
                "compute any answer's map, or extract with --target"
            )
        tokens = ds.vli.tokens(example)
        label = str(ds["label"].isel(example=tokens.index).values) if "label" in ds else None
        item = ModelInput(tokens.example_id, tokens.image, tokens.text, label=label or None)
        with self._lock:
            captured, _, _ = capture_for(self.adapter, item, [method], target=Target(answer, versus or None))
        values = relevancy_values(captured, [method])[method][: tokens.n_tokens].astype(np.float64)
        result = ChosenRelevancy(values, captured.target, COMPUTED)
        self._cache[key] = result
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result


def stored_targets(ds: xr.Dataset, example: str, method: str) -> dict[str, str]:
    """The targets ``method``'s stored entries resolved to for ``example`` (``red vs blue``), each with its entry.

    One small read (the example's ``relevancy_target``); no map is read."""
    entries = [entry for entry in ds.vli.relevancy_methods if split_entry(entry)[0] == split_entry(method)[0]]
    if not entries or "relevancy_target" not in ds:
        return {}
    targets = ds["relevancy_target"].isel(example=ds.vli.position(example)).sel(relevancy_method=entries).values
    return {str(target): entry for entry, target in zip(entries, targets, strict=True)}


def _stored(ds: xr.Dataset, example: str, method: str, wanted: str) -> ChosenRelevancy | None:
    """The stored map of ``method`` whose resolved target for ``example`` is ``wanted``, if the store has one."""
    entry = stored_targets(ds, example, method).get(wanted)
    if entry is None:
        return None
    return ChosenRelevancy(np.nan_to_num(ds.vli.relevancy(example, entry).values), wanted, STORED)
