"""Result tables in the papers' form, from run folders, sweep folders or ``results.jsonl`` files.

* Domain-pair table (MM-SADA Table 1): one row per method, or per ablation setting (method + tag); one column per
  domain pair (``D2→D1``), ordered by target then source as in the papers, and a ``mean`` column; a cell is the
  mean ± standard deviation over seeds of ``target_top1`` (or ``--metric``).
* EPIC-100 table (TA3N / M3EM): runs with verb and noun heads get columns verb / noun / action top-1 (top-5 with
  ``--metric top5``), mean ± std over seeds.

Arithmetic (tested exactly in tests/test_report.py):

* cell mean = arithmetic mean of the seeds' values;
* cell std = the **sample** standard deviation over seeds (ddof = 1, divides by n - 1); ``std="population"``
  (ddof = 0) is the alternative; one seed has no sample std (the cell shows the mean alone);
* ``mean`` column = mean over the domain pairs of the per-pair means (each pair weighs the same, whatever its
  number of seeds); shown only for rows that have every pair of the table.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapt.results import collect, invalid_marks, mean_std, pair_of, pair_order, row_label, row_order
from featstore.errors import UserError

EPIC_KEYS = {"top1": ("verb_top1", "noun_top1", "action_top1"), "top5": ("verb_top5", "noun_top5", "action_top5")}


# ------------------------------------------------------------------------------------------------------------
# arithmetic


def _value(row: dict, metric: str) -> float | None:
    v = row
    for part in metric.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass
class Cell:
    mean: float
    std: float | None
    n: int
    values: list = field(default_factory=list)
    invalid: int = 0                 # runs of the cell marked invalid (collapsed, overlapping stores)
    codes: int = 1                   # distinct code fingerprints of its runs (more than one: mixed code)

    def text(self, digits: int = 2) -> str:
        if self.n == 0 or self.mean != self.mean:
            return "–"
        return (f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else "")
                + self.marks())

    def marks(self) -> str:
        """What the reader must know about the cell's number, in words."""
        out = f" ({self.invalid}/{self.n} invalid)" if self.invalid else ""
        return out + (" (mixed code)" if self.codes > 1 else "")


def _cell(rows: list, values: list, std: str) -> Cell:
    """A cell of ``rows`` (its runs) and their ``values``, with its marks."""
    from adapt.provenance import code_key
    return Cell(*mean_std(values, std), len(values), values, sum(bool(invalid_marks(r)) for r in rows),
                len({code_key(r.get("provenance")) for r in rows}))


@dataclass
class ResultTable:
    title: str
    columns: list                    # column labels (pairs, or verb / noun / action)
    rows: list                       # [(label, {column: Cell}, mean or None)]
    mean_column: bool
    metric: str
    std: str
    meta: dict = field(default_factory=dict)  # row label -> (method, tag, backbone)

    def row(self, label: str):
        for r in self.rows:
            if r[0] == label:
                return r
        raise KeyError(label)


