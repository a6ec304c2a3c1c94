"""Token and head pickers: layer, head (or their mean), query token, and the token movie."""

from __future__ import annotations

import panel as pn
import param
import xarray as xr

from vlinterpret_panel.schema import TEXT
from vlinterpret_panel.ui.common import SIDEBAR_CONTROL_WIDTH, heading
from vlinterpret_panel.ui.selection import Selection, batched_widget
from vlinterpret_panel.ui.view import View

MEAN = "mean"
MOVIE_INTERVAL_MS = 2000


class TokenControls(View):
    """Pick layer, head and query token by name; play steps through the text tokens like VL-InterpreT's movie."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        selection = self.selection
        self._layer = batched_widget(
            pn.widgets.IntSlider, selection, "layer", label="layer", width=SIDEBAR_CONTROL_WIDTH
        )
        self._head = pn.widgets.Select(label="head", options=[MEAN, *map(str, range(ds.sizes["head"]))], width=100)
        self._token = pn.widgets.Select(label="query token", width=200)
        self._movie = pn.widgets.Player(
            label="token movie",
            start=0,
            end=1,
            value=0,
            interval=MOVIE_INTERVAL_MS,
            loop_policy="loop",
            visible_buttons=["first", "previous", "pause", "play", "next", "last"],  # nine ran past the edge
            width=SIDEBAR_CONTROL_WIDTH,
        )
        self._options_for: tuple | None = None
        self._head.param.watch(self._head_chosen, "value")
        self._token.param.watch(self._token_chosen, "value")
        self._movie.param.watch(self._movie_step, "value")
        selection.param.watch(self._show_head, "head")
        selection.param.watch(self._show_tokens, ["example", "tokens"])
        self._show_head()
        self._show_tokens()

    def dataset_changed(self) -> None:
        self._head.options = [MEAN, *map(str, range(self.ds.sizes["head"]))]
        self._show_head()
        self._show_tokens()

    def _text_tokens(self) -> list[int]:
        return [int(t) for t in self.ds.vli.tokens(self.selection.example).tokens_of(TEXT)]

    def _head_chosen(self, event: param.parameterized.Event) -> None:
        self.selection.select(head=None if event.new == MEAN else int(event.new))

    def _show_head(self, *events: param.parameterized.Event) -> None:
        self._head.value = MEAN if self.selection.head is None else str(self.selection.head)

    def _show_tokens(self, *events: param.parameterized.Event) -> None:
        """Keep the token picker in step; its option list is rebuilt only when it has to change."""
        info = self.ds.vli.tokens(self.selection.example)
        several = len(self.selection.tokens) > 1
        key = (self.ds.vli.identity, self.selection.example, several and len(self.selection.tokens))
        if key != self._options_for:
            options = {f"{t}: {info.token_text[t]} ({info.modality[t]})": t for t in range(info.n_tokens)}
            if several:
                options = {f"{len(self.selection.tokens)} tokens (averaged)": -1, **options}
            self._token.options = options
            self._movie.end = max(1, len(self._text_tokens()) - 1)
            self._options_for = key
        self._token.value = -1 if several else self.selection.tokens[0]

    def _token_chosen(self, event: param.parameterized.Event) -> None:
        if event.new is not None and event.new >= 0 and [event.new] != self.selection.tokens:
            self.selection.select(tokens=[int(event.new)])

    def _movie_step(self, event: param.parameterized.Event) -> None:
        text_tokens = self._text_tokens()
        if text_tokens:
            self.selection.select(tokens=[text_tokens[event.new % len(text_tokens)]])

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(heading("Head and token"), self._layer, self._head, self._token, self._movie)
