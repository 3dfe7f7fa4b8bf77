"""The built-in methods: one file each (its paper, its facts, its heads, its terms; :mod:`adapt.method` is the
contract).  ``REGISTRY`` maps the ``--method`` names to their classes, in the order of the papers' tables; a
method of your own is given by its file or module instead (``--method path/to/my_method.py``)."""

from adapt.methods.adabn import AdaBN
from adapt.methods.cdan import CDAN, CDANE
from adapt.methods.cia import CIA
from adapt.methods.contrastive import Contrastive
from adapt.methods.dann import DANN
from adapt.methods.m3em import M3EM
from adapt.methods.mcd import MCD
from adapt.methods.mmd import MMD
from adapt.methods.mmsada import MMSADA
from adapt.methods.pseudo_label import PseudoLabel
from adapt.methods.shot import SHOT
from adapt.methods.source_only import SourceOnly
from adapt.methods.ta3n import TA3N
from adapt.methods.target_only import TargetOnly

REGISTRY: dict = {m.name: m for m in (
    SourceOnly, TargetOnly, AdaBN, MMD, MCD, DANN, CDAN, CDANE, PseudoLabel, SHOT, MMSADA, Contrastive, TA3N, M3EM, CIA)}

__all__ = ["REGISTRY", "markdown_table"]


def markdown_table() -> str:
    """The README's method table."""
    rows = ["| method | paper | composition (the preset) |", "|---|---|---|"]
    for m in REGISTRY.values():
        rows.append(f"| `{m.name}` | {m.title} | {m.composition} |")
    return "\n".join(rows)
