"""Counterfactual reruns and causal searches on the built-in generative model, in process and in chromium.

    python benchmarks/bench_counterfactual.py [--edits 10] [--searches 40] [--browser-runs 5]

On a copy of ``datasets/generative``:

1. ``LiveModel.add_counterfactual``: mask a quarter of an example's image and regenerate its
   answer with the store's options (32 tokens at most, top-5 alternatives, full maps, four
   relevancy methods: two of them one backward pass per generated token), then write the shard.
2. ``LiveModel.explain_causally`` on generated tokens of ``--searches`` examples (the first
   token, and a later one), threshold 90%, guided by generic relevancy: seconds and reruns.
3. In chromium (the README's ``vlinterpret serve STORE --model generative``): drag a box on
   the editor, press "Run edit", time until the page shows the comparison of the new pair
   (the "edited:" plot titled with its answer), and press "Explain" on the causal tab, time
   until its result shows. A rerun is timed twice: in the page, from the button's pointerdown
   to the first animation frame showing the new pair's heading ("→ live-...", the same text
   the Python timing waits for; no polling interval in the figure), and from Python around the
   click and the waits (which adds Playwright's click and up to 250 ms per polled wait). The server sends
   the pair's heading, table and three plots in one message, so the heading's frame shows the whole pair.

Targets (issue 13): a counterfactual rerun < 1 s end to end; a causal search < 10 s.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import load_average, summary  # noqa: E402
from vlinterpret_panel import open_dataset  # noqa: E402
from vlinterpret_panel.counterfactual import Edit  # noqa: E402
from vlinterpret_panel.live import LiveModel  # noqa: E402


def copy_store(directory: Path) -> Path:
    store = directory / "store"
    shutil.copytree(REPO / "datasets" / "generative", store, ignore=shutil.ignore_patterns(".index", "causal"))
    return store


def bench_edits(store: Path, edits: int) -> None:
    live = LiveModel("generative")
    ids = [str(i) for i in open_dataset(store).indexes["example"]][:edits]
    live.add_counterfactual(store, ids[0], Edit(box=(0, 0, 32, 32)))  # warm-up: first torch calls, imports
    seconds = []
    for index, example in enumerate(ids):
        corner = index % 4
        box = (32 * (corner % 2), 32 * (corner // 2), 32 * (corner % 2) + 32, 32 * (corner // 2) + 32)
        started = time.perf_counter()
        live.add_counterfactual(store, example, Edit(box=box, fill="background"))
        seconds.append(time.perf_counter() - started)
    print(summary("add_counterfactual (generate + capture + shard), in process", seconds), f"load {load_average()}")


def bench_searches(store: Path, searches: int) -> None:
    live = LiveModel("generative")
    ds = open_dataset(store)
    ids = [i for i in map(str, ds.indexes["example"]) if not ds.vli.origin(i)][:searches]
    rng = np.random.default_rng(0)
    seconds, reruns, sizes = [], [], []
    for example in ids:
        steps = len(ds.vli.answer(example))
        for step in sorted({0, int(rng.integers(0, steps))}):
            found = live.explain_causally(store, example, step=step)
            seconds.append(found.seconds)
            reruns.append(found.reruns)
            sizes.append(len(found.kept) / len(found.units))
    print(
        summary("causal search, in process", seconds),
        f"reruns median {np.median(reruns):.0f} (max {max(reruns)}), kept share median {np.median(sizes):.2f},",
        f"load {load_average()}",
    )


# In the page: remember each pointerdown's time and the "→ live-..." pair headings shown so far (text inside
# Panel's shadow roots too).
_PAIR_IDS_JS = """() => {
  window.__vliPairIds = () => {
    const ids = new Set();
    function walk(node) {
      if (node.shadowRoot) walk(node.shadowRoot);
      for (const child of node.children ?? []) walk(child);
      if ((node.tagName === 'P' || !node.children?.length) && node.textContent)
        for (const match of node.textContent.matchAll(/→ (live-[\\w-]+)/g)) ids.add(match[1]);
    }
    walk(document.body);
    return ids;
  };
}"""
_ARM_JS = """() => {
  if (!window.__vliArmed) {
    window.addEventListener('pointerdown', () => { window.__vliDown = performance.now(); }, {capture: true});
    window.__vliArmed = true;
  }
  window.__vliSeen = window.__vliPairIds();
}"""
# Resolves in the first animation frame showing a pair heading not shown before the click: ms since pointerdown.
_NEW_PAIR_JS = """() => {
  const fresh = [...window.__vliPairIds()].filter(id => !window.__vliSeen.has(id));
  return fresh.length ? performance.now() - window.__vliDown : false;
}"""


def _added_id(app: object, previous: str | None) -> str | None:
    """The example id in the page's "added live-..." status line, when it is not ``previous``."""
    status = app.page.get_by_text(re.compile(r"added live-")).first  # type: ignore[attr-defined]
    found = re.search(r"live-[\w-]+", status.inner_text()) if status.count() else None
    return found.group(0) if found and found.group(0) != previous else None


