"""Write the small VL-InterpreT database the importer tests use on every clone (tests/fixtures/).

    python extract/make_vlinterpret_fixture.py [--out tests/fixtures/vlinterpret_small]

VL-InterpreT's own format, made the way its ``db_example.py`` and ``VliLmdb.preprocess``
(``app/database/``) make their example database, only smaller: an LMDB whose values are
lz4-framed msgpack; each example (keys "0", "1", ...) is a pickled dict (protocol 4) of plain
Python values and NumPy arrays, with NumPy's helpers named as NumPy 1.x named them. Raw
examples name image tokens ``IMG_<i>`` on a 3 x 2 grid in column-major order, as
``db_example.py`` does; the preprocessing then sorts the image tokens by (row, column) in
``tokens``, ``img_coords`` and ``attention`` but not in ``hidden_states`` (IMG_0, IMG_2, IMG_4,
IMG_1, ...), adds ``img_grid_size`` and ``tsne``, and writes ``n_examples``, ``n_layers``,
``n_heads`` (msgpack integers) and ``faiss``, a pickled ``defaultdict`` of (layer, "txt"/"img")
-> [(example id, token index)]. Attention is uniform random, unnormalised, as in VL-InterpreT's
example. Safe content only: plain types, NumPy arrays and that ``defaultdict``. Seeded: the
same bytes in every run. The external fixture in ``../shared/fixtures`` (VL-InterpreT's
12 x 12 x 14-token example, 4 MB) stays an extra test.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import shutil
from pathlib import Path
from typing import Any

import lmdb
import lz4.frame
import msgpack
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "vlinterpret_small"
EXAMPLES, LAYERS, HEADS, HIDDEN = 3, 2, 2, 8
HEIGHT, WIDTH = 30, 48
TEXT = ["[CLS]", "text", "input", "for", "example", "{n}", ".", "[SEP]"]
# (x, y) of IMG_0 ... IMG_5, (0, 0) at the top left: column-major, as in db_example.py.
RAW_COORDS = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
# VL-InterpreT pickles with HIGHEST_PROTOCOL, which was 4 where its example database was made.
PICKLE_PROTOCOL = 4


class NumPy1Pickler(pickle._Pickler):
    """A pickler that names NumPy's helpers as NumPy 1.x did (``numpy.core.multiarray._reconstruct``).

    VL-InterpreT's databases were written with NumPy 1.x; NumPy 2 spells the same functions
    ``numpy._core...``. The importer accepts both, and this fixture keeps the spelling of the
    databases users have, which no other test on a fresh clone writes.
    """

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith("numpy._core."):
            super().save_global(obj, name)
            return
        self.save(module.replace("numpy._core.", "numpy.core.", 1))
        self.save(name or obj.__qualname__)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dumps(value: object) -> bytes:
    """``pickle.dumps(value, protocol=4)`` with NumPy 1.x names (protocol 4 writes STACK_GLOBAL)."""
    buffer = io.BytesIO()
    NumPy1Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(value)
    return buffer.getvalue()


def encode(value: object) -> bytes:
    """A value as VL-InterpreT's VliLmdb stores it: msgpack, then an lz4 frame."""
    return lz4.frame.compress(msgpack.dumps(value, use_bin_type=True))


def raw_example(index: int) -> dict[str, object]:
    """One example as a VL-InterpreT user writes it, before preprocessing (8 text, 6 image tokens)."""
    rng = np.random.default_rng(index)
    rows, columns = np.indices((HEIGHT, WIDTH))
    image = np.stack([rows * 8 % 256, columns * 5 % 256, np.full_like(rows, 40 * index)], axis=-1).astype(np.int64)
    tokens = [t.format(n=index) for t in TEXT] + [f"IMG_{k}" for k in range(len(RAW_COORDS))]
    n_tokens = len(tokens)
    return {
        "ex_id": index,
        "image": image,
        "tokens": tokens,
        "txt_len": len(TEXT),
        "img_coords": list(RAW_COORDS),
        "accuracy": index % 2 == 0,
        "attention": rng.random((LAYERS, HEADS, n_tokens, n_tokens)),
        "hidden_states": rng.random((LAYERS + 1, n_tokens, HIDDEN)),
        "custom_metrics": {"head importance": rng.random((LAYERS, HEADS))},
    }


def preprocess(example: dict, tsne_seed: int) -> dict:
    """VL-InterpreT's preprocessing of one example, with the same types and (quirky) orders.

    Image tokens are sorted by (y, x) in tokens (as ``np.str_``), coordinates and both attention
    axes, but the hidden states are left in the raw order; ``tsne`` (float32 per hidden layer)
    is random here (from ``tsne_seed``), where VL-InterpreT runs an unseeded t-SNE.
    """
    rng = np.random.default_rng(tsne_seed)
    txt_len = example["txt_len"]
    coords = np.array(example["img_coords"], dtype=[("x", int), ("y", int)])
    order = np.argsort(coords, order=("y", "x"))
    image_index = txt_len + order
    keep = np.concatenate([np.arange(txt_len), image_index])
    tokens = example["tokens"][:txt_len] + list(np.array(example["tokens"][txt_len:])[order])
    n_tokens = len(tokens)
    return {
        **example,
        "tokens": tokens,
        "img_coords": coords[order].tolist(),
        "attention": example["attention"][:, :, keep][:, :, :, keep],
        "img_grid_size": np.max(example["img_coords"], axis=0) + 1,
        "tsne": [rng.normal(size=(n_tokens, 2)).astype(np.float32) for _ in range(LAYERS + 1)],
    }


def faiss_map() -> collections.defaultdict:
    """The ``faiss`` key: (layer, modality) -> [(example id, token index)], as VL-InterpreT writes it."""
    index: collections.defaultdict = collections.defaultdict(list)
    for example in range(EXAMPLES):
        example_id = str(example)  # one string per example, as VliLmdb.preprocess (pickled once, memoised)
        for layer in range(LAYERS + 1):
            index[(layer, "txt")] += [(example_id, token) for token in range(len(TEXT))]
            index[(layer, "img")] += [(example_id, token) for token in range(len(TEXT), len(TEXT) + len(RAW_COORDS))]
    return index


def write(out: Path) -> Path:
    """Write the database to ``out`` (replaced if it exists); return its data file."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = lmdb.open(str(out), map_size=8 * 2**20, subdir=True)
    with env.begin(write=True) as txn:
        for index in range(EXAMPLES):
            example = preprocess(raw_example(index), tsne_seed=EXAMPLES + index)
            txn.put(str(index).encode(), encode(dumps(example)))
        txn.put(b"faiss", encode(dumps(faiss_map())))
        for name, value in (("n_examples", EXAMPLES), ("n_heads", HEADS), ("n_layers", LAYERS)):
            txn.put(name.encode(), encode(value))
    env.close()
    (out / "lock.mdb").unlink(missing_ok=True)  # a lock file is made by whoever opens it
    return out / "data.mdb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="database directory to (re)write")
    data = write(parser.parse_args().out)
    print(f"wrote {data} ({data.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
