"""Write the small VL-InterpreT database the importer tests use on every clone (tests/fixtures/).

    python extract/make_vlinterpret_fixture.py [--out tests/fixtures/vlinterpret_small]

VL-InterpreT's own format, as in its shipped example database: an LMDB whose values are
lz4-framed msgpack; each example (keys "0", "1", ...) is a pickled dict (protocol 4) of plain
Python values and NumPy arrays, with VL-InterpreT's quirks: unnormalised random attention, image
tokens listed in sorted order (IMG_0, IMG_2, IMG_4, IMG_1, ...) in ``tokens``, ``img_coords`` and
``attention`` but not in ``hidden_states``, int64 images, ``accuracy`` as a bool, ``tsne``. Plus
``n_examples``, ``n_heads``, ``n_layers`` (msgpack integers) and a pickled ``faiss`` index map.
Only safe content (plain types, NumPy arrays, ``collections.defaultdict``): what the restricted
unpickler accepts. Seeded: the same bytes in every run (LMDB pages aside). The external fixture
in ``../shared/fixtures`` (VL-InterpreT's 12 x 12 x 14-token example, 4 MB) stays an extra test.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import shutil
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "vlinterpret_small"
EXAMPLES, LAYERS, HEADS, HIDDEN = 3, 2, 2, 8
HEIGHT, WIDTH = 30, 48
GRID = (3, 2)  # columns, rows
TEXT = ["[CLS]", "text", "input", "for", "example", "{n}", ".", "[SEP]"]
IMAGE_ORDER = [0, 2, 4, 1, 3, 5]  # VL-InterpreT listed image tokens sorted as strings, not by index


def encode(value: object) -> bytes:
    """A value as VL-InterpreT's VliLmdb stores it: msgpack, then an lz4 frame."""
    return lz4.frame.compress(msgpack.dumps(value, use_bin_type=True))


def example(index: int) -> dict[str, object]:
    """One example dict in VL-InterpreT's layout (8 text tokens, 6 image tokens on a 3 x 2 grid)."""
    rng = np.random.default_rng(index)
    rows, columns = np.indices((HEIGHT, WIDTH))
    image = np.stack([rows * 8 % 256, columns * 5 % 256, np.full_like(rows, 40 * index)], axis=-1).astype(np.int64)
    coords = [(k % GRID[0], k // GRID[0]) for k in IMAGE_ORDER]  # (x, y), (0, 0) at the top left
    tokens = [t.format(n=index) for t in TEXT] + [np.str_(f"IMG_{k}") for k in IMAGE_ORDER]
    n_tokens = len(tokens)
    return {
        "ex_id": index,
        "image": image,
        "tokens": tokens,
        "txt_len": len(TEXT),
        "img_coords": coords,
        "accuracy": index != 1,
        "attention": rng.random((LAYERS, HEADS, n_tokens, n_tokens)),
        "hidden_states": rng.normal(size=(LAYERS + 1, n_tokens, HIDDEN)),
        "custom_metrics": {"head importance": rng.random((LAYERS, HEADS)).astype(np.float32)},
        "img_grid_size": np.array(GRID, dtype=np.int64),
        "tsne": [rng.normal(size=(n_tokens, 2)).astype(np.float32) for _ in range(LAYERS + 1)],
    }


def faiss_map() -> collections.defaultdict:
    """The ``faiss`` key's (layer, modality) -> [(example id, token)] map, as VL-InterpreT writes it."""
    index: collections.defaultdict = collections.defaultdict(list)
    for layer in range(LAYERS + 1):
        for example_id in range(EXAMPLES):
            for token in range(len(TEXT)):
                index[(layer, "txt")].append((str(example_id), token))
            for token in range(len(TEXT), len(TEXT) + len(IMAGE_ORDER)):
                index[(layer, "img")].append((str(example_id), token))
    return index


def write(out: Path) -> Path:
    """Write the database to ``out`` (replaced if it exists); return its data file."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = lmdb.open(str(out), map_size=8 * 2**20, subdir=True)
    with env.begin(write=True) as txn:
        for index in range(EXAMPLES):
            txn.put(str(index).encode(), encode(pickle.dumps(example(index), protocol=4)))
        txn.put(b"faiss", encode(pickle.dumps(faiss_map(), protocol=4)))
        for name, value in (("n_examples", EXAMPLES), ("n_heads", HEADS), ("n_layers", LAYERS)):
            txn.put(name.encode(), encode(value))
    env.close()
    (out / "lock.mdb").unlink(missing_ok=True)  # a lock file is made by whoever opens it
    return out / "data.mdb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    data = write(parser.parse_args().out)
    print(f"wrote {data} ({data.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
