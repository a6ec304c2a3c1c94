"""One shared 2-D map per hidden layer: every real token of every example, projected together.

VL-InterpreT ran an independent t-SNE per example and layer, so positions in two examples
could not be compared. Here one projection is fitted per hidden layer on a random sample
of tokens from the whole dataset and then applied to all tokens, batch by batch, so a
store larger than memory is projected in bounded memory and tokens of every example sit
in one comparable map.

* ``pca`` (default): scikit-learn PCA fitted on the sample, a linear map applied to all.
* ``tsne``: scikit-learn t-SNE (seeded, perplexity capped for small samples) on a 50-D PCA
  reduction of the sample; t-SNE has no transform, so every other token is placed at the
  distance-weighted mean of its 10 nearest sample tokens (sample tokens keep their place).
* ``umap``: umap-learn (optional dependency) fitted on the 50-D reduction, its ``transform``
  applied to all tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from vlinterpret_panel import cache
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import PAD

Method = Literal["pca", "tsne", "umap"]
METHODS: dict[str, str] = {
    "pca": "principal component analysis (linear, fast, default)",
    "tsne": "t-SNE on a sample, other tokens placed by their nearest sample tokens",
    "umap": "UMAP (needs umap-learn), fitted on a sample and applied to all tokens",
}
DEFAULT_SAMPLE_SIZE = {"pca": 50_000, "tsne": 5_000, "umap": 20_000}
CACHE_KIND = "projection"
_CACHE_VERSION = 1
_REDUCED_DIMENSIONS = 50
_PLACEMENT_NEIGHBORS = 10
_PER_EXAMPLE_COORDINATES = ("label", "prediction", "correct")

Transform = Callable[[np.ndarray], np.ndarray]


def real_tokens(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(example_index, token)`` of every real (non-padding) token, example by example."""
    modality = ds["modality"].values
    example_index, token = np.nonzero(modality != PAD)
    return example_index.astype(np.int64), token.astype(np.int64)


def check_hidden_layer(ds: xr.Dataset, hidden_layer: int) -> int:
    """``hidden_layer`` as a position on the ``hidden_layer`` axis, or a ``VLIError`` naming it."""
    n_layers = ds.sizes["hidden_layer"]
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, (int, np.integer)):
        raise VLIError(f"hidden_layer: expected an integer, got {hidden_layer!r}")
    if not 0 <= hidden_layer < n_layers:
        raise VLIError(f"hidden_layer: {hidden_layer} is out of range; the store has hidden layers 0 to {n_layers - 1}")
    return int(hidden_layer)


def hidden_vectors(ds: xr.Dataset, hidden_layer: int, examples: np.ndarray | slice) -> np.ndarray:
    """Hidden states ``(example, token, feature)`` of some examples at one layer, NaN features as 0.

    NaN features are the padding of a narrower tower (e.g. a CLIP text tower); 0 keeps those
    tokens in the same space without inventing values.
    """
    block = ds["hidden_states"].isel(hidden_layer=hidden_layer, example=examples).values
    block = block.astype(np.float32, copy=False)
    return np.nan_to_num(block, copy=False, nan=0.0)  # in place: the block is a fresh array


