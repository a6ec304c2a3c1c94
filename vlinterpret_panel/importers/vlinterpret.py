"""Import a VL-InterpreT database (LMDB) into a vlinterpret-panel store, without running its pickles.

The record layout, read from VL-InterpreT's ``app/database/database.py`` and ``db_example.py``:
every LMDB value is lz4-frame-compressed msgpack. Keys made of digits are examples whose
msgpack value is a pickled dict with ``image`` (H, W, 3), ``tokens`` (text tokens, then image
tokens), ``txt_len``, ``img_coords`` ((x, y) cell of each image token, (0, 0) at the top left),
``attention`` (layers, heads, T, T), ``hidden_states`` (layers + 1, T, dim) and optionally
``accuracy`` and ``custom_metrics`` ({name: (layers, heads)}). Its preprocessing adds
``img_grid_size`` (columns, rows) and ``tsne``. The other keys are ``n_examples``,
``n_layers`` and ``n_heads`` (msgpack integers) and ``faiss`` (a pickled neighbour index of
t-SNE points). Pickles are decoded with ``safe_pickle.safe_loads`` only; ``faiss`` and
``tsne`` are derived from the rest (unseeded t-SNE) and are not imported.

Conversions, all recorded in the store's ``extraction`` attribute:

* ``img_coords`` (x, y) are (column, row counted from the top): VL-InterpreT's data format
  and its patch picker use that; only its text-attention view counts rows from the bottom
  (``w*(h-j-1)+i``), a display bug, not a property of the data. ``patch_position`` is
  (row, column) with the same top origin, so no flip is needed; ``token_box`` is the cell of
  the ``columns x rows`` grid over the image, as VL-InterpreT's overlay draws it.
* VL-InterpreT's preprocessing sorts image tokens by (row, column) in ``tokens``,
  ``img_coords`` and ``attention`` but not in ``hidden_states``. Its own writers name image
  tokens ``IMG_<original index>``; when they do, the hidden states are put back in step with
  the tokens, otherwise the hidden states are kept as stored and the import warns.
* ``accuracy`` (True/False) becomes ``correct`` (1/0); a fractional accuracy becomes ``score``.
* Attention must be post-softmax. Rows that do not sum to 1 (VL-InterpreT's example database
  holds uniform random numbers) are refused unless ``normalize_attention`` is set; then each
  row is divided by its sum, and the sums are kept in ``attention_row_sum`` so that
  ``attention * attention_row_sum`` gives back the source.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import lz4.frame
import msgpack
import numpy as np
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.importers.safe_pickle import safe_loads
from vlinterpret_panel.schema import (
    CORRECT_UNKNOWN,
    IMAGE,
    SPECIAL,
    TEXT,
    ExampleRecord,
    ModelInfo,
    records_to_dataset,
    with_schema_attrs,
)
from vlinterpret_panel.store import Precision, write_shard
from vlinterpret_panel.store import example_ids as stored_example_ids

IMPORTER_VERSION = "1"

# Tokenizer markers that carry no text. Not "[UNK]" (it stands for a word) nor added tokens
# such as KD-VLP's "[PERSON_3]", which are content.
SPECIAL_TOKENS = frozenset(
    {
        "[CLS]",
        "[SEP]",
        "[PAD]",
        "[MASK]",
        "[BOS]",
        "[EOS]",
        "<s>",
        "</s>",
        "<pad>",
        "<mask>",
        "<bos>",
        "<eos>",
        "<|endoftext|>",
        "<|startoftext|>",
    }
)
REQUIRED_FIELDS = ("image", "tokens", "txt_len", "img_coords", "attention", "hidden_states")
KNOWN_FIELDS = frozenset(REQUIRED_FIELDS) | {"ex_id", "accuracy", "custom_metrics", "img_grid_size", "tsne", "text"}
# Same criterion as schema.validate: a row is a query's (sums to 1) or not a query (sums to 0).
ROW_SUM_TOLERANCE = 2e-2
COORDINATE_CONVERSION = (
    "img_coords (x, y) with (0, 0) at the top-left read as (column, row from top); "
    "patch_position = (row, column), no flip; token_box = the token's cell of the "
    "img_grid_size (columns, rows) grid over the image, in pixels"
)


@dataclass
class ImportReport:
    """What an import did: where it wrote, and the conversions that were needed."""

    store: Path
    example_ids: list[str]
    shards: list[Path]
    realigned_hidden_states: list[str] = field(default_factory=list)
    unverified_hidden_state_order: list[str] = field(default_factory=list)
    attention_normalized: bool = False


def _decode_value(value: bytes, *, source: str) -> Any:
    """Undo VL-InterpreT's value encoding: lz4 frame, then msgpack."""
    try:
        packed = lz4.frame.decompress(value)
    except Exception as error:  # lz4 raises RuntimeError, or others for truncated frames
        raise VLIError(f"{source}: not lz4-compressed as VL-InterpreT writes values ({error})") from None
    try:
        return msgpack.unpackb(packed, raw=False)
    except Exception as error:  # msgpack raises ExtraData, FormatError, ValueError, ...
        raise VLIError(f"{source}: not a msgpack value as VL-InterpreT writes them ({error})") from None


