"""Drive the dashboard in Debian's chromium: serve it on a free port, launch the browser, find plots.

Shared by the browser tests (``tests/ui/conftest.py`` and the test modules) and by
``docs/make_screenshots.py``, so both find a plot the same way: through Bokeh's own views
(frame boxes and scales), by title, so a click or a clip lands on a given plot or data coordinate.
Imports no pytest: the screenshot script uses it outside a test run.
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
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

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
APP_VIEWPORT = {"width": 1600, "height": 1000}

# Defines ``findPlot(prefix)``: the first Bokeh plot view whose title starts with ``prefix``, or null.
_FIND_PLOT_JS = """
  function findPlot(prefix) {
    const seen = new Set();
    function find(view) {
      if (!view || seen.has(view)) return null;
      seen.add(view);
      if (view.frame && view.model.title && view.model.title.text.startsWith(prefix)) return view;
      for (const child of (view.child_views ?? [])) { const hit = find(child); if (hit) return hit; }
      return null;
    }
    for (const root of Object.values(Bokeh.index)) { const view = find(root); if (view) return view; }
    return null;
  }
"""

# Every titled plot: its title and its frame's box on the page.
FIGURES_JS = """() => {
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

# The page position of data coordinates (x, y) in the plot titled ``prefix...`` (factors for categorical axes).
DATA_TO_PAGE_JS = f"""([prefix, x, y]) => {{
  {_FIND_PLOT_JS}
  const view = findPlot(prefix);
  if (!view) return null;
  const frame = view.frame, box = view.el.getBoundingClientRect();
  const sx = typeof x === 'string' ? frame.x_range.synthetic(x) : x;
  const sy = typeof y === 'string' ? frame.y_range.synthetic(y) : y;
  return [box.left + frame.x_scale.compute(sx), box.top + frame.y_scale.compute(sy)];
}}"""

# Scroll the plot titled ``prefix...`` into the middle of the view; whether it was found.
SCROLL_JS = f"""(prefix) => {{
  {_FIND_PLOT_JS}
  const view = findPlot(prefix);
  if (view) view.el.scrollIntoView({{block: 'center'}});
  return !!view;
}}"""

# The bounding box of the plot titled ``prefix...`` (levels=0) or of its ``levels``-th enclosing layout.
BOX_JS = f"""([prefix, levels]) => {{
  {_FIND_PLOT_JS}
  let view = findPlot(prefix);
  if (!view) return null;
  for (let i = 0; i < levels && view.parent; i++) view = view.parent;
  const box = view.el.getBoundingClientRect();
  return {{x: box.left, y: box.top, width: box.width, height: box.height}};
}}"""


# Every colorbar on the page: the title of its plot, its box in its plot's canvas, and its tick labels' text.
COLORBARS_JS = """() => {
  const out = [], seen = new Set();
  function walk(view, figure) {
    if (!view || seen.has(view)) return;
    seen.add(view);
    if (view.frame && view.model.title) figure = view;
    if (view.model && view.model.type === 'ColorBar') {
      const axis = view._axis_view, coords = axis.tick_coords.major[axis.dimension];
      const labels = Array.from(axis.compute_labels(coords).items ?? []).map((label) => label.text);
      const canvas = view.parent.bbox, box = view.bbox;
      out.push({plot: figure ? figure.model.title.text : '', labels,
                left: box.left, right: box.right, top: box.top, bottom: box.bottom,
                width: canvas.width, height: canvas.height});
    }
    for (const child of (view.child_views ?? [])) walk(child, figure);
    for (const child of (view.renderer_views?.values() ?? [])) walk(child, figure);
  }
  for (const view of Object.values(Bokeh.index)) walk(view, null);
  return out;
}"""


def free_port() -> int:
    """A localhost TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def panel_serve_command(store: Path, port: int) -> list[str]:
    """``panel serve dashboards/app.py --args STORE`` bound to localhost on ``port``."""
    return [
        sys.executable, "-m", "panel", "serve", str(REPO / "dashboards" / "app.py"),
        "--address", "127.0.0.1", "--port", str(port), f"--allow-websocket-origin=127.0.0.1:{port}",
        "--args", str(store),
    ]  # fmt: skip


def live_serve_command(store: Path, model: str) -> Callable[[int], list[str]]:
    """``vlinterpret serve STORE --model MODEL`` (the live session) on a given port."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "vlinterpret_panel.cli", "serve", str(store), "--model", model,
                "--port", str(port)]  # fmt: skip

    return command


