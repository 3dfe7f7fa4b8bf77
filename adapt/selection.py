"""Model selection from validators (``adapt report --select``): which checkpoint and which grid point each
validator prefers, the target accuracy there, and how far that is from the oracle's choice.

For one method and domain pair the sweep has runs at grid points ``g`` (their tags) and seeds ``s``, each
evaluated at steps ``t``.  A validator ``V`` (:mod:`adapt.validators`; higher is better) selects

* in each run, the checkpoint ``t*(g, s) = argmax_t V(g, s, t)`` (the first on ties);
* the grid point ``g* = argmax_g mean_s V(g, s, t*(g, s))``;

and the selected accuracy is ``mean_s acc(g*, s, t*(g*, s))``, the target top-1 there.  The **oracle** is the same
selection with the target accuracy as its own validator (what tuning on the target test gives), and **last-9** is
the best grid point's mean over seeds of MM-SADA's protocol figure (``target_top1``: the mean of the last 9
evaluations), what a paper tuned on the target test reports.  **Gap** = oracle - selected.  The rank correlation is
Spearman's rho between ``V`` and the target accuracy over every (run, step) of the method and pair, and over the
whole sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapt.results import pair_of
from adapt.validators import NAMES
from featstore.errors import UserError

ORACLE = "oracle"


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (ties take their mean rank); None with fewer than 3 points or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties: the mean of their ranks
        same = x == v
        ranks[same] = ranks[same].mean()
    return ranks


def curves(row: dict, name: str) -> tuple[list, list, list] | None:
    """(steps, validator values, target accuracies) of one run, or None when it has no such validator."""
    acc = row.get("target_top1_per_eval") or []
    steps = row.get("eval_steps") or []
    if name == ORACLE:
        return steps, acc, acc
    values = (row.get("validators_per_eval") or {}).get(name)
    if not values or len(values) != len(acc):
        return None
    return steps, [np.nan if v is None else float(v) for v in values], acc


def collapsed_at(row: dict) -> list[bool]:
    """Per evaluation of a run, whether its predictions had collapsed there (a checkpoint no rule may choose)."""
    flags = row.get("collapsed_per_eval")
    n = len(row.get("eval_steps") or [])
    if flags and len(flags) == n:
        return [bool(f) for f in flags]
    steps = set((row.get("collapse") or {}).get("steps") or [])
    return [s in steps for s in row.get("eval_steps") or []]


@dataclass
class Selection:
    method: str
    pair: str
    validator: str
    tag: str            # the grid point chosen ('' = the base settings)
    steps: list         # the checkpoint chosen in each seed's run
    selected: float     # target top-1 there, mean over seeds
    oracle: float
    last9: float
    rho: float | None
    seeds: int
    passed_over: int = 0  # collapsed checkpoints the rule was not allowed to choose; -1: all had collapsed

    @property
    def collapsed_note(self) -> str:
        return ("every checkpoint collapsed: chosen among them (invalid)" if self.passed_over < 0 else
                str(self.passed_over))

    @property
    def gap(self) -> float:
        return self.oracle - self.selected


def check_name(name: str, where: str = "--select") -> None:
    """Refuse, before any work, a name that is neither a validator nor the oracle (nor ``all`` where allowed)."""
    if name not in (ORACLE, "all", *NAMES):
        raise UserError(f"{where} {name}: not a validator; one of {', '.join(NAMES)}, {ORACLE} or all")


def choose(runs: list, name: str, passed: list | None = None) -> tuple[str, list, float] | None:
    """(grid point, checkpoint steps, mean target accuracy there) that validator ``name`` selects among ``runs``
    (final.json rows of one method and pair).  A checkpoint whose predictions had collapsed is not chosen (an
    entropy-like validator prefers them) while any other is there: a run with no other checkpoint drops out, and
    a grid point whose runs all dropped out too.  ``passed`` receives how many collapsed checkpoints were passed
    over, or -1 when every checkpoint had collapsed and the choice is among them (said by the callers)."""
    def pick(skip_collapsed: bool):
        by_tag: dict = {}
        skipped = 0
        for r in runs:
            c = curves(r, name)
            if c is None:
                return None, 0
            steps, values, acc = c
            v = np.asarray(values, dtype=np.float64)
            if not len(v) or not np.isfinite(v).any():
                return None, 0
            if skip_collapsed:
                bad = np.asarray(collapsed_at(r), dtype=bool)
                skipped += int(bad.sum())
                v = np.where(bad, np.nan, v)
                if not np.isfinite(v).any():
                    continue
            i = int(np.nanargmax(v))
            by_tag.setdefault(r.get("tag") or "", []).append((float(v[i]), steps[i], float(acc[i])))
        return by_tag, skipped
    by_tag, skipped = pick(True)
    if by_tag == {}:  # every checkpoint collapsed: chosen among them, and said
        by_tag, skipped = pick(False)
        skipped = -1 if by_tag else skipped
    if passed is not None:
        passed.append(skipped)
    if not by_tag:
        return None
    tag = max(by_tag, key=lambda t: (np.mean([x[0] for x in by_tag[t]]), t == ""))
    picks = by_tag[tag]
    return tag, [p[1] for p in picks], float(np.mean([p[2] for p in picks]))


def select(rows: list[dict], names: list[str] | None = None) -> list[Selection]:
    """The selections of every validator in ``names`` (default: all that the runs carry) for every method and
    pair of ``rows``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("method", "?"), pair_of(r)), []).append(r)
    names = names or available(rows)
    out = []
    for (method, pair), runs in groups.items():
        oracle = choose(runs, ORACLE)
        if oracle is None:
            continue
        by_tag: dict = {}
        for r in runs:
            by_tag.setdefault(r.get("tag") or "", []).append(float(r.get("target_top1", np.nan)))
        last9 = max(float(np.mean(v)) for v in by_tag.values())
        for name in names:
            passed: list = []
            chosen = choose(runs, name, passed)
            if chosen is None:
                continue
            out.append(Selection(method, pair, name, chosen[0], chosen[1], chosen[2], oracle[2], last9,
                                 spearman(*points(runs, name)), len(runs), passed[0]))
    return out


def available(rows: list[dict]) -> list[str]:
    """The validators every given run carries, in :data:`adapt.validators.NAMES` order."""
    have = None
    for r in rows:
        names = set((r.get("validators_per_eval") or {}).keys())
        have = names if have is None else have & names
    return [n for n in NAMES if n in (have or set())]


def points(rows: list[dict], name: str) -> tuple[list, list]:
    """(validator values, target accuracies) at every (run, step) of ``rows`` that carry validator ``name``."""
    xs, ys = [], []
    for r in rows:
        c = curves(r, name)
        if c is not None:
            xs += list(c[1])
            ys += list(c[2])
    return xs, ys


def overall_rho(rows: list[dict], name: str) -> float | None:
    """Spearman's rho between validator ``name`` and the target accuracy over every (run, step) of ``rows``."""
    return spearman(*points(rows, name))
