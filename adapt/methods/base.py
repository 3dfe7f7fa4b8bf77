"""What a method file declares: its paper, its composition and a table of facts, each a setting with its value and
the reference it comes from (a file and line of the released code, or an equation, section or table of the paper).

A method's preset is its facts: ``preset(dataset, backbone, form)`` collects the settings of the facts that apply
(``when``: a dataset or a backbone).  ``form="paper"`` lays the facts marked ``paper`` over the code's, where the
paper and its released code disagree; the code's form is the default (it produced the published numbers).
Facts with no setting record what the reference does that needs no setting, or why a frozen-feature run differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

FORMS = ("code", "paper")


@dataclass(frozen=True)
class Fact:
    setting: Optional[str]           # a TrainConfig field, or None for a fact that is not a setting
    value: Any
    source: str                      # "repo file:line" or "paper eq. N / sec. N / Table N"
    when: dict = field(default_factory=dict)  # {"dataset": "epic100"} / {"backbone": "tbn"}: where it applies
    form: str = "code"               # "code" or "paper"

    def applies(self, dataset: str, backbone: str, form: str) -> bool:
        if self.setting is None:
            return False
        if self.form != "code" and self.form != form:
            return False
        return all({"dataset": dataset, "backbone": backbone}[k] in (v if isinstance(v, tuple) else (v,))
                   for k, v in self.when.items())


@dataclass(frozen=True)
class Method:
    name: str
    title: str                       # the paper, short
    citation: str
    composition: str                 # one line for the README table
    facts: tuple = ()
    differences: tuple = ()          # where a frozen-feature run differs from the reference, and why
    base: tuple = ()                 # facts inherited from another file (a dataset base), listed for the table

    def preset(self, dataset: str, backbone: str, form: str = "code") -> dict:
        out: dict = {}
        for f in (*self.base, *self.facts):
            if f.form == "code" and f.applies(dataset, backbone, form):
                out[f.setting] = f.value
        if form != "code":
            for f in self.facts:
                if f.form == form and f.applies(dataset, backbone, form):
                    out[f.setting] = f.value
        return out

    def table(self) -> str:
        """The facts as a Markdown table (``adapt methods --facts NAME``)."""
        rows = ["| setting | value | where | source |", "|---|---|---|---|"]
        for f in (*self.base, *self.facts):
            where = ", ".join(f"{k} {'/'.join(v) if isinstance(v, tuple) else v}" for k, v in f.when.items())
            if f.form != "code":
                where = (where + ", " if where else "") + f"form={f.form}"
            rows.append(f"| {f.setting or '-'} | {f.value} | {where or 'always'} | {f.source} |")
        return "\n".join(rows)


def facts(*rows, **common) -> tuple:
    """``facts(("w_adv", 1.0, "model.py:642"), ..., when={...})``: Fact rows with shared keyword fields."""
    out = []
    for r in rows:
        if isinstance(r, Fact):
            out.append(r)
        else:
            setting, value, source, *rest = r
            kw = dict(common)
            if rest:
                kw.update(rest[0])
            out.append(Fact(setting, value, source, **kw))
    return tuple(out)
