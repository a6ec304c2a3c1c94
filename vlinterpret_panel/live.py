"""Add one example to a store with a live model: check the user's upload and text, run, append a shard.

The dashboard's "Add example" calls this; nothing here draws anything. Inputs come from the
user, so they are checked before anything is decoded or run: an upload is bytes (never a
path or a URL), at most ``MAX_UPLOAD_BYTES``, a PNG or JPEG by its own header, and its pixel
count is read from the header and refused above ``MAX_IMAGE_PIXELS`` before decoding (a
decompression bomb never allocates). The text is one non-empty line of at most
``MAX_TEXT_CHARS`` characters. The model runs through extract's ``run_batch`` (attention,
hidden states and the store's relevancy methods) and the record becomes a shard through
``records_to_dataset`` and the store's atomic ``write_shard``: a failure before the rename
leaves the store as it was, byte for byte, and a kill during the write leaves at most a
hidden ``.partial`` file that readers ignore.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from vlinterpret_panel.adapters.base import ModelAdapter, ModelInput
from vlinterpret_panel.counterfactual import Edit
from vlinterpret_panel.errors import VLIError, error_line
from vlinterpret_panel.extract import provenance, run_batch
from vlinterpret_panel.relevancy.targets import methods_and_targets
from vlinterpret_panel.schema import CORRECT_UNKNOWN, ExampleRecord, ModelInfo, records_to_dataset
from vlinterpret_panel.store import Precision, open_dataset, write_shard

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TEXT_CHARS = 200
# Uploads are stored at most this many pixels on a side (the store pads every image to one canvas).
MAX_STORED_SIDE = 512
ACCEPTED_FORMATS = ("PNG", "JPEG")
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
LIVE_ID_PREFIX = "live-"

if TYPE_CHECKING:
    from vlinterpret_panel.adapters.generative import GenerationOptions
    from vlinterpret_panel.causal import CausalExplanation


def decode_image(data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The RGB pixels (uint8, H×W×3) of an uploaded PNG or JPEG, or a ``VLIError`` saying why not.

    Checks, in order: the byte size, the format from the file's first bytes, the pixel count
    from its header (before any pixel is decoded), then decodes in full, so a truncated file
    is refused rather than padded.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    if not isinstance(data, bytes | bytearray) or not data:
        raise VLIError("no image uploaded: choose a PNG or JPEG file")
    if len(data) > max_bytes:
        raise VLIError(f"the upload is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    if not any(bytes(data).startswith(magic) for magic in _MAGIC):
        raise VLIError("the upload is not a PNG or JPEG image")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise VLIError("PIL is set to load truncated images (ImageFile.LOAD_TRUNCATED_IMAGES); refusing uploads")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as image:
                width, height = image.size
                if width < 1 or height < 1 or width * height > max_pixels:
                    raise VLIError(
                        f"the image is {width} × {height} pixels; the limit is {max_pixels:,} pixels "
                        f"(e.g. {int(max_pixels**0.5)} × {int(max_pixels**0.5)})"
                    )
                image.load()
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except VLIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VLIError(f"the image has too many pixels; the limit is {max_pixels:,}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise VLIError(f"cannot read the image: it is damaged or truncated ({error})") from None
    return pixels


def check_text(text: str, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The question or caption, stripped; a ``VLIError`` if it is empty, too long or not one line of text."""
    text = (text or "").strip()
    if not text:
        raise VLIError("type a question or caption")
    if len(text) > max_chars:
        raise VLIError(f"the text has {len(text)} characters; the limit is {max_chars}")
    if any(not character.isprintable() for character in text):
        raise VLIError("the text must be one line of printable characters")
    return text


def fit_image(pixels: np.ndarray, max_side: int = MAX_STORED_SIDE) -> np.ndarray:
    """``pixels`` shrunk (area averaging, aspect kept) so neither side exceeds ``max_side``."""
    from PIL import Image

    height, width = pixels.shape[:2]
    if max(height, width) <= max_side:
        return pixels
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX), dtype=np.uint8)


@dataclass(frozen=True)
class SceneDraft:
    """A random scene of the built-in models' world with a question about it, its answer and target."""

    image: np.ndarray
    question: str
    answer: str
    target_mask: np.ndarray


def random_scene(seed: int | None = None) -> SceneDraft:
    """Draw a scene (``world.make_scene``) and a question (``world.make_question``)."""
    from vlinterpret_panel.models import world

    rng = np.random.default_rng(seed)
    scene = world.make_scene(rng)
    vqa = world.make_question(scene, rng)
    return SceneDraft(scene.image, vqa.question, vqa.answer, np.asarray(vqa.target_mask))