@contextmanager
def _read_transaction(path: Path) -> Iterator[lmdb.Transaction]:
    """A read-only snapshot of the database that never writes to its directory (no lock file)."""
    if not (path / "data.mdb").is_file():
        raise VLIError(f"{path}: not a VL-InterpreT database (no data.mdb in the directory)")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, create=False, readahead=False, max_dbs=0)
    except lmdb.Error as error:
        raise VLIError(f"{path}: cannot open the LMDB database ({error})") from None
    try:
        with env.begin(buffers=False) as txn:
            yield txn
    finally:
        env.close()


def _example_keys(txn: lmdb.Transaction, path: Path) -> list[bytes]:
    """Keys of the examples (VL-InterpreT's rule: keys made of digits), in numeric order."""
    keys = [bytes(key) for key in txn.cursor().iternext(keys=True, values=False) if bytes(key).isdigit()]
    if not keys:
        raise VLIError(f"{path}: the database holds no examples (no numeric keys)")
    return sorted(keys, key=int)


def _header(txn: lmdb.Transaction, path: Path) -> dict[str, int]:
    """``n_layers``/``n_heads``/``n_examples`` where present as plain msgpack integers."""
    header = {}
    for name in ("n_layers", "n_heads", "n_examples"):
        value = txn.get(name.encode())
        if value is not None:
            decoded = _decode_value(bytes(value), source=f"{path} key {name!r}")
            if isinstance(decoded, int):
                header[name] = decoded
    return header


