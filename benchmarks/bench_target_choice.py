"""Picking an answer to explain in the relevancy view: in process and in chromium.

    python benchmarks/bench_target_choice.py [--examples 20] [--browser-picks 12]

On a copy of ``datasets/single_stream`` (its VQA maps stored for predicted, runner-up and "predicted vs
runner-up"), served as ``vlinterpret serve STORE --model single_stream``:

1. In process, ``ChosenRelevancyReader.relevancy``: a stored map (the contrast with the runner-up) and a map
   computed with the model (generic relevancy of the third answer: one forward and one backward pass).
2. In chromium at 1600x1000, on the Relevancy tab with generic relevancy: pick the third answer of the list
   (computed), time until the main map's title names it; then pick "against" the runner-up of the
   prediction (stored), time until the contrast's map and the pair row with its difference are shown.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import load_average, summary  # noqa: E402
from vlinterpret_panel import open_dataset  # noqa: E402
from vlinterpret_panel.live import LiveModel  # noqa: E402
from vlinterpret_panel.relevancy.chosen import ChosenRelevancyReader, answer_choices  # noqa: E402


def bench_in_process(store: Path, examples: int) -> None:
    ds = open_dataset(store)
    live = LiveModel("single_stream")
    stored, computed = [], []
    for example in [str(i) for i in ds.indexes["example"]][:examples]:
        answers = [name for name, _ in answer_choices(ds, example)]
        reader = ChosenRelevancyReader(live.adapter, lock=live.lock)
        began = time.perf_counter()
        reader.relevancy(ds, example, "generic", answers[0], answers[1])
        stored.append(time.perf_counter() - began)
        began = time.perf_counter()
        reader.relevancy(ds, example, "generic", answers[2])
        computed.append(time.perf_counter() - began)
    print(summary("in process: a stored map (the contrast with the runner-up)", stored), f"load {load_average()}")
    print(summary("in process: a map computed with the model (the third answer)", computed), f"load {load_average()}")


def bench_browser(store: Path, picks: int) -> None:
    from tests.ui.browser import app_page, chromium, live_serve_command, served

    ds = open_dataset(store)
    ids = [str(i) for i in ds.indexes["example"]][:picks]
    computed, stored, clicks = [], [], []
    log = store.parent / "serve.log"
    command = live_serve_command(store, "single_stream")
    with served(command, log) as (url, _), chromium() as browser, app_page(browser, url) as app:
        for example in ids:
            answers = [str(a) for a in ds["top_answer"].sel(example=example).values]
            app.page.goto(f"{url}?example={example}")
            app.wait_for_figure("layer ")
            app.page.get_by_text("Relevancy", exact=True).click()
            method = app.page.get_by_label("method")
            method.locator("option").first.wait_for(state="attached")
            names = method.locator("option").all_inner_texts()
            method.select_option(index=next(i for i, name in enumerate(names) if name.startswith("generic")))
            app.wait_for_figure(f"generic → {answers[0]}")
            began = time.perf_counter()
            app.page.get_by_label(f"{answers[2]} ·").check()
            clicks.append(time.perf_counter() - began)
            app.wait_for_figure(f"generic → {answers[2][:6]}", timeout=30)  # titles are cut to the plot's width
            app.wait_for_figure(f"text relevancy for {answers[2]}", timeout=30)
            computed.append(time.perf_counter() - began)
            app.page.get_by_label(f"{answers[0]} ·").check()
            app.wait_for_figure(f"generic → {answers[0]}", timeout=30)
            began = time.perf_counter()
            app.page.get_by_label("against").select_option(index=2)
            app.wait_for_figure(f"text relevancy for {answers[0]} vs {answers[1]}", timeout=30)
            app.wait_for_figure(f"{answers[0]} − {answers[1][:6]}", timeout=30)
            stored.append(time.perf_counter() - began)
        assert not [error for error in app.errors if "ERR_NAME_NOT_RESOLVED" not in error], app.errors
    print(summary("chromium: pick an answer -> its computed map shown", computed), f"load {load_average()}")
    print(summary("  of which Playwright's check() of the radio button", clicks))
    print(
        summary("chromium: pick 'against' -> the stored contrast and the pair row shown", stored),
        f"load {load_average()}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--browser-picks", type=int, default=12, help="0 skips the chromium part")
    args = parser.parse_args()
    print(f"load {load_average()}")
    with tempfile.TemporaryDirectory() as directory:
        store = Path(directory) / "store"
        shutil.copytree(REPO / "datasets" / "single_stream", store, ignore=shutil.ignore_patterns(".index"))
        bench_in_process(store, args.examples)
        if args.browser_picks:
            bench_browser(store, args.browser_picks)


if __name__ == "__main__":
    main()
