"""Load on one dashboard server: several browser sessions clicking at once; response times and peak memory.

    python benchmarks/bench_load.py [--store PATH] [--sessions 8] [--seconds 60]

The run of ``tests/ui/test_load.py``, as a script: ``panel serve dashboards/app.py`` on a free
localhost port over the store (the shipped demo store by default), Debian's chromium driven by
Playwright, one browser context per session. Each session opens its own example, layer, head
and token from the URL, then in rounds every session taps a head-summary cell, a text token or
an image patch before any is waited for. A click's time runs in the page from the pointer going
down to the plot showing its new title. Prints p50 / p95 / max per click kind, the server's CPU
time per click and its peak resident memory; exits 1 if a session logged an error, lost its own
state, or the server died.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ui.browser import REPO, chromium
from tests.ui.test_load import peak_rss_gb, run_load, served

DEMO_STORE = REPO / "datasets" / "synthetic"  # dashboards/app.py's DEMO_STORE (importing it would build the app)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEMO_STORE)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the sessions keep clicking")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch, served(args.store, Path(scratch) / "panel-serve.log") as running:
        url, server = running
        with chromium() as browser:
            result = run_load(browser, url, args.store, args.sessions, args.seconds, server_pid=server.pid)
        alive = server.poll() is None
        print(f"store: {args.store}")
        print("\n".join(result.report()))
        if alive:
            print(f"server peak memory (max RSS): {peak_rss_gb(server.pid):.2f} GB")
        else:
            print(f"the server died: {(Path(scratch) / 'panel-serve.log').read_text()[-3000:]}")
    for failure in result.failures:
        print(f"FAILED: {failure}")
    for index, errors in result.errors.items():
        print(f"session {index} logged errors: {errors}")
    return 0 if alive and not result.failures and not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
