"""Run an adapter over many image-text pairs into a store: batches, progress, resumption, Dask.

The inputs are split into chunks of ``examples_per_shard`` examples, in input order (by
default as many as make about ``SHARD_TARGET_BYTES`` of arrays, measured on the first
example, so a tiny model does not pay a file per 16 examples); each chunk becomes one
shard, written atomically by whichever process ran it, so chunks can run in parallel
(``workers`` local Dask processes, or an existing Dask ``scheduler``) and values do not
depend on how many workers ran them. Examples already in the store are skipped, so an
interrupted extraction resumes where it stopped. An example that fails is reported, never
dropped silently: its id and error go to the shard's ``extraction`` attribute, to
``failures.json`` in the store and to the returned report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlinterpret_panel.adapters.base import ForwardCapture, ModelAdapter, ModelInput
from vlinterpret_panel.adapters.generative import GenerationOptions
from vlinterpret_panel.cluster import distributed_client
from vlinterpret_panel.errors import VLIError, error_line
from vlinterpret_panel.schema import ExampleRecord, ModelInfo
from vlinterpret_panel.store import Precision, example_ids, write_records

FAILURES_FILE = "failures.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TEXT_COLUMNS = ("text", "question", "caption")


@dataclass(frozen=True)
class ExampleSource:
    """Where one example comes from: an image file and a text, or a generated scene (``seed``).

    Sources are small and picklable; the image is read only where the example runs.
    """

    example_id: str
    text: str = ""
    image_path: str | None = None
    label: str | None = None
    seed: int | None = None
    scene_text: str = "question"

    def load(self) -> ModelInput:
        """Read the image (or generate the scene) into a ``ModelInput``."""
        if self.seed is not None:
            return _scene_input(self)
        from PIL import Image, UnidentifiedImageError

        if self.image_path is None:
            raise VLIError(f"example {self.example_id!r}: no image path and no scene seed")
        try:
            with Image.open(self.image_path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as error:
            raise VLIError(f"{self.image_path}: cannot read the image ({error})") from None
        return ModelInput(example_id=self.example_id, image=pixels, text=self.text, label=self.label)


SCENE_TEXTS = ("question", "caption", "describe")
"""What a generated scene is asked: a question, a caption naming every object, or the description prompt."""


def _scene_input(source: ExampleSource) -> ModelInput:
    """A scene of the built-in models' synthetic world, with its question (or caption, or description prompt).

    Questions and description prompts carry the ground truth of a generated answer: the mask
    of the object each generated word names (``world.generated_token_masks``).
    """
    from functools import partial

    from vlinterpret_panel.models import world

    seed = int(source.seed or 0)
    if source.scene_text == "caption":
        scene = world.scene_for_seed(seed)
        # A caption names every object, so its target is all of them.
        every_object = np.logical_or.reduce(scene.masks)
        return ModelInput(source.example_id, scene.image, world.make_caption(scene), target_mask=every_object)
    task = "describe" if source.scene_text == "describe" else "question"
    scene, example = world.generative_example_for_seed(seed, task)
    return ModelInput(
        source.example_id,
        scene.image,
        example.prompt,
        label=example.reference,
        target_mask=example.target_mask,
        answer_masks=partial(world.generated_token_masks, scene, example),
    )


def scene_sources(count: int, *, seed: int | None = None, text: str = "question") -> list[ExampleSource]:
    """``count`` generated scenes (seeds ``seed`` ... ``seed + count - 1``) for the built-in models.

    The default first seed is ``world.HELDOUT_SEED_START``: held-out scenes, never trained on.
    """
    if seed is None:
        from vlinterpret_panel.models.world import HELDOUT_SEED_START

        seed = HELDOUT_SEED_START
    if text not in SCENE_TEXTS:
        raise VLIError(f"scene text must be one of {', '.join(SCENE_TEXTS)}, not {text!r}")
    return [ExampleSource(f"scene-{s:07d}", seed=s, scene_text=text) for s in range(seed, seed + count)]


def read_sources(images: str | os.PathLike, texts: str | os.PathLike) -> list[ExampleSource]:
    """Examples from a folder of images and a JSON or CSV file of questions or captions.

    Each entry (a JSON list of objects, or CSV rows with a header) has ``image`` (a file name
    in ``images``) and ``text`` (or ``question``/``caption``), optionally ``id`` and ``label``.
    The default id is the image file stem, plus the entry's index when an image has several texts.
    """
    images, texts = Path(images), Path(texts)
    if not images.is_dir():
        raise VLIError(f"{images}: not a folder of images")
    if not texts.is_file():
        raise VLIError(f"{texts}: no such questions/captions file")
    try:
        if texts.suffix.lower() == ".json":
            entries = json.loads(texts.read_text())
        elif texts.suffix.lower() == ".csv":
            with texts.open(newline="") as handle:
                entries = list(csv.DictReader(handle))
        else:
            raise VLIError(f"{texts}: give the questions or captions as .json or .csv")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise VLIError(f"{texts}: cannot parse ({error})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise VLIError(f"{texts}: expected a list of entries with 'image' and 'text'")
    per_image: dict[str, int] = {}
    for entry in entries:
        per_image[str(entry.get("image"))] = per_image.get(str(entry.get("image")), 0) + 1
    sources, seen = [], set()
    for index, entry in enumerate(entries):
        text = next((entry[c] for c in TEXT_COLUMNS if entry.get(c) not in (None, "")), None)
        if not entry.get("image") or text is None:
            raise VLIError(f"{texts}: entry {index} needs 'image' and 'text' (or 'question'/'caption')")
        image_path = images / str(entry["image"])
        if not image_path.is_file():
            raise VLIError(f"{texts}: entry {index}: no image {image_path}")
        default_id = image_path.stem if per_image[str(entry["image"])] == 1 else f"{image_path.stem}-{index}"
        example_id = str(entry.get("id") or default_id)
        if example_id in seen:
            raise VLIError(f"{texts}: example id {example_id!r} appears twice; give each entry a unique 'id'")
        seen.add(example_id)
        label = entry.get("label")
        sources.append(
            ExampleSource(example_id, str(text), str(image_path), None if label in (None, "") else str(label))
        )
    return sources


@dataclass
class Failure:
    """An example that could not be extracted, and why."""

    example_id: str
    error: str


@dataclass
class ChunkResult:
    """What one chunk (one shard) produced."""

    written: list[str]
    failures: list[Failure]
    shard: str | None
    forward_seconds: float
    pending: Future | None = None

    def finish(self) -> ChunkResult:
        """Wait for a shard being written in the background; its path becomes ``shard``."""
        if self.pending is not None:
            self.shard, self.pending = str(self.pending.result()), None
        return self


@dataclass
class ExtractionReport:
    """The outcome of ``extract``: counts, failures, shards and throughput."""

    store: str
    requested: int
    skipped: int
    written: int
    failures: list[Failure] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    forward_seconds: float = 0.0

    @property
    def examples_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else math.nan


def run_batch(
    adapter: ModelAdapter,
    items: Sequence[ModelInput],
    relevancy: Sequence[str] = (),
    generation: GenerationOptions | None = None,
    targets: Sequence[str] = (),
) -> list[tuple[ExampleRecord, ModelInfo] | BaseException]:
    """Run ``items`` through ``adapter``, several per forward pass when it has ``forward_batch``.

    Returns one (record, info) or the exception per item, so one bad example never costs
    the others: a batch that fails is rerun one example at a time. With ``relevancy``
    methods, each record gets their values; methods that declare they need gradients (or
    LRP) run one example at a time through ``relevancy.capture.record_for_targets``. With
    ``generation``, each item's answer is generated and captured token by token
    (``adapters.generative.capture_answer``; its options name the relevancy methods; ``targets``
    become its targets).
    ``targets`` (``relevancy.targets``) other than the predicted answer store the target-dependent methods
    once per target (``relevancy.capture.record_for_targets``).
    """
    import torch

    if generation is not None:
        from vlinterpret_panel.adapters.generative import capture_answer, check_generative

        generative = check_generative(adapter)
        if targets:
            generation = replace(generation, targets=list(targets))
        answers: list[tuple[ExampleRecord, ModelInfo] | BaseException] = []
        for item in items:
            try:
                answers.append(capture_answer(generative, item, generation))
            except Exception as error:  # reported per example, never dropped
                answers.append(error)
        return answers

    from vlinterpret_panel.relevancy.capture import add_relevancy, record_for_targets
    from vlinterpret_panel.relevancy.inputs import Captured
    from vlinterpret_panel.relevancy.registry import ATTENTION, needs

    per_example = bool(needs(relevancy) - {ATTENTION}) or bool(targets)
    forward_batch: Callable[..., list[ForwardCapture]] | None = getattr(adapter, "forward_batch", None)
    if forward_batch is not None and len(items) > 1 and not per_example:
        try:
            with torch.no_grad():
                captures = forward_batch([i.image for i in items], [i.text for i in items])
            records = [adapter.to_record(item, adapter.explain(c)) for item, c in zip(items, captures, strict=True)]
            results: list[tuple[ExampleRecord, ModelInfo] | BaseException] = []
            for record, info in records:
                try:
                    if relevancy:
                        add_relevancy(record, Captured.from_record(record, info), relevancy)
                    results.append((record, info))
                except Exception as error:  # a method that fails on an example fails that example
                    results.append(error)
            return results
        except Exception:  # isolate the failing example(s) below
            pass
    results = []
    for item in items:
        try:
            if relevancy:
                record, info = record_for_targets(adapter, item, relevancy, targets)
            else:
                record, info = adapter.run(item)
            results.append((record, info))
        except Exception as error:  # reported per example, never dropped
            results.append(error)
    return results


_ADAPTERS: dict[str, ModelAdapter] = {}
_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(adapter: ModelAdapter) -> threading.Lock:
    """The lock serialising runs of ``adapter`` (Dask workers may run several tasks in threads)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(id(adapter), threading.Lock())


