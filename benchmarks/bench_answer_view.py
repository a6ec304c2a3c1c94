"""Server-side cost of a click on a generated token, on a store of LLaVA-1.5-shaped generated answers.

    python benchmarks/bench_answer_view.py [--examples 56] [--clicks 60] [--store PATH]

The store (written once, then reused) holds ``--examples`` synthetic examples shaped like
llava-1.5-7b's with the default ``--generate`` storage: 576 image patches and 27 prompt tokens,
32-token answers, the answer rows of 32 layers x 32 heads over all 635 keys (float16), their
hidden states (33 x 4096) and two relevancy methods; random values (the cost does not depend
on them). 56 examples are ~2.1 GB. A click is what the answer view computes when the user taps
token k of an example: the image map, the text map, the strip, the alternatives and the
per-token reliance bars, each through ``ds.vli`` as the view does, with its caches (a first
click on an example pays its reliance reads, the later ones hit the cache). Printed: p50/p95
per click for the relevancy map and for one head's attention row, first clicks on an example
apart. Target (issue 13): p95 < 150 ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlinterpret_panel import open_dataset
from vlinterpret_panel.schema import IMAGE, TEXT, ExampleRecord, GeneratedAnswer, ModelInfo, records_to_dataset
from vlinterpret_panel.store import write_shard

LAYERS, HEADS, HIDDEN = 32, 32, 4096
GRID, PROMPT, STEPS = 24, 27, 32
METHODS = ("raw_attention", "generic")


def _record(index: int) -> ExampleRecord:
    """One LLaVA-1.5-shaped example: [BOS], 576 patches, prompt words, a 32-token answer."""
    rng = np.random.default_rng(index)
    n_image = GRID * GRID
    tokens = ["<s>"] + [f"<patch_{i}>" for i in range(n_image)] + [f"w{i}" for i in range(PROMPT)]
    answer = [f"a{i}" for i in range(STEPS)]
    tokens += answer
    n = len(tokens)
    modality = ["special"] + [IMAGE] * n_image + [TEXT] * (PROMPT + STEPS)
    boxes = np.full((n, 4), np.nan, dtype=np.float32)
    size = 336 // GRID
    for i in range(n_image):
        row, col = divmod(i, GRID)
        boxes[1 + i] = (col * size, row * size, (col + 1) * size, (row + 1) * size)
    positions = np.arange(n - STEPS, n)
    attention = rng.random((LAYERS, HEADS, STEPS, n), dtype=np.float32)
    attention *= np.arange(n)[None, None, None, :] < positions[None, None, :, None]  # causal rows
    attention /= attention.sum(-1, keepdims=True)
    relevancy = {m: rng.random((STEPS, n), dtype=np.float32) for m in METHODS}
    generated = GeneratedAnswer(
        tokens=answer,
        positions=positions,
        probabilities=rng.random(STEPS).astype(np.float32),
        alternatives=np.array([[f"a{j}" for j in range(5)]] * STEPS),
        alternative_probabilities=np.sort(rng.random((STEPS, 5)).astype(np.float32))[:, ::-1],
        attention=attention,
        hidden_states=rng.standard_normal((LAYERS + 1, STEPS, HIDDEN), dtype=np.float32),
        relevancy=relevancy,
    )
    return ExampleRecord(
        example_id=f"llava-{index:04d}",
        image=rng.integers(0, 255, (336, 336, 3), dtype=np.uint8),
        text="describe the image",
        tokens=tokens,
        modality=modality,
        token_box=boxes,
        attention=None,
        hidden_states=None,
        answer=generated,
    )


def _info() -> ModelInfo:
    return ModelInfo(
        name="llava-1.5-shaped (synthetic)",
        layer_kind=["self"] * LAYERS,
        num_heads=[HEADS] * LAYERS,
        hidden_layer_name=["embeddings"] + [f"layers.{i}" for i in range(LAYERS)],
        layer_name=[f"model.layers.{i}.self_attn" for i in range(LAYERS)],
        config={"generator": "benchmarks/bench_answer_view.py"},
    )


def build(store: Path, examples: int) -> None:
    """Write the store, 4 examples per shard."""
    for start in range(0, examples, 4):
        records = [_record(i) for i in range(start, min(examples, start + 4))]
        write_shard(records_to_dataset(records, _info()), store)


def click(ds, example: str, step: int, method: str, head: int | None) -> None:
    """What the answer view reads and computes for a tap on generated token ``step``."""
    tokens = ds.vli.tokens(example)
    values = ds.vli.answer_map(example, step, method, -1, head)
    ds.vli.values_on_image(example, values)
    ds.vli.answer(example)
    ds.vli.alternatives(example, step)
    ds.vli.reliance(example, method, -1, head)
    assert len(values) == tokens.n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=56)
    parser.add_argument("--clicks", type=int, default=60)
    parser.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "vli-bench-answers")
    args = parser.parse_args()
    if not args.store.exists():
        started = time.perf_counter()
        build(args.store, args.examples)
        print(f"wrote {args.store} in {time.perf_counter() - started:.0f} s")
    size = sum(p.stat().st_size for p in args.store.glob("*.nc")) / 1e9
    ds = open_dataset(args.store)
    ids = [str(i) for i in ds.example.values]
    print(f"{len(ids)} examples, {size:.2f} GB on disk, load {Path('/proc/loadavg').read_text().split()[0]}")
    rng = np.random.default_rng(0)
    for method, head in (("generic", None), ("attention", 0)):
        first, later, seen = [], [], set()
        for _ in range(args.clicks):
            example = ids[int(rng.integers(len(ids)))]
            step = int(rng.integers(STEPS))
            started = time.perf_counter()
            click(ds, example, step, method, head)
            elapsed = (time.perf_counter() - started) * 1000
            (later if example in seen else first).append(elapsed)
            seen.add(example)
        name = method if head is None else f"{method} head {head}"
        for label, times in (("first click on an example", first), ("later clicks", later)):
            if times:
                p50, p95 = np.percentile(times, [50, 95])
                print(f"{name:18s} {label:26s} n={len(times):3d}  p50 {p50:7.1f} ms  p95 {p95:7.1f} ms")


if __name__ == "__main__":
    main()
