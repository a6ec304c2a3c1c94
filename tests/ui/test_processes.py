"""Several dashboard server processes over one store: each serves its own pages, and the results they cache
beside the store (written by whichever process computes them first) stay whole and correct."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from tests.ui.browser import app_page, panel_serve_command, served
from vlinterpret_panel import open_dataset
from vlinterpret_panel.cache import cache_directory
from vlinterpret_panel.stats import CACHE_KIND, cached_head_statistics, compute_head_statistics
from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

pytestmark = pytest.mark.browser


def test_two_server_processes_share_one_store_and_its_caches(browser: object, tmp_path: Path) -> None:
    store = tmp_path / "store"  # nothing cached yet: both servers compute the head statistics at once
    write_synthetic_store(store, SynthSpec(examples=24, layers=4, heads=4, tokens=40, seed=5), examples_per_shard=8)
    with ExitStack() as stack:
        servers = [
            stack.enter_context(served(lambda port: panel_serve_command(store, port), tmp_path / f"serve-{i}.log"))
            for i in range(2)
        ]
        pages = [stack.enter_context(app_page(browser, url)) for url, _ in servers]
        for page in pages:
            page.open()
        for page in pages:  # the whole store's summary: computed and cached by both processes at once
            page.page.get_by_role("button", name="dataset", exact=True).click()
        for page in pages:
            page.wait_for_figure("cross_modal · all examples", timeout=90)
            assert page.errors == []
        assert len({server.pid for _, server in servers}) == 2
        assert all(server.poll() is None for _, server in servers)
    ds = open_dataset(store)
    written = sorted(cache_directory(ds).glob(f"{CACHE_KIND}*"))
    assert len(written) == 1, written  # one entry, whichever process renamed its file into place last
    cached = cached_head_statistics(ds)
    assert cached is not None
    fresh = compute_head_statistics(ds, use_cache=False)
    for name in fresh.data_vars:
        np.testing.assert_array_equal(cached[name].values, fresh[name].values)
