"""Time the shared hidden-state projection of a store of a million tokens or more.

    python benchmarks/bench_projection.py [--store PATH] [--tokens 1000000] [--method pca --method tsne]

Builds the store once (hidden size 768, up to 185 tokens per example, one small attention
layer so the store is mostly hidden states): ``--distinct`` synthetic examples, then copies
of their shards under new example ids until the store holds ``--tokens`` real tokens.
Each method then runs in a fresh process (no cache), so its time and peak memory are its own,
with a ``--chunk-cache``-byte netCDF chunk cache (see ``bench_stats.py``; 0 keeps netCDF's default).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import netCDF4

from vlinterpret_panel.store import shard_paths
from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

HIDDEN_HEAVY = SynthSpec(layers=1, heads=2, tokens=185, hidden_size=768, image_size=32, seed=21)


def store_tokens(path: Path) -> int:
    """Real tokens in the store, from each shard's ``seq_len`` alone."""
    total = 0
    for shard_path in shard_paths(path):
        with netCDF4.Dataset(shard_path) as shard:
            total += int(shard.variables["seq_len"][:].sum())
    return total


def ensure_store(path: Path, tokens: int, distinct: int) -> None:
    """Write ``distinct`` examples if the store is empty, then copy shards up to ``tokens`` real tokens."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_stats import copy_shard

    if not path.exists() or not shard_paths(path):
        print(f"writing {distinct} distinct examples to {path} ...", flush=True)
        spec = SynthSpec(**{**HIDDEN_HEAVY.__dict__, "examples": distinct})
        write_synthetic_store(path, spec, examples_per_shard=100, progress=True)
    originals = shard_paths(path)
    copy_number = len(originals)
    while store_tokens(path) < tokens:
        copy_shard(originals[copy_number % len(originals)], path, copy_number)
        copy_number += 1


def child(store: Path, method: str, hidden_layer: int, chunk_cache: int) -> dict:
    if chunk_cache > 0:
        netCDF4.set_chunk_cache(chunk_cache, 1009, 0.75)
    from vlinterpret_panel.projection import project_hidden_states
    from vlinterpret_panel.store import open_dataset

    started = time.perf_counter()
    ds = open_dataset(store)
    opened = time.perf_counter() - started
    started = time.perf_counter()
    result = project_hidden_states(ds, hidden_layer, method=method, use_cache=False)
    seconds = time.perf_counter() - started
    return {
        "open": opened,
        "seconds": seconds,
        "points": result.sizes["point"],
        "examples": ds.sizes["example"],
        "sample_size": int(result.attrs["sample_size"]),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/vlinterpret-bench/proj-1m-tokens"))
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=600)
    parser.add_argument("--hidden-layer", type=int, default=1)
    parser.add_argument("--method", action="append", choices=["pca", "tsne", "umap"])
    parser.add_argument("--chunk-cache", type=int, default=2**20, help="netCDF chunk cache bytes (0: default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.store, args.child, args.hidden_layer, args.chunk_cache)))
        return

    ensure_store(args.store, args.tokens, args.distinct)
    size = sum(p.stat().st_size for p in shard_paths(args.store))
    for method in args.method or ["pca"]:
        command = [sys.executable, __file__, "--store", str(args.store), "--hidden-layer", str(args.hidden_layer)]
        command += ["--chunk-cache", str(args.chunk_cache)]
        output = subprocess.run([*command, "--child", method], check=True, capture_output=True, text=True)
        run = json.loads(output.stdout.strip().splitlines()[-1])
        print(
            f"{method}: {run['points']:,} tokens of {run['examples']:,} examples (store {size / 1e9:.2f} GB), "
            f"hidden layer {args.hidden_layer}, fitted on {run['sample_size']:,} tokens: "
            f"{run['seconds']:.1f} s ({run['points'] / run['seconds']:,.0f} tokens/s), "
            f"open {run['open']:.1f} s, peak RSS {run['peak_rss'] / 2**30:.2f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