def _cached_adapter(spec: str, options: dict[str, Any]) -> ModelAdapter:
    """One adapter per process and spec, so a worker loads the model once for all its chunks."""
    from vlinterpret_panel.adapters.registry import load_adapter

    key = json.dumps([spec, options], sort_keys=True, default=str)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = load_adapter(spec, **options)
    return _ADAPTERS[key]


def extract_chunk(
    adapter: ModelAdapter | str,
    sources: Sequence[ExampleSource],
    store: str,
    *,
    options: dict[str, Any] | None = None,
    batch_size: int = 8,
    precision: Precision = "float16",
    extraction: dict[str, Any] | None = None,
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    writer: ThreadPoolExecutor | None = None,
    relevancy: Sequence[str] = (),
    generation: GenerationOptions | None = None,
    targets: Sequence[str] = (),
) -> ChunkResult:
    """Extract ``sources`` and write the successful ones as one shard (the unit of a Dask task).

    With a ``writer`` thread the shard is written in the background (the result's ``finish``
    waits for it), so the next chunk's forward passes overlap this chunk's compression and I/O.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if isinstance(adapter, str):
        adapter = _cached_adapter(adapter, options or {})
    records: list[ExampleRecord] = []
    info: ModelInfo | None = None
    failures: list[Failure] = []
    forward_seconds = 0.0
    for start in range(0, len(sources), batch_size):
        batch = sources[start : start + batch_size]
        items: list[ModelInput] = []
        for source in batch:
            try:
                items.append(source.load())
            except Exception as error:  # an unreadable input is one failure
                failures.append(Failure(source.example_id, error_line(error)))
        began = time.perf_counter()
        with _lock(adapter):  # adapters hook their models: one forward at a time per adapter
            results = run_batch(adapter, items, relevancy, generation, targets) if items else []
        forward_seconds += time.perf_counter() - began
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                failures.append(Failure(item.example_id, error_line(result)))
            else:
                records.append(result[0])
                info = info or result[1]
        if on_batch is not None:
            on_batch(len(batch))
    chunk = ChunkResult([r.example_id for r in records], failures, None, forward_seconds)
    if records and info is not None:
        attrs = dict(extraction or {})
        attrs["failures"] = [asdict(f) for f in failures]
        model_info = info

        def write() -> Path:
            return write_records(records, model_info, store, precision=precision, extraction=attrs)

        if writer is None:
            chunk.shard = str(write())
        else:
            chunk.pending = writer.submit(write)
    return chunk


def provenance(
    adapter_spec: str,
    options: dict[str, Any],
    batch_size: int,
    precision: str,
    relevancy: Sequence[str],
    generation: GenerationOptions | None = None,
    targets: Sequence[str] = (),
) -> dict[str, Any]:
    """What a store's ``extraction`` attribute records: the adapter, its options and the library versions.

    transformers' version from its package metadata: importing it for the number took 0.75 s, on the first
    example a live server added (a built-in model does not use it)."""
    from importlib.metadata import version

    import torch

    from vlinterpret_panel import __version__

    return {
        "adapter": adapter_spec,
        "options": options,
        "batch_size": batch_size,
        "precision": precision,
        "relevancy": list(relevancy),
        **({"targets": list(targets)} if targets else {}),
        **({"generation": asdict(generation)} if generation is not None else {}),
        "vlinterpret_panel": __version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
    }


def check_targets(targets: Sequence[str], relevancy: Sequence[str], generation: GenerationOptions | None) -> list[str]:
    """The targets as written in the store (``[]`` for the predicted answer alone), checked before any example runs."""
    from vlinterpret_panel.relevancy.capture import depends_on_target
    from vlinterpret_panel.relevancy.targets import Target

    chosen = list(dict.fromkeys(str(Target.parse(target)) for target in targets))
    if chosen in ([], ["predicted"]):
        return []
    if generation is not None:
        replace(generation, targets=chosen).chosen_targets()
    elif not any(depends_on_target(method) for method in relevancy):
        raise VLIError(
            f"--target {chosen} needs a gradient or LRP relevancy method; {list(relevancy)} read attention only"
        )
    return chosen


def extract(
    adapter: str | ModelAdapter,
    sources: Sequence[ExampleSource],
    store: str | os.PathLike,
    *,
    options: dict[str, Any] | None = None,
    batch_size: int = 8,
    examples_per_shard: int | None = None,
    precision: Precision = "float16",
    workers: int = 0,
    scheduler: str | None = None,
    progress: bool = True,
    relevancy: Sequence[str] = (),
    generation: GenerationOptions | None = None,
    targets: Sequence[str] = (),
) -> ExtractionReport:
    """Extract ``sources`` with ``adapter`` (a spec for ``load_adapter``, or an adapter) into ``store``.

    ``workers`` > 0 starts a local Dask cluster of that many processes; ``scheduler`` uses an
    existing Dask distributed scheduler. Both need ``adapter`` as a spec string, which each
    worker loads once. Examples already in the store are skipped. ``relevancy`` names methods
    of ``vlinterpret_panel.relevancy`` whose values are stored per example (``relevancy``,
    ``relevancy_target``: the prediction, or the score of a dual encoder).
    ``examples_per_shard`` defaults to ``auto_examples_per_shard`` (``DISTRIBUTED_EXAMPLES_PER_SHARD``
    with Dask, where the model is not loaded in this process, and ``GENERATED_EXAMPLES_PER_SHARD``
    for generated answers). ``generation`` generates each answer and stores it token by token
    (``adapters.generative``); its ``methods`` are the relevancy methods then, not ``relevancy``.
    ``targets`` (``relevancy.targets``: ``predicted``, ``label``, an answer, ``A vs B``) are what the
    gradient-based methods explain, each stored as its own ``relevancy_method`` entry (default: the
    predicted answer only, under the bare method names).
    """
    from tqdm.auto import tqdm

    store = Path(store)
    options = dict(options or {})
    if batch_size < 1 or (examples_per_shard is not None and examples_per_shard < 1):
        raise VLIError("--batch-size and --examples-per-shard must be at least 1")
    if (workers or scheduler) and not isinstance(adapter, str):
        raise VLIError("extraction with Dask workers needs the adapter as a spec string (see load_adapter)")
    ids = [s.example_id for s in sources]
    if len(set(ids)) != len(ids):
        raise VLIError("example ids must be unique")
    done = example_ids(store)
    todo = [s for s in sources if s.example_id not in done]
    spec = adapter if isinstance(adapter, str) else f"{type(adapter).__module__}.{type(adapter).__name__}"
    from vlinterpret_panel.relevancy.capture import check_supported
    from vlinterpret_panel.relevancy.registry import check_methods

    relevancy = check_methods(relevancy)
    if generation is not None and relevancy:
        raise VLIError("with --generate, the relevancy methods are the generation options' (GenerationOptions.methods)")
    targets = check_targets(targets, relevancy, generation)
    recorded = provenance(spec, options, batch_size, precision, relevancy, generation, targets)
    if todo and isinstance(adapter, str) and not (workers or scheduler):
        adapter = _cached_adapter(adapter, options)  # load errors come before the progress bar
    if isinstance(adapter, ModelAdapter):
        check_supported(adapter, relevancy)
        if generation is not None:
            from vlinterpret_panel.adapters.generative import check_generative

            generation.check(check_generative(adapter))
    if examples_per_shard is None:
        if generation is not None:
            examples_per_shard = GENERATED_EXAMPLES_PER_SHARD
        elif workers or scheduler:
            examples_per_shard = DISTRIBUTED_EXAMPLES_PER_SHARD
        else:
            examples_per_shard = auto_examples_per_shard(adapter, todo)  # type: ignore[arg-type]
    chunks = [todo[i : i + examples_per_shard] for i in range(0, len(todo), examples_per_shard)]
    report = ExtractionReport(str(store), len(sources), len(sources) - len(todo), 0)
    began = time.perf_counter()
    with tqdm(total=len(todo), unit="example", disable=not progress, desc="extract") as bar:
        results = _run_chunks(
            adapter,
            chunks,
            str(store),
            options,
            batch_size,
            precision,
            recorded,
            workers,
            scheduler,
            bar,
            relevancy,
            generation,
            targets,
        )
        for result in results:
            report.written += len(result.written)
            report.failures.extend(result.failures)
            report.forward_seconds += result.forward_seconds
            if result.shard:
                report.shards.append(result.shard)
    report.seconds = time.perf_counter() - began
    _write_failures(store, report)
    return report


SHARD_TARGET_BYTES = 128 * 2**20
"""Attention and hidden-state bytes (float32, before packing) aimed at per shard by default."""
MAX_EXAMPLES_PER_SHARD = 1024
DISTRIBUTED_EXAMPLES_PER_SHARD = 16
GENERATED_EXAMPLES_PER_SHARD = 16
"""Generated answers per shard: a LLaVA-1.5-sized one stores up to 64 MB, all held until its shard is written."""


def auto_examples_per_shard(adapter: ModelAdapter, sources: Sequence[ExampleSource]) -> int:
    """Examples per shard making about ``SHARD_TARGET_BYTES``, from one probe run of the first loadable example.

    Per-shard costs (a file, its metadata, an fsync) dwarf a tiny model's per-example data,
    while a ViLT-sized example is tens of MB: a fixed count suits neither. The probe costs
    one extra forward pass; an input that fails to load or run falls back to 16.
    """
    for source in sources[:4]:
        try:
            record, _ = adapter.run(source.load())
        except Exception:  # reported when the example itself runs
            continue
        arrays = (record.attention, record.hidden_states)
        example_bytes = 4 * sum(array.size for array in arrays if array is not None)
        return int(np.clip(SHARD_TARGET_BYTES // max(1, example_bytes), 1, MAX_EXAMPLES_PER_SHARD))
    return DISTRIBUTED_EXAMPLES_PER_SHARD


def _run_chunks(
    adapter: str | ModelAdapter,
    chunks: list[list[ExampleSource]],
    store: str,
    options: dict[str, Any],
    batch_size: int,
    precision: Precision,
    provenance: dict[str, Any],
    workers: int,
    scheduler: str | None,
    bar: Any,
    relevancy: Sequence[str],
    generation: GenerationOptions | None,
    targets: Sequence[str],
) -> Iterable[ChunkResult]:
    """Yield each chunk's result: in this process, or as Dask tasks (one shard each)."""
    common: dict[str, Any] = {
        "options": options,
        "batch_size": batch_size,
        "precision": precision,
        "extraction": provenance,
        "relevancy": relevancy,
        "generation": generation,
        "targets": targets,
    }
    if not (workers or scheduler):
        if isinstance(adapter, str):
            adapter = _cached_adapter(adapter, options)
        # One background writer, at most one shard in flight: memory stays at two chunks.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vli-shard-writer") as writer:
            previous: ChunkResult | None = None
            for chunk in chunks:
                current = extract_chunk(adapter, chunk, store, on_batch=bar.update, writer=writer, **common)
                if previous is not None:
                    yield previous.finish()
                previous = current
            if previous is not None:
                yield previous.finish()
        return
    from distributed import as_completed

    Path(store).mkdir(parents=True, exist_ok=True)  # the workers write into it: they must see it
    threads = None if scheduler else max(1, (os.cpu_count() or 1) // workers)
    with distributed_client(store, workers=None if scheduler else workers, scheduler=scheduler) as client:
        assert client is not None  # workers or a scheduler was given
        futures = [
            client.submit(extract_chunk, adapter, chunk, store, threads=threads, pure=False, **common)
            for chunk in chunks
        ]
        sizes = {future.key: len(chunk) for future, chunk in zip(futures, chunks, strict=True)}
        for future in as_completed(futures):
            result = future.result()
            bar.update(sizes[future.key])
            yield result


def _write_failures(store: Path, report: ExtractionReport) -> None:
    """List this run's failures in ``store/failures.json`` (removed when a run has none)."""
    path = store / FAILURES_FILE
    if report.failures:
        store.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(f) for f in report.failures], indent=1) + "\n")
    elif path.exists():
        path.unlink()
