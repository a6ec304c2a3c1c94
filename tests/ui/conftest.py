"""One live ``panel serve`` of the dashboard for all browser tests, and the page helper to drive it.

The app is served on a free localhost port over a small synthetic store that also holds
relevancy maps; chromium (Debian's) is driven by Playwright. Serving, launching and finding
plots live in ``tests/ui/browser.py``, which ``docs/make_screenshots.py`` shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vlinterpret_panel.schema import records_to_dataset
from vlinterpret_panel.store import write_shard
from vlinterpret_panel.synth import SynthSpec, synthetic_record

pytest.importorskip("playwright.sync_api")

from tests.ui.browser import CHROMIUM, AppPage, app_page, chromium, panel_serve_command, served

UI_SPEC = SynthSpec(examples=8, layers=3, heads=3, tokens=40, hidden_size=16, image_size=64, seed=5)
RELEVANCY_METHODS = ("rollout", "transformer_attribution")


@pytest.fixture(scope="session")
def relevancy_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic store whose examples also carry relevancy maps of two methods."""
    records = []
    for index in range(UI_SPEC.examples):
        record = synthetic_record(UI_SPEC, index)
        rng = np.random.default_rng(index)
        record.relevancy = {method: rng.uniform(size=len(record.tokens)) for method in RELEVANCY_METHODS}
        record.relevancy_target = record.prediction
        records.append(record)
    path = tmp_path_factory.mktemp("ui") / "store"
    for start in (0, 4):
        write_shard(records_to_dataset(records[start : start + 4], UI_SPEC.model_info()), path)
    return path


@pytest.fixture(scope="session")
def app_url(relevancy_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``panel serve dashboards/app.py --args STORE`` on a free localhost port; its URL."""
    log_path = tmp_path_factory.mktemp("server") / "panel-serve.log"
    with served(lambda port: panel_serve_command(relevancy_store, port), log_path) as (url, server):
        yield url
        alive = server.poll() is None
    assert alive, f"the server died during the tests: {log_path.read_text()[-3000:]}"


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with chromium() as browser:
        yield browser


@pytest.fixture
def app(browser: object, app_url: str) -> Iterator[AppPage]:
    with app_page(browser, app_url) as page:
        yield page


def changed_fraction(before: np.ndarray, after: np.ndarray) -> float:
    """Share of pixels whose colour changed noticeably."""
    if before.shape != after.shape:
        return 1.0
    return float((np.abs(before - after).sum(axis=-1) > 30).mean())
