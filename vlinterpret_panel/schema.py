"""The one dataset schema: names, units and checks for every store, reader and writer.

A store holds one ``xarray.Dataset`` over examples. The full description, with the
reasons behind it, is in ``docs/schema.md``; this module is its executable form.

Conventions
-----------
* Attention rows are queries, columns are keys: ``attention[..., q, k]`` is how much
  query token ``q`` attends to key token ``k``. Rows of real queries sum to 1; rows of
  tokens that are not queries of a layer (e.g. image tokens in a text-only layer of a
  dual-stream model) are all 0. Padded tokens and padded heads are NaN.
* The ``layer`` axis lists attention modules in execution order. ``layer_kind`` says
  which tokens a module relates, so single-stream, dual-stream (co-attention),
  dual-encoder and decoder models all fit one ``(query, key)`` frame over the whole
  token sequence.
* Tokens are in model order. ``modality`` labels each token (text, image, special, pad);
  never infer modality from positions or a text length.
* ``token_box`` is each image token's pixel box ``(x0, y0, x1, y1)`` on the stored image,
  with row 0 at the top and x to the right; NaN for tokens that are not image regions.
* Examples are padded to a common token count and a common image canvas; ``seq_len``,
  ``image_height`` and ``image_width`` keep the true sizes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.packing import ATTENTION_FILL, ATTENTION_SCALE, packed_attrs, stacked_packed

SCHEMA_NAME = "vlinterpret-panel"
SCHEMA_VERSION = "1.2"
"""1.1 added generated answers (``answer_*``, ``step``, ``rank``); readers accept any 1.x store."""

TEXT, IMAGE, SPECIAL, PAD = "text", "image", "special", "pad"
MODALITIES = (TEXT, IMAGE, SPECIAL, PAD)

LAYER_KINDS = {
    "self": "every token attends every token (single stream, or a causal decoder)",
    "text_self": "text tokens attend text tokens (text stream of a dual-stream model)",
    "image_self": "image tokens attend image tokens (image stream)",
    "cross_text_to_image": "text queries attend image keys (cross-attention)",
    "cross_image_to_text": "image queries attend text keys (cross-attention)",
}

BOX_NAMES = ("x0", "y0", "x1", "y1")
CHANNEL_NAMES = ("red", "green", "blue")
GRID_AXES = ("row", "column")
CORRECT_UNKNOWN = -1


@dataclass(frozen=True)
class Variable:
    """One data variable of the schema: layout, units, in-memory type, padding fill, and its source in a record.

    ``from_record`` gives one example's value from an ``ExampleRecord`` (None: the record has
    none); a ``keyed_by`` variable's value is a mapping whose keys label that dimension
    (e.g. relevancy per method). An optional variable is stored when any record has a
    value (and the variables named in ``requires`` are stored). A required variable may be
    left out of a store that has its ``unless`` variable instead (a generated-answer store
    keeps the answer's attention rows, not the full maps). Readers fill padding and examples
    of shards without the variable with ``fill``.
    """

    dims: tuple[str, ...]
    required: bool
    attrs: dict[str, str]
    dtype: Any
    fill: Any
    from_record: Callable[[ExampleRecord], Any] | None = None
    keyed_by: str | None = None
    requires: tuple[str, ...] = ()
    unless: str | None = None


def _answer(field_name: str) -> Callable[[ExampleRecord], Any]:
    """A generated-answer field of a record (None when the record has no generated answer)."""
    return lambda r: None if r.answer is None else getattr(r.answer, field_name)


def _correct(record: ExampleRecord) -> int:
    if record.label is None or record.prediction is None:
        return CORRECT_UNKNOWN
    return int(record.label == record.prediction)


def _targets(record: ExampleRecord) -> dict[str, str] | None:
    """The output each stored relevancy map of the record explains (``relevancy_targets`` per entry, else
    ``relevancy_target`` for all)."""
    if not record.relevancy:
        return None
    explained = record.relevancy_targets or {}
    return {method: explained.get(method, record.relevancy_target or "") for method in record.relevancy}


# The single source of truth for layout, units, types and fill values of every variable.
VARIABLES: dict[str, Variable] = {
    "attention": Variable(
        ("example", "layer", "head", "query", "key"),
        True,
        {"long_name": "attention probability of query token to key token", "units": "1"},
        np.float32,
        np.nan,
        lambda r: r.attention,
        unless="answer_attention",
    ),
    "hidden_states": Variable(
        ("example", "hidden_layer", "token", "feature"),
        True,
        {"long_name": "hidden state of each token after each layer", "units": "1"},
        np.float32,
        np.nan,
        lambda r: r.hidden_states,
        unless="answer_attention",
    ),
    "token_text": Variable(
        ("example", "token"), True, {"long_name": "token string"}, object, "", lambda r: np.array(r.tokens, object)
    ),
    "modality": Variable(
        ("example", "token"),
        True,
        {"long_name": "token modality", "flag_meanings": " ".join(MODALITIES)},
        object,
        PAD,
        lambda r: np.array(r.modality, object),
    ),
    "token_box": Variable(
        ("example", "token", "box"),
        True,
        {"long_name": "pixel box of an image token on the image (NaN if none)", "units": "pixel"},
        np.float32,
        np.nan,
        lambda r: r.token_box,
    ),
    "seq_len": Variable(
        ("example",), True, {"long_name": "number of real (unpadded) tokens"}, np.int32, 0, lambda r: len(r.tokens)
    ),
    "image": Variable(
        ("example", "image_y", "image_x", "channel"),
        True,
        {"long_name": "RGB image, padded to the store's canvas", "units": "1"},
        np.uint8,
        0,
        lambda r: r.image,
    ),
    "image_height": Variable(
        ("example",),
        True,
        {"long_name": "true image height", "units": "pixel"},
        np.int32,
        0,
        lambda r: r.image.shape[0],
    ),
    "image_width": Variable(
        ("example",),
        True,
        {"long_name": "true image width", "units": "pixel"},
        np.int32,
        0,
        lambda r: r.image.shape[1],
    ),
    "text": Variable(
        ("example",), True, {"long_name": "input text (question or caption)"}, object, "", lambda r: r.text
    ),
    "label": Variable(
        ("example",), False, {"long_name": "ground-truth answer or class"}, object, "", lambda r: r.label
    ),
    "prediction": Variable(
        ("example",), False, {"long_name": "model output (answer or class)"}, object, "", lambda r: r.prediction
    ),
    "score": Variable(
        ("example",),
        False,
        {"long_name": "model score of the prediction", "units": "1"},
        np.float32,
        np.nan,
        lambda r: r.score,
    ),
    "top_answer": Variable(
        ("example", "answer_rank"),
        False,
        {"long_name": "the model's most probable answers, the prediction first"},
        object,
        "",
        lambda r: None if r.top_answers is None else np.array([a for a, _ in r.top_answers], object),
    ),
    "top_answer_probability": Variable(
        ("example", "answer_rank"),
        False,
        {"long_name": "probability of each top answer (softmax over the model's answers)", "units": "1"},
        np.float32,
        np.nan,
        lambda r: None if r.top_answers is None else np.array([p for _, p in r.top_answers], np.float32),
    ),
    "correct": Variable(
        ("example",),
        False,
        {
            "long_name": "prediction equals label",
            "flag_values": "-1 0 1",
            "flag_meanings": "unknown incorrect correct",
        },
        np.int8,
        CORRECT_UNKNOWN,  # unknown, not "incorrect"
        _correct,
        requires=("label", "prediction"),
    ),
    "readout_token": Variable(
        ("example", "readout"),
        False,
        {"long_name": "index of the token an output head reads (e.g. [CLS])"},
        np.int32,
        -1,
        lambda r: r.readout_tokens or None,
        keyed_by="readout",
    ),
    "patch_position": Variable(
        ("example", "token", "grid_axis"),
        False,
        {"long_name": "row and column of an image token in its patch grid (-1 if none)"},
        np.int16,
        -1,
        lambda r: r.patch_position,
    ),
    "target_mask": Variable(
        ("example", "image_y", "image_x"),
        False,
        {"long_name": "ground-truth pixels the answer depends on", "units": "1"},
        np.uint8,
        0,
        lambda r: r.target_mask,
    ),
    "relevancy": Variable(
        ("example", "relevancy_method", "token"),
        False,
        {"long_name": "relevancy of each token for the explained output", "units": "1"},
        np.float32,
        np.nan,
        lambda r: r.relevancy or None,
        keyed_by="relevancy_method",
    ),
    "relevancy_target": Variable(
        ("example", "relevancy_method"),
        False,
        {"long_name": "output the relevancy explains"},
        object,
        "",
        _targets,
        keyed_by="relevancy_method",
    ),
    "attention_row_sum": Variable(
        ("example", "layer", "head", "query"),
        False,
        {
            "long_name": "sum of each attention row before it was normalised (imported unnormalised data)",
            "units": "1",
        },
        np.float32,
        np.nan,
    ),
    "answer_token": Variable(
        ("example", "step"),
        False,
        {"long_name": "generated token at each step of the answer"},
        object,
        "",
        _answer("tokens"),
    ),
    "answer_position": Variable(
        ("example", "step"),
        False,
        {"long_name": "token position of each generated token; the query row that predicted it is one before"},
        np.int32,
        -1,
        _answer("positions"),
    ),
    "answer_probability": Variable(
        ("example", "step"),
        False,
        {"long_name": "probability the model gave each generated token", "units": "1"},
        np.float32,
        np.nan,
        _answer("probabilities"),
    ),
    "answer_alternative": Variable(
        ("example", "step", "rank"),
        False,
        {"long_name": "most probable tokens at each step, best first (rank 0: the generated one, greedy decoding)"},
        object,
        "",
        _answer("alternatives"),
    ),
    "answer_alternative_probability": Variable(
        ("example", "step", "rank"),
        False,
        {"long_name": "probability of each alternative token", "units": "1"},
        np.float32,
        np.nan,
        _answer("alternative_probabilities"),
    ),
    "answer_attention": Variable(
        ("example", "layer", "head", "step", "key"),
        False,
        {
            "long_name": "attention of the query that predicted each generated token (answer_position - 1) to each key",
            "units": "1",
        },
        np.float32,
        np.nan,
        _answer("attention"),
    ),
    "answer_hidden_states": Variable(
        ("example", "hidden_layer", "step", "feature"),
        False,
        {"long_name": "hidden state of the query that predicted each generated token, after each layer", "units": "1"},
        np.float32,
        np.nan,
        _answer("hidden_states"),
    ),
    "answer_relevancy": Variable(
        ("example", "relevancy_method", "step", "token"),
        False,
        {"long_name": "relevancy of each token for each generated token (0 for tokens after its query)", "units": "1"},
        np.float32,
        np.nan,
        _answer("relevancy"),
        keyed_by="relevancy_method",
    ),
    "answer_target_mask": Variable(
        ("example", "step", "image_y", "image_x"),
        False,
        {"long_name": "ground-truth pixels of the object each generated token names (all 0: names none)", "units": "1"},
        np.uint8,
        0,
        _answer("target_masks"),
    ),
    "counterfactual_of": Variable(
        ("example",),
        False,
        {"long_name": "id of the example this one was edited from ('' for an original)"},
        object,
        "",
        lambda r: r.counterfactual_of,
    ),
    "counterfactual_edit": Variable(
        ("example",),
        False,
        {"long_name": "the edit that made this example from its original (JSON; '' for an original)"},
        object,
        "",
        lambda r: r.counterfactual_edit,
        requires=("counterfactual_of",),
    ),
    "custom_metric": Variable(
        ("example", "metric", "layer", "head"),
        False,
        {"long_name": "user-supplied per-head metric"},
        np.float32,
        np.nan,
        lambda r: r.custom_metrics or None,
        keyed_by="metric",
    ),
}

COORDINATE_ATTRS: dict[str, dict[str, str]] = {
    "example": {"long_name": "example identifier"},
    "layer": {"long_name": "attention module index in execution order"},
    "layer_kind": {"long_name": "which tokens the module relates", "flag_meanings": " ".join(LAYER_KINDS)},
    "layer_name": {"long_name": "module name in the model"},
    "layer_heads": {"long_name": "number of real heads in the module (more are NaN padding)"},
    "head": {"long_name": "attention head index"},
    "query": {"long_name": "query token position"},
    "key": {"long_name": "key token position"},
    "token": {"long_name": "token position"},
    "hidden_layer": {"long_name": "hidden-state index; 0 is the embedding output"},
    "hidden_layer_name": {"long_name": "where the hidden state is taken"},
    "box": {"long_name": "box corner coordinate"},
    "image_y": {"long_name": "pixel row, 0 at the top", "units": "pixel"},
    "image_x": {"long_name": "pixel column, 0 at the left", "units": "pixel"},
    "channel": {"long_name": "colour channel"},
    "grid_axis": {"long_name": "patch grid axis"},
    "step": {"long_name": "generation step: index of the generated token in the answer"},
    "rank": {"long_name": "rank of an alternative token at a generation step, 0 the most probable"},
    "answer_rank": {"long_name": "rank of an answer by probability, 0 the prediction"},
}

REQUIRED_ATTRS = ("schema", "schema_version", "model_name", "created")


@dataclass(frozen=True)
class ModelInfo:
    """What is common to every example a model produces: its name and its layer layout.

    ``layer_index`` and ``head_index`` are the model's own indices of the stored layers and
    heads when only some are stored (the ``layer`` and ``head`` coordinates); by default all.
    """

    name: str
    layer_kind: Sequence[str]
    num_heads: Sequence[int]
    hidden_layer_name: Sequence[str]
    layer_name: Sequence[str] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    layer_index: Sequence[int] | None = None
    head_index: Sequence[int] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layer_kind) - set(LAYER_KINDS))
        if unknown:
            raise VLIError(f"unknown layer kind(s) {unknown}; use one of {sorted(LAYER_KINDS)}")
        if len(self.num_heads) != len(self.layer_kind):
            raise VLIError("num_heads must give one head count per layer")


@dataclass
class GeneratedAnswer:
    """What a generative model produced for one example, step by step, in the schema's conventions.

    ``positions[k]`` is generated token k's position in the example's token sequence; the row
    that predicted it is ``positions[k] - 1``. ``attention`` is ``(layer, head, step, token)``
    (that row, over every key), ``hidden_states`` ``(hidden_layer, step, feature)`` (that
    row's states), ``relevancy`` per method ``(step, token)``, ``target_masks`` ``(step, H, W)``.
    """

    tokens: Sequence[str]
    positions: np.ndarray
    probabilities: np.ndarray
    alternatives: np.ndarray
    alternative_probabilities: np.ndarray
    attention: np.ndarray
    hidden_states: np.ndarray
    relevancy: Mapping[str, np.ndarray] | None = None
    target_masks: np.ndarray | None = None

    def check(self, where: str, n_tokens: int, image_shape: tuple[int, ...]) -> None:
        """Raise ``VLIError`` if the answer's arrays disagree with each other or the token sequence."""
        steps = len(self.tokens)
        if steps == 0:
            raise VLIError(f"{where}: the generated answer has no tokens")
        positions = np.asarray(self.positions)
        if positions.shape != (steps,) or (positions < 1).any() or (positions >= n_tokens).any():
            raise VLIError(f"{where}: answer positions must give one position in 1..{n_tokens - 1} per generated token")
        expected = {
            "probabilities": (self.probabilities, (steps,)),
            "alternatives": (self.alternatives, (steps, None)),
            "alternative_probabilities": (self.alternative_probabilities, (steps, None)),
            "attention": (self.attention, (None, None, steps, n_tokens)),
            "hidden_states": (self.hidden_states, (None, steps, None)),
        }
        if self.target_masks is not None:
            expected["target_masks"] = (self.target_masks, (steps, *image_shape[:2]))
        for method, values in (self.relevancy or {}).items():
            expected[f"relevancy {method!r}"] = (values, (steps, n_tokens))
        _check_shapes(where, expected)


def _check_shapes(where: str, expected: Mapping[str, tuple[Any, tuple[int | None, ...]]]) -> None:
    """Raise ``VLIError`` naming the first array whose shape is not the expected one (None: any size)."""
    for name, (array, shape) in expected.items():
        got = np.shape(array)
        if len(got) != len(shape) or any(
            want is not None and size != want for size, want in zip(got, shape, strict=True)
        ):
            wanted = tuple("any" if s is None else s for s in shape)
            raise VLIError(f"{where}: {name} has shape {tuple(got)}, expected {wanted}")


@dataclass
class ExampleRecord:
    """Everything a model run yields for one image-text pair, in the schema's conventions.

    Adapters return it; ``records_to_dataset`` turns a batch of them into a Dataset.
    ``attention`` is ``(layer, head, token, token)`` (heads beyond a layer's count NaN),
    ``hidden_states`` is ``(hidden_layer, token, feature)``; a generated answer's record may
    leave both out (None) and keep its ``answer``'s rows instead.
    ``attention_gradient`` (same shape as ``attention``) is for relevancy and is not stored.
    ``relevancy`` maps ``relevancy_method`` entries (``relevancy.targets.entry_name``) to values;
    ``relevancy_targets`` names the output each entry explains (default: ``relevancy_target``).
    """

    example_id: str
    image: np.ndarray
    text: str
    tokens: Sequence[str]
    modality: Sequence[str]
    token_box: np.ndarray
    attention: np.ndarray | None
    hidden_states: np.ndarray | None
    label: str | None = None
    prediction: str | None = None
    score: float | None = None
    top_answers: Sequence[tuple[str, float]] | None = None
    readout_tokens: Mapping[str, int] | None = None
    patch_position: np.ndarray | None = None
    target_mask: np.ndarray | None = None
    relevancy: Mapping[str, np.ndarray] | None = None
    relevancy_target: str | None = None
    relevancy_targets: Mapping[str, str] | None = None
    custom_metrics: Mapping[str, np.ndarray] | None = None
    attention_gradient: np.ndarray | None = None
    answer: GeneratedAnswer | None = None
    counterfactual_of: str | None = None
    counterfactual_edit: str | None = None

    def full_attention(self) -> np.ndarray:
        """``attention``, or a ``VLIError`` for a generated answer's record that keeps only its rows."""
        if self.attention is None:
            raise VLIError(f"example {self.example_id!r} keeps only its answer's attention rows, not the full maps")
        return self.attention

    def check(self) -> None:
        """Raise ``VLIError`` if the arrays disagree in shape with each other."""
        n_tokens = len(self.tokens)
        where = f"example {self.example_id!r}"
        if n_tokens == 0:
            raise VLIError(f"{where}: has no tokens")
        if len(self.modality) != n_tokens:
            raise VLIError(f"{where}: {len(self.modality)} modality labels for {n_tokens} tokens")
        bad = sorted(set(self.modality) - {TEXT, IMAGE, SPECIAL})
        if bad:
            raise VLIError(f"{where}: unknown modality {bad}; use text, image or special")
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise VLIError(
                f"{where}: image must be uint8 (height, width, 3), got {self.image.dtype} {tuple(self.image.shape)}"
            )
        if self.answer is None and (self.attention is None or self.hidden_states is None):
            raise VLIError(f"{where}: has no attention or hidden states (only a generated answer may leave them out)")
        expected: dict[str, tuple[Any, tuple[int | None, ...]]] = {"token_box": (self.token_box, (n_tokens, 4))}
        if self.attention is not None:
            expected["attention"] = (self.attention, (None, None, n_tokens, n_tokens))
        if self.hidden_states is not None:
            expected["hidden_states"] = (self.hidden_states, (None, n_tokens, None))
        if self.patch_position is not None:
            expected["patch_position"] = (self.patch_position, (n_tokens, 2))
        if self.target_mask is not None:
            expected["target_mask"] = (self.target_mask, self.image.shape[:2])
        if self.attention_gradient is not None and self.attention is not None:
            expected["attention_gradient"] = (self.attention_gradient, self.attention.shape)
        _check_shapes(where, expected)
        for name, values in (self.relevancy or {}).items():
            if np.shape(values) != (n_tokens,):
                raise VLIError(f"{where}: relevancy {name!r} needs one value per token")
        if self.answer is not None:
            self.answer.check(where, n_tokens, self.image.shape)


PACKED_VARIABLES = ("attention", "answer_attention")
"""Attention probabilities: stored packed to 16 bits at float16 precision (``packing``)."""


def _stacked_padded(arrays: Sequence[Any], shape: Sequence[int], fill: Any, dtype: Any) -> np.ndarray:
    """``arrays`` stacked on a new first axis, each in the top-left corner of ``shape``, the rest ``fill``.

    One allocation and one write of each value: padding each and then stacking copied a
    ViLT-sized shard's attention twice, and filling a padded example before copying it in
    wrote it twice. Only the padding is filled: along each axis, the part past the array.
    A missing value (None) is all ``fill``.
    """
    out = np.empty((len(arrays), *shape), dtype=dtype)
    for index, array in enumerate(arrays):
        if array is None:
            out[index] = fill
            continue
        array = np.asarray(array, dtype=dtype)
        if array.ndim == 0:  # one value per example (a 0-d object array would be stored as an array)
            out[index] = array[()]
            continue
        inside = [slice(0, n) for n in array.shape]
        block: tuple[int | slice, ...] = (index, *inside)
        out[block] = array
        for axis, size in enumerate(array.shape):
            if size != shape[axis]:
                rest: tuple[int | slice, ...] = (index, *inside[:axis], slice(size, None))
                out[rest] = fill
    return out


def records_to_dataset(
    records: Sequence[ExampleRecord],
    info: ModelInfo,
    extraction: Mapping[str, Any] | None = None,
    *,
    packed_attention: bool = False,
) -> xr.Dataset:
    """Stack example records into one schema Dataset: each variable of ``VARIABLES`` padded with its fill.

    ``packed_attention`` packs the attention maps straight into the store's 16-bit form (``packing``; what
    ``store.write_shard`` at float16 precision writes, value for value) instead of a padded float32 stack:
    half the memory and one pass fewer, for a Dataset that is written, not read.
    """
    if not records:
        raise VLIError("no examples to store")
    for record in records:
        record.check()
    n_layers = len(info.layer_kind)
    n_heads = max(info.num_heads)
    for name in ("attention", "hidden_states"):
        present = [getattr(r, name) is not None for r in records]
        if any(present) and not all(present):
            raise VLIError(f"some examples have {name} and others not; store them in separate shards")
    steps = [len(r.answer.tokens) for r in records if r.answer is not None]
    feature_sizes = [r.hidden_states.shape[2] for r in records if r.hidden_states is not None]
    feature_sizes += [r.answer.hidden_states.shape[2] for r in records if r.answer is not None]
    ranks = [r.answer.alternatives.shape[1] for r in records if r.answer is not None]
    for r in records:
        _check_layout(r, info, n_layers, n_heads)
    sizes = {
        "layer": n_layers,
        "head": n_heads,
        "token": max(len(r.tokens) for r in records),
        "hidden_layer": len(info.hidden_layer_name),
        "feature": max(feature_sizes),
        "image_y": max(r.image.shape[0] for r in records),
        "image_x": max(r.image.shape[1] for r in records),
        "box": len(BOX_NAMES),
        "channel": len(CHANNEL_NAMES),
        "grid_axis": len(GRID_AXES),
        "step": max(steps, default=0),
        "rank": max(ranks, default=0),
        "answer_rank": max((len(r.top_answers or ()) for r in records), default=0),
    }
    sizes["query"] = sizes["key"] = sizes["token"]
    coords: dict[str, Any] = {}
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    keys_of = _keyed_coordinates(records)
    for name, variable in VARIABLES.items():
        if variable.from_record is None or not all(other in data_vars for other in variable.requires):
            continue
        values = [variable.from_record(r) for r in records]
        if all(value is None for value in values):
            continue
        if variable.keyed_by is not None:
            keys = keys_of[variable.keyed_by]
            coords[variable.keyed_by] = keys
            sizes[variable.keyed_by] = len(keys)
            inner = tuple(sizes[dim] for dim in variable.dims[2:])
            values = [[(value or {}).get(key) for key in keys] for value in values]
            values = [_stacked_padded(v, inner, variable.fill, variable.dtype) for v in values]
        shape = tuple(sizes[dim] for dim in variable.dims[1:])
        if packed_attention and name in PACKED_VARIABLES:
            data_vars[name] = (variable.dims, stacked_packed(values, shape))
        else:
            data_vars[name] = (variable.dims, _stacked_padded(values, shape, variable.fill, variable.dtype))
    for name in PACKED_VARIABLES:
        if name in data_vars:
            padding = ATTENTION_FILL if packed_attention else np.nan
            for layer, heads in enumerate(info.num_heads):
                data_vars[name][1][:, layer, heads:] = padding
    if "patch_position" in data_vars:
        coords["grid_axis"] = list(GRID_AXES)
    if sizes["step"]:
        coords.update(step=np.arange(sizes["step"], dtype=np.int32), rank=np.arange(sizes["rank"], dtype=np.int32))
    coords.update(
        example=[r.example_id for r in records],
        layer=np.asarray(info.layer_index if info.layer_index is not None else np.arange(n_layers), dtype=np.int32),
        layer_kind=("layer", np.array(info.layer_kind, dtype=object)),
        layer_name=("layer", np.array(info.layer_name or [f"layer.{i}" for i in range(n_layers)], dtype=object)),
        layer_heads=("layer", np.array(info.num_heads, dtype=np.int32)),
        head=np.asarray(info.head_index if info.head_index is not None else np.arange(n_heads), dtype=np.int32),
        query=np.arange(sizes["token"], dtype=np.int32),
        key=np.arange(sizes["token"], dtype=np.int32),
        token=np.arange(sizes["token"], dtype=np.int32),
        hidden_layer=np.arange(sizes["hidden_layer"], dtype=np.int32),
        hidden_layer_name=("hidden_layer", np.array(info.hidden_layer_name, dtype=object)),
        box=list(BOX_NAMES),
        image_y=np.arange(sizes["image_y"], dtype=np.int32),
        image_x=np.arange(sizes["image_x"], dtype=np.int32),
        channel=list(CHANNEL_NAMES),
    )
    attrs = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "model_name": info.name,
        "model_config": json.dumps(dict(info.config), sort_keys=True, default=str),
        "extraction": json.dumps(dict(extraction or {}), sort_keys=True, default=str),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    if packed_attention:
        for name in PACKED_VARIABLES:
            if name in ds:
                ds[name].attrs.update(packed_attrs())
    return with_schema_attrs(ds)


def _check_layout(record: ExampleRecord, info: ModelInfo, n_layers: int, n_heads: int) -> None:
    """Raise ``VLIError`` if a record's layers, heads or hidden layers disagree with the model info."""
    where = f"example {record.example_id!r}"
    attention = [("attention", record.attention)]
    hidden = [("hidden_states", record.hidden_states)]
    if record.answer is not None:
        attention.append(("answer attention", record.answer.attention))
        hidden.append(("answer hidden states", record.answer.hidden_states))
    for name, values in attention:
        if values is not None and values.shape[:2] != (n_layers, n_heads):
            raise VLIError(
                f"{where}: {name} has {values.shape[:2]} (layers, heads), the model info says {(n_layers, n_heads)}"
            )
    for name, values in hidden:
        if values is not None and values.shape[0] != len(info.hidden_layer_name):
            raise VLIError(
                f"{where}: {values.shape[0]} hidden layers in {name}, "
                f"the model info names {len(info.hidden_layer_name)}"
            )


def _keyed_coordinates(records: Sequence[ExampleRecord]) -> dict[str, list[str]]:
    """The labels of each ``keyed_by`` dimension: every key any record gives any variable keyed by it."""
    keys: dict[str, set[str]] = {}
    for variable in VARIABLES.values():
        if variable.keyed_by is None or variable.from_record is None:
            continue
        found = keys.setdefault(variable.keyed_by, set())
        for record in records:
            found.update(variable.from_record(record) or {})
    return {dim: sorted(labels) for dim, labels in keys.items()}


def with_schema_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Attach the schema's long names and units to every known variable and coordinate."""
    for name, variable in VARIABLES.items():
        if name in ds.variables:
            ds[name].attrs.update(variable.attrs)
    for name, attrs in COORDINATE_ATTRS.items():
        if name in ds.variables:
            ds[name].attrs.update(attrs)
    return ds


def _fail(source: str | None, message: str) -> None:
    prefix = f"{source}: " if source else ""
    raise VLIError(prefix + message)


def validate(ds: xr.Dataset, *, source: str | None = None, check_values: bool = False) -> None:
    """Raise ``VLIError`` naming ``source`` if ``ds`` does not follow the schema.

    The structural checks read metadata only, so every reader runs them on open.
    ``check_values`` also scans the data (chunk by chunk when Dask-backed): NaN outside
    padding, attention rows that do not sum to 1 (or 0 for non-queries), bad modalities.
    """
    if ds.attrs.get("schema") != SCHEMA_NAME:
        _fail(source, "not a vlinterpret-panel dataset (no 'schema' attribute naming it)")
    version = str(ds.attrs.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        _fail(source, f"schema version {version or 'missing'}, this reader supports {SCHEMA_VERSION}")
    for attr in REQUIRED_ATTRS:
        if attr not in ds.attrs:
            _fail(source, f"missing attribute {attr!r}")
    for name, variable in VARIABLES.items():
        if name not in ds.variables:
            if variable.required and not (variable.unless and variable.unless in ds.variables):
                _fail(source, f"missing variable {name!r}")
            continue
        if ds[name].dims != variable.dims:
            _fail(source, f"variable {name!r} has dims {ds[name].dims}, expected {variable.dims}")
    sizes = ds.sizes
    if any(sizes.get(dim, sizes["token"]) != sizes["token"] for dim in ("query", "key")):
        _fail(
            source,
            f"token/attention length mismatch: {sizes['token']} tokens but attention is "
            f"{sizes.get('query')} queries x {sizes.get('key')} keys",
        )
    answer_variables = sorted(str(name) for name in ds.data_vars if str(name).startswith("answer_"))
    if answer_variables and not {"answer_token", "answer_position"} <= set(answer_variables):
        _fail(source, f"{', '.join(answer_variables)} need the generated tokens: answer_token and answer_position")
    if sizes["box"] != 4 or sizes["channel"] != 3:
        _fail(source, "token_box needs 4 box coordinates and image 3 channels")
    for coord in ("layer_kind", "layer_heads", "hidden_layer_name"):
        if coord not in ds.coords:
            _fail(source, f"missing coordinate {coord!r}")
    unknown = sorted(set(ds["layer_kind"].values.tolist()) - set(LAYER_KINDS))
    if unknown:
        _fail(source, f"unknown layer kind(s) {unknown}")
    if int(ds["layer_heads"].max()) > sizes["head"]:
        _fail(source, "layer_heads exceeds the head axis")
    if check_values:
        _check_values(ds, source)


def require_full_attention(ds: xr.Dataset, purpose: str) -> None:
    """``VLIError`` if ``ds`` keeps only generated answers' attention rows, which ``purpose`` cannot use."""
    if "attention" not in ds:
        raise VLIError(
            f"{purpose} needs the full attention maps; this store keeps only the generated answers' "
            "attention rows (answer_attention): extract it with --rows all for the full maps"
        )


def _where(ds: xr.Dataset, example: int, dims: Sequence[str], index: Sequence[int]) -> dict[str, Any]:
    """Readable coordinates of a flagged element of one example's array."""
    labels = {"example": ds["example"].values[example] if "example" in ds.coords else example}
    for dim, i in zip(dims, index, strict=True):
        labels[dim] = ds[dim].values[i] if dim in ds.coords else i
    return {dim: value.item() if isinstance(value, np.generic) else value for dim, value in labels.items()}


VALUE_CHECK_BYTES = 64 * 2**20
"""Attention bytes checked at once by ``_check_values``: bounds memory on big Dask-backed stores."""


def _check_values(ds: xr.Dataset, source: str | None) -> None:
    """Value checks of ``validate``, on blocks of examples so memory stays bounded.

    NumPy over a whole block (per-example lengths as masks): a writer checks every shard it
    writes, so this is on the extraction's hot path, where one ``isel`` per example cost
    more than the rest of the write.
    """
    n_tokens = ds.sizes["token"]
    seq_lens = np.asarray(ds["seq_len"].values)
    if ((seq_lens < 1) | (seq_lens > n_tokens)).any():
        _fail(source, f"seq_len must lie between 1 and {n_tokens}")
    layer_heads = np.asarray(ds["layer_heads"].values)
    real_head = np.arange(ds.sizes["head"])[None, :] < layer_heads[:, None]  # (layer, head)
    maps = [name for name in ("attention", "answer_attention") if name in ds]
    example_bytes = sum(ds[name].dtype.itemsize * ds[name][0].size for name in maps)
    block = max(1, VALUE_CHECK_BYTES // max(1, example_bytes))
    answer = "answer_position" in ds
    if answer:
        positions = np.asarray(ds["answer_position"].values)
        beyond = (positions >= seq_lens[:, None]) | ((positions < 1) & (positions != -1))
        if beyond.any():
            index = np.argwhere(beyond)[0]
            where = _where(ds, index[0], ["step"], index[1:])
            _fail(source, f"answer_position must lie in 1..seq_len-1 (or -1 past the answer), see {where}")
    names = ["modality", *maps, *(name for name in ("hidden_states", "answer_hidden_states") if name in ds)]
    for first in range(0, ds.sizes["example"], block):
        part = ds[names].isel(example=slice(first, first + block))
        valid_token = np.arange(n_tokens)[None, :] < seq_lens[first : first + block, None]  # (example, token)
        _check_modality(ds, part, first, valid_token, source)
        if "attention" in part:
            _check_rows(ds, part["attention"], first, valid_token, valid_token, real_head, source)
        if "hidden_states" in part:
            _check_hidden(ds, part["hidden_states"], first, valid_token, source)
        if answer:
            valid_step = positions[first : first + block] >= 0  # (example, step)
            if "answer_attention" in part:
                _check_rows(ds, part["answer_attention"], first, valid_step, valid_token, real_head, source)
            if "answer_hidden_states" in part:
                _check_hidden(ds, part["answer_hidden_states"], first, valid_step, source)


def _check_modality(ds: xr.Dataset, part: xr.Dataset, first: int, valid_token: np.ndarray, source: str | None) -> None:
    """Known modality values, and ``pad`` exactly past ``seq_len``; ``valid_token`` is ``(example, token)``."""
    modality = np.asarray(part["modality"].values)
    bad = sorted(set(np.unique(modality).tolist()) - set(MODALITIES))
    if bad:
        _fail(source, f"unknown modality value(s) {bad}; use one of {list(MODALITIES)}")
    wrong = np.argwhere((modality == PAD) == valid_token)
    if wrong.size:
        where = _where(ds, first + wrong[0][0], ["token"], wrong[0][1:])
        _fail(
            source,
            f"padding is not explicit: modality 'pad' must mark exactly the tokens past seq_len, see {where}",
        )


def _check_rows(
    ds: xr.Dataset,
    values: xr.DataArray,
    first: int,
    valid_row: np.ndarray,
    valid_key: np.ndarray,
    real_head: np.ndarray,
    source: str | None,
) -> None:
    """Attention ``(example, layer, head, row, key)``: no NaN in use, rows summing to 1 (or 0 for non-queries)."""
    tolerance = 2e-2
    name, row_dim = str(values.name), str(values.dims[3])
    attention = np.asarray(values.values)
    in_use = real_head[None, :, :, None, None] & valid_row[:, None, None, :, None] & valid_key[:, None, None, None, :]
    packed = attention.dtype == np.uint16  # as stored (``packing``): checked as it will be read
    holes = (attention == ATTENTION_FILL if packed else np.isnan(attention)) & in_use
    if holes.any():
        index = np.argwhere(holes)[0]
        where = _where(ds, first + index[0], ["layer", "head", row_dim, "key"], index[1:])
        _fail(source, f"{name} has NaN outside padding at {where}")
    row_sum = np.where(in_use, attention, 0).sum(axis=-1) * (ATTENTION_SCALE if packed else 1.0)
    bad_rows = (np.abs(row_sum - 1) > tolerance) & (np.abs(row_sum) > tolerance)
    if bad_rows.any():
        index = np.argwhere(bad_rows)[0]
        where = _where(ds, first + index[0], ["layer", "head", row_dim], index[1:])
        _fail(
            source,
            f"{name} rows must sum to 1 (or 0 for tokens that are not queries of a layer); "
            f"the row at {where} sums to {row_sum[tuple(index)]:.3f}",
        )


def _check_hidden(ds: xr.Dataset, values: xr.DataArray, first: int, valid_row: np.ndarray, source: str | None) -> None:
    """Hidden states ``(example, hidden_layer, row, feature)``: NaN only as padding (rows, or trailing features)."""
    name, row_dim = str(values.name), str(values.dims[2])
    hidden_nan = np.isnan(np.asarray(values.values))
    # Narrower towers pad trailing features with NaN; anything else is a hole in the data.
    not_suffix = (np.diff(hidden_nan.astype(np.int8), axis=-1) < 0).any(axis=-1)
    holes = (not_suffix | hidden_nan.all(axis=-1)) & valid_row[:, None, :]
    if holes.any():
        index = np.argwhere(holes)[0]
        where = _where(ds, first + index[0], ["hidden_layer", row_dim], index[1:])
        _fail(source, f"{name} has NaN outside padding at {where}")
