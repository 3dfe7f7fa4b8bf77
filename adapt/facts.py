"""A preset as facts: each setting of a method's (or a dataset base's) preset with its value and the reference it
comes from (a released code's file:line, a paper's equation, section or table), where it applies (a dataset, a
backbone) and in which form (the released code's, or the paper's where they differ).  ``adapt methods NAME``
prints them; :func:`adapt.config.resolve` applies them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

FORMS = ("code", "paper")


@dataclass(frozen=True)
class Fact:
    """A setting of a preset with its value and the reference it comes from (a released code's file:line, or a
    paper's equation, section or table); ``setting`` None records what the reference does that needs no setting."""

    setting: Optional[str]
    value: Any
    source: str
    when: dict = field(default_factory=dict)  # {"dataset": "epic100"} / {"backbone": "tbn"}: where it applies
    form: str = "code"               # "code", or "paper" where the paper and its released code differ
    base: bool = False               # a dataset base's row (adapt/datasets.py): skipped by a method without the setting

    def applies(self, dataset: str, backbone: str, form: str) -> bool:
        if self.setting is None or (self.form != "code" and self.form != form):
            return False
        return all({"dataset": dataset, "backbone": backbone}[k] in (v if isinstance(v, tuple) else (v,))
                   for k, v in self.when.items())


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


def applying(rows: tuple, dataset: str, backbone: str, form: str = "code") -> list:
    """The facts of ``rows`` that apply, in the order they act: the code's form, then (``form="paper"``) the
    paper's over it; a later row of a setting wins."""
    code = [f for f in rows if f.form == "code" and f.applies(dataset, backbone, form)]
    return code + ([f for f in rows if f.form == form and f.applies(dataset, backbone, form)] if form != "code" else [])


def preset(rows: tuple, dataset: str, backbone: str, form: str = "code") -> dict:
    """The settings of the facts that apply (:func:`applying`) and their values."""
    return {f.setting: f.value for f in applying(rows, dataset, backbone, form)}


def where(rows: tuple, **when) -> tuple:
    """A preset's facts restricted to ``when`` (CIA's "TA3N + the modules" on TBN: ``where(TA3N.facts,
    backbone="tbn")``), rows that record no setting left out."""
    return tuple(dataclasses.replace(f, when=dict(when)) for f in rows if f.setting)


def facts_table(rows: tuple) -> str:
    rows_md = ["| setting | value | where | source |", "|---|---|---|---|"]
    for f in rows:
        where = ", ".join(f"{k} {'/'.join(v) if isinstance(v, tuple) else v}" for k, v in f.when.items())
        if f.form != "code":
            where = (where + ", " if where else "") + f"form={f.form}"
        rows_md.append(f"| {f.setting or '-'} | {f.value} | {where or 'always'} | {f.source} |")
    return "\n".join(rows_md)