def bench_browser(store: Path, runs: int) -> None:
    """One browser session (as a user editing one example after another): ``runs`` edits, then ``runs`` searches."""
    from tests.ui.browser import app_page, chromium, live_serve_command, served

    command = live_serve_command(store, "generative")

    original = str(open_dataset(store).indexes["example"][0])
    edit_seconds, page_seconds, explain_seconds = [], [], []
    log = Path(tempfile.gettempdir()) / "bench_counterfactual.log"
    with served(command, log) as (url, _), chromium() as browser, app_page(browser, url) as app:
        app.page.goto(f"{url}?example={original}")
        app.wait_for_figure("generated answer")
        app.page.get_by_text("Counterfactual", exact=True).click()
        app.wait_for_figure("edited image")
        app.page.evaluate(_PAIR_IDS_JS)
        added: str | None = ""
        for run in range(runs):
            frame = app.figure("draw on")
            before = set(open_dataset(store).vli.counterfactuals(original))
            corner = (run % 2, (run // 2) % 2)
            x = frame["left"] + 2 + corner[0] * frame["width"] / 2
            y = frame["top"] + 2 + corner[1] * frame["height"] / 2
            app.page.mouse.move(x, y)
            app.page.mouse.down()
            app.page.mouse.move(x + frame["width"] / 2 - 4, y + frame["height"] / 2 - 4, steps=5)
            app.page.mouse.up()
            time.sleep(0.5)
            app.page.evaluate(_ARM_JS)
            started = time.perf_counter()
            app.page.get_by_role("button", name="Run edit").click()
            page_seconds.append(
                app.page.wait_for_function(_NEW_PAIR_JS, polling="raf", timeout=60_000).json_value() / 1000
            )
            # The new id from the page's status line: opening the store here would load the machine meanwhile.
            app.wait_until(lambda previous=added: _added_id(app, previous) is not None, timeout=60, what="the status")
            added = _added_id(app, added)
            app.page.get_by_text(f"→ {added}").first.wait_for(timeout=60_000)
            app.wait_for_figure("edited: ", timeout=60)
            edit_seconds.append(time.perf_counter() - started)
            assert added in set(open_dataset(store).vli.counterfactuals(original)) - before
            time.sleep(1.0)
        app.page.get_by_text("Causal", exact=True).click()
        app.wait_for_figure("no causal explanation yet")
        button = app.page.get_by_role("button", name="Explain")
        for _ in range(runs):
            started = time.perf_counter()
            button.click()
            while button.is_enabled():  # disabled while the search runs (at least one 200 ms poll)
                time.sleep(0.01)
            while not button.is_enabled():
                time.sleep(0.01)
            explain_seconds.append(time.perf_counter() - started)
            app.page.get_by_text("reruns in").first.wait_for(timeout=30_000)  # the view shows it on its next poll
            time.sleep(1.0)
    print("  each rerun in the page (ms):", [round(seconds * 1000) for seconds in page_seconds])
    print(summary("chromium, in the page: pointerdown -> new pair's plot", page_seconds), f"load {load_average()}")
    print(summary("chromium: Run edit -> comparison of the new pair shown", edit_seconds), f"load {load_average()}")
    print(summary("chromium: Explain -> result shown", explain_seconds), f"load {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--searches", type=int, default=40)
    parser.add_argument("--browser-runs", type=int, default=5, help="0 skips the chromium part")
    args = parser.parse_args()
    print(f"load {load_average()}")
    with tempfile.TemporaryDirectory() as directory:
        store = copy_store(Path(directory))
        bench_edits(store, args.edits)
        bench_searches(store, args.searches)
        if args.browser_runs:
            bench_browser(copy_store(Path(directory) / "browser"), args.browser_runs)


if __name__ == "__main__":
    main()
