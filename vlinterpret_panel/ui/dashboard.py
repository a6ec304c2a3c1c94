"""The dashboard: every view composed around one shared ``Selection`` and one dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import panel as pn
import param
import xarray as xr
from panel.io.document import hold

from vlinterpret_panel.causal import has_causal
from vlinterpret_panel.live import AddedExample, LiveModel
from vlinterpret_panel.ui.answer import ANSWER_URL_PARAMETERS, AnswerView
from vlinterpret_panel.ui.attention import AttentionHeatmap
from vlinterpret_panel.ui.causal import CausalView
from vlinterpret_panel.ui.common import SIDEBAR_WIDTH, extension, message_banner
from vlinterpret_panel.ui.compare import HeadComparison
from vlinterpret_panel.ui.counterfactual import CounterfactualView
from vlinterpret_panel.ui.embedding import EmbeddingView
from vlinterpret_panel.ui.examples import ExampleBrowser
from vlinterpret_panel.ui.export import ExportPanel
from vlinterpret_panel.ui.head_summary import HeadSummary
from vlinterpret_panel.ui.image import ImageView
from vlinterpret_panel.ui.relevancy import RelevancyView
from vlinterpret_panel.ui.reliance import RelianceView
from vlinterpret_panel.ui.selection import Selection, default_tokens, valid_tokens
from vlinterpret_panel.ui.text import TextView
from vlinterpret_panel.ui.tokens import TokenControls
from vlinterpret_panel.ui.view import View

extension()
pn.config.loading_indicator = True


class Dashboard(View):
    """All views of one dataset, linked through one ``Selection``; usable inline in JupyterLab.

    Setting ``ds`` (or calling ``show_store``) moves every view to a grown store without
    rebuilding anything.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        selection: Selection | None = None,
        *,
        live: LiveModel | None = None,
        store: Path | None = None,
        on_added: Callable[[AddedExample], None] | None = None,
        **params,
    ) -> None:
        super().__init__(ds, selection, **params)
        selection = self.selection
        self.live = live
        self.examples = ExampleBrowser(ds, selection)
        self.tokens = TokenControls(ds, selection)
        self.head_summary = HeadSummary(ds, selection)
        self.attention = AttentionHeatmap(ds, selection)
        self.image = ImageView(ds, selection)
        self.text = TextView(ds, selection)
        self.embedding = EmbeddingView(ds, selection)
        self.relevancy = RelevancyView(ds, selection, live=live)
        self.comparison = HeadComparison(ds, selection)
        self.export = ExportPanel(ds, selection)
        self.answer = AnswerView(ds, selection)
        self.reliance = RelianceView(ds, selection)
        self.counterfactual = CounterfactualView(ds, selection, live=live, store=store, on_added=on_added)
        self.causal = CausalView(ds, selection, live=live, store=store)
        self._summary = pn.pane.Markdown(self.summary(), sizing_mode="stretch_width")

    @property
    def views(self) -> list[View]:
        """Every view of the dashboard."""
        return [
            self.examples,
            self.tokens,
            self.head_summary,
            self.attention,
            self.image,
            self.text,
            self.embedding,
            self.relevancy,
            self.comparison,
            self.export,
            self.answer,
            self.reliance,
            self.counterfactual,
            self.causal,
        ]

    def dataset_changed(self) -> None:
        """Give every view the new dataset, in one document change; the selection keeps what still fits."""
        if not hasattr(self, "export"):  # during construction
            return
        with hold():
            self.selection.adopt(self.ds)
            self.selection.tokens = valid_tokens(self.ds, self.selection.example, self.selection.tokens)
            for view in self.views:
                if view.ds is not self.ds:  # a view shown the grown store first (the counterfactual's) is not redrawn
                    view.ds = self.ds
            self._summary.object = self.summary()

    def show_store(self, ds: xr.Dataset, example: str | None = None) -> None:
        """Show ``ds`` (a grown store), then select ``example`` if given.

        The same store shown again (the store poll may have shown it first) redraws nothing.
        """
        if ds is not self.ds:
            self.ds = ds
        if example is not None:
            self.selection.select(example=example, tokens=default_tokens(ds, example))

    def url_state(self) -> list[tuple[param.Parameterized, dict[str, str]]]:
        """The views' own state kept in the page URL beside the selection: the generated token and its map, the edit
        compared."""
        state: list[tuple[param.Parameterized, dict[str, str]]] = []
        if self.ds.vli.has_answers:
            state.append((self.answer, ANSWER_URL_PARAMETERS))
        if self.live is not None or "counterfactual_of" in self.ds:
            state.append((self.counterfactual, {"edited": "edited"}))
        return state

    def summary(self) -> str:
        """One line naming the model and the store's sizes."""
        ds = self.ds
        return (
            f"**{ds.attrs.get('model_name', '?')}** · {ds.sizes['example']} examples · "
            f"{ds.sizes['layer']} layers × {ds.sizes['head']} heads · up to {ds.sizes['token']} tokens"
        )

    def sidebar(self) -> list[pn.viewable.Viewable | pn.viewable.Viewer]:
        """The controls: the example browser, token and head pickers, export."""
        return [self._summary, self.examples, self.tokens, self.export]

    def main(self) -> pn.viewable.Viewable:
        """The views, in tabs rendered when first opened."""
        # One screen at 1600 x 1000: which head (summary), where on the image, the matrix, then the
        # text; narrower windows wrap the views into more rows instead of clipping them.
        views = pn.FlexBox(
            self.head_summary,
            self.image,
            self.attention,
            self.text,
            self.attention.mean_view(),
            flex_wrap="wrap",
            gap="4px 16px",
            sizing_mode="stretch_width",
        )
        attention = pn.Column(message_banner(self.selection), views, sizing_mode="stretch_width")
        answer = [("Answer", self.answer), ("Reliance", self.reliance)] if self.ds.vli.has_answers else []
        edits = self.live is not None or "counterfactual_of" in self.ds
        return pn.Tabs(
            *answer,
            ("Attention", attention),
            ("Embeddings", self.embedding),
            ("Relevancy", self.relevancy),
            ("Compare heads", self.comparison),
            *([("Counterfactual", self.counterfactual)] if edits else []),
            *([("Causal", self.causal)] if self.live is not None or has_causal(self.ds) else []),
            dynamic=True,
            sizing_mode="stretch_width",
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Row(sidebar_column(self.sidebar()), self.main())


class AnswerDashboard(View):
    """The page for a store of generated answers without full maps: the example browser and the answer view."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self.examples = ExampleBrowser(ds, self.selection)
        self.answer = AnswerView(ds, self.selection)
        self.reliance = RelianceView(ds, self.selection)
        self._summary = pn.pane.Markdown(self.summary(), sizing_mode="stretch_width")

    def dataset_changed(self) -> None:
        """Give both views the new dataset."""
        if not hasattr(self, "answer"):
            return
        with hold():
            self.selection.adopt(self.ds)
            self.examples.ds = self.ds
            self.answer.ds = self.ds
            self.reliance.ds = self.ds
            self._summary.object = self.summary()

    def url_state(self) -> list[tuple[param.Parameterized, dict[str, str]]]:
        """The generated token shown and its map, kept in the page URL beside the selection."""
        return [(self.answer, ANSWER_URL_PARAMETERS)]

    def summary(self) -> str:
        """One line naming the model, the store's sizes and that only answer rows are stored."""
        ds = self.ds
        return (
            f"**{ds.attrs.get('model_name', '?')}** · {ds.sizes['example']} examples · generated answers "
            f"(attention rows of {ds.sizes.get('layer', 0)} layers × {ds.sizes.get('head', 0)} heads; the "
            "attention views need a store extracted with `--rows all`)"
        )

    def sidebar(self) -> list[pn.viewable.Viewable | pn.viewable.Viewer]:
        """The store summary and the example browser."""
        return [self._summary, self.examples]

    def main(self) -> pn.viewable.Viewable:
        """The answer view and the dataset's modality reliance, in tabs."""
        tabs = pn.Tabs(("Answer", self.answer), ("Reliance", self.reliance), dynamic=True, sizing_mode="stretch_width")
        return pn.Column(message_banner(self.selection), tabs, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Row(sidebar_column(self.sidebar()), self.main())


def sidebar_column(items: list[pn.viewable.Viewable | pn.viewable.Viewer]) -> pn.Column:
    """The controls beside the views when a dashboard is shown alone (a notebook), at the template's sidebar width.

    It does not shrink: in a notebook's narrower output the row shrank it under its widgets, which then ran
    under the views beside it.
    """
    return pn.Column(*items, width=SIDEBAR_WIDTH - 10, styles={"flex-shrink": "0"}, margin=(5, 15, 5, 5))
