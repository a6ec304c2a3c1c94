"""Server-side cost of dashboard clicks on a large store: update time p50/p95 and peak memory.

    python benchmarks/bench_dashboard.py [--store PATH] [--gigabytes 5] [--clicks 60]

Writes a ViLT-sized synthetic store (12 layers x 12 heads, 185 tokens, hidden 768) once and
reuses it. The dashboard is built and rendered into a Bokeh document exactly as ``panel serve``
does for a session (the Attention tab, which is open on load); each click fires the view's
HoloViews Tap stream, as a browser tap does, and is timed until every linked plot has updated
and the resulting document patch is serialised for the browser. Between rounds the example
changes (untimed), so head clicks read attention chunks not yet cached. Memory is this
process's peak resident set size: the server's, since the server is this process.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import panel as pn
from bokeh.document import Document
from bokeh.document.events import DocumentPatchedEvent
from bokeh.protocol import Protocol
from panel.io.state import set_curdoc

from vlinterpret_panel.maps import example_tokens
from vlinterpret_panel.schema import TEXT, records_to_dataset
from vlinterpret_panel.store import open_dataset, shard_paths, write_shard
from vlinterpret_panel.synth import SynthSpec, synthetic_records
from vlinterpret_panel.ui.app import Dashboard
from vlinterpret_panel.ui.text import token_layout

VILT_SIZED = SynthSpec(layers=12, heads=12, tokens=185, hidden_size=768, image_size=384, seed=0)
P95_TARGET_MS, MEMORY_TARGET_GB = 150, 1.5


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in shard_paths(path))


def ensure_store(path: Path, gigabytes: float) -> None:
    """Write (or extend, 8 examples per shard) the synthetic store until it holds ``gigabytes`` on disk."""
    written = open_dataset(path).sizes["example"] if path.exists() and shard_paths(path) else 0
    while not path.exists() or store_bytes(path) < gigabytes * 1e9:
        spec = SynthSpec(**{**VILT_SIZED.__dict__, "examples": written + 8})
        records = list(synthetic_records(spec, written, written + 8))
        write_shard(records_to_dataset(records, spec.model_info(), {"synthetic": True}), path)
        written += 8
        print(f"\r{path}: {written} examples, {store_bytes(path) / 1e9:.2f} GB", end="", flush=True)
    print()


class PatchCounter:
    """Collects the document changes a click causes and serialises them as the server would."""

    def __init__(self, document: Document) -> None:
        self.events: list = []
        self._protocol = Protocol()
        document.on_change(self.events.append)

    def flush(self) -> int:
        """Serialise the pending changes into one PATCH-DOC message; return its size in bytes."""
        changes = [event for event in self.events if isinstance(event, DocumentPatchedEvent)]
        self.events.clear()  # in place: on_change holds this list's append
        if not changes:
            return 0
        message = self._protocol.create("PATCH-DOC", changes)
        return len(message.content_json) + sum(len(buffer.to_bytes()) for buffer in message.buffers)


def timed(click: Callable[[], None], patches: PatchCounter, document: Document) -> tuple[float, float, int]:
    """Run one click as the server runs a browser event for this session's document.

    Returns wall time and CPU time (all threads of this process) in ms, and the patch size.
    The CPU time is what the click costs the server; the wall time also counts waiting for a
    core, which on a shared machine can be most of it.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    with set_curdoc(document):
        click()
    if document.callbacks.hold_value:
        document.unhold()  # what the server's next-tick callback does: release the held changes to the session
    size = patches.flush()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/vlinterpret-bench/store-5gb"))
    parser.add_argument("--gigabytes", type=float, default=5.0)
    parser.add_argument("--clicks", type=int, default=60, help="clicks of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ensure_store(args.store, args.gigabytes)

    ds = open_dataset(args.store)
    started = time.perf_counter()
    dashboard = Dashboard(ds)
    document = Document()
    document.add_root(pn.Row(pn.Column(*dashboard.sidebar()), dashboard.main()).get_root(document))
    patches = PatchCounter(document)
    # Treat the document as a connected session's: held changes are then released to on_change
    # listeners (here the PatchCounter; in the server the websocket) instead of being dropped.
    pn.state._connected[document] = True
    patches.flush()
    build_ms = (time.perf_counter() - started) * 1000

    rng = np.random.default_rng(args.seed)
    selection = dashboard.selection
    n_layers, n_heads = ds.sizes["layer"], ds.sizes["head"]
    results: dict[str, list[float]] = {"text token click": [], "image patch click": [], "head click": []}
    cpu_times: dict[str, list[float]] = {name: [] for name in results}
    sizes: dict[str, list[int]] = {name: [] for name in results}
    examples = rng.choice(ds.sizes["example"], size=args.clicks, replace=args.clicks > ds.sizes["example"])
    for round_index, example_position in enumerate(examples):
        example = str(ds.indexes["example"][example_position])
        timed(lambda example=example: selection.select(example=example), patches, document)  # untimed: new chunks
        info = example_tokens(ds, example)
        layout = token_layout(info)
        text_rows = layout[np.isin(layout.token, info.tokens_of(TEXT))]
        row = text_rows.iloc[int(rng.integers(len(text_rows)))]
        patch = int(rng.choice(info.image_tokens()))
        x0, y0, x1, y1 = info.token_box[patch]
        layer, head = int(rng.integers(n_layers)), int(rng.integers(n_heads))
        clicks = {
            "head click": lambda layer=layer, head=head: dashboard.head_summary.tap.event(x=str(head), y=str(layer)),
            "text token click": lambda row=row: dashboard.text.tap.event(
                x=(row.x0 + row.x1) / 2, y=(row.y0 + row.y1) / 2
            ),
            "image patch click": lambda x=(x0 + x1) / 2, y=(y0 + y1) / 2: dashboard.image.tap.event(x=x, y=y),
        }
        order = list(clicks) if round_index % 2 == 0 else list(reversed(clicks))
        for name in order:
            elapsed, cpu, size = timed(clicks[name], patches, document)
            results[name].append(elapsed)
            cpu_times[name].append(cpu)
            sizes[name].append(size)
        if selection.message:
            print(f"user error shown during the run: {selection.message}", file=sys.stderr)
            return 1

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(
        f"store: {args.store} {store_bytes(args.store) / 1e9:.2f} GB on disk, {ds.sizes['example']} examples, "
        f"{n_layers} layers x {n_heads} heads, {ds.sizes['token']} tokens, {len(shard_paths(args.store))} shards"
    )
    print(f"session build + first render: {build_ms:.0f} ms")
    print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name, times in results.items():
        p50, p95 = np.percentile(times, 50), np.percentile(times, 95)
        cpu50, cpu95 = np.percentile(cpu_times[name], 50), np.percentile(cpu_times[name], 95)
        verdict = "ok" if p95 < P95_TARGET_MS else f"wall p95 OVER the {P95_TARGET_MS} ms target"
        print(
            f"{name:18s} n={len(times):3d}  wall p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  |  "
            f"cpu p50 {cpu50:6.1f} ms  p95 {cpu95:6.1f} ms  |  patch {statistics.median(sizes[name]) / 1e3:.0f} kB  "
            f"({verdict})"
        )
    verdict = "ok" if peak_gb < MEMORY_TARGET_GB else f"OVER the {MEMORY_TARGET_GB} GB target"
    print(f"server peak memory (max RSS): {peak_gb:.2f} GB ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
