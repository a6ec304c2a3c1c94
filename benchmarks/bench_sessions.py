"""Many sessions on one server, driven from Python: server-side latency and CPU per click, no browser drawing.

    python benchmarks/bench_sessions.py [--store PATH] [--sessions 1,4,8] [--rounds 20]

``panel serve dashboards/app.py`` on a free localhost port; each session is a Bokeh client
(``bokeh.client.pull_session``) holding its own copy of the page's document, run on its own
thread. In rounds, every session changes a widget at the same moment (the head, the query
token, the layer, in turn: what a click on a head cell, a text token or the layer slider
sends); a click's time runs from sending the change to the last update the server sends back
for it (the session waits for the server's first update, then until it has been quiet for ``QUIET`` s). The clients
only decode the server's messages, so the server gets the machine's cores that a browser
drawing eight pages took. Prints p50 / p95 / max per session count, the server's CPU time per
click and the load generator's own CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import holoviews.plotting.bokeh  # noqa: F401  (the page's HoloViews models, to decode its document)
import panel.models  # noqa: F401  (Panel's models, likewise)
from bokeh.client import ClientSession, pull_session
from bokeh.document.events import MessageSentEvent
from bokeh.events import DocumentReady

from tests.ui.browser import REPO, panel_serve_command, served

DEFAULT_STORE = REPO / "datasets" / "single_stream"
QUIET = 0.4  # seconds without an update from the server that end a click
ANSWER_TIMEOUT = 20.0  # a click the server has not answered by then counts as unanswered
CLICKS = ("head", "query token", "layer")


@dataclass
class Client:
    """One session: its document's widgets by title, and the time of the server's last update."""

    session: ClientSession
    widgets: dict[str, object]
    last_update: float = 0.0
    unanswered: int = 0  # clicks the server sent nothing back for
    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in CLICKS})

    def changed(self, event: object) -> None:
        if getattr(event, "setter", None) is self.session:  # the server's update, not this client's own change
            self.last_update = time.perf_counter()


def connect(url: str) -> Client:
    """A new session of the page at ``url``, marked drawn, its IO loop running on a thread of its own."""
    session = pull_session(url=url)
    widgets = {
        model.title: model
        for model in session.document.models
        if getattr(model, "title", None) in CLICKS and hasattr(model, "value")
    }
    missing = set(CLICKS) - set(widgets)
    if missing:
        raise SystemExit(f"the page has no widget titled {sorted(missing)}")
    client = Client(session, widgets)
    session.document.on_change(client.changed)
    # What BokehJS sends once it has drawn the page: until then Panel holds the session's updates and each
    # HoloViews plot reschedules its redraw every tick (a busy loop: 100% of the server's core).
    ready = MessageSentEvent(session.document, "bokeh_event", DocumentReady())
    session._connection._send_patch_document(session.id, ready)
    threading.Thread(target=session._connection.loop_until_closed, daemon=True).start()  # Bokeh: "for testing"
    return client


def next_value(widget: object, session_index: int) -> object:
    """Another value of ``widget`` than its current one, spread over the sessions."""
    options = getattr(widget, "options", None)
    if options:
        values = [o[0] if isinstance(o, (list, tuple)) else o for o in options]
    else:
        values = list(range(int(widget.start), int(widget.end) + 1))
    current = values.index(widget.value) if widget.value in values else 0
    return values[(current + 1 + session_index % (len(values) - 1)) % len(values)]


def wait_until_quiet(server: psutil.Process, seconds: float = 0.5, timeout: float = 30) -> None:
    """Until the server has used under 5% of a core for ``seconds``: the pages' first updates are over."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        used = sum(server.cpu_times()[:2])
        time.sleep(seconds)
        if sum(server.cpu_times()[:2]) - used < 0.05 * seconds:
            return


def click(client: Client, kind: str, value: object, record: bool = True) -> None:
    """Send the change, wait for the server's first update and then until it is quiet for ``QUIET`` s; record
    the time from sending to the last update."""
    loop = client.session._connection._loop  # the session's IO loop: its document changes happen there
    sent = time.perf_counter()
    client.last_update = sent
    widget = client.widgets[kind]
    loop.add_callback(lambda: setattr(widget, "value", value))
    deadline = sent + ANSWER_TIMEOUT
    while time.perf_counter() < deadline and (
        client.last_update == sent or time.perf_counter() - client.last_update < QUIET
    ):
        time.sleep(0.02)
    if record:
        if client.last_update == sent:
            client.unanswered += 1
        else:
            client.latencies[kind].append(client.last_update - sent)


def run(url: str, server_pid: int, sessions: int, rounds: int) -> list[str]:
    clients = [connect(url) for _ in range(sessions)]
    server, generator = psutil.Process(server_pid), psutil.Process()
    for round_index in range(len(CLICKS)):  # unmeasured: each kind of click once, the server's first calls
        for index, client in enumerate(clients):
            kind = CLICKS[round_index]
            click(client, kind, next_value(client.widgets[kind], index), record=False)
    wait_until_quiet(server)
    server_cpu, generator_cpu = sum(server.cpu_times()[:2]), sum(generator.cpu_times()[:2])
    began = time.perf_counter()
    for round_index in range(rounds):
        kind = CLICKS[round_index % len(CLICKS)]
        values = [next_value(c.widgets[kind], i) for i, c in enumerate(clients)]
        threads = [threading.Thread(target=click, args=(c, kind, v)) for c, v in zip(clients, values, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = time.perf_counter() - began
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu
    generator_cpu = sum(generator.cpu_times()[:2]) - generator_cpu
    for client in clients:
        client.session.close()
    all_times = np.array([t for c in clients for times in c.latencies.values() for t in times]) * 1000
    lines = [f"{sessions} session(s), {rounds} rounds, {len(all_times)} clicks in {seconds:.0f} s"]
    for kind in CLICKS:
        times = np.array([t for c in clients for t in c.latencies[kind]]) * 1000
        lines.append(
            f"  {kind:12s} p50 {np.percentile(times, 50):6.0f} ms  p95 {np.percentile(times, 95):6.0f} ms  "
            f"max {times.max():6.0f} ms"
        )
    lines.append(
        f"  all clicks   p50 {np.percentile(all_times, 50):6.0f} ms  p95 {np.percentile(all_times, 95):6.0f} ms; "
        f"server CPU {1000 * server_cpu / len(all_times):.0f} ms per click ({server_cpu / seconds:.0%} of a core), "
        f"load generator {generator_cpu / seconds:.0%} of a core"
    )
    unanswered = sum(c.unanswered for c in clients)
    if unanswered:
        lines.append(f"  {unanswered} click(s) got no update from the server")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--sessions", default="1,4,8", help="session counts to measure, comma-separated")
    parser.add_argument("--rounds", type=int, default=18)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "panel-serve.log"
        with served(lambda port: panel_serve_command(args.store, port), log) as (url, server):
            print(f"store: {args.store}")
            for count in (int(n) for n in args.sessions.split(",")):
                print("\n".join(run(url, server.pid, count, args.rounds)), flush=True)
            print(f"load average after: {psutil.getloadavg()[0]:.1f}")
            if server.poll() is not None:
                print(f"the server died: {log.read_text()[-3000:]}")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
