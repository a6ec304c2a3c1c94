"""Head statistics over a large store: throughput next to the raw read speed, and peak memory.

    python benchmarks/bench_stats.py [--store PATH] [--gigabytes 8]

Builds the store once (ViLT-sized examples: 12 layers x 12 heads, 185 tokens, hidden 768):
``--distinct`` synthetic examples, then copies of their shards under new example ids until
the store holds ``--gigabytes`` on disk (generating every example would take hours on a
shared machine; the statistics cost the same on copied data). Then, each in a fresh
process so peak memory is its own:

* raw read: every attention chunk of every shard read and decompressed with netCDF4, nothing else;
* statistics: ``compute_head_statistics`` over the whole store (Dask, bounded batches, no cache);
* with ``--workers N``, the same on a local Dask distributed cluster of N worker processes
  (``vlinterpret stats --workers N``), its peak memory the largest worker's.

Prints both throughputs (on-disk store bytes per second), their ratio and peak resident memory.

``--chunk-cache`` sets netCDF's per-variable chunk cache before the store is opened (both
children). netCDF's default, 64 MiB per variable *per open file*, keeps decompressed chunks
of every shard read so far: 1.6 GB after 20 shards of this store. Pass 0 to measure that default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from vlinterpret_panel.store import SHARD_PREFIX, SHARD_SUFFIX, shard_paths
from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

VILT_SIZED = SynthSpec(layers=12, heads=12, tokens=185, hidden_size=768, image_size=384, seed=11)


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in shard_paths(path))


def copy_shard(source: Path, store: Path, copy_number: int) -> None:
    """Copy a shard atomically under a new name, giving its examples new ids."""
    import netCDF4

    name = f"{SHARD_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=store)
    os.close(handle)
    shutil.copyfile(source, temporary)
    with netCDF4.Dataset(temporary, "r+") as shard:
        ids = shard.variables["example"][:]
        shard.variables["example"][:] = np.array([f"{i}-copy{copy_number:04d}" for i in ids], dtype=object)
    os.replace(temporary, store / name)


def ensure_store(path: Path, gigabytes: float, distinct: int) -> None:
    """Write ``distinct`` examples if the store is empty, then copy shards up to ``gigabytes``."""
    if not path.exists() or not shard_paths(path):
        print(f"writing {distinct} distinct examples to {path} ...", flush=True)
        spec = SynthSpec(**{**VILT_SIZED.__dict__, "examples": distinct})
        write_synthetic_store(path, spec, examples_per_shard=8, progress=True)
    originals = shard_paths(path)
    copy_number = len(shard_paths(path))
    while store_bytes(path) < gigabytes * 1e9:
        copy_shard(originals[copy_number % len(originals)], path, copy_number)
        copy_number += 1


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_chunk_cache(size: int) -> None:
    """Use a ``size``-byte netCDF chunk cache for files opened from now on (0: keep netCDF's default)."""
    import netCDF4

    if size > 0:
        netCDF4.set_chunk_cache(size, 1009, 0.75)


def child_raw_read(store: Path) -> dict:
    """Read and decompress every attention chunk with netCDF4 alone."""
    import netCDF4

    started = time.perf_counter()
    values = 0
    for shard_path in shard_paths(store):
        with netCDF4.Dataset(shard_path) as shard:
            attention = shard.variables["attention"]
            attention.set_auto_maskandscale(False)  # raw uint16: the read, not the decoding
            for example in range(attention.shape[0]):
                for layer in range(attention.shape[1]):
                    values += attention[example, layer].size
    return {"seconds": time.perf_counter() - started, "values": values, "peak_rss": _peak_rss_bytes()}


def child_statistics(store: Path, batch_size: int, workers: int | None = None, chunk_cache: int = 0) -> dict:
    """All built-in statistics of every example, without the cache; on ``workers`` processes when given."""
    from vlinterpret_panel.cluster import distributed_client
    from vlinterpret_panel.stats import compute_head_statistics
    from vlinterpret_panel.store import open_dataset

    started = time.perf_counter()
    with distributed_client(store, workers=workers) as client:
        if client is not None:
            client.run(set_chunk_cache, chunk_cache)
            started = time.perf_counter()  # the cluster's start-up (~2 s) is not the statistics'
        ds = open_dataset(store)
        table = compute_head_statistics(ds, batch_size=batch_size, use_cache=False)
        seconds = time.perf_counter() - started
        worker_peak = max(client.run(_peak_rss_bytes).values()) if client is not None else 0
    finite = int(np.isfinite(table["entropy"].values).sum())
    peak = max(_peak_rss_bytes(), worker_peak)
    return {"seconds": seconds, "examples": ds.sizes["example"], "finite": finite, "peak_rss": peak}


def drop_page_cache() -> bool:
    """Evict files from the OS cache where allowed, so both measurements read cold."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1\n")
        return True
    except OSError:
        return False


def run_child(*arguments: str) -> dict:
    output = subprocess.run([sys.executable, __file__, *arguments], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/vlinterpret-bench/stats-8gb"))
    parser.add_argument("--gigabytes", type=float, default=8.0)
    parser.add_argument("--distinct", type=int, default=64, help="synthetic examples to generate before copying")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-cache", type=int, default=2**20, help="netCDF chunk cache bytes (0: default)")
    parser.add_argument("--workers", type=int, help="also measure the statistics on a local cluster of N processes")
    parser.add_argument("--child", choices=["raw", "stats"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_chunk_cache(args.chunk_cache)
    if args.child == "raw":
        print(json.dumps(child_raw_read(args.store)))
        return
    if args.child == "stats":
        print(json.dumps(child_statistics(args.store, args.batch_size, args.workers, args.chunk_cache)))
        return

    ensure_store(args.store, args.gigabytes, args.distinct)
    size = store_bytes(args.store)
    cold = drop_page_cache()
    common = ["--store", str(args.store), "--chunk-cache", str(args.chunk_cache)]
    raw = run_child(*common, "--child", "raw")
    drop_page_cache()
    computed = run_child(*common, "--child", "stats", "--batch-size", str(args.batch_size))

    gb = 1e9
    raw_speed, stats_speed = size / raw["seconds"] / gb, size / computed["seconds"] / gb
    print(
        f"store: {args.store} {size / gb:.2f} GB on disk, {computed['examples']} examples, "
        f"{len(shard_paths(args.store))} shards ({'cold page cache' if cold else 'page cache not dropped'}), "
        f"netCDF chunk cache {args.chunk_cache if args.chunk_cache > 0 else 'default'} bytes"
    )
    print(
        f"raw read (netCDF4, every attention chunk): {raw['seconds']:7.1f} s  {raw_speed:.3f} GB/s  "
        f"peak RSS {raw['peak_rss'] / 2**30:.2f} GiB"
    )
    print(
        f"head statistics (10 statistics, Dask):     {computed['seconds']:7.1f} s  {stats_speed:.3f} GB/s  "
        f"peak RSS {computed['peak_rss'] / 2**30:.2f} GiB  "
        f"({computed['examples'] / computed['seconds']:.1f} examples/s)"
    )
    print(f"ratio statistics / raw read: {stats_speed / raw_speed:.2f}")
    if args.workers:
        drop_page_cache()
        clustered = run_child(
            *common, "--child", "stats", "--batch-size", str(args.batch_size), "--workers", str(args.workers)
        )
        cluster_speed = size / clustered["seconds"] / gb
        print(
            f"head statistics, {args.workers} worker processes: {clustered['seconds']:7.1f} s  "
            f"{cluster_speed:.3f} GB/s  peak RSS per process {clustered['peak_rss'] / 2**30:.2f} GiB  "
            f"ratio to raw read {cluster_speed / raw_speed:.2f}"
        )
    print(f"load average while measuring: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
