"""One live ``panel serve`` of the dashboard for all browser tests, and helpers to drive its plots.

The app is served on a free localhost port over a small synthetic store that also holds
relevancy maps; chromium (Debian's) is driven by Playwright. Plot positions come from Bokeh's
own views (frame boxes and scales), so a click lands on a given data coordinate.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlinterpret_panel.schema import records_to_dataset
from vlinterpret_panel.store import write_shard
from vlinterpret_panel.synth import SynthSpec, synthetic_record

playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_SPEC = SynthSpec(examples=8, layers=3, heads=3, tokens=40, hidden_size=16, image_size=64, seed=5)
RELEVANCY_METHODS = ("rollout", "transformer_attribution")

_FIGURES_JS = """() => {
  const out = [], seen = new Set();
  function walk(view) {
    if (!view || seen.has(view)) return;
    seen.add(view);
    if (view.frame && view.model.title) {
      const box = view.el.getBoundingClientRect(), frame = view.frame.bbox;
      out.push({title: view.model.title.text, left: box.left + frame.left, top: box.top + frame.top,
                width: frame.width, height: frame.height});
    }
    for (const child of (view.child_views ?? [])) walk(child);
  }
  for (const view of Object.values(Bokeh.index)) walk(view);
  return out;
}"""

_DATA_TO_PAGE_JS = """([prefix, x, y]) => {
  const seen = new Set();
  function find(view) {
    if (!view || seen.has(view)) return null;
    seen.add(view);
    if (view.frame && view.model.title && view.model.title.text.startsWith(prefix)) return view;
    for (const child of (view.child_views ?? [])) { const hit = find(child); if (hit) return hit; }
    return null;
  }
  let view = null;
  for (const root of Object.values(Bokeh.index)) { view = find(root); if (view) break; }
  if (!view) return null;
  const frame = view.frame, box = view.el.getBoundingClientRect();
  const sx = typeof x === 'string' ? frame.x_range.synthetic(x) : x;
  const sy = typeof y === 'string' ? frame.y_range.synthetic(y) : y;
  return [box.left + frame.x_scale.compute(sx), box.top + frame.y_scale.compute(sy)];
}"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def panel_serve_command(store: Path, port: int) -> list[str]:
    """``panel serve dashboards/app.py --args STORE`` bound to localhost on ``port``."""
    return [
        sys.executable, "-m", "panel", "serve", str(REPO / "dashboards" / "app.py"),
        "--address", "127.0.0.1", "--port", str(port), f"--allow-websocket-origin=127.0.0.1:{port}",
        "--args", str(store),
    ]  # fmt: skip


@contextmanager
def served(command_for_port: Callable[[int], list[str]], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start a dashboard server on a free localhost port, wait until it answers: its URL and process."""
    port = _free_port()
    with log_path.open("w") as log:
        server = subprocess.Popen(command_for_port(port), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}/app"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=30) as response:
                        if response.status == 200:
                            break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not start: {log_path.read_text()}") from None
                    time.sleep(0.5)
            yield url, server
        finally:
            server.terminate()
            server.wait(timeout=30)


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
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class AppPage:
    """One browser session of the dashboard, with the console errors and failed requests it logged."""

    def __init__(self, page: object, url: str) -> None:
        self.page, self.url = page, url
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("requestfailed", lambda request: self.errors.append(f"request failed: {request.url}"))

    def open(self, query: str = "") -> AppPage:
        self.page.goto(self.url + query)
        self.wait_for_figure("layer ")
        return self

    def figures(self) -> list[dict]:
        return self.page.evaluate(_FIGURES_JS)

    def figure(self, prefix: str) -> dict:
        matches = [f for f in self.figures() if f["title"].startswith(prefix)]
        assert matches, f"no plot titled {prefix!r}: {[f['title'] for f in self.figures()]}"
        return matches[0]

    def wait_for_figure(self, prefix: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.figure(prefix)
            except (AssertionError, playwright_api.Error):
                time.sleep(0.25)
        return self.figure(prefix)

    def click_data(self, prefix: str, x: float | str, y: float | str) -> None:
        """Click the plot titled ``prefix...`` at data coordinates ``(x, y)`` (factors for categorical axes)."""
        position = self.page.evaluate(_DATA_TO_PAGE_JS, [prefix, x, y])
        assert position is not None, f"no plot titled {prefix!r}"
        self.page.mouse.click(*position)

    def pixels(self, prefix: str) -> np.ndarray:
        """The RGB pixels of a plot's frame, as shown."""
        frame = self.figure(prefix)
        clip = {key: frame[key] for key in ("width", "height")} | {"x": frame["left"], "y": frame["top"]}
        return np.asarray(Image.open(io.BytesIO(self.page.screenshot(clip=clip))).convert("RGB"), dtype=np.int16)

    def wait_until(self, condition, timeout: float = 20, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def app(browser: object, app_url: str) -> Iterator[AppPage]:
    context = browser.new_context(viewport={"width": 1600, "height": 1300})
    page = context.new_page()
    yield AppPage(page, app_url)
    context.close()


def changed_fraction(before: np.ndarray, after: np.ndarray) -> float:
    """Share of pixels whose colour changed noticeably."""
    if before.shape != after.shape:
        return 1.0
    return float((np.abs(before - after).sum(axis=-1) > 30).mean())
