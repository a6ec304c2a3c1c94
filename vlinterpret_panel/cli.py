"""The ``vlinterpret`` command: thin wrappers over the package's functions.

Every subcommand reports a user error (``VLIError``) as one line on stderr and exits
with status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vlinterpret_panel.errors import VLIError

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

    serve(args.store, address=args.address, port=args.port, show=args.show)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vlinterpret`` and all its subcommands."""
    parser = argparse.ArgumentParser(prog="vlinterpret", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a store or shard against the schema")
    validate.add_argument("path", help="store directory or .nc shard")
    validate.set_defaults(handler=_validate)

    synth = commands.add_parser("synth", help="write a synthetic store of any size")
    synth.add_argument("output", help="store directory to write (appended to if it exists)")
    synth.add_argument("--examples", type=int, default=16)
    synth.add_argument("--layers", type=int, default=4)
    synth.add_argument("--heads", type=int, default=4)
    synth.add_argument("--tokens", type=int, default=40, help="tokens per example (the longest)")
    synth.add_argument("--hidden-size", type=int, default=32)
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--fixed-length", action="store_true", help="same token count for every example")
    synth.add_argument("--examples-per-shard", type=int, default=8)
    synth.add_argument("--precision", choices=["float16", "float32"], default="float16")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_synth)

    serve = commands.add_parser("serve", help="serve the dashboard on a store")
    serve.add_argument("store", help="store directory")
    serve.add_argument("--address", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=5006)
    serve.add_argument("--show", action="store_true", help="open a browser")
    serve.set_defaults(handler=_serve)

    importer = commands.add_parser(
        "import-vlinterpret", help="convert a VL-InterpreT database (LMDB) into a store, refusing unsafe pickles"
    )
    importer.add_argument("lmdb_dir", help="VL-InterpreT database directory (holding data.mdb); opened read-only")
    importer.add_argument("store", help="store directory to write (created, or appended to if it exists)")
    importer.add_argument("--model-name", help="model name for the store (default: from the database's name)")
    importer.add_argument("--precision", choices=["float16", "float32"], default="float32")
    importer.add_argument(
        "--normalize-attention",
        action="store_true",
        help="divide attention rows that do not sum to 1 by their sums (kept in attention_row_sum)",
    )
    importer.add_argument("--examples-per-shard", type=int, default=16)
    importer.set_defaults(handler=_import_vlinterpret)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlinterpret``; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
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
