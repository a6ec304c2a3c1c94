"""Load: several browser sessions on one ``panel serve``, clicking through the views at once.

Each session opens its own example, layer, head and token from the URL, then keeps tapping
head-summary cells, text tokens and image patches of its own choosing. A round fires one click
in every session before waiting for any, so the server handles up to ``sessions`` clicks at a
time. A click's response time is measured in the page, from the pointer going down to the
plot's Bokeh model showing the expected title (the document patch has been applied). After
every click the session's URL must name exactly its own state; at the end no session may have
logged a console or page error and the server must still be running.

``VLINTERPRET_LOAD_SECONDS`` (default 60) bounds the clicking; ``benchmarks/bench_load.py``
runs the same load as a script.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import psutil
import pytest

from tests.ui.browser import APP_VIEWPORT, AppPage, panel_serve_command
from tests.ui.browser import served as serve_on_free_port
from vlinterpret_panel import open_dataset
from vlinterpret_panel.maps import example_tokens
from vlinterpret_panel.schema import TEXT
from vlinterpret_panel.ui.text import token_layout

pytestmark = pytest.mark.browser

SESSIONS = 8
SECONDS = float(os.environ.get("VLINTERPRET_LOAD_SECONDS", "60"))
CLICK_TIMEOUT_S = 60
KINDS = ("head cell", "text token", "image patch")
SUMMARY = "cross_modal"

# Arms a probe: the next pointerdown starts its clock, which stops when a plot titled ``prefix...`` exists.
# It looks once a frame (16 ms); a look walks the page's Bokeh views, ~0.1 ms.
_PROBE_JS = """(prefix) => {
  if (window.__vliProbe) clearInterval(window.__vliProbe.timer);
  const probe = window.__vliProbe = {start: null, elapsed: null, timer: null};
  window.addEventListener('pointerdown', () => { probe.start = performance.now(); }, {capture: true, once: true});
  function titled() {
    const seen = new Set(), stack = Object.values(Bokeh.index);
    while (stack.length) {
      const view = stack.pop();
      if (!view || seen.has(view)) continue;
      seen.add(view);
      if (view.model.title && view.model.title.text && view.model.title.text.startsWith(prefix)) return true;
      stack.push(...(view.child_views ?? []));
    }
    return false;
  }
  probe.timer = setInterval(() => {
    if (probe.start === null || !titled()) return;
    probe.elapsed = performance.now() - probe.start;
    clearInterval(probe.timer);
  }, 16);
}"""


def heatmap_title(layer: int, head: int | None) -> str:
    """The attention heatmap's title prefix for a layer and head (None = mean; the test store has < 10 heads)."""
    return f"layer {layer}, {'mean of heads' if head is None else f'head {head}'}"


@dataclass
class Session:
    """One browser session and the state its own clicks should have left it in."""

    app: AppPage
    example: str
    layer: int
    head: int | None
    token: int
    rng: np.random.Generator
    n_layers: int = 1
    n_heads: int = 1
    image_title: str = ""
    text_boxes: list = field(default_factory=list)
    patch_centres: dict = field(default_factory=dict)

    def query(self) -> str:
        head = "mean" if self.head is None else self.head
        return f"?example={self.example}&layer={self.layer}&head={head}&tokens=[{self.token}]"

    def expected_url_state(self) -> dict[str, str]:
        head = "mean" if self.head is None else str(self.head)
        return {"example": self.example, "layer": str(self.layer), "head": head, "tokens": f"[{self.token}]"}

    def url_state(self) -> dict[str, str]:
        query = parse_qs(urlparse(self.app.page.evaluate("window.location.href")).query)
        return {key: query[key][0] for key in ("example", "layer", "head", "tokens") if key in query}


@dataclass
class LoadResult:
    """Response times per click kind (ms), session opening times (s) and what went wrong."""

    times: dict[str, list[float]]
    open_seconds: list[float]
    failures: list[str]
    errors: dict[int, list[str]]
    rounds: int
    elapsed_s: float
    load_before: float
    load_after: float
    server_cpu_s: float | None = None
    browser_cpu_s: float = 0.0

    def report(self) -> list[str]:
        """The printed figures: one line per click kind, p50 / p95 / max."""
        lines = [
            f"{len(self.open_seconds)} sessions, {self.rounds} rounds in {self.elapsed_s:.0f} s; "
            f"load average {self.load_before:.1f} before, {self.load_after:.1f} after, on {os.cpu_count()} cores",
            f"{'session open':12s} n={len(self.open_seconds):4d}  p50 {np.median(self.open_seconds) * 1000:7.0f} ms  "
            f"max {max(self.open_seconds) * 1000:7.0f} ms",
        ]
        clicks = sum(len(times) for times in self.times.values())
        if self.server_cpu_s is not None and clicks:
            lines.append(
                f"server CPU while clicking: {self.server_cpu_s:.1f} s, {self.server_cpu_s / clicks * 1000:.0f} ms "
                f"per click ({self.server_cpu_s / self.elapsed_s:.0%} of one core)"
            )
        lines.append(
            f"browser CPU while clicking (chromium and the Playwright driver): {self.browser_cpu_s:.1f} s "
            f"({self.browser_cpu_s / self.elapsed_s:.0%} of one core)"
        )
        for kind, times in self.times.items():
            if times:
                p50, p95 = np.percentile(times, 50), np.percentile(times, 95)
                lines.append(
                    f"{kind:12s} n={len(times):4d}  p50 {p50:7.0f} ms  p95 {p95:7.0f} ms  max {max(times):7.0f} ms"
                )
        return lines


