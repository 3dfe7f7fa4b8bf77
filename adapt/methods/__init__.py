"""The methods: one file each (its paper, its preset as a table of facts with their references, and where a
frozen-feature run differs).  ``REGISTRY`` maps the ``--method`` names to them, in the order of the papers'
tables."""

from adapt.methods import (adabn, cia, contrastive, dann, m3em, mcd, mmd, mmsada, pseudo_label, source_only, ta3n,
                           target_only)
from adapt.methods.base import FORMS, Fact, Method

REGISTRY: dict = {m.METHOD.name: m.METHOD for m in (
    source_only, target_only, adabn, mmd, mcd, dann, pseudo_label, mmsada, contrastive, ta3n, m3em, cia)}

__all__ = ["REGISTRY", "FORMS", "Fact", "Method", "markdown_table"]


def markdown_table() -> str:
    """The README's method table."""
    rows = ["| method | paper | composition (the preset) |", "|---|---|---|"]
    for m in REGISTRY.values():
        rows.append(f"| `{m.name}` | {m.title} | {m.composition} |")
    return "\n".join(rows)