@contextmanager
def running(
    command: list[str], log_path: Path, ready_url: str, *, cwd: Path = REPO, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """Run ``command`` (output to ``log_path``) until ``ready_url`` answers 200; stopped on exit."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=30) as response:
                        if response.status == 200:
                            break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{command[2]} did not start: {log_path.read_text()[-3000:]}") from None
                    time.sleep(0.5)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=30)


# The log of each running server by its URL: a page that lacks a plot reports its server's last lines.
SERVER_LOGS: dict[str, Path] = {}


def server_log_tail(url: str, characters: int = 3000) -> str:
    """The end of the log of the server that serves ``url`` (a page's URL, with or without a query)."""
    log_path = SERVER_LOGS.get(url.split("?")[0])
    return log_path.read_text()[-characters:] if log_path is not None and log_path.exists() else "(no server log)"


@contextmanager
def served(command_for_port: Callable[[int], list[str]], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start a dashboard server on a free localhost port, wait until it answers: its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/app"
    with running(command_for_port(port), log_path, url) as server:
        SERVER_LOGS[url] = log_path
        try:
            yield url, server
        finally:
            SERVER_LOGS.pop(url, None)


@contextmanager
def served_alive(command_for_port: Callable[[int], list[str]], log_path: Path) -> Iterator[str]:
    """``served`` for a module of tests: its URL; afterwards, fail if the server died during them."""
    with served(command_for_port, log_path) as (url, server):
        yield url
        alive = server.poll() is None
    assert alive, f"the server died during the tests: {log_path.read_text()[-3000:]}"


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium (not Playwright's download), launched headless by Playwright."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class AppPage:
    """One browser session of the dashboard, with the console errors and failed requests it logged."""

    def __init__(self, page: Page, url: str) -> None:
        self.page, self.url = page, url
        self.errors: list[str] = []
        self.console: list[str] = []  # every console message, for a failure's report
        page.on("console", self._log)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("requestfailed", lambda request: self.errors.append(f"request failed: {request.url}"))

    def _log(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text[:300]}")
        if message.type == "error":
            self.errors.append(message.text)

    def open(self, query: str = "") -> AppPage:
        self.page.goto(self.url + query)
        self.wait_for_figure("layer ")
        return self

    def figures(self) -> list[dict]:
        return self.page.evaluate(FIGURES_JS)

    def colorbars(self) -> list[dict]:
        """Every colorbar shown: its plot's title, its box in that plot's canvas and its tick labels."""
        return self.page.evaluate(COLORBARS_JS)

    def figure(self, prefix: str) -> dict:
        figures = self.figures()
        matches = [f for f in figures if f["title"].startswith(prefix)]
        titles = [f["title"] for f in figures]
        assert matches, (
            f"no plot titled {prefix!r}: {titles}; the page's last console messages: {self.console[-15:]}; "
            f"its server's log ends: {server_log_tail(self.url)}"
        )
        return matches[0]

    def wait_for_figure(self, prefix: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.figure(prefix)
            except (AssertionError, PlaywrightError):
                self.page.wait_for_timeout(250)
        return self.figure(prefix)

    def data_position(self, prefix: str, x: float | str, y: float | str) -> tuple[float, float]:
        """The page position of data coordinates ``(x, y)`` (factors for categorical axes) in the plot ``prefix...``."""
        position = self.page.evaluate(DATA_TO_PAGE_JS, [prefix, x, y])
        assert position is not None, f"no plot titled {prefix!r}"
        return position[0], position[1]

    def scroll_to(self, prefix: str) -> None:
        """Scroll the plot titled ``prefix...`` to the middle of its scrolling container (e.g. a notebook)."""
        found = self.page.evaluate(SCROLL_JS, prefix)
        assert found, f"no plot titled {prefix!r}"
        box, deadline = None, time.monotonic() + 5
        while time.monotonic() < deadline:  # until the scroll has come to rest
            self.page.wait_for_timeout(200)
            now = self.box(prefix)
            if now == box:
                return
            box = now

    def click_data(self, prefix: str, x: float | str, y: float | str) -> None:
        """Click the plot titled ``prefix...`` at data coordinates ``(x, y)``."""
        self.page.mouse.click(*self.data_position(prefix, x, y))

    def box(self, prefix: str, levels: int = 0) -> dict:
        """The page box (x, y, width, height) of the plot titled ``prefix...`` or its ``levels``-th layout."""
        box = self.page.evaluate(BOX_JS, [prefix, levels])
        assert box is not None, f"no plot titled {prefix!r}: {[f['title'] for f in self.figures()]}"
        return box

    def pixels(self, prefix: str) -> np.ndarray:
        """The RGB pixels of a plot's frame, as shown."""
        frame = self.figure(prefix)
        clip = {key: frame[key] for key in ("width", "height")} | {"x": frame["left"], "y": frame["top"]}
        return np.asarray(Image.open(io.BytesIO(self.page.screenshot(clip=clip))).convert("RGB"), dtype=np.int16)

    def wait_until(self, condition, timeout: float = 20, what: str = "condition") -> None:
        """Poll ``condition`` until it holds. Waits in Playwright, not ``time.sleep``: the sync API takes in the
        browser's events (e.g. a URL changed by ``history.pushState``, read by ``page.url``) only inside its calls."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            self.page.wait_for_timeout(200)
        raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def app_page(browser: Browser, url: str, viewport: dict | None = None) -> Iterator[AppPage]:
    """An ``AppPage`` of ``url`` in a fresh browser context (``APP_VIEWPORT`` unless told), closed after."""
    context = browser.new_context(viewport=viewport or APP_VIEWPORT)
    try:
        yield AppPage(context.new_page(), url)
    finally:
        context.close()
