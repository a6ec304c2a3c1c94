"""Time opening a large synthetic store and reading one (example, layer, head) slice.

    python benchmarks/bench_store.py [--store PATH] [--gigabytes 2]

Writes the store once (ViLT-sized examples: 12 layers x 12 heads, 185 tokens, hidden 768)
and reuses it on later runs. Prints the figures; record them in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vlinterpret_panel.store import open_dataset, shard_paths
from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

VILT_SIZED = SynthSpec(layers=12, heads=12, tokens=185, hidden_size=768, image_size=384, seed=0)


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in shard_paths(path))


def ensure_store(path: Path, gigabytes: float) -> None:
    """Write (or extend) the synthetic store until it holds ``gigabytes`` on disk."""
    if path.exists() and store_bytes(path) >= gigabytes * 1e9:
        return
    probe = path.with_name(path.name + "-probe")
    write_synthetic_store(probe, SynthSpec(**{**VILT_SIZED.__dict__, "examples": 4}), examples_per_shard=4)
    per_example = store_bytes(probe) / 4
    subprocess.run(["rm", "-rf", str(probe)], check=True)
    examples = int(np.ceil(gigabytes * 1e9 / per_example))
    print(f"writing {examples} examples (~{per_example / 1e6:.1f} MB each) to {path} ...", flush=True)
    started = time.perf_counter()
    spec = SynthSpec(**{**VILT_SIZED.__dict__, "examples": examples})
    write_synthetic_store(path, spec, examples_per_shard=8, progress=True)
    print(f"wrote {store_bytes(path) / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s")


def drop_page_cache(path: Path) -> bool:
    """Evict the store's files from the OS cache where allowed, for cold reads."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            subprocess.run(["sync"], check=True)
            control.write("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/vlinterpret-bench/store-2gb"))
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    ensure_store(args.store, args.gigabytes)
    size = store_bytes(args.store)

    open_times, cold_reads, warm_reads = [], [], []
    rng = np.random.default_rng(0)
    cold = drop_page_cache(args.store)
    for _ in range(args.repeats):
        drop_page_cache(args.store)
        started = time.perf_counter()
        ds = open_dataset(args.store)
        open_times.append(time.perf_counter() - started)
        example, layer, head = (int(rng.integers(ds.sizes[d])) for d in ("example", "layer", "head"))
        started = time.perf_counter()
        ds.attention.isel(example=example, layer=layer, head=head).compute()
        cold_reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        ds.attention.isel(example=example, layer=layer, head=(head + 1) % ds.sizes["head"]).compute()
        warm_reads.append(time.perf_counter() - started)
        ds.close()

    ms = 1000
    shards = len(shard_paths(args.store))
    print(f"store: {args.store} {size / 1e9:.2f} GB, {ds.sizes['example']} examples, {shards} shards")
    median_open, max_open = statistics.median(open_times) * ms, max(open_times) * ms
    print(f"open_dataset:            median {median_open:7.1f} ms  max {max_open:7.1f} ms")
    label = "cold cache" if cold else "page cache not dropped (not root)"
    print(f"read 1 (ex, layer, head): median {statistics.median(cold_reads) * ms:7.1f} ms  ({label})")
    print(f"read another head, same open store: median {statistics.median(warm_reads) * ms:7.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