def build_tables(rows: list[dict], metric: str = "target_top1", std: str = "sample") -> list[ResultTable]:
    """The domain-pair table of the runs without noun heads and the EPIC-100 table of those with them."""
    backbones = len({r.get("backbone") for r in rows})
    meta = {row_label(r, backbones): (r.get("method", "?"), r.get("tag") or "", r.get("backbone") or "")
            for r in rows}
    epic = [r for r in rows if "action_top1" in r]
    plain = [r for r in rows if "action_top1" not in r]
    tables = []
    if plain:
        pairs = sorted({pair_of(r) for r in plain}, key=pair_order)
        cells: dict = {}
        for r in plain:
            v = _value(r, metric)
            if v is None:
                raise UserError(f"{r.get('run_dir') or r.get('run')}: no numeric {metric!r} in final.json")
            cells.setdefault(row_label(r, backbones), {}).setdefault(pair_of(r), []).append((r, v))
        out_rows = []
        for label in row_order(plain, backbones):
            row_cells = {p: _cell([r for r, _ in rv], [v for _, v in rv], std) for p, rv in cells[label].items()}
            mean = (math.fsum(row_cells[p].mean for p in pairs) / len(pairs)
                    if all(p in row_cells for p in pairs) else None)
            out_rows.append((label, row_cells, mean))
        tables.append(ResultTable(f"{metric} (%), mean ± {std} std over seeds", pairs, out_rows,
                                  len(pairs) > 1, metric, std, meta))
    if epic:
        keys = EPIC_KEYS["top5" if metric.endswith("top5") else "top1"]
        pairs = sorted({pair_of(r) for r in epic}, key=pair_order)
        names = {k: k.split("_")[0] for k in keys}
        columns = [names[k] if len(pairs) == 1 else f"{p} {names[k]}" for p in pairs for k in keys]
        cells = {}
        for r in epic:
            for k in keys:
                col = names[k] if len(pairs) == 1 else f"{pair_of(r)} {names[k]}"
                cells.setdefault(row_label(r, backbones), {}).setdefault(col, []).append((r, float(r[k])))
        out_rows = [(label, {c: _cell([r for r, _ in rv], [v for _, v in rv], std) for c, rv in cells[label].items()},
                     None) for label in row_order(epic, backbones)]
        tables.append(ResultTable(f"EPIC-100 target {keys[0].split('_')[1]} (%), mean ± {std} std over seeds",
                                  columns, out_rows, False, ",".join(keys), std, meta))
    return tables


# ------------------------------------------------------------------------------------------------------------
# writing