def _load_example(txn: lmdb.Transaction, key: bytes, path: Path) -> dict[str, Any]:
    """Decode one example's dict with the restricted unpickler."""
    source = f"{path} key {key.decode()!r}"
    raw = txn.get(key)
    if raw is None:
        raise VLIError(f"{source}: the key vanished from the database")
    payload = _decode_value(bytes(raw), source=source)
    if not isinstance(payload, bytes):
        raise VLIError(f"{source}: expected a pickled example, found a msgpack {type(payload).__name__}")
    example = safe_loads(payload, source=source)
    if not isinstance(example, dict):
        raise VLIError(f"{source}: expected a dict of example fields, found {type(example).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in example]
    if missing:
        raise VLIError(f"{source}: example lacks field(s) {missing}")
    return example


def _array(example: Mapping[str, Any], name: str, ndim: int, source: str) -> np.ndarray:
    """A numeric field as an array of ``ndim`` dimensions (lists of per-layer arrays are stacked)."""
    value = example[name]
    try:
        array = np.stack(value) if isinstance(value, list | tuple) else np.asarray(value)
    except ValueError as error:
        raise VLIError(f"{source}: {name} is ragged ({error})") from None
    if array.ndim != ndim or array.dtype.kind not in "biuf":
        raise VLIError(f"{source}: {name} must be a numeric array of {ndim} dims, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise VLIError(f"{source}: {name} holds NaN or infinite values")
    return array


def _image(example: Mapping[str, Any], source: str) -> np.ndarray:
    """The image as uint8 RGB; refuses values that would not survive the conversion exactly."""
    image = np.asarray(example["image"])
    if image.size == 0:
        return np.zeros((0, 0, 3), dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype.kind not in "biuf":
        raise VLIError(f"{source}: image must be numeric (height, width, 3) RGB, got {image.dtype} {image.shape}")
    if image.dtype.kind == "f" and not np.array_equal(image, np.round(image)):
        raise VLIError(f"{source}: image has fractional pixel values; expected integers 0-255")
    if image.min() < 0 or image.max() > 255:
        raise VLIError(f"{source}: image values lie outside 0-255")
    return image.astype(np.uint8)


def _grid(example: Mapping[str, Any], coords: np.ndarray, source: str) -> tuple[int, int]:
    """(columns, rows) of the patch grid: ``img_grid_size`` if preprocessed, else max coords + 1."""
    derived = (int(coords[:, 0].max()) + 1, int(coords[:, 1].max()) + 1)
    stored = example.get("img_grid_size")
    if stored is None:
        return derived
    stored = np.asarray(stored)
    if stored.shape != (2,) or stored.dtype.kind not in "iu":
        raise VLIError(f"{source}: img_grid_size must be two integers (columns, rows), got {stored.tolist()!r}")
    columns, rows = int(stored[0]), int(stored[1])
    if columns < derived[0] or rows < derived[1]:
        raise VLIError(f"{source}: img_grid_size {(columns, rows)} is smaller than img_coords reach {derived}")
    return columns, rows


def _hidden_state_order(tokens: list[str], txt_len: int) -> np.ndarray | None:
    """Original positions of the image tokens if their names (``IMG_<i>``) reveal them, else None."""
    names = tokens[txt_len:]
    if not all(name.startswith("IMG_") and name[4:].isdigit() for name in names):
        return None
    original = np.array([int(name[4:]) for name in names])
    if sorted(original.tolist()) != list(range(len(names))):
        return None
    return original


def _join_text(tokens: list[str], modality: list[str]) -> str:
    """The input text rebuilt from its tokens (WordPiece ``##`` pieces glued to the word before)."""
    words: list[str] = []
    for token, kind in zip(tokens, modality, strict=True):
        if kind != TEXT:
            continue
        if token.startswith("##") and words:
            words[-1] += token[2:]
        else:
            words.append(token)
    return " ".join(words)


@dataclass
class _Converted:
    """One example's record plus what the import must report or decide across examples."""

    record: ExampleRecord
    accuracy: Any
    realigned: bool
    order_unverified: bool


def _convert(example_id: str, example: Mapping[str, Any], source: str) -> _Converted:
    """One VL-InterpreT example dict as an ``ExampleRecord`` (see the module docstring)."""
    if not isinstance(example["tokens"], list | tuple | np.ndarray):
        raise VLIError(f"{source}: tokens must be a list of strings, got {type(example['tokens']).__name__}")
    tokens = [str(token) for token in example["tokens"]]
    n_tokens = len(tokens)
    txt_len = example["txt_len"]
    if isinstance(txt_len, bool) or not isinstance(txt_len, int | np.integer) or not 0 <= txt_len <= n_tokens:
        raise VLIError(f"{source}: txt_len {txt_len!r} must be an integer between 0 and {n_tokens} tokens")
    txt_len = int(txt_len)
    attention = _array(example, "attention", 4, source)
    hidden_states = _array(example, "hidden_states", 3, source)
    if attention.shape[2:] != (n_tokens, n_tokens):
        raise VLIError(f"{source}: attention is {attention.shape}, expected (layers, heads, {n_tokens}, {n_tokens})")
    if hidden_states.shape[:2] != (attention.shape[0] + 1, n_tokens):
        raise VLIError(
            f"{source}: hidden_states is {hidden_states.shape}, expected ({attention.shape[0] + 1}, {n_tokens}, dim)"
        )
    image = _image(example, source)
    modality = [SPECIAL if token in SPECIAL_TOKENS else TEXT for token in tokens[:txt_len]]
    modality += [IMAGE] * (n_tokens - txt_len)

    token_box = np.full((n_tokens, 4), np.nan, dtype=np.float32)
    patch_position = np.full((n_tokens, 2), -1, dtype=np.int16)
    raw_coords = example["img_coords"]
    if raw_coords is not None and len(raw_coords) > 0:
        coords = np.asarray(raw_coords)
        if coords.shape != (n_tokens - txt_len, 2) or coords.dtype.kind not in "iu" or coords.min() < 0:
            raise VLIError(
                f"{source}: img_coords must give one (x, y) pair of non-negative integers per image token "
                f"({n_tokens - txt_len}), got {coords.dtype} {coords.shape}"
            )
        columns, rows = _grid(example, coords, source)
        cell_width, cell_height = image.shape[1] / columns, image.shape[0] / rows
        x, y = coords[:, 0], coords[:, 1]
        patch_position[txt_len:] = np.stack([y, x], axis=1)
        token_box[txt_len:] = np.stack(
            [x * cell_width, y * cell_height, (x + 1) * cell_width, (y + 1) * cell_height], axis=1
        )

    realigned = order_unverified = False
    if "img_grid_size" in example and n_tokens > txt_len:
        original = _hidden_state_order(tokens, txt_len)
        if original is None:
            order_unverified = True
        elif not np.array_equal(original, np.arange(n_tokens - txt_len)):
            hidden_states = hidden_states.copy()
            hidden_states[:, txt_len:] = hidden_states[:, txt_len + original]
            realigned = True

    custom_metrics = example.get("custom_metrics") or {}
    if not isinstance(custom_metrics, dict):
        raise VLIError(f"{source}: custom_metrics must be a dict of name -> (layers, heads) array")
    metrics = {}
    for name, values in custom_metrics.items():
        metric = np.asarray(values)
        if metric.shape != attention.shape[:2] or metric.dtype.kind not in "biuf":
            raise VLIError(
                f"{source}: custom metric {name!r} is {metric.dtype} {metric.shape}, "
                f"expected numbers of shape {attention.shape[:2]} (layers, heads)"
            )
        metrics[str(name)] = metric
    text = example.get("text")
    record = ExampleRecord(
        example_id=example_id,
        image=image,
        text=str(text) if isinstance(text, str) else _join_text(tokens, modality),
        tokens=tokens,
        modality=modality,
        token_box=token_box,
        attention=attention,
        hidden_states=hidden_states,
        patch_position=patch_position,
        custom_metrics=metrics or None,
    )
    accuracy = example.get("accuracy")
    if accuracy is not None and not isinstance(accuracy, bool | np.bool_ | int | float | np.integer | np.floating):
        raise VLIError(f"{source}: accuracy must be True/False or a number, got {type(accuracy).__name__}")
    record.check()
    return _Converted(record, accuracy, realigned, order_unverified)


def _row_sums(attention: np.ndarray) -> np.ndarray:
    return attention.sum(axis=-1, dtype=np.float64)


def _is_normalized(attention: np.ndarray) -> bool:
    sums = _row_sums(attention)
    return bool(np.all((np.abs(sums - 1) <= ROW_SUM_TOLERANCE) | (np.abs(sums) <= ROW_SUM_TOLERANCE)))


def _to_dataset(
    converted: list[_Converted],
    info: ModelInfo,
    extraction: Mapping[str, Any],
    *,
    normalize_attention: bool,
    accuracy_variable: str | None,
) -> xr.Dataset:
    """Stack converted examples into a schema Dataset, with ``correct`` or ``score`` and row sums."""
    row_sums = []
    if normalize_attention:
        for item in converted:
            sums = _row_sums(item.record.full_attention())
            row_sums.append(sums)
            divisor = np.where(sums == 0, 1.0, sums)[..., None]
            item.record.attention = item.record.attention / divisor
    ds = records_to_dataset([item.record for item in converted], info, extraction)
    if normalize_attention:
        padded = np.full(ds["attention"].shape[:-1], np.nan, dtype=np.float32)
        for index, sums in enumerate(row_sums):
            padded[index, :, : sums.shape[1], : sums.shape[2]] = sums
        ds["attention_row_sum"] = (("example", "layer", "head", "query"), padded)
        ds["attention_row_sum"].attrs.update(
            long_name="sum of the source attention row before normalization (source = attention * this)",
            units="1",
        )
    accuracies = [item.accuracy for item in converted]
    if accuracy_variable == "correct":
        correct = [CORRECT_UNKNOWN if value is None else int(value) for value in accuracies]
        ds["correct"] = (("example",), np.array(correct, dtype=np.int8))
    elif accuracy_variable == "score":
        scores = [np.nan if value is None else float(value) for value in accuracies]
        ds["score"] = (("example",), np.array(scores, dtype=np.float32))
    return with_schema_attrs(ds)


def _accuracy_variable(accuracies: list[Any]) -> str | None:
    """Where ``accuracy`` goes: ``correct`` for the documented True/False (or 0/1) flag, else ``score``."""
    present = [value for value in accuracies if value is not None]
    if not present:
        return None
    return "correct" if all(isinstance(value, bool | np.bool_) or value in (0, 1) for value in present) else "score"


def _convert_key(txn: lmdb.Transaction, key: bytes, path: Path) -> _Converted:
    return _convert(key.decode(), _load_example(txn, key, path), f"{path} key {key.decode()!r}")


def import_vlinterpret(
    lmdb_dir: str | os.PathLike,
    store: str | os.PathLike,
    *,
    model_name: str | None = None,
    precision: Precision = "float32",
    normalize_attention: bool = False,
    examples_per_shard: int = 16,
) -> ImportReport:
    """Convert a VL-InterpreT database into ``store``; all or nothing.

    A first pass decodes (restricted unpickler) and checks every example, keeping none of
    its arrays, so a refused record stops the import before anything is written. A second
    pass over the same read snapshot converts a shard's worth of examples at a time into a
    staging directory beside ``store``, whose shards are moved in only once all are
    written. ``float32`` stores float32 values exactly (float64 sources round to float32).
    """
    source = Path(lmdb_dir)
    target = Path(store)
    if not source.is_dir():
        raise VLIError(f"{source}: no such directory (expected a VL-InterpreT LMDB database directory)")
    if target.exists() and not target.is_dir():
        raise VLIError(f"{target}: is a file, not a store directory")
    if examples_per_shard < 1:
        raise VLIError("examples_per_shard must be at least 1")
    with _read_transaction(source) as txn:
        keys = _example_keys(txn, source)
        header = _header(txn, source)
        clash = sorted(stored_example_ids(target) & {key.decode() for key in keys}, key=int)
        if clash:
            raise VLIError(f"{target}: already holds example(s) {clash[:5]} of {source}; import into a new store")
        shapes, not_normalized, realigned, unverified, accuracies = set(), [], [], [], []
        for key in keys:
            checked = _convert_key(txn, key, source)
            example_id = checked.record.example_id
            accuracies.append(checked.accuracy)
            shapes.add(checked.record.full_attention().shape[:2])
            if not _is_normalized(checked.record.full_attention()):
                not_normalized.append(example_id)
            if checked.realigned:
                realigned.append(example_id)
            if checked.order_unverified:
                unverified.append(example_id)
        if len(shapes) != 1:
            raise VLIError(f"{source}: examples disagree on (layers, heads): {sorted(shapes)}")
        n_layers, n_heads = shapes.pop()
        if header.get("n_layers", n_layers) != n_layers or header.get("n_heads", n_heads) != n_heads:
            raise VLIError(
                f"{source}: header says {header.get('n_layers')} layers x {header.get('n_heads')} heads, "
                f"the examples hold {n_layers} x {n_heads}"
            )
        if not_normalized and not normalize_attention:
            raise VLIError(
                f"{source}: attention rows of example(s) {not_normalized[:5]} do not sum to 1, so they are not "
                "post-softmax probabilities; pass --normalize-attention to divide each row by its sum "
                "(the sums are kept in attention_row_sum)"
            )
        if unverified:
            warnings.warn(
                f"{source}: examples {unverified[:5]} were preprocessed by VL-InterpreT, which reorders image "
                "tokens but not hidden states, and their token names do not reveal the original order; their "
                "image-token hidden states are kept as stored and may not belong to the token listed",
                stacklevel=2,
            )
        info = ModelInfo(
            name=model_name or f"VL-InterpreT import of {source.resolve().name}",
            layer_kind=["self"] * n_layers,
            num_heads=[n_heads] * n_layers,
            hidden_layer_name=["embeddings"] + [f"layer.{i}" for i in range(n_layers)],
            layer_name=[f"layer.{i}" for i in range(n_layers)],
            config={"source_format": "VL-InterpreT LMDB database"},
        )
        extraction = {
            "importer": "vlinterpret_panel.importers.vlinterpret",
            "importer_version": IMPORTER_VERSION,
            "source": str(source.resolve()),
            "source_header": header,
            "precision": precision,
            "coordinate_conversion": COORDINATE_CONVERSION,
            "special_tokens": sorted(SPECIAL_TOKENS),
            "attention_normalized": normalize_attention,
            "realigned_hidden_states": realigned,
            "unverified_hidden_state_order": unverified,
            "not_imported": "tsne and faiss (derived: unseeded t-SNE and its neighbour index)",
        }
        batches = (
            _to_dataset(
                [_convert_key(txn, key, source) for key in keys[start : start + examples_per_shard]],
                info,
                extraction,
                normalize_attention=normalize_attention,
                accuracy_variable=_accuracy_variable(accuracies),
            )
            for start in range(0, len(keys), examples_per_shard)
        )
        shards = _write_all_or_nothing(batches, target, precision)
    return ImportReport(
        store=target,
        example_ids=[key.decode() for key in keys],
        shards=shards,
        realigned_hidden_states=realigned,
        unverified_hidden_state_order=unverified,
        attention_normalized=normalize_attention,
    )


def _write_all_or_nothing(datasets: Iterable[xr.Dataset], target: Path, precision: Precision) -> list[Path]:
    """Write every shard into a hidden staging directory beside ``target``, then move them in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it private) so a store moved into place gets the umask's permissions.
    staging = target.parent / f".{target.name}.import-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        written = [write_shard(ds, staging, precision=precision) for ds in datasets]
        if not target.exists():
            staging.rename(target)
            return [target / shard.name for shard in written]
        moved = []
        for shard in written:
            destination = target / shard.name
            os.replace(shard, destination)
            moved.append(destination)
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def dumps_report(report: ImportReport) -> str:
    """A one-line human summary of an import."""
    notes = []
    if report.attention_normalized:
        notes.append("attention rows normalized (sums in attention_row_sum)")
    if report.realigned_hidden_states:
        notes.append(f"hidden states re-aligned with tokens in {len(report.realigned_hidden_states)} example(s)")
    if report.unverified_hidden_state_order:
        notes.append(f"image hidden-state order unverified in {len(report.unverified_hidden_state_order)} example(s)")
    suffix = f"; {'; '.join(notes)}" if notes else ""
    return f"{report.store}: imported {len(report.example_ids)} example(s) in {len(report.shards)} shard(s){suffix}"
