"""Example browser: search the text, filter by label, prediction and correctness, step through examples."""

from __future__ import annotations

import pandas as pd
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.accessor import CORRECT_NAMES
from vlinterpret_panel.ui.common import SIDEBAR_CONTROL_WIDTH, heading
from vlinterpret_panel.ui.selection import Selection, valid_tokens
from vlinterpret_panel.ui.view import View

ANY = "any"


class ExampleBrowser(View):
    """Find examples by text, label, prediction and correctness; the chosen one sets ``selection.example``."""

    search = param.String(default="", doc="words the example text must contain")
    label: str = param.Selector(  # type: ignore[assignment]
        default=ANY, objects=[ANY]
    )
    prediction: str = param.Selector(  # type: ignore[assignment]
        default=ANY, objects=[ANY]
    )
    correct: str = param.Selector(  # type: ignore[assignment]
        default=ANY, objects=[ANY, *CORRECT_NAMES.values()]
    )

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        selection = self.selection
        self._table = ds.vli.example_table()
        # Stretched to its column: Panel's default 300 px ran under the views beside a 270 px column in a notebook.
        self._choice = pn.widgets.Select(
            label="example", options=self._options(self._table), size=8, sizing_mode="stretch_width"
        )
        self._choice.value = selection.example
        self._choice.param.watch(self._chosen, "value")
        self._previous = pn.widgets.Button(label="◀ previous", width=90)
        self._next = pn.widgets.Button(label="next ▶", width=90)
        self._previous.on_click(lambda event: self.step(-1))
        self._next.on_click(lambda event: self.step(+1))
        self._count = pn.pane.Markdown("")
        self._details = pn.pane.Markdown("", sizing_mode="stretch_width")
        self._edits = pn.widgets.Select(
            label="counterfactuals of this example", options={}, visible=False, sizing_mode="stretch_width"
        )
        self._edits.param.watch(self._chosen, "value")
        self.param.watch(self._filter, ["search", "label", "prediction", "correct"])
        selection.param.watch(self._show_example, "example")
        self.dataset_changed()

    def dataset_changed(self) -> None:
        self._table = self.ds.vli.example_table()
        for name in ("label", "prediction"):
            if name in self._table:
                self.param[name].objects = [ANY, *sorted(self._table[name].unique())]
        self._filter()
        self._show_example()

    @staticmethod
    def _options(table: pd.DataFrame) -> dict[str, str]:
        return {f"{example}: {row.text[:48]}": example for example, row in table.iterrows()}

    def matching(self) -> pd.DataFrame:
        """The rows of the example table that pass the current search and filters."""
        table = self._table
        keep = pd.Series(True, index=table.index)
        for word in self.search.lower().split():
            keep &= table["text"].str.lower().str.contains(word, regex=False)
        for name in ("label", "prediction", "correct"):
            value = getattr(self, name)
            if value != ANY and name in table:
                keep &= table[name] == value
        return table[keep]

    def _filter(self, *events: param.parameterized.Event) -> None:
        matching = self.matching()
        self._choice.options = self._options(matching)
        self._count.object = f"{len(matching)} of {len(self._table)} examples"
        self.selection.subset = list(matching.index)
        if len(matching) and self.selection.example not in matching.index:
            self.selection.example = matching.index[0]

    def step(self, offset: int) -> None:
        """Move to the next (or previous) matching example, wrapping around."""
        ids = list(self.matching().index)
        if not ids:
            return
        position = ids.index(self.selection.example) if self.selection.example in ids else -offset
        self.selection.select(example=ids[(position + offset) % len(ids)])

    def _chosen(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.selection.example:
            self.selection.select(example=event.new)

    def _show_example(self, *events: param.parameterized.Event) -> None:
        example = self.selection.example
        if self._choice.value != example and example in self._choice.options.values():
            self._choice.value = example
        if events:  # keep the token positions the new example has (a shared link sets both at once)
            self.selection.select(tokens=valid_tokens(self.ds, example, self.selection.tokens))
        if example not in self._table.index:
            return
        row = self._table.loc[example]
        facts = [f"**{example}**", f"*{row.text}*"]
        facts += [f"{name}: **{row[name]}**" for name in ("label", "prediction", "correct") if row.get(name, "")]
        origin = self.ds.vli.origin(example)
        if origin is not None:
            edit = self.ds.vli.edit(example)
            facts.append(f"counterfactual of **{origin}**" + (f": {edit.describe()}" if edit is not None else ""))
        self._details.object = "  \n".join(facts)
        edits = self.ds.vli.counterfactuals(example)
        self._edits.param.update(
            options={"": "", **{f"{e}: {self._table.loc[e, 'text'][:40]}": e for e in edits}},
            value="",
            label=f"counterfactuals of this example ({len(edits)})",
            visible=bool(edits),
        )

    def __panel__(self) -> pn.viewable.Viewable:
        filters: list[pn.widgets.Widget] = [
            pn.widgets.TextInput.from_param(
                self.param.search, placeholder="search the text", width=SIDEBAR_CONTROL_WIDTH
            )
        ]
        filters += [
            pn.widgets.Select.from_param(self.param[name], width=140)
            for name in ("label", "prediction", "correct")
            if name in self._table
        ]
        return pn.Column(
            heading("Examples"),
            *filters,
            self._count,
            self._choice,
            pn.Row(self._previous, self._next),
            self._details,
            self._edits,
            sizing_mode="stretch_width",
        )
