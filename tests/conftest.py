"""Shared fixtures: small synthetic stores written fresh for each test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builtin_models import BUILTIN_MODELS
from vlinterpret_panel import shard_reader
from vlinterpret_panel.cache import LRUCache
from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

SMALL_SPEC = SynthSpec(examples=10, layers=3, heads=2, tokens=30, hidden_size=16, image_size=48, seed=3)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-example synthetic store of varying token counts and image sizes, in 3 shards."""
    path = tmp_path_factory.mktemp("stores") / "small"
    write_synthetic_store(path, SMALL_SPEC, examples_per_shard=4)
    return path


@pytest.fixture(scope="session")
def builtin_adapters() -> dict:
    """Adapters of the three built-in answer and retrieval models, by name (loaded once)."""
    from vlinterpret_panel.adapters.registry import load_adapter

    return {name: load_adapter(name) for name in BUILTIN_MODELS}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple]]:
    """Every block read from a shard from now on, as (variable, index)."""
    recorded: list[tuple[str, tuple]] = []
    original = shard_reader._read_block

    def recording(handle, name, info, index, padded_shape, fill):
        recorded.append((name, index))
        return original(handle, name, info, index, padded_shape, fill)

    monkeypatch.setattr(shard_reader, "_read_block", recording)
    # Stores opened before keep their shards' tasks (with the unpatched reader) for the next open: start afresh.
    monkeypatch.setattr(shard_reader, "_SHARD_BLOCKS", LRUCache(64))
    return recorded
