"""Retake the screenshots in docs/screenshots/ from the real app on the shipped demo store.

    python docs/make_screenshots.py [--store datasets/single_stream] [--out docs/screenshots]
        [--only attention|answers|live|captions]

Starts ``panel serve dashboards/app.py`` on a free localhost port over the store, drives
Debian's chromium with Playwright, and stops the server at the end. The example is the first
correctly answered "what color is the ...?" question; the query token is its shape word; the
layer and head are where that word's attention lands most on the patches of the object the
question is about (the store's ``target_mask``). Plots are found as the browser tests find
them (``tests/ui/browser.py``): through Bokeh's own views, by title. The answer and reliance
views are shot on ``datasets/generative``: its first example (a scene description) with its
third generated token (a shape word) chosen, and the reliance chart tapped at answer position 3. The caption
contrast is shot on ``datasets/dual_encoder`` served with its model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from playwright.sync_api import Page

# The repository root, for tests.ui.browser when run as ``python docs/make_screenshots.py``.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ui.browser import REPO, AppPage, chromium, live_serve_command, panel_serve_command, served
from vlinterpret_panel import open_dataset
from vlinterpret_panel.maps import example_tokens
from vlinterpret_panel.schema import TEXT

PAGE_SIZE = {"width": 1600, "height": 1000}
TALL_SIZE = {"width": 1600, "height": 1400}  # element shots: views below the fold fit without scrolling
MARGIN = 8


def choose(store: Path) -> dict:
    """The example, query token and (layer, head) the screenshots show."""
    ds = open_dataset(store)
    table = ds[["text", "correct"]].compute().to_dataframe()
    asks = table[table["text"].astype(str).str.startswith("what color is the") & (table["correct"] == 1)]
    example = str(asks.index[0]) if len(asks) else str(table.index[0])
    info = example_tokens(ds, example)
    text = [int(t) for t in info.tokens_of(TEXT)]
    words = ds["token_text"].sel(example=example).values
    # The shape word: the last text token that is a word (not punctuation or a special token).
    token = next((t for t in reversed(text) if str(words[t]).isalpha()), text[0])
    layer, head = ds.sizes["layer"] - 1, None
    if "target_mask" in ds:
        mask = ds["target_mask"].sel(example=example).values.astype(float)
        patches = info.image_tokens()
        cover = np.array(
            [mask[int(y0) : int(y1), int(x0) : int(x1)].mean() for x0, y0, x1, y1 in info.token_box[patches]]
        )
        attention = ds["attention"].sel(example=example).values[:, :, token, patches]  # layer, head, patch
        on_target = np.nan_to_num(attention * cover).sum(axis=-1)
        layer, head = (int(i) for i in np.unravel_index(np.argmax(on_target), on_target.shape))
    return {
        "example": example,
        "text": str(info.text),
        "token": token,
        "word": str(words[token]),
        "layer": layer,
        "head": head,
        "heads": ds.sizes["head"],
    }


class Shooter(AppPage):
    """One browser page of the app and the screenshots taken of it."""

    def __init__(self, page: Page, url: str, out: Path) -> None:
        super().__init__(page, url)
        self.out = out

    def wait_for_figure(self, prefix: str, timeout: float = 90) -> dict:
        # The shipped store is larger than the tests' one: its first views take longer.
        return super().wait_for_figure(prefix, timeout)

    def settle(self, seconds: float = 1.5, timeout: float = 120) -> None:
        """Wait until nothing shows a loading spinner, then a little longer for the canvases to paint."""
        deadline = time.monotonic() + timeout
        self.page.wait_for_timeout(500)
        while time.monotonic() < deadline and self.page.locator(".pn-loading").count():
            time.sleep(0.25)
        self.page.wait_for_timeout(int(seconds * 1000))

    def shoot(self, name: str, clip: dict | None = None) -> None:
        path = self.out / name
        if clip is None:
            self.page.screenshot(path=path)
        else:
            size = self.page.viewport_size
            x, y = max(0.0, clip["x"] - MARGIN), max(0.0, clip["y"] - MARGIN)
            width = min(clip["x"] + clip["width"] + MARGIN, size["width"]) - x
            height = min(clip["y"] + clip["height"] + MARGIN, size["height"]) - y
            self.page.screenshot(path=path, clip={"x": x, "y": y, "width": width, "height": height})
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")

    def resize(self, size: dict) -> None:
        self.page.set_viewport_size(size)
        self.settle(1.0)

    def tab(self, name: str) -> None:
        self.page.get_by_text(name, exact=True).first.click()

    def sidebar_box(self, first: str, after: str) -> dict:
        """From the sidebar heading ``first`` down to just above the heading ``after``."""
        top = self.page.get_by_text(first, exact=True).first.bounding_box()
        bottom = self.page.get_by_text(after, exact=True).first.bounding_box()
        return {"x": 4, "y": top["y"] - 4, "width": 330, "height": bottom["y"] - top["y"] - 4}


@contextmanager
def shooter(store: Path, out: Path) -> Iterator[Shooter]:
    """A ``Shooter`` page of ``panel serve`` on ``store``, writing to ``out``; the server stops after."""
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        served(lambda port: panel_serve_command(store, port), Path(tmp) / "panel-serve.log") as (url, _server),
        chromium() as browser,
    ):
        yield Shooter(browser.new_context(viewport=PAGE_SIZE).new_page(), url, out)


def run(store: Path, out: Path) -> None:
    chosen = choose(store)
    print(f"showing {chosen}")
    layer, head, token = chosen["layer"], chosen["head"], chosen["token"]
    head_query = "mean" if head is None else head
    query = f"?example={chosen['example']}&layer={layer}&head={head_query}&tokens=[{token}]"
    heatmap = f"layer {layer}, " + ("mean of heads" if head is None else f"head {head}")
    with shooter(store, out) as shots:
        page = shots.page
        shots.open(query)
        for prefix in ("cross_modal", heatmap, chosen["text"][:20], f"attention from {token}:"):
            shots.wait_for_figure(prefix)
        shots.settle(2.5)
        shots.shoot("dashboard.png")

        shots.resize(TALL_SIZE)
        shots.shoot("head-summary.png", shots.box("cross_modal", 1))
        shots.shoot("attention-heatmap.png", shots.box(heatmap, 2))
        shots.shoot("image-view.png", shots.box(chosen["text"][:20], 1))
        shots.shoot("text-view.png", shots.box(f"attention from {token}:"))
        shots.shoot("example-browser.png", shots.sidebar_box("Examples", "Head and token"))

        shots.tab("Embeddings")
        shots.wait_for_figure("hidden layer")
        shots.settle(3.0)
        shots.shoot("embedding-view.png", shots.box("hidden layer", 2))

        shots.tab("Relevancy")
        shots.wait_for_figure("text relevancy for")
        shots.settle(2.0)
        shots.shoot("relevancy-view.png", shots.box("text relevancy for", 3))
        # Generic relevancy of the prediction against the runner-up (stored with --target "predicted vs
        # runner-up"): the answer list, the contrast's maps and the pair row with its difference.
        method = page.get_by_label("method")
        names = method.locator("option").all_inner_texts()
        method.select_option(index=next(i for i, name in enumerate(names) if name.startswith("generic")))
        against = page.get_by_label("against")
        predicted, runner_up = (name.split(" · ")[0] for name in against.locator("option").all_inner_texts()[1:3])
        against.select_option(index=2)
        shots.wait_for_figure(f"generic → {predicted} vs {runner_up}")
        shots.wait_for_figure(f"{predicted} − {runner_up}")
        shots.settle(2.0)
        shots.shoot("relevancy-contrast.png", shots.box(f"generic → {predicted} vs {runner_up}", 3))
        # AttnLRP's signed map of the prediction: red for the answer, blue against it.
        against.select_option(index=0)
        names = method.locator("option").all_inner_texts()
        method.select_option(index=next(i for i, name in enumerate(names) if name.startswith("attnlrp")))
        shots.wait_for_figure(f"attnlrp → {predicted}")
        shots.settle(2.0)
        shots.shoot("relevancy-attnlrp.png", shots.box(f"attnlrp → {predicted}", 2))

        shots.tab("Compare heads")
        chooser = page.locator("select[multiple]")
        chooser.wait_for()
        near = [layer - 1 if layer > 0 else layer + 1, layer]
        names = [f"L{near[0]} mean", f"L{layer} mean"] + ([] if head is None else [f"L{layer} H{head}"])
        chooser.select_option(names)
        shots.wait_for_figure("L")
        shots.settle(2.0)
        shots.shoot("head-comparison.png", shots.box("L", 6))
    if shots.errors:
        print("console errors:\n" + "\n".join(shots.errors))
    print(json.dumps(chosen))


def run_answers(store: Path, out: Path) -> None:
    """The answer view (token 2 of the first example chosen) and the reliance view (position 3 tapped)."""
    from vlinterpret_panel.ui.answer import strip_layout

    ds = open_dataset(store)
    answer = ds.vli.answer(str(ds.example.values[0]))
    boxes = strip_layout(answer)
    chosen = boxes[boxes.step == 2].iloc[0]
    strip = "generated answer"
    with shooter(store, out) as shots:
        shots.page.goto(shots.url)
        shots.wait_for_figure(strip)
        shots.click_data(strip, (chosen.x0 + chosen.x1) / 2, (chosen.y0 + chosen.y1) / 2)
        shots.wait_for_figure(f"{strip}: token 2 selected")
        shots.page.mouse.move(2, 2)  # no hover tooltip in the picture
        shots.settle(2.0)
        shots.shoot("answer-view.png")
        # The same token against the runner-up at its step (stored with --target "predicted vs runner-up").
        shots.page.get_by_label("map").select_option("generic [predicted vs runner-up]")
        contrast = shots.wait_for_figure(f"{answer['token'].iloc[2]!r} vs ")
        shots.settle(2.0)
        shots.shoot("answer-contrast.png", shots.box(contrast["title"], 2))
        shots.tab("Reliance")
        chart = "mean share of each generated token's map"
        shots.wait_for_figure(chart)
        shots.click_data(chart, 3, 0.5)
        shots.page.mouse.move(2, 2)
        shots.settle(2.0)
        shots.shoot("reliance-view.png")
    if shots.errors:
        print("console errors:\n" + "\n".join(shots.errors))


def run_live(store: Path, out: Path) -> None:
    """A counterfactual pair and a causal explanation, on a copy of ``store`` served with its live model.

    The yellow triangle of the first example ("describe the scene") is masked with the
    background colour; the causal view then explains the generated answer of a colour
    question ("what color is the triangle?", scene-1000000003).
    """
    model = open_dataset(store).attrs["model_name"]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(store, copy, ignore=shutil.ignore_patterns(".index", "causal"))

        command = live_serve_command(copy, model)

        with (
            served(command, Path(tmp) / "serve.log") as (url, _server),
            chromium() as browser,
        ):
            shots = Shooter(browser.new_context(viewport=PAGE_SIZE).new_page(), url, out)
            shots.page.goto(url)
            shots.wait_for_figure("generated answer")
            shots.tab("Counterfactual")
            frame = shots.wait_for_figure("draw on")
            shots.wait_for_figure("edited image")
            x, y = frame["left"] + 2, frame["top"] + 2
            shots.page.mouse.move(x, y)
            shots.page.mouse.down()
            shots.page.mouse.move(x + frame["width"] * 0.3, y + frame["height"] * 0.3, steps=5)
            shots.page.mouse.move(x + frame["width"] * 0.5, y + frame["height"] * 0.5, steps=5)
            shots.page.mouse.up()
            shots.settle(1.0)
            shots.page.get_by_role("button", name="Run edit").click()
            shots.wait_for_figure("edited: ")
            shots.page.mouse.move(2, 2)
            shots.settle(2.0)
            shots.shoot("counterfactual-view.png")
            shots.page.goto(f"{url}?example=scene-1000000003")
            shots.wait_for_figure("generated answer")
            shots.tab("Causal")
            shots.wait_for_figure("no causal explanation yet")
            shots.page.get_by_role("button", name="Explain").click()
            shots.page.get_by_text("reruns in").first.wait_for(timeout=60_000)
            shots.page.mouse.move(2, 2)
            shots.settle(2.0)
            shots.shoot("causal-view.png")
            if shots.errors:
                print("console errors:\n" + "\n".join(shots.errors))


def run_captions(store: Path, out: Path) -> None:
    """The dual encoder's relevancy view, served with its model: generic relevancy of the first example's caption
    against the store's caption the model scores highest with that image (the first one offered)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(store, copy, ignore=shutil.ignore_patterns(".index"))
        command = live_serve_command(copy, open_dataset(store).attrs["model_name"])
        with served(command, Path(tmp) / "serve.log") as (url, _server), chromium() as browser:
            shots = Shooter(browser.new_context(viewport=PAGE_SIZE).new_page(), url, out)
            shots.open("")
            shots.tab("Relevancy")
            shots.wait_for_figure("text relevancy for")
            method = shots.page.get_by_label("method")
            names = method.locator("option").all_inner_texts()
            method.select_option(index=next(i for i, name in enumerate(names) if name.startswith("generic")))
            shots.wait_for_figure("generic → score")
            against = shots.page.get_by_label("against")
            against.locator("option").nth(1).wait_for(state="attached")
            against.select_option(index=1)
            shots.wait_for_figure("generic → this − other")
            shots.page.mouse.move(2, 2)
            shots.settle(2.0)
            shots.shoot("caption-contrast.png", shots.sidebar_box("method", "All methods") | {"x": 292, "width": 990})
            if shots.errors:
                print("console errors:\n" + "\n".join(shots.errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=REPO / "datasets" / "single_stream")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--answers-store", type=Path, default=REPO / "datasets" / "generative")
    parser.add_argument("--captions-store", type=Path, default=REPO / "datasets" / "dual_encoder")
    parser.add_argument(
        "--only", choices=["attention", "answers", "live", "captions"], help="retake one set of screenshots only"
    )
    args = parser.parse_args()
    if args.only in (None, "attention"):
        run(args.store.resolve(), args.out.resolve())
    if args.only in (None, "answers"):
        run_answers(args.answers_store.resolve(), args.out.resolve())
    if args.only in (None, "live"):
        run_live(args.answers_store.resolve(), args.out.resolve())
    if args.only in (None, "captions"):
        run_captions(args.captions_store.resolve(), args.out.resolve())


if __name__ == "__main__":
    main()