def to_markdown(t: ResultTable, digits: int = 2) -> str:
    header = ["method", *t.columns] + (["mean"] if t.mean_column else [])
    lines = [f"**{t.title}**", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, cells, mean in t.rows:
        vals = [cells[c].text(digits) if c in cells else "–" for c in t.columns]
        if t.mean_column:
            vals.append(_mean_text(cells, mean, digits))
        lines.append("| " + " | ".join([label, *vals]) + " |")
    return "\n".join(lines) + "\n"


def _mean_text(cells: dict, mean, digits: int) -> str:
    if mean is None:
        return "–"
    bad = sum(c.invalid for c in cells.values())
    return f"{mean:.{digits}f}" + (f" ({bad} invalid runs)" if bad else "")


def to_csv(t: ResultTable) -> str:
    """Machine-readable: the row label, method, tag, backbone, and per column its mean, std (empty for one seed)
    and number of seeds; then the mean column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "method", "tag", "backbone",
                *(f"{c} {s}" for c in t.columns for s in ("mean", "std", "n", "invalid", "mixed_code"))]
               + (["mean"] if t.mean_column else []))
    for label, cells, mean in t.rows:
        vals = []
        for c in t.columns:
            cell = cells.get(c)
            vals += ["", "", 0, 0, ""] if cell is None else [
                repr(cell.mean), "" if cell.std is None else repr(cell.std), cell.n, cell.invalid,
                "yes" if cell.codes > 1 else ""]
        method, tag, backbone = t.meta.get(label, (label, "", ""))
        w.writerow([label, method, tag, backbone, *vals]
                   + ([("" if mean is None else repr(mean))] if t.mean_column else []))
    return buf.getvalue()


def print_table(t: ResultTable, console, digits: int = 2) -> None:
    from rich.markup import escape
    from rich.table import Table
    table = Table(title=escape(t.title))
    table.add_column("method")
    for c in t.columns:
        table.add_column(escape(c), justify="right")
    if t.mean_column:
        table.add_column("mean", justify="right", style="bold")
    for label, cells, mean in t.rows:
        vals = [escape(cells[c].text(digits)) if c in cells else "–" for c in t.columns]
        if t.mean_column:
            vals.append(_mean_text(cells, mean, digits))
        table.add_row(escape(label), *vals)
    console.print(table)


def footer(rows: list[dict]) -> list[str]:
    """What made the numbers (Markdown lines): the code of the runs (package and method digests), the stores
    they read (path and content digests), and the runs marked invalid with why."""
    from adapt.provenance import code_name
    from featstore.identity import short
    codes: dict = {}
    stores: dict = {}
    for r in rows:
        prov = r.get("provenance")
        codes[code_name(prov)] = codes.get(code_name(prov), 0) + 1
        for role, ident in ((prov or {}).get("stores") or {}).items():
            stores.setdefault((role, ident.get("path")), set()).add(short(ident))
    lines = ["## What made these numbers", "", "Code (runs):"]
    lines += [f"- {name} ({n})" for name, n in codes.items()]
    if stores:
        lines += ["", "Stores:"]
        for (role, path), ids in stores.items():
            lines.append(f"- {role} {path}: " + "; ".join(sorted(ids))
                         + (" (its content differs between runs)" if len(ids) > 1 else ""))
    bad = [(r, invalid_marks(r)) for r in rows if invalid_marks(r)]
    if bad:
        lines += ["", "Invalid runs (marked in the tables; their numbers are not results):"]
        for r, why in bad:
            detail = []
            if r.get("collapse"):
                c = r["collapse"]
                detail.append(f"collapsed to {c.get('kind', 'one class')} (class {c.get('class')}) at steps "
                              f"{c.get('steps')}")
            if r.get("overlap"):
                detail.append("shares clips with the source: " + ", ".join(f"{k} {v}" for k, v in
                                                                          r["overlap"].items()))
            lines.append(f"- {r.get('run_dir') or r.get('run')}: " + "; ".join(detail or why))
    return lines


def write_report(paths: list, out: str | Path | None = None, metric: str = "target_top1", std: str = "sample",
                 console=None, plots: bool = True, select: str | None = None) -> dict:
    """Collect the runs, print the tables, write report.md, report.csv (report_epic100.csv for the EPIC-100
    table) and accuracy.png into ``out`` (default: the first folder of ``paths``); returns the written paths."""
    if select is not None:
        from adapt.selection import check_name
        check_name(select)
    skipped: list = []
    rows = collect(paths, skipped)
    if skipped and console is not None:
        for why in sorted({w for _, w in skipped}):
            folders = [f for f, w in skipped if w == why]
            console.print(f"left out {len(folders)} run(s), {why}: " + ", ".join(folders[:3])
                          + (" ..." if len(folders) > 3 else ""), highlight=False)
    if not rows:
        raise UserError("no complete runs (final.json) in " + ", ".join(map(str, paths)))
    first = Path(paths[0])
    out = Path(out) if out else (first.parent if first.is_file() else first)
    writable(out, "the report")
    tables = build_tables(rows, metric, std)
    written = {}
    md = [f"# Results ({len(rows)} runs)\n"]
    for t in tables:
        md.append(to_markdown(t))
        name = "report_epic100.csv" if t.metric.startswith("verb_") and len(tables) > 1 else "report.csv"
        (out / name).write_text(to_csv(t))
        written[name] = out / name
        if console is not None:
            print_table(t, console)
    md.append("\n".join(footer(rows)) + "\n")
    if console is not None:
        bad = sum(bool(invalid_marks(r)) for r in rows)
        if bad:
            console.print(f"[yellow]{bad} of the {len(rows)} runs are invalid[/yellow] (collapsed or sharing clips "
                          f"with the source): marked in the tables, listed in report.md")
    (out / "report.md").write_text("\n".join(md))
    written["report.md"] = out / "report.md"
    if plots:
        from adapt import plots as P
        curve_metric = metric if metric in ("target_top1", "verb_top1", "noun_top1", "action_top1") else "target_top1"
        png = P.plot_accuracy(rows, out / "accuracy.png", metric=curve_metric, std=std)
        if png:
            written["accuracy.png"] = png
    if select:
        written.update(write_selection(rows, select, out, console, plots))
    if console is not None:
        console.print("wrote " + ", ".join(str(p) for p in written.values()))
    return written


def writable(folder: Path, what: str) -> None:
    """Refuse, in one line before anything is written, a folder where ``what`` cannot be written (a colleague's
    read-only runs: write the report elsewhere with --out)."""
    import os
    import tempfile
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{folder}: cannot write {what} there ({e.strerror or e}); give --out a folder you can "
                        f"write") from None


def write_selection(rows: list[dict], select: str, out: Path, console=None, plots: bool = True) -> dict:
    """``--select VALIDATOR`` (or ``all``): per method and pair, the grid point and checkpoints the validator
    chooses, the target top-1 there, the oracle's, the gap, the last-9 figure and Spearman's rho (see
    :mod:`adapt.selection`); selection.md / selection.csv and, with plots, selection.png."""
    from adapt import selection as S
    from adapt.validators import CITATIONS
    have = S.available(rows)
    names = have if select == "all" else [select]
    unknown = [n for n in names if n not in have]
    if unknown or not names:
        raise UserError(f"--select {select}: the runs carry the validators {', '.join(have) or 'none'} (train with "
                        f"validators on; source_val and dev need --set source_holdout=0.1 or source_val=STORE)")
    chosen = S.select(rows, names)
    header = ["validator", "method", "pair", "grid point", "steps", "selected", "oracle", "gap", "last-9", "rho",
              "collapsed checkpoints passed over"]
    lines = []
    for c in chosen:
        lines.append([c.validator, c.method, c.pair, c.tag or "-", " ".join(map(str, c.steps)), f"{c.selected:.2f}",
                      f"{c.oracle:.2f}", f"{c.gap:.2f}", f"{c.last9:.2f}", "-" if c.rho is None else f"{c.rho:.2f}",
                      c.collapsed_note])
    if console is not None and any(c.passed_over for c in chosen):
        over = sum(max(0, c.passed_over) for c in chosen)
        forced = [f"{c.validator} {c.method} {c.pair}" for c in chosen if c.passed_over < 0]
        console.print(f"[yellow]{over} collapsed checkpoints were passed over[/yellow] by the selection rules"
                      + (f"; every checkpoint had collapsed for {', '.join(forced)}: chosen among them, invalid"
                         if forced else "") + " (selection.md)", highlight=False, soft_wrap=True)
    summary = []
    for n in names:
        mine = [c for c in chosen if c.validator == n]
        rho = S.overall_rho(rows, n)
        summary.append([n, f"{np.mean([c.selected for c in mine]):.2f}", f"{np.mean([c.oracle for c in mine]):.2f}",
                        f"{np.mean([c.gap for c in mine]):.2f}", "-" if rho is None else f"{rho:.2f}", CITATIONS[n]])
    sum_header = ["validator", "selected (mean)", "oracle (mean)", "gap (mean)", "rho (all runs and steps)", "paper"]
    written = {}
    md = ["# Model selection without target labels\n", _md_table(sum_header, summary), "",
          _md_table(header, lines), ""]
    (out / "selection.md").write_text("\n".join(md))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(lines)
    (out / "selection.csv").write_text(buf.getvalue())
    written.update({"selection.md": out / "selection.md", "selection.csv": out / "selection.csv"})
    if console is not None:
        from rich.table import Table
        for title, head, body in (("model selection: per method and pair", header, lines),
                                  ("model selection: validators", sum_header[:5], [r[:5] for r in summary])):
            table = Table(title=title)
            for h in head:
                table.add_column(h)
            for r in body:
                table.add_row(*r)
            console.print(table)
    if plots:
        from adapt import plots as P
        png = P.plot_selection(rows, names, out / "selection.png")
        if png:
            written["selection.png"] = png
    return written


def _md_table(header: list, rows: list) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])
