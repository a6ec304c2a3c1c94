"""The ``vlinterpret`` command: thin wrappers over the package's functions.

Every subcommand reports a user error (``VLIError``) as one line on stderr and exits
with status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vlinterpret_panel.errors import VLIError

if TYPE_CHECKING:
    from vlinterpret_panel.adapters.generative import GenerationOptions

Handler = Callable[[argparse.Namespace], int]


def _validate(args: argparse.Namespace) -> int:
    from vlinterpret_panel.schema import validate
    from vlinterpret_panel.store import open_dataset, shard_paths

    path = Path(args.path)
    targets = shard_paths(path) if path.is_dir() else [path]
    if path.is_dir() and not targets:
        raise VLIError(f"{path}: the store has no shards (*.nc files)")
    for target in targets:
        validate(open_dataset(target), source=str(target), check_values=True)
    ds = open_dataset(path)
    print(
        f"{path}: valid ({ds.sizes['example']} examples in {len(targets)} shard(s), model {ds.attrs['model_name']!r})"
    )
    return 0


def _synth(args: argparse.Namespace) -> int:
    from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

    spec = SynthSpec(
        examples=args.examples,
        layers=args.layers,
        heads=args.heads,
        tokens=args.tokens,
        hidden_size=args.hidden_size,
        image_size=args.image_size,
        vary_length=not args.fixed_length,
        seed=args.seed,
    )
    shards = write_synthetic_store(
        args.output, spec, examples_per_shard=args.examples_per_shard, precision=args.precision, progress=True
    )
    print(f"{args.output}: wrote {spec.examples} synthetic examples in {len(shards)} shard(s)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from vlinterpret_panel.ui.serve import serve

    serve(args.store, address=args.address, port=args.port, show=args.show, model=args.model)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from vlinterpret_panel.extract import FAILURES_FILE, extract, read_sources, scene_sources

    if args.scenes is not None:
        if args.images or args.texts:
            raise VLIError("give either --scenes N or --images DIR with --texts FILE, not both")
        sources = scene_sources(args.scenes, seed=args.seed, text=args.scene_text)
    elif args.images and args.texts:
        sources = read_sources(args.images, args.texts)
    else:
        raise VLIError("give --images DIR and --texts FILE (JSON or CSV), or --scenes N for a built-in model")
    options = {}
    for option in args.option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise VLIError(f"--option {option!r}: write KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    generation = _generation_options(args)
    methods = args.relevancy.split(",") if args.relevancy else []
    if generation is not None and methods:
        from vlinterpret_panel.relevancy.answer import ANSWER_METHODS

        chosen = list(ANSWER_METHODS) if methods == ["all"] else [m for m in methods if m != "none"]
        generation = dataclasses.replace(generation, methods=chosen)
        methods = ()
    report = extract(
        args.model,
        sources,
        args.output,
        options=options,
        batch_size=args.batch_size,
        examples_per_shard=args.examples_per_shard,
        precision=args.precision,
        workers=args.workers,
        scheduler=args.scheduler,
        progress=not args.quiet,
        relevancy=methods,
        generation=generation,
        targets=args.target or (),
    )
    print(
        f"{args.output}: wrote {report.written} example(s) in {len(report.shards)} shard(s), "
        f"skipped {report.skipped} already stored, {len(report.failures)} failed "
        f"({report.examples_per_second:.2f} examples/s)"
    )
    for failure in report.failures:
        print(f"vlinterpret extract: failed: {failure.example_id}: {failure.error}", file=sys.stderr)
    if report.failures:
        print(f"vlinterpret extract: failures listed in {Path(args.output) / FAILURES_FILE}", file=sys.stderr)
        return 0 if args.allow_failures else 1
    return 0


def _index_list(text: str | None, option: str) -> list[int] | None:
    """``"0,5,31"`` or ``"0-7,12"`` as sorted indices; None for all."""
    if text is None or text == "all":
        return None
    indices: set[int] = set()
    try:
        for part in text.split(","):
            first, sep, last = part.partition("-")
            indices.update(range(int(first), int(last) + 1) if sep else [int(first)])
    except ValueError:
        raise VLIError(f"{option} {text!r}: write indices like 0,5,31 or ranges like 0-7") from None
    return sorted(indices)


def _generation_options(args: argparse.Namespace) -> GenerationOptions | None:
    """The ``--generate`` options, or None; a generation option without ``--generate`` is an error."""
    from vlinterpret_panel.adapters.generative import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TOP_K, GenerationOptions

    given = [
        flag
        for flag, value in (
            ("--max-new-tokens", args.max_new_tokens),
            ("--top-k", args.top_k),
            ("--layers", args.layers),
            ("--heads", args.heads),
            ("--rows", args.rows),
        )
        if value is not None
    ]
    if not args.generate:
        if given:
            raise VLIError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --generate")
        return None
    return GenerationOptions(
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
        top_k=DEFAULT_TOP_K if args.top_k is None else args.top_k,
        layers=_index_list(args.layers, "--layers"),
        heads=_index_list(args.heads, "--heads"),
        rows=args.rows or "answer",
    )


def _import_vlinterpret(args: argparse.Namespace) -> int:
    import warnings

    from vlinterpret_panel.importers.vlinterpret import dumps_report, import_vlinterpret

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = import_vlinterpret(
            args.lmdb_dir,
            args.store,
            model_name=args.model_name,
            precision=args.precision,
            normalize_attention=args.normalize_attention,
            examples_per_shard=args.examples_per_shard,
        )
    for warning in caught:
        print(f"vlinterpret import-vlinterpret: warning: {warning.message}", file=sys.stderr)
    print(dumps_report(report))
    return 0


def _stats(args: argparse.Namespace) -> int:
    import netCDF4

    from vlinterpret_panel.cluster import distributed_client
    from vlinterpret_panel.precompute import precompute
    from vlinterpret_panel.store import open_dataset

    # netCDF's default chunk cache, 64 MiB per variable of every open shard, would grow with
    # every shard this scan reads; each chunk is read once here, so 1 MiB is plenty.
    netCDF4.set_chunk_cache(2**20, 1009, 0.75)
    ds = open_dataset(Path(args.store).resolve())  # absolute shard paths: a remote worker's directory differs
    methods = [] if args.no_projections else (args.method or ["pca"])
    with distributed_client(args.store, workers=args.workers, scheduler=args.scheduler) as client:
        if client is not None:
            print(f"{args.store}: computing on {len(client.scheduler_info()['workers'])} Dask workers")
        lines = precompute(
            ds,
            hidden_layers=args.hidden_layer,
            methods=methods,
            batch_size=args.batch_size,
            search_index=True if args.search_index else None,
            progress=not args.quiet,
        )
    for line in lines:
        print(f"{args.store}: cached {line}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from vlinterpret_panel.adapters.generative import GenerativeAdapter
    from vlinterpret_panel.adapters.registry import load_adapter
    from vlinterpret_panel.relevancy.evaluate import evaluate_to_directory

    if args.examples < 1:
        raise VLIError("--examples must be at least 1")
    torch.manual_seed(args.seed)
    adapter = load_adapter(args.model)
    out = Path(args.out)
    if isinstance(adapter, GenerativeAdapter) and hasattr(adapter, "deletion_probabilities"):
        from vlinterpret_panel.relevancy.evaluate_answers import evaluate_answers_to_directory

        paths, answers = evaluate_answers_to_directory(
            adapter, args.examples, out, seed=args.seed, progress=not args.quiet, target=args.target
        )
        examples, seconds = answers.examples, answers.seconds
    else:
        paths, result = evaluate_to_directory(
            adapter, args.examples, out, seed=args.seed, progress=not args.quiet, target=args.target
        )
        examples, seconds = result.examples, result.seconds
    written = ", ".join(map(str, paths))
    print(f"{args.model}: evaluated {examples} examples in {seconds:.0f} s; wrote {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vlinterpret`` and all its subcommands."""
    from vlinterpret_panel import __version__

    parser = argparse.ArgumentParser(
        prog="vlinterpret",
        description="Extract, analyse and explore the attention, hidden states and relevancy of VL models.",
    )
    parser.add_argument("--version", action="version", version=f"vlinterpret-panel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    precision_help = "float16: attention packed to 16 bits (error < 8e-6), half the disk; float32: exact"
    download_help = "let a Hugging Face Hub name that is not in the local cache be downloaded (default: offline)"

    validate = commands.add_parser("validate", help="check a store or shard against the schema")
    validate.add_argument("path", help="store directory or .nc shard")
    validate.set_defaults(handler=_validate)

    synth = commands.add_parser("synth", help="write a synthetic store of any size")
    synth.add_argument("output", help="store directory to write (appended to if it exists)")
    synth.add_argument("--examples", type=int, default=16, help="number of examples (default 16)")
    synth.add_argument("--layers", type=int, default=4, help="attention layers (default 4)")
    synth.add_argument("--heads", type=int, default=4, help="heads per layer (default 4)")
    synth.add_argument("--tokens", type=int, default=40, help="tokens per example (the longest)")
    synth.add_argument("--hidden-size", type=int, default=32, help="hidden state width (default 32)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--fixed-length", action="store_true", help="same token count for every example")
    synth.add_argument("--examples-per-shard", type=int, default=8, help="examples per shard file (default 8)")
    synth.add_argument("--precision", choices=["float16", "float32"], default="float16", help=precision_help)
    synth.add_argument("--seed", type=int, default=0, help="seed of the generator (same seed, same store)")
    synth.set_defaults(handler=_synth)

    serve = commands.add_parser("serve", help="serve the dashboard on a store")
    serve.add_argument("store", help="store directory")
    serve.add_argument("--address", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=5006, help="port to listen on (default 5006)")
    serve.add_argument("--show", action="store_true", help="open a browser")
    serve.add_argument("--model", help="adapter spec of the store's model (e.g. single_stream): adds 'Add example'")
    serve.add_argument("--allow-download", action="store_true", help=download_help)
    serve.set_defaults(handler=_serve)

    extract = commands.add_parser("extract", help="run a model over images and texts into a store")
    extract.add_argument("model", help="adapter spec: built-in name, HF name or path, family:path, py:module:factory")
    extract.add_argument("output", help="store directory (examples already in it are skipped)")
    extract.add_argument("--images", help="folder of images")
    extract.add_argument("--texts", help="JSON or CSV of entries with image, text (or question/caption), id, label")
    extract.add_argument("--scenes", type=int, help="extract N generated scenes instead (built-in models)")
    extract.add_argument(
        "--scene-text",
        choices=["question", "caption", "describe"],
        default="question",
        help="with --scenes: a question (VQA and generative models), a caption naming every object (dual "
        "encoder) or the description prompt (generative model)",
    )
    extract.add_argument(
        "--seed",
        type=int,
        # None: extract.scene_sources starts at world.HELDOUT_SEED_START. Not imported here, since
        # the models package loads torch: 2 s more for every --help and --version.
        help="first scene seed (default 1,000,000,000, world.HELDOUT_SEED_START: held-out scenes; "
        "training used the seeds below it)",
    )
    extract.add_argument("--option", action="append", default=[], help="KEY=VALUE for the adapter (JSON values)")
    extract.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    extract.add_argument(
        "--examples-per-shard",
        type=int,
        default=None,
        help="examples per shard and per Dask task (memory: 2 shards); default: about 128 MB of arrays "
        "per shard, 16 with Dask",
    )
    extract.add_argument("--precision", choices=["float16", "float32"], default="float16", help=precision_help)
    extract.add_argument("--allow-download", action="store_true", help=download_help)
    extract.add_argument("--workers", type=int, default=0, help="run on a local Dask cluster of N processes")
    extract.add_argument("--scheduler", help="address of an existing Dask distributed scheduler")
    extract.add_argument(
        "--relevancy",
        help="relevancy methods to store, comma-separated (e.g. generic,rollout,raw_attention,attention_gradcam; "
        "transformer_attribution and attnlrp for the built-in models); "
        "with --generate: raw_attention,rollout by default (recorded while generating), 'all' adds the "
        "gradient methods (one backward pass per generated token), 'none' stores none",
    )
    extract.add_argument(
        "--target",
        action="append",
        help="what the gradient-based relevancy methods explain, repeatable: predicted (default), label, an "
        "answer's name or index, or a contrast 'A vs B' (e.g. 'predicted vs runner-up', 'red vs blue'); each "
        "target other than predicted is stored as 'METHOD [TARGET]'. With --generate, read at each generated "
        "token over the vocabulary (predicted: the generated token; runner-up: the next most probable)",
    )
    extract.add_argument(
        "--generate",
        action="store_true",
        help="generate each answer and store every generated token: its probability, top-k alternatives, "
        "attention rows, hidden states and relevancy (generative models: generative, LLaVA, Qwen2-VL)",
    )
    extract.add_argument("--max-new-tokens", type=int, help="with --generate: tokens to generate at most (default 32)")
    extract.add_argument("--top-k", type=int, help="with --generate: alternatives stored per step (default 5)")
    extract.add_argument("--layers", help="with --generate: decoder layers to store, e.g. 0,15,31 or 0-7 (default all)")
    extract.add_argument("--heads", help="with --generate: heads to store, e.g. 0-7 (default all)")
    extract.add_argument(
        "--rows",
        choices=["answer", "all"],
        help="with --generate: store the attention rows of the generated tokens only (default), or the "
        "chosen layers' full maps too (large: LLaVA-1.5 needs 26 MB per layer and example)",
    )
    extract.add_argument("--allow-failures", action="store_true", help="exit 0 even if some examples failed")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(handler=_extract)

    importer = commands.add_parser(
        "import-vlinterpret", help="convert a VL-InterpreT database (LMDB) into a store, refusing unsafe pickles"
    )
    importer.add_argument("lmdb_dir", help="VL-InterpreT database directory (holding data.mdb); opened read-only")
    importer.add_argument("store", help="store directory to write (created, or appended to if it exists)")
    importer.add_argument("--model-name", help="model name for the store (default: from the database's name)")
    importer.add_argument("--precision", choices=["float16", "float32"], default="float32", help=precision_help)
    importer.add_argument(
        "--normalize-attention",
        action="store_true",
        help="divide attention rows that do not sum to 1 by their sums (kept in attention_row_sum)",
    )
    importer.add_argument("--examples-per-shard", type=int, default=16, help="examples per shard file (default 16)")
    importer.set_defaults(handler=_import_vlinterpret)
    stats = commands.add_parser("stats", help="precompute and cache head statistics and hidden-state projections")
    stats.add_argument("store", help="store directory (results are cached in STORE/.cache)")
    stats.add_argument(
        "--hidden-layer", type=int, action="append", help="hidden layer to project (repeatable; default: all)"
    )
    stats.add_argument(
        "--method", action="append", choices=["pca", "tsne", "umap"], help="projection method (repeatable; default pca)"
    )
    stats.add_argument("--no-projections", action="store_true", help="only the head statistics")
    stats.add_argument("--batch-size", type=int, default=32, help="examples per statistics batch")
    stats.add_argument(
        "--search-index",
        action="store_true",
        help="write every projected layer's nearest-token search copy (default: only layers too large for memory)",
    )
    stats.add_argument("--workers", type=int, help="compute on a local Dask cluster of N worker processes")
    stats.add_argument(
        "--scheduler", help="compute on a running Dask cluster (e.g. tcp://host:8786) whose workers see STORE's path"
    )
    stats.add_argument("--quiet", action="store_true", help="no progress bars")
    stats.set_defaults(handler=_stats)
    evaluate = commands.add_parser(
        "evaluate", help="perturbation and localisation tests of the relevancy methods on the built-in world"
    )
    evaluate.add_argument("model", help="adapter spec, e.g. single_stream, dual_stream, dual_encoder, generative")
    evaluate.add_argument("--examples", type=int, default=200, help="held-out examples of the built-in world")
    evaluate.add_argument("--out", required=True, help="directory for results.md, results.csv and accuracy.png")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    evaluate.add_argument(
        "--target",
        default="predicted",
        help="what the gradient-based methods explain: predicted (default), label, an answer, or 'A vs B' "
        "(e.g. 'predicted vs runner-up'; for the generative model, read at each generated token)",
    )
    evaluate.add_argument("--allow-download", action="store_true", help=download_help)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlinterpret``; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    if getattr(args, "allow_download", False):
        import os

        from vlinterpret_panel.adapters.hf_common import ALLOW_DOWNLOAD_VARIABLE

        os.environ[ALLOW_DOWNLOAD_VARIABLE] = "1"
    try:
        return handler(args)
    except VLIError as error:
        print(f"vlinterpret {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlinterpret {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
