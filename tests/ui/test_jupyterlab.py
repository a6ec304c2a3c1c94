"""The dashboard inline in a real JupyterLab: run the explore notebook in chromium, click, see the views follow."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import xarray as xr

from tests.ui.browser import REPO, AppPage, app_page, free_port, running
from tests.ui.conftest import changed_fraction
from vlinterpret_panel import open_dataset
from vlinterpret_panel.maps import example_tokens
from vlinterpret_panel.schema import TEXT
from vlinterpret_panel.ui.text import token_layout

pytest.importorskip("jupyterlab", reason="the JupyterLab test needs the 'lab' extra (jupyterlab, ipykernel)")
pytestmark = pytest.mark.browser

# The README's screenshot is this test's: VLI_UPDATE_SCREENSHOTS=1 writes it there (else into the test's directory).
SCREENSHOT = REPO / "docs" / "screenshots" / "jupyterlab.png"
SUMMARY = "cross_modal"
NOTEBOOK = "docs/notebooks/explore.ipynb"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """JupyterLab on 127.0.0.1 with a token, over a copy of the notebooks (runs never write into the repository).

    Its settings, workspaces and runtime files live in the temporary directory, and it checks for
    no news or updates: the machine may be offline.
    """
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO / "docs" / "notebooks", root / "docs" / "notebooks")
    (root / "datasets").symlink_to(REPO / "datasets")
    # Every cell stays in the page: with JupyterLab's default windowing, scrolling detached the outputs' plots.
    tracker = root / ".settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"windowingMode": "none"}')
    notification = root / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false"}')  # no "get notified about news?" prompt over the page
    token, port = secrets.token_hex(16), free_port()
    environment = os.environ | {
        "JUPYTER_CONFIG_DIR": str(root / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
    }
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]  # fmt: skip
    if os.geteuid() == 0:  # CI machines run as root; JupyterLab refuses that unless told
        command.append("--allow-root")
    url = f"http://127.0.0.1:{port}"
    with running(command, root / "lab.log", f"{url}/api/status?token={token}", cwd=root, env=environment):
        yield url, token


def _run_notebook(app: AppPage, url: str, token: str) -> None:
    """Open the explore notebook, run all its cells and wait until the dashboard's head summary is drawn.

    The notebook's kernel is started first (Jupyter's REST API) and the page connects to it. Under load (CI; here
    with the two cores 3x oversubscribed) JupyterLab at times lost track of its kernel: it asked "Select Kernel"
    over the page, or it connected to the kernel a second time and kept that connection, which handles no comms
    (`KernelManager.connectTo` gives comms to a kernel's first connection only): no Panel output could draw
    ("Comms are disabled on this kernel connection"). Then the page is loaded again, as a user would; its one
    connection to the running kernel handles comms."""
    _start_session(url, token, NOTEBOOK)
    stalls: list[str] = []
    for _ in range(3):
        app.page.goto("about:blank")  # the last try's page and its requests gone, its errors are dropped
        app.errors.clear()
        app.page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
        if not _run_all(app):
            continue
        try:
            app.wait_until(lambda: _comms_lost(app) or _has_figure(app, SUMMARY), timeout=150, what="the head summary")
        except AssertionError:  # once in a full CI-like run: nothing drawn and no error; say what the page showed
            stalls.append(_page_state(app))
            continue
        if not _comms_lost(app):
            return
    raise AssertionError(f"no head summary in three tries; {stalls or app.errors}")


def _page_state(app: AppPage) -> str:
    """What a notebook page shows when its dashboard did not draw: cells queued or running, error output, console."""
    running = app.page.get_by_text("[*]:").count()
    stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    errors = app.page.locator(stderr).all_inner_texts()
    return f"cells running or queued: {running}; error output: {errors[-3:]}; console: {app.console[-10:]}"


def _comms_lost(app: AppPage) -> bool:
    return any("Comms are disabled" in error for error in app.errors)


def _has_figure(app: AppPage, prefix: str) -> bool:
    return any(figure["title"].startswith(prefix) for figure in app.figures())


def _start_session(url: str, token: str, path: str) -> None:
    """Start a notebook's kernel through Jupyter server's REST API."""
    body = {"path": path, "name": pathlib.Path(path).name, "type": "notebook", "kernel": {"name": "python3"}}
    request = urllib.request.Request(
        f"{url}/api/sessions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=60).close()


def _run_all(app: AppPage) -> bool:
    """Run > Run All Cells once the kernel is idle, until the first cell has run ("[1]:"); False if JupyterLab
    asks "Select Kernel" instead.

    Clicked again only when no cell is queued or running ("[*]:") some seconds after the click (the click was
    lost): clicking while cells are queued would rerun them."""
    app.page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
    app.wait_until(lambda: app.page.get_by_text("Kernel status: Idle").count() > 0, timeout=120, what="the kernel")
    asks_for_kernel = app.page.locator(".jp-Dialog", has_text="Select Kernel")
    for _ in range(4):
        if asks_for_kernel.count():
            return False
        app.page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        app.page.get_by_text("Run All Cells", exact=True).first.click()
        clicked = time.monotonic()
        while time.monotonic() - clicked < 180:
            if app.page.get_by_text("[1]:").count():
                return True
            if asks_for_kernel.count():
                return False
            if not app.page.get_by_text("[*]:").count() and time.monotonic() - clicked > 10:
                break
            app.page.wait_for_timeout(500)
    raise AssertionError("the notebook's cells did not run")


def _head_and_word_to_click(ds: xr.Dataset, example: str, selected: str) -> tuple[int, int, int]:
    """(layer, head, word): the head, other than the one shown, where a word's map on the image differs most from
    the first word's (the one selected when the page opens), so both clicks must change what is drawn."""
    info = example_tokens(ds, example)
    words = [int(t) for t in info.tokens_of(TEXT)]
    best, choice = -1.0, (0, 0, words[-1])
    for layer in range(ds.sizes["layer"]):
        for head in range(ds.sizes["head"]):
            if selected.startswith(f"layer {layer}, head {head}"):
                continue
            first = np.nan_to_num(ds.vli.token_attention_on_image(example, layer, head, words[0]).values)
            for word in words[1:]:
                other = np.nan_to_num(ds.vli.token_attention_on_image(example, layer, head, word).values)
                if other.max() <= 0 or first.max() <= 0:
                    continue
                difference = float(np.abs(other / other.max() - first / first.max()).mean())
                if difference > best:
                    best, choice = difference, (layer, head, word)
    return choice


def _activate_cell_with(app: AppPage, text: str) -> None:
    """Make the cell whose output shows ``text`` JupyterLab's active cell (a click on its input prompt), and wait
    until it is: a click into an inactive cell's output is taken by JupyterLab, not by the plot under it."""
    cell = app.page.locator(".jp-Notebook .jp-Cell", has=app.page.get_by_text(text, exact=True)).first
    cell.locator(".jp-InputPrompt").first.click()
    app.wait_until(lambda: "jp-mod-active" in (cell.get_attribute("class") or ""), what=f"the cell showing {text!r}")


ELEMENT_AT_JS = """([x, y]) => {
    const element = document.elementFromPoint(x, y);
    return element ? `${element.tagName.toLowerCase()}.${[...element.classList].join(".")}` : "nothing";
}"""


def _click_until_shown(app: AppPage, prefix: str, point: tuple, shown: str, tries: int = 3) -> None:
    """Click the plot ``prefix...`` at data coordinates ``point`` until a plot titled ``shown...`` appears.

    In one CI run (the whole suite, two cores) a click on the head summary changed nothing for 30 s, though the
    plot's cell was active and the same click works alone and under load here. A user whose click is lost clicks
    again; so does this test, after scrolling the plot to rest again, and it reports what each click hit."""
    hits = []
    for _ in range(tries):
        app.scroll_to(prefix)
        position = app.data_position(prefix, *point)
        hits.append(app.page.evaluate(ELEMENT_AT_JS, list(position)))
        app.page.mouse.click(*position)
        try:
            app.wait_for_figure(shown, timeout=15)
            return
        except AssertionError:
            continue
    raise AssertionError(f"no plot titled {shown!r} after {tries} clicks on {prefix!r}; they hit: {hits}")


def test_the_inline_dashboard_responds_to_clicks_in_jupyterlab(
    browser: object, lab: tuple[str, str], tmp_path: pathlib.Path
) -> None:
    url, token = lab
    with app_page(browser, url) as app:
        _run_notebook(app, url, token)
        # The last cell prints the notebook's figures: every cell has run and every view is drawn.
        app.page.get_by_text('"share_on_object"').first.wait_for(timeout=180_000)
        app.page.wait_for_timeout(2000)
        heatmap = app.wait_for_figure("layer ", timeout=120)
        ds = open_dataset(REPO / "datasets" / "single_stream")
        example = str(ds.example.values[0])
        info = example_tokens(ds, example)
        layer, head, token = _head_and_word_to_click(ds, example, selected=heatmap["title"])
        image = info.text[:20]  # the image view's title starts with the example's text
        app.wait_for_figure(image, timeout=60)
        # The first click into an output only makes its cell JupyterLab's active cell: make it active first.
        _activate_cell_with(app, "Examples")  # the dashboard's sidebar heading
        app.scroll_to(SUMMARY)
        # A head-summary cell: the attention heatmap of that head is drawn.
        app.scroll_to(heatmap["title"])
        before = app.pixels(heatmap["title"])
        shown = f"layer {layer}, head {head}"
        _click_until_shown(app, SUMMARY, (str(head), str(layer)), shown)
        app.scroll_to(shown)
        app.wait_until(lambda: changed_fraction(before, app.pixels(shown)) > 0.05, what="the heatmap to change")
        # A word of the text: the image view shows that word's attention.
        app.scroll_to(image)
        image_before = app.pixels(image)
        layout = token_layout(info)
        target = layout[layout.token == token].iloc[0]
        word = (float((target.x0 + target.x1) / 2), float((target.y0 + target.y1) / 2))
        _click_until_shown(app, "attention from", word, f"attention from {token}:")
        app.scroll_to(image)
        app.wait_until(lambda: changed_fraction(image_before, app.pixels(image)) > 0.01, what="the image overlay")
        app.scroll_to(SUMMARY)
        update = os.environ.get("VLI_UPDATE_SCREENSHOTS") == "1"
        app.page.screenshot(path=SCREENSHOT if update else tmp_path / SCREENSHOT.name)
        assert not app.errors, app.errors
