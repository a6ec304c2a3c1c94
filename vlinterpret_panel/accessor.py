"""``ds.vli``: the analysis API that notebooks and dashboard views share, and the owner of a dataset's identity.

xarray creates an accessor once per Dataset object and keeps it on that object, so
``ds.vli`` holds what identifies the data behind ``ds`` (``identity``: the store version and
a digest of the examples and every other index it holds) and is the one place reads are
cached: example tokens, attention blocks and tables live in process-wide ``LRUCache``s keyed
by that identity. Two Dataset objects over the same data share entries; a subset never
shares the store's. The computations stay pure functions in ``maps``, ``stats``,
``projection`` and ``neighbors``; every method here delegates to one of them. Import
``vlinterpret_panel`` (or this module) to register the accessor.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from vlinterpret_panel import answers, maps
from vlinterpret_panel.cache import DatasetIdentity, LRUCache, dataset_identity
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import PAD

# A ViLT-sized (example, layer) block is 12 heads x 185 x 185 float32 = 1.6 MB: 48 of them is < 100 MB.
_BLOCKS: LRUCache[Hashable, np.ndarray] = LRUCache(48)
_TOKENS: LRUCache[Hashable, maps.ExampleTokens] = LRUCache(64)
# Small derived tables: the example browser's rows, a layer's map as a table, one example's rows of it, generated
# tokens' maps and answers (a few kB each at LLaVA size). 64 entries were evicted within a few answer clicks.
_TABLES: LRUCache[Hashable, Any] = LRUCache(512)
# Hidden layers held in memory for the nearest-token search (each at most neighbors.DEFAULT_MEMORY_BUDGET).
_LAYERS: LRUCache[Hashable, np.ndarray] = LRUCache(4)

CORRECT_NAMES = {1: "correct", 0: "incorrect", -1: "unknown"}
PROJECTION_COLUMNS = ("example", "token", "modality", "token_text", "label", "correct")


def clear_caches() -> None:
    """Forget every in-process read (e.g. after a store was rewritten in place under the same signature)."""
    for kept in (_BLOCKS, _TOKENS, _TABLES, _LAYERS):
        kept.clear()


@xr.register_dataset_accessor("vli")
class VLIAccessor:
    """Analysis of a schema Dataset; every method stays lazy until its result is shown."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    # Identity and lookups

    @cached_property
    def identity(self) -> DatasetIdentity:
        """What the data behind this object are: store version and selection (computed once per object)."""
        return dataset_identity(self._ds)

    def key(self, *parts: Hashable) -> tuple[Hashable, ...]:
        """A cache key for ``parts`` of this dataset (its identity first)."""
        return (*self.identity.key, *parts)

    def position(self, example: int | str) -> int:
        """Position of ``example`` (an index, or an example id) in this dataset."""
        return maps.example_position(self._ds, example)

    def example_id(self, example: int | str) -> str:
        """The id of ``example`` (an index, or an id, checked)."""
        return str(self._ds.indexes["example"][self.position(example)])

    def tokens(self, example: int | str) -> maps.ExampleTokens:
        """Tokens, modalities, boxes, text and image of one example (cached)."""
        position = self.position(example)
        return _TOKENS.get(self.key("tokens", position), lambda: maps.read_example_tokens(self._ds, position))

    def layer_block(self, example: int | str, layer: int) -> np.ndarray:
        """All heads of one (example, layer) attention block, real tokens only (cached: a click reads it once)."""
        tokens = self.tokens(example)
        layer = maps.check_layer(self._ds, layer)
        return _BLOCKS.get(
            self.key("attention", tokens.index, layer),
            lambda: maps.read_layer_block(self._ds, tokens.index, layer, tokens.n_tokens),
        )

    # Attention maps

    def attention_map(self, example: int | str, layer: int, head: int | None = None) -> xr.DataArray:
        """One ``(query, key)`` attention map trimmed to the example's real tokens; head None = mean."""
        return maps.attention_map(self._ds, example, layer, head, reads=self)

    def token_attention(
        self, example: int | str, layer: int, head: int | None, token: int | list[int], direction: str = "from"
    ) -> xr.DataArray:
        """Attention from (the row) or to (the column) token(s), one value per token."""
        return maps.token_attention(self._ds, example, layer, head, token, direction, reads=self)  # type: ignore[arg-type]

    def token_attention_on_image(
        self,
        example: int | str,
        layer: int,
        head: int | None,
        token: int | list[int],
        direction: str = "from",
        smooth: bool = False,
    ) -> xr.DataArray:
        """Attention from (or to) token(s) over the image, as an ``(image_y, image_x)`` array."""
        return maps.token_attention_on_image(
            self._ds,
            example,
            layer,
            head,
            token,
            direction,  # type: ignore[arg-type]
            smooth=smooth,
            reads=self,
        )

    def values_on_image(self, example: int | str, values: Any, smooth: bool = False) -> xr.DataArray:
        """One value per token (attention, relevancy...) painted over the example's image."""
        return maps.values_on_image(self._ds, example, values, smooth=smooth, reads=self)

    # Relevancy

    @property
    def relevancy_methods(self) -> list[str]:
        """Names of the relevancy methods stored with the examples (empty when none are)."""
        if "relevancy" not in self._ds:
            return []
        return [str(method) for method in self._ds.indexes["relevancy_method"]]

    def relevancy(self, example: int | str, method: str) -> xr.DataArray:
        """The stored relevancy of each real token of ``example`` by ``method``, with the output it explains."""
        methods = self.relevancy_methods
        if method not in methods:
            stored = ", ".join(methods) or "none"
            raise VLIError(f"relevancy method {method!r} is not in this store (stored: {stored})")
        tokens = self.tokens(example)

        def read() -> xr.DataArray:
            where = {"example": tokens.index, "relevancy_method": methods.index(method)}
            values = self._ds["relevancy"].isel(where).values[: tokens.n_tokens].astype(np.float64)
            target = str(self._ds["relevancy_target"].isel(where).values) if "relevancy_target" in self._ds else ""
            return xr.DataArray(
                values,
                dims="token",
                coords={"token": np.arange(tokens.n_tokens), "token_text": ("token", tokens.token_text)},
                name="relevancy",
                attrs={"example": tokens.example_id, "relevancy_method": method, "target": target, "units": "1"},
            )

        return _TABLES.get(self.key("relevancy", tokens.index, method), read)

    # Generated answers

    @property
    def has_answers(self) -> bool:
        """Whether the store holds generated answers (``--generate``)."""
        return answers.has_answers(self._ds)

    @property
    def answer_methods(self) -> list[str]:
        """The relevancy methods stored for generated tokens."""
        return answers.answer_methods(self._ds)

    def answer(self, example: int | str) -> pd.DataFrame:
        """The generated tokens of ``example``: step, token, probability, sequence position (cached)."""
        position = self.position(example)
        return _TABLES.get(self.key("answer", position), lambda: answers.answer_table(self._ds, position))

    def alternatives(self, example: int | str, step: int) -> pd.DataFrame:
        """The top-k tokens at generated ``step`` of ``example``, most probable first (cached)."""
        position = self.position(example)
        return _TABLES.get(
            self.key("alternatives", position, step), lambda: answers.alternatives(self._ds, position, step)
        )

    def answer_map(
        self, example: int | str, step: int, method: str = answers.ATTENTION, layer: int = -1, head: int | None = None
    ) -> np.ndarray:
        """Generated token ``step``'s map over the example's real tokens (``answers.answer_map``; cached)."""
        tokens = self.tokens(example)
        return _TABLES.get(
            self.key("answer-map", tokens.index, step, method, layer, head),
            lambda: answers.answer_map(self._ds, tokens.index, tokens.n_tokens, step, method, layer, head),
        )

    def reliance(
        self, example: int | str, method: str = answers.ATTENTION, layer: int = -1, head: int | None = None
    ) -> pd.DataFrame:
        """Per generated token of ``example``, the share of its map on the image, the prompt and the answer so far."""
        tokens = self.tokens(example)

        def compute() -> pd.DataFrame:
            steps = self.answer(example)
            if not len(steps):
                return pd.DataFrame(columns=list(answers.RELIANCE_PARTS)).rename_axis("step")
            maps = answers.answer_maps(self._ds, tokens.index, tokens.n_tokens, method, layer, head)
            return answers.reliance(maps[steps["step"].to_numpy()], tokens.modality, int(steps["position"].iloc[0]))

        return _TABLES.get(self.key("reliance", tokens.index, method, layer, head), compute)

    def dataset_reliance(
        self, method: str = answers.ATTENTION, layer: int = -1, head: int | None = None
    ) -> xr.DataArray:
        """Image / prompt / answer-so-far shares of every generated token of every example (cached)."""
        return _TABLES.get(
            self.key("dataset-reliance", method, layer, head),
            lambda: answers.dataset_reliance(self._ds, method, layer, head),
        )

    def relevancy_ranking(self) -> dict[str, float]:
        """Pointing-game accuracy of each stored method against the stored target masks (cached; may be empty)."""
        from vlinterpret_panel.relevancy.localisation import stored_pointing_game

        return _TABLES.get(
            self.key("relevancy-ranking"), lambda: stored_pointing_game(self._ds, self.relevancy_methods)
        )

    def best_relevancy_method(self) -> str | None:
        """The stored method that points at the target most often (None without masks or relevancy).

        What the relevancy view shows first: the evaluation ranks methods differently per model
        (docs/evaluation/), so the store's own examples decide. Ties go to the first in name order.
        """
        ranking = self.relevancy_ranking()
        return max(sorted(ranking), key=lambda method: ranking[method]) if ranking else None

    # Head statistics

    def statistics(self) -> list[str]:
        """Names of the head statistics this dataset offers (built-in, then ``custom:<metric>``)."""
        from vlinterpret_panel.stats import available_statistics

        return available_statistics(self._ds)

    def head_stats(self, statistics: Sequence[str] | None = None) -> xr.Dataset:
        """Per (example, layer, head) statistics, lazily (see ``stats.head_statistics``)."""
        from vlinterpret_panel.stats import head_statistics

        return head_statistics(self._ds, statistics=statistics)

    def head_summary(
        self,
        statistic: str,
        *,
        example: int | str | None = None,
        where: xr.DataArray | None = None,
        normalize: str = "raw",
        aggregate: str = "mean",
    ) -> xr.DataArray:
        """A ``(layer, head)`` summary of one statistic for an example or a subset (see ``stats.head_summary``)."""
        from vlinterpret_panel.stats import head_summary

        return head_summary(self._ds, statistic, example=example, where=where, normalize=normalize, aggregate=aggregate)  # type: ignore[arg-type]

    def compute_stats(self, *, progress: bool = False) -> xr.Dataset:
        """Every built-in statistic of every example, in memory and cached beside the store."""
        from vlinterpret_panel.stats import compute_head_statistics

        return compute_head_statistics(self._ds, progress=progress)

    def cached_stats(self) -> xr.Dataset | None:
        """The statistics table if it was computed before (beside the store or in this process), else None."""
        from vlinterpret_panel.stats import cached_head_statistics

        return cached_head_statistics(self._ds)

    # Hidden states

    def projection(
        self, hidden_layer: int, *, method: str = "pca", sample_size: int | None = None, seed: int = 0, **kwargs: Any
    ) -> xr.Dataset:
        """2-D projection of all tokens' hidden states at one layer, in one shared map (see ``projection``)."""
        from vlinterpret_panel.projection import project_hidden_states

        return project_hidden_states(
            self._ds,
            hidden_layer,
            method=method,  # type: ignore[arg-type]
            sample_size=sample_size,
            seed=seed,
            **kwargs,
        )

    def projection_table(self, hidden_layer: int) -> pd.DataFrame:
        """The default (PCA) projection of a hidden layer as a table, one row per token (cached)."""

        def load() -> pd.DataFrame:
            projected = self.projection(hidden_layer)
            table = pd.DataFrame({"x": projected["x"].values, "y": projected["y"].values})
            for name in PROJECTION_COLUMNS:
                if name in projected.variables:
                    table[name] = projected[name].values
            table["example"] = table["example"].astype(str)
            return table

        return _TABLES.get(self.key("projection-table", int(hidden_layer)), load)

    def projection_ready(self, hidden_layer: int) -> bool:
        """Whether ``projection_table(hidden_layer)`` is in memory (answers without computing)."""
        return self.key("projection-table", int(hidden_layer)) in _TABLES

    def projection_extent(self, hidden_layer: int) -> float:
        """The larger side of the layer's map (``projection_table``), e.g. to scale a hover radius (cached)."""
        table = self.projection_table(hidden_layer)
        return _TABLES.get(
            self.key("projection-extent", int(hidden_layer)),
            lambda: max(float(np.ptp(table["x"].to_numpy())), float(np.ptp(table["y"].to_numpy())), 1e-12),
        )

    def projection_rows(self, hidden_layer: int, example: int | str) -> pd.DataFrame:
        """The rows of one example in ``projection_table(hidden_layer)`` (cached: a pointer move must not scan it)."""
        example_id = self.example_id(example)
        table = self.projection_table(hidden_layer)
        return _TABLES.get(
            self.key("projection-rows", int(hidden_layer), example_id), lambda: table[table["example"] == example_id]
        )

    def nearest_tokens(
        self, example: int | str, token: int, hidden_layer: int, k: int = 10, *, modality: str | None = None
    ) -> pd.DataFrame:
        """The ``k`` nearest tokens across the dataset in hidden space, with their examples and texts."""
        from vlinterpret_panel.neighbors import nearest_tokens

        return nearest_tokens(
            self._ds, example, token, hidden_layer, k=k, modality=modality, layer=self._layer_in_memory(hidden_layer)
        )

    def _layer_in_memory(self, hidden_layer: int) -> np.ndarray | None:
        """Every real token's vector at ``hidden_layer``, kept in memory when the layer fits the budget."""
        from vlinterpret_panel.neighbors import read_layer

        if not self._layer_fits_in_memory():
            return None
        return _LAYERS.get(self.key("hidden-layer", int(hidden_layer)), lambda: read_layer(self._ds, hidden_layer))

    def _layer_fits_in_memory(self) -> bool:
        from vlinterpret_panel.neighbors import fits_in_memory

        return _TABLES.get(self.key("layer-fits-in-memory"), lambda: fits_in_memory(self._ds))

    def search_ready(self, hidden_layer: int) -> bool:
        """Whether a nearest-token search at ``hidden_layer`` reads the layer from memory or its copy."""
        from vlinterpret_panel.neighbors import layer_copy_exists

        if self._layer_fits_in_memory():
            return self.key("hidden-layer", int(hidden_layer)) in _LAYERS
        return layer_copy_exists(self._ds, hidden_layer)

    def prepare_search(self, hidden_layer: int) -> None:
        """Read ``hidden_layer`` once so later searches are fast: into memory, or copied beside the store."""
        from vlinterpret_panel.neighbors import prepare_layer_copy

        if self._layer_in_memory(hidden_layer) is None:
            prepare_layer_copy(self._ds, hidden_layer)

    # Tables the views list

    def example_table(self) -> pd.DataFrame:
        """One row per example (id, text, label, prediction, correct, counterfactual_of), read once per dataset."""

        def read() -> pd.DataFrame:
            names = ("text", "label", "prediction", "correct", "counterfactual_of")
            columns = [name for name in names if name in self._ds]
            table = self._ds[columns].compute().to_dataframe()[columns]
            table.index = table.index.astype(str)
            for name in ("text", "label", "prediction", "counterfactual_of"):
                if name in table:
                    table[name] = table[name].astype(str)
            if "correct" in table:
                table["correct"] = table["correct"].astype(int).map(CORRECT_NAMES)
            return table

        return _TABLES.get(self.key("examples"), read)

    # Counterfactuals and causal explanations

    def origin(self, example: int | str) -> str | None:
        """The id of the example ``example`` was edited from, or None for an original."""
        table = self.example_table()
        origin = table["counterfactual_of"].get(self.example_id(example), "") if "counterfactual_of" in table else ""
        return origin or None

    def counterfactuals(self, example: int | str) -> list[str]:
        """The ids of the examples edited from ``example``, in store order."""
        table = self.example_table()
        if "counterfactual_of" not in table:
            return []
        return table.index[table["counterfactual_of"] == self.example_id(example)].tolist()

    def edit(self, example: int | str) -> Any:
        """The ``counterfactual.Edit`` that made ``example``, or None for an original."""
        from vlinterpret_panel.counterfactual import edit_of

        return edit_of(self._ds, self.example_id(example))

    def causal_explanations(self, example: int | str) -> list[Any]:
        """``example``'s stored causal explanations (``causal.CausalExplanation``), read from the store directory."""
        from vlinterpret_panel.causal import load

        store = self._ds.attrs.get("store_path")
        return load(store, self.example_id(example)) if store else []

    def categories(self, name: str) -> list[str]:
        """The sorted distinct values of a per-token (``modality``) or per-example variable, as strings (cached)."""

        def read() -> list[str]:
            if name == "modality":
                values = np.unique(self._ds["modality"].values.astype(str))
                values = values[values != PAD]
            elif name in self._ds and self._ds[name].dims == ("example",):
                values = np.unique(self._ds[name].values.astype(str))
            else:
                values = np.unique(self._ds["example"].values.astype(str))
            return sorted(map(str, values))

        return _TABLES.get(self.key("categories", name), read)