@contextmanager
def served(store: Path, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``panel serve dashboards/app.py --args STORE`` on a free localhost port: its URL and process."""
    with serve_on_free_port(lambda port: panel_serve_command(store, port), log_path) as running:
        yield running


def peak_rss_gb(pid: int) -> float:
    """A live process's peak resident set size (Linux ``VmHWM``), in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no VmHWM for process {pid}")


def _open_sessions(browser: object, url: str, store: Path, sessions: int) -> list[Session]:
    """One context per session, each on its own example, layer, head and token, set through the URL."""
    ds = open_dataset(store)
    ids = [str(i) for i in ds.indexes["example"]]
    n_layers, n_heads = ds.sizes["layer"], ds.sizes["head"]
    opened = []
    for index in range(sessions):
        example = ids[index % len(ids)]
        info = example_tokens(ds, example)
        text_tokens = [int(t) for t in info.tokens_of(TEXT)]
        layout = token_layout(info)
        boxes = layout[np.isin(layout.token, text_tokens)]
        context = browser.new_context(viewport=APP_VIEWPORT)
        session = Session(
            app=AppPage(context.new_page(), url),
            example=example,
            layer=index % n_layers,
            head=None if index % (n_heads + 1) == n_heads else index % (n_heads + 1),
            token=text_tokens[index % len(text_tokens)],
            rng=np.random.default_rng(index),
            n_layers=n_layers,
            n_heads=n_heads,
            image_title=info.text[:20],
            text_boxes=[(int(r.token), (r.x0 + r.x1) / 2, (r.y0 + r.y1) / 2) for r in boxes.itertuples()],
            patch_centres={
                int(p): ((x0 + x1) / 2, (y0 + y1) / 2)
                for p in info.image_tokens()
                for x0, y0, x1, y1 in [info.token_box[p]]
            },
        )
        opened.append(session)
    return opened


def _next_click(session: Session, kind: str) -> tuple[str, float | str, float | str, str, dict]:
    """A click of ``kind`` that changes the session's state: (plot, x, y, title it leads to, new state)."""
    rng = session.rng
    if kind == "head cell":
        cells = [
            (layer, head)
            for layer in range(session.n_layers)
            for head in [*range(session.n_heads), None]
            if (layer, head) != (session.layer, session.head)
        ]
        layer, head = cells[int(rng.integers(len(cells)))]
        column = "mean" if head is None else str(head)
        return SUMMARY, column, str(layer), heatmap_title(layer, head), {"layer": layer, "head": head}
    if kind == "text token":
        choices = [box for box in session.text_boxes if box[0] != session.token]
        token, x, y = choices[int(rng.integers(len(choices)))]
        return "attention from", float(x), float(y), f"attention from {token}:", {"token": token}
    patches = [p for p in session.patch_centres if p != session.token]
    patch = patches[int(rng.integers(len(patches)))]
    x, y = session.patch_centres[patch]
    return session.image_title, float(x), float(y), f"attention from {patch}:", {"token": patch}


def _wait_for_probe(session: Session, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        elapsed = session.app.page.evaluate("window.__vliProbe.elapsed")
        if elapsed is not None:
            return float(elapsed)
        time.sleep(0.05)
    return None


def _wait_for_url(session: Session, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if session.url_state() == session.expected_url_state():
            return True
        time.sleep(0.05)
    return False


def final_state_failures(session: Session, index: int) -> list[str]:
    """What in the session's page does not show its own last state: URL, heatmap, text and image titles."""
    failures = []
    if session.url_state() != session.expected_url_state():
        failures.append(f"session {index}: URL {session.url_state()} != {session.expected_url_state()}")
    titles = [figure["title"] for figure in session.app.figures()]
    for prefix in (heatmap_title(session.layer, session.head), f"attention from {session.token}:", session.image_title):
        if not any(title.startswith(prefix) for title in titles):
            failures.append(f"session {index}: no plot titled {prefix!r} among {titles}")
    return failures


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used, in seconds (Linux ``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendant_cpu_seconds(excluded: int | None) -> dict[int, float]:
    """CPU seconds of each chromium or Playwright driver (node) process this one started, but ``excluded``."""
    seconds = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if process.pid == excluded or not process.name().startswith(("chrom", "node")):
                continue
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def run_load(
    browser: object,
    url: str,
    store: Path,
    sessions: int = SESSIONS,
    seconds: float = SECONDS,
    server_pid: int | None = None,
) -> LoadResult:
    """Open ``sessions`` sessions, click in rounds for ``seconds``, check each keeps only its own state.

    With ``server_pid``, also the CPU time the server spent during the clicking.
    """
    load_before = os.getloadavg()[0]
    opened = _open_sessions(browser, url, store, sessions)
    failures: list[str] = []
    open_seconds = []
    for index, session in enumerate(opened):
        started = time.perf_counter()
        session.app.page.goto(url + session.query())
        session.app.wait_for_figure(heatmap_title(session.layer, session.head), timeout=CLICK_TIMEOUT_S)
        session.app.wait_for_figure(f"attention from {session.token}:", timeout=CLICK_TIMEOUT_S)
        session.app.wait_for_figure(SUMMARY, timeout=CLICK_TIMEOUT_S)
        session.app.wait_for_figure(session.image_title, timeout=CLICK_TIMEOUT_S)
        open_seconds.append(time.perf_counter() - started)
        if session.url_state() != session.expected_url_state():
            failures.append(f"session {index} opened with URL {session.url_state()}")

    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu_before = server_cpu_seconds(server_pid) if server_pid else None
    browser_before = descendant_cpu_seconds(server_pid)
    started = time.monotonic()
    rounds = 0
    while not failures and (rounds == 0 or time.monotonic() - started < seconds):  # at least one round
        pending = []
        for index, session in enumerate(opened):
            kind = KINDS[(rounds + index) % len(KINDS)]
            plot, x, y, title, change = _next_click(session, kind)
            session.app.page.evaluate(_PROBE_JS, title)
            session.app.click_data(plot, x, y)
            pending.append((index, session, kind, title, change))
        for index, session, kind, title, change in pending:
            deadline = time.monotonic() + CLICK_TIMEOUT_S
            elapsed = _wait_for_probe(session, deadline)
            if elapsed is None:
                failures.append(f"session {index}: {kind} click: no plot titled {title!r} after {CLICK_TIMEOUT_S} s")
                continue
            times[kind].append(elapsed)
            for name, value in change.items():
                setattr(session, name, value)
            if not _wait_for_url(session, deadline):
                failures.append(f"session {index}: URL {session.url_state()} != {session.expected_url_state()}")
        rounds += 1
    elapsed_s = time.monotonic() - started
    server_cpu_s = server_cpu_seconds(server_pid) - cpu_before if server_pid else None
    browser_after = descendant_cpu_seconds(server_pid)
    browser_cpu_s = sum(cpu - browser_before.get(pid, 0.0) for pid, cpu in browser_after.items())
    for index, session in enumerate(opened):
        failures.extend(final_state_failures(session, index))
    errors = {index: list(session.app.errors) for index, session in enumerate(opened) if session.app.errors}
    for session in opened:
        session.app.page.context.close()
    load_after = os.getloadavg()[0]
    return LoadResult(
        times, open_seconds, failures, errors, rounds, elapsed_s, load_before, load_after, server_cpu_s, browser_cpu_s
    )


@pytest.fixture(scope="module")
def load_server(
    relevancy_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server of its own, so its process can be watched (alive, peak memory) through the load."""
    with served(relevancy_store, tmp_path_factory.mktemp("load") / "panel-serve.log") as running:
        yield running


def test_eight_sessions_clicking_at_once_keep_their_own_state(
    browser: object, load_server: tuple[str, subprocess.Popen], relevancy_store: Path
) -> None:
    url, server = load_server
    result = run_load(browser, url, relevancy_store, server_pid=server.pid)
    print("\n" + "\n".join(result.report()))
    alive = server.poll() is None
    if alive:
        print(f"server peak memory (max RSS): {peak_rss_gb(server.pid):.2f} GB")
    assert alive, "the server died under load"
    assert result.failures == []
    assert result.errors == {}
    assert all(len(times) >= SESSIONS // len(KINDS) for times in result.times.values()), result.times
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, "the server no longer serves new sessions"
