"""End-to-end click latency in chromium: pointer down to the last redraw of the linked views.

    python benchmarks/bench_browser.py [--store PATH] [--gigabytes 1] [--clicks 30]

Serves the dashboard (``panel serve dashboards/app.py``, as a user runs it) on the ViLT-sized
synthetic store of ``bench_dashboard.py`` (written once, reused), opens it in Debian's chromium at
1600 x 1000 and clicks as a user does: a head-summary cell, a text token, an image patch, each
on a new example (the example changes untimed, through "next ▶"). In the page, a capture-phase
``pointerdown`` listener stamps the click; every change the server pushes into the Bokeh document
stamps the next animation frame after it (``requestAnimationFrame`` + a task, so the browser has
painted). A click's latency is the last such stamp minus the pointer down, once nothing has changed
for ``QUIET_MS``. Server CPU per click is read from the server process (psutil) over the same span.
Targets (issue 16): p50 <= 200 ms and p95 <= 300 ms for each kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dashboard import ensure_store, store_bytes
from tests.ui.browser import app_page, chromium, panel_serve_command, served
from vlinterpret_panel.schema import TEXT
from vlinterpret_panel.store import open_dataset
from vlinterpret_panel.ui.text import token_layout

P50_TARGET_MS, P95_TARGET_MS = 200, 300
QUIET_MS = 700
KINDS = ("head-summary cell", "text token", "image patch")

INSTALL_PROBE_JS = """() => {
  if (window.__probe) return;
  const probe = window.__probe = {down: null, painted: null, changes: 0};
  document.addEventListener('pointerdown', () => { probe.down = performance.now(); probe.painted = null; }, true);
  for (const doc of Bokeh.documents) {
    doc.on_change(() => {
      probe.changes += 1;
      requestAnimationFrame(() => setTimeout(() => { probe.painted = performance.now(); }, 0));
    });
  }
}"""
READ_PROBE_JS = "() => ({down: window.__probe.down, painted: window.__probe.painted, changes: window.__probe.changes})"


def wait_quiet(page: object, timeout: float = 30.0) -> dict:
    """The probe once no document change has come for ``QUIET_MS``."""
    deadline = time.monotonic() + timeout
    last = page.evaluate(READ_PROBE_JS)  # type: ignore[attr-defined]
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = page.evaluate(READ_PROBE_JS)  # type: ignore[attr-defined]
        if now["changes"] != last["changes"] or now["painted"] != last["painted"]:
            last, quiet_since = now, time.monotonic()
        elif (time.monotonic() - quiet_since) * 1000 >= QUIET_MS:
            return now
    raise TimeoutError("the page kept changing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/vlinterpret-bench/store-1gb"))
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--clicks", type=int, default=30, help="clicks of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ensure_store(args.store, args.gigabytes)
    ds = open_dataset(args.store)
    rng = np.random.default_rng(args.seed)
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
    log = Path("/tmp/vlinterpret-bench-browser.log")
    with served(lambda port: panel_serve_command(args.store, port), log) as (url, server):
        process = psutil.Process(server.pid)
        with chromium() as browser, app_page(browser, url, {"width": 1600, "height": 1000}) as app:
            app.open()
            time.sleep(3)
            app.page.evaluate(INSTALL_PROBE_JS)
            app.wait_for_figure("cross_modal")
            for round_index in range(args.clicks):
                app.page.get_by_text("next ▶", exact=True).click()  # untimed: a new example
                wait_quiet(app.page)
                example = app.page.evaluate("() => window.location.search")
                example = example.split("example=")[1].split("&")[0] if "example=" in example else None
                info = ds.vli.tokens(example or 0)
                layout = token_layout(info)
                words = layout[np.isin(layout.token, info.tokens_of(TEXT))]
                word = words.iloc[int(rng.integers(len(words)))]
                patch = int(rng.choice(info.image_tokens()))
                x0, y0, x1, y1 = info.token_box[patch]
                layer, head = int(rng.integers(ds.sizes["layer"])), int(rng.integers(ds.sizes["head"]))
                targets = {
                    "head-summary cell": ("cross_modal", str(head), str(layer)),
                    "text token": ("attention from", (word.x0 + word.x1) / 2, (word.y0 + word.y1) / 2),
                    "image patch": (info.text[:10], (x0 + x1) / 2, (y0 + y1) / 2),
                }
                order = list(KINDS) if round_index % 2 == 0 else list(reversed(KINDS))
                for kind in order:
                    title, x, y = targets[kind]
                    position = app.data_position(title, x, y)
                    busy_before = sum(process.cpu_times()[:2])
                    app.page.mouse.click(*position)
                    probe = wait_quiet(app.page)
                    cpu[kind].append((sum(process.cpu_times()[:2]) - busy_before) * 1000)
                    if probe["painted"] is None or probe["down"] is None:
                        raise RuntimeError(f"{kind}: the click changed nothing on the page")
                    latencies[kind].append(probe["painted"] - probe["down"])
            errors = list(app.errors)
    print(
        f"store: {args.store} {store_bytes(args.store) / 1e9:.2f} GB, {ds.sizes['example']} examples, "
        f"{ds.sizes['layer']} layers x {ds.sizes['head']} heads, {ds.sizes['token']} tokens"
    )
    load = os.getloadavg()[0]
    print(f"chromium 1600x1000, one session; load average at the end: {load:.1f} on {os.cpu_count()} cores")
    ok = not errors
    for kind in KINDS:
        p50, p95 = np.percentile(latencies[kind], 50), np.percentile(latencies[kind], 95)
        met = p50 <= P50_TARGET_MS and p95 <= P95_TARGET_MS
        ok &= met
        print(
            f"{kind:18s} n={len(latencies[kind]):3d}  end to end p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  |  "
            f"server CPU p50 {np.percentile(cpu[kind], 50):6.1f} ms  ({'ok' if met else 'OVER target'})"
        )
    if errors:
        print(f"console errors: {errors}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