@dataclass(frozen=True)
class AddedExample:
    """An example added to a store: its id, the shard holding it, its prediction."""

    example_id: str
    shard: Path
    prediction: str | None


def _store_precision(ds: xr.Dataset) -> Precision:
    try:
        precision = json.loads(ds.attrs.get("extraction", "{}")).get("precision", "float16")
    except (json.JSONDecodeError, AttributeError):
        precision = "float16"
    return "float32" if precision == "float32" else "float16"


def _store_generation(ds: xr.Dataset) -> GenerationOptions | None:
    """The generation options a store of generated answers was extracted with (None: not generated)."""
    from vlinterpret_panel.adapters.generative import GenerationOptions

    try:
        options = json.loads(ds.attrs.get("extraction", "{}")).get("generation")
    except (json.JSONDecodeError, AttributeError):
        options = None
    if not options:
        return GenerationOptions() if ds.vli.has_answers else None
    return GenerationOptions(**{k: v for k, v in options.items() if k in GenerationOptions.__dataclass_fields__})


def _stored_run_options(ds: xr.Dataset) -> tuple[list[str], list[str], GenerationOptions | None]:
    """How the store's examples were run: its relevancy methods and targets (``[]`` for a generated answer's, which
    its generation options hold), and its generation options (None: not generated)."""
    generation = _store_generation(ds)
    methods, targets = methods_and_targets(ds.vli.answer_methods if generation else ds.vli.relevancy_methods)
    return ([] if generation else methods), targets, generation


def _check_fits(new: xr.Dataset, ds: xr.Dataset) -> None:
    """Refuse a shard that would make the store unopenable (``store`` rejects mixed models and layouts)."""
    if new.attrs["model_name"] != ds.attrs["model_name"]:
        raise VLIError(f"the model {new.attrs['model_name']!r} is not the store's {ds.attrs['model_name']!r}")
    for name in ("layer_kind", "hidden_layer_name", "relevancy_method"):
        if name in ds.coords and name in new.coords and new[name].values.tolist() != ds[name].values.tolist():
            raise VLIError(f"the model's {name} {new[name].values.tolist()} differs from the store's")
    if new.sizes.get("feature") != ds.sizes.get("feature"):
        raise VLIError(f"the model's hidden size {new.sizes.get('feature')} differs from the store's")