def _sample(
    ds: xr.Dataset,
    hidden_layer: int,
    example_index: np.ndarray,
    token: np.ndarray,
    size: int,
    seed: int,
    batch_tokens: int,
) -> np.ndarray:
    """Hidden vectors of ``size`` random real tokens, drawn from whole random examples.

    Reading whole examples keeps the sample to a few chunk reads however large the store;
    they are read ``batch_tokens`` token slots at a time, keeping only their real tokens.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(example_index, minlength=ds.sizes["example"])
    order = rng.permutation(ds.sizes["example"])
    needed = np.searchsorted(np.cumsum(counts[order]), size) + 1
    chosen = np.sort(order[:needed])
    examples_per_batch = max(1, batch_tokens // max(1, ds.sizes["token"]))
    parts = []
    for first in range(0, len(chosen), examples_per_batch):
        group = chosen[first : first + examples_per_batch]
        in_group = np.isin(example_index, group)
        rows = np.searchsorted(group, example_index[in_group])
        parts.append(hidden_vectors(ds, hidden_layer, group)[rows, token[in_group]])
    picked = np.concatenate(parts)
    if len(picked) > size:
        picked = picked[np.sort(rng.choice(len(picked), size=size, replace=False))]
    return picked


def _fit(method: str, sample: np.ndarray, seed: int) -> tuple[Transform, dict]:
    """Fit ``method`` on the sample; return the map for any tokens and attrs describing the fit."""
    from sklearn.decomposition import PCA

    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(sample)
        return pca.transform, {"explained_variance_ratio": pca.explained_variance_ratio_.astype(np.float64)}
    reducer = PCA(n_components=min(_REDUCED_DIMENSIONS, *sample.shape), random_state=seed).fit(sample)
    reduced = reducer.transform(sample)
    if method == "tsne":
        from sklearn.manifold import TSNE
        from sklearn.neighbors import KNeighborsRegressor

        perplexity = float(min(30.0, max(1.0, (len(sample) - 1) / 3)))
        embedding = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
        placement = KNeighborsRegressor(n_neighbors=min(_PLACEMENT_NEIGHBORS, len(sample)), weights="distance")
        placement.fit(reduced, embedding)
        return (lambda vectors: placement.predict(reducer.transform(vectors))), {"perplexity": perplexity}
    try:
        import umap
    except ImportError:
        raise VLIError("method='umap' needs the optional package umap-learn: pip install umap-learn") from None
    # A seed makes UMAP single-threaded; it is what makes the map reproducible.
    model = umap.UMAP(n_components=2, n_neighbors=min(15, len(sample) - 1), random_state=seed, n_jobs=1)
    model.fit(reduced)
    return (lambda vectors: model.transform(reducer.transform(vectors))), {}


def _compute(
    ds: xr.Dataset, hidden_layer: int, method: str, sample_size: int, seed: int, batch_tokens: int, progress: bool
) -> xr.Dataset:
    """The projection of every real token, as a compact dataset of positions (cached form)."""
    example_index, token = real_tokens(ds)
    sample = _sample(ds, hidden_layer, example_index, token, sample_size, seed, batch_tokens)
    if len(sample) < 3:
        raise VLIError(f"hidden_layer {hidden_layer}: too few tokens ({len(sample)}) to project")
    transform, fit_attrs = _fit(method, sample, seed)
    xy = np.empty((len(token), 2), dtype=np.float32)
    examples_per_batch = max(1, batch_tokens // max(1, ds.sizes["token"]))
    n_examples = ds.sizes["example"]
    starts = np.searchsorted(example_index, np.arange(n_examples + 1))  # first point of each example
    with tqdm(total=len(token), unit="token", desc=f"projection {method}", disable=not progress) as bar:
        for first in range(0, n_examples, examples_per_batch):
            last = min(n_examples, first + examples_per_batch)
            points = slice(starts[first], starts[last])
            vectors = hidden_vectors(ds, hidden_layer, slice(first, last))
            xy[points] = transform(vectors[example_index[points] - first, token[points]])
            bar.update(points.stop - points.start)
    return xr.Dataset(
        {
            "x": ("point", xy[:, 0], {"long_name": f"{method} component 1"}),
            "y": ("point", xy[:, 1], {"long_name": f"{method} component 2"}),
            "example_index": ("point", example_index.astype(np.int32)),
            "token": ("point", token.astype(np.int32)),
        },
        attrs={"method": method, "sample_size": len(sample), "seed": seed, **fit_attrs},
    )


def project_hidden_states(
    ds: xr.Dataset,
    hidden_layer: int,
    *,
    method: Method = "pca",
    sample_size: int | None = None,
    seed: int = 0,
    batch_tokens: int = 50_000,
    progress: bool = False,
    use_cache: bool = True,
) -> xr.Dataset:
    """A 2-D map of every real token's hidden state at ``hidden_layer``, shared by all examples.

    Returns a Dataset over dim ``point`` (one per real token) with variables ``x`` and ``y``
    and coordinates ``example`` (id), ``token`` (position), ``modality``, ``token_text`` and,
    when stored, ``label``, ``prediction``, ``correct``. The projection is fitted on
    ``sample_size`` tokens (default per method, see ``DEFAULT_SAMPLE_SIZE``) drawn with
    ``seed``, applied to ``batch_tokens`` tokens at a time, and cached beside the store.
    """
    hidden_layer = check_hidden_layer(ds, hidden_layer)
    if method not in METHODS:
        raise VLIError(f"method: unknown projection {method!r}; choose from {list(METHODS)}")
    sample_size = DEFAULT_SAMPLE_SIZE[method] if sample_size is None else sample_size
    if isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer)) or sample_size < 3:
        raise VLIError(f"sample_size: expected an integer of at least 3, got {sample_size!r}")
    if batch_tokens < 1:
        raise VLIError(f"batch_tokens: expected a positive integer, got {batch_tokens!r}")
    params = {
        "version": _CACHE_VERSION,
        "hidden_layer": hidden_layer,
        "method": method,
        "sample_size": int(sample_size),
        "seed": int(seed),
    }
    compact = cache.cached(
        ds.vli.identity,
        f"{CACHE_KIND}-{method}-{hidden_layer}",
        params,
        lambda: _compute(ds, hidden_layer, method, int(sample_size), int(seed), batch_tokens, progress),
        use_cache=use_cache,
    )
    return _with_token_coordinates(ds, compact, hidden_layer)


def _with_token_coordinates(ds: xr.Dataset, compact: xr.Dataset, hidden_layer: int) -> xr.Dataset:
    """Attach the store's labels (ids, modality, text, answers) to each projected point."""
    example_index = compact["example_index"].values
    token = compact["token"].values
    coords = {
        "example": ("point", ds["example"].values[example_index]),
        "token": ("point", token),
        "modality": ("point", ds["modality"].values[example_index, token].astype(str)),
        "token_text": ("point", ds["token_text"].values[example_index, token].astype(str)),
    }
    for name in _PER_EXAMPLE_COORDINATES:
        if name in ds:
            coords[name] = ("point", ds[name].values[example_index])
    result = xr.Dataset(
        {"x": compact["x"], "y": compact["y"]},
        coords=coords,
        attrs={
            **compact.attrs,
            "hidden_layer": hidden_layer,
            "hidden_layer_name": str(ds["hidden_layer_name"].values[hidden_layer]),
        },
    )
    return result.assign_coords(point=np.arange(result.sizes["point"]))