class LiveModel:
    """One model, loaded once, that adds examples to stores of that model; safe to share between threads."""

    def __init__(self, spec: str, adapter: ModelAdapter | None = None) -> None:
        from vlinterpret_panel.adapters.registry import builtin_names, load_adapter

        self.spec = spec
        self.adapter = adapter if adapter is not None else load_adapter(spec)
        self.builtin = spec.removeprefix("builtin:") in builtin_names()
        self._lock = threading.Lock()  # adapters hook their model while it runs: one run at a time

    @property
    def lock(self) -> threading.Lock:
        """Held while the model runs: anything else that runs it (the relevancy of a picked answer) takes it too."""
        return self._lock

    def check_store(self, ds: xr.Dataset) -> None:
        """Refuse a store of another model (its shards and this model's could not be opened together)."""
        if ds.attrs.get("model_name") != self.adapter.name:
            raise VLIError(
                f"--model {self.spec} is {self.adapter.name!r} but the store holds {ds.attrs.get('model_name')!r}; "
                "serve the store with the model that made it"
            )

    def add_example(
        self,
        store: str | os.PathLike,
        image: np.ndarray,
        text: str,
        *,
        label: str | None = None,
        target_mask: np.ndarray | None = None,
        counterfactual_of: str | None = None,
        edit: Edit | None = None,
        opened: xr.Dataset | None = None,
    ) -> AddedExample:
        """Run the model on ``image`` and ``text`` and append the example to ``store`` as a new shard.

        Extracts what the store holds: attention, hidden states and relevancy for the store's
        methods, or the generated answer with the options the store was extracted with. A
        counterfactual names its original and its ``edit``. ``opened`` is the store as the caller
        has it open (it saves reading every shard's metadata again). Any failure raises
        ``VLIError`` and leaves the store unchanged.
        """
        text = check_text(text)
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise VLIError(f"the image must be uint8 H×W×3 pixels, not {image.dtype} {image.shape}")
        if target_mask is not None and image.shape[:2] != np.shape(target_mask):
            raise VLIError("the target mask must have the image's size")
        if max(image.shape[:2]) > MAX_STORED_SIDE:
            image, target_mask = fit_image(image), None
        ds = opened if opened is not None else open_dataset(store)
        self.check_store(ds)
        precision = _store_precision(ds)
        existing = {str(i) for i in ds.indexes["example"]}
        example_id = f"{LIVE_ID_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        while example_id in existing:
            example_id = f"{LIVE_ID_PREFIX}{uuid.uuid4().hex[:12]}"
        item = ModelInput(example_id, image, text, label=label, target_mask=target_mask)
        methods, targets, generation = _stored_run_options(ds)
        record, info = self._run(item, methods, targets, generation)
        if counterfactual_of is not None:
            record.counterfactual_of = counterfactual_of
            record.counterfactual_edit = edit.to_json() if edit is not None else ""
        attrs = provenance(self.spec, {}, 1, precision, methods, generation, targets) | {
            "source": "counterfactual" if counterfactual_of is not None else "add example",
            "failures": [],
        }
        new = records_to_dataset([record], info, attrs, packed_attention=precision == "float16")
        if record.label is None and "label" in ds and "label" not in new:
            # As records_to_dataset writes an unlabelled example among labelled ones: "" and unknown.
            new["label"] = ("example", np.array([""], dtype=object), ds["label"].attrs)
            if "prediction" in new and "correct" in ds:
                new["correct"] = ("example", np.array([CORRECT_UNKNOWN], dtype=np.int8), ds["correct"].attrs)
        if counterfactual_of is None and "counterfactual_of" in ds:
            new["counterfactual_of"] = ("example", np.array([""], dtype=object), ds["counterfactual_of"].attrs)
            new["counterfactual_edit"] = ("example", np.array([""], dtype=object), ds["counterfactual_edit"].attrs)
        _check_fits(new, ds)
        shard = write_shard(new, store, precision=precision)
        return AddedExample(example_id, shard, record.prediction)

    def _run(
        self, item: ModelInput, methods: list[str], targets: list[str], generation: GenerationOptions | None
    ) -> tuple[ExampleRecord, ModelInfo]:
        """Run ``item`` with a store's methods and targets, or its generation options (``_stored_run_options``)."""
        with self._lock:
            (result,) = run_batch(self.adapter, [item], methods, generation, targets)
        if isinstance(result, BaseException):
            raise VLIError(f"the model failed on this example: {error_line(result)}")
        return result

    def warm_up(self, ds: xr.Dataset) -> None:
        """Run the store's first example as its examples are run, storing nothing: a server's first edit paid for
        lazy imports (sympy, by torch's batched gradients) and first calls, 0.55 s of its 0.65 s."""
        self.check_store(ds)
        tokens = ds.vli.tokens(str(ds.indexes["example"][0]))
        self._run(ModelInput("warm-up", tokens.image, tokens.text), *_stored_run_options(ds))

    def add_counterfactual(
        self, store: str | os.PathLike, original: str, edit: Edit, *, opened: xr.Dataset | None = None
    ) -> AddedExample:
        """Apply ``edit`` to example ``original`` of ``store``, run the model and store the result linked to it.

        The edited image keeps the original's size; the label and ground-truth mask are not
        carried over (a masked region may remove what they name). ``opened``: as for ``add_example``.
        """
        edit.check()
        ds = opened if opened is not None else open_dataset(store)
        self.check_store(ds)
        if original not in ds.indexes["example"]:
            raise VLIError(f"no example {original!r} in the store")
        tokens = ds.vli.tokens(original)
        image = edit.apply(tokens.image)
        return self.add_example(store, image, edit.text(tokens.text), counterfactual_of=original, edit=edit, opened=ds)

    def explain_causally(
        self,
        store: str | os.PathLike,
        example: str,
        *,
        step: int = 0,
        threshold: float = 0.9,
        method: str | None = None,
        progress: Callable[[float, str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> CausalExplanation:
        """The causal explanation of ``example``'s output (``causal.explain``), saved beside the store's shards.

        The model is held only during each rerun, so other sessions' runs interleave.
        """
        from vlinterpret_panel import causal

        ds = open_dataset(store)
        self.check_store(ds)
        if example not in ds.indexes["example"]:
            raise VLIError(f"no example {example!r} in the store")
        explanation = causal.explain(
            self.adapter,
            ds,
            example,
            step=step,
            threshold=threshold,
            method=method,
            progress=progress,
            cancel=cancel,
            lock=self._lock,
        )
        causal.save(store, explanation)
        return explanation
