"""Reading the runs' results (final.json, metrics.jsonl, results.jsonl) and naming them: the one place the report,
the plots and the sweep take runs, their domain pairs and their row labels from."""

from __future__ import annotations

import json
import math
from pathlib import Path

from featstore.errors import UserError


def read_final(path: Path) -> dict | None:
    """A run's final.json, or None when it is cut or not JSON (the run then counts as not complete)."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) else None


def invalid_marks(final: dict) -> list:
    """Why a run's number is not a result to publish: ``collapsed`` (its predictions collapsed), ``overlap`` (its
    target or evaluation store shares clips with its source, allowed by ``allow_overlap``)."""
    return [why for why, flag in (("collapsed", final.get("collapse")), ("overlap", final.get("overlap"))) if flag]


def collect(paths: list, skipped: list | None = None) -> list[dict]:
    """Rows (final.json dicts with ``run_dir``) from run folders, folders of run folders (searched recursively)
    and results.jsonl files; a folder without any final.json falls back to its results.jsonl.  A run folder left
    out is appended to ``skipped`` as (folder, why): its final.json is cut, or it has none (a run training now, or
    one that stopped: a ``.partial`` folder)."""
    rows, seen = [], set()
    skipped = [] if skipped is None else skipped

    def add(row, run_dir):
        key = str(Path(run_dir).resolve()) if run_dir else json.dumps(row, sort_keys=True)
        if key in seen:
            return
        seen.add(key)
        why = unreadable(row, Path(run_dir) if run_dir else None)
        if why:
            skipped.append((str(run_dir or row.get("run", "?")), why))
            return
        rows.append({**row, "run_dir": str(run_dir) if run_dir else ""})

    for p in paths:
        p = Path(p)
        if p.is_file():
            for row in read_jsonl(p):
                add(row, p.parent / row["run"] if row.get("run") else "")
        elif found := ([p / "final.json"] if (p / "final.json").is_file() else
                       sorted(p.rglob("final.json")) if p.is_dir() else []):
            for f in (f for f in found if not f.parent.name.endswith((".partial", ".replaced"))):
                row = read_final(f)
                if row is None:
                    skipped.append((str(f.parent), "final.json cut or unreadable"))
                else:
                    add(row, f.parent)
            for c in sorted(p.rglob("config.json")):
                if not (c.parent / "final.json").is_file() and not c.parent.name.endswith(".replaced"):
                    skipped.append((str(c.parent), "not complete (training now, or stopped before its end)"))
        elif p.is_dir():
            if (p / "results.jsonl").is_file():
                for row in read_jsonl(p / "results.jsonl"):
                    add(row, p / row["run"] if row.get("run") else "")
            else:
                raise UserError(f"{p}: no runs (no final.json below it and no results.jsonl)")
        else:
            raise UserError(f"{p}: no such run folder or results file")
    return rows


EPIC_KEYS = ("verb_top1", "noun_top1", "action_top1", "verb_top5", "noun_top5", "action_top5")


def unreadable(row: dict, run_dir: Path | None) -> str | None:
    """Why a run's results cannot be reported (a run left out, said, never a traceback), or None."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not number(row.get("target_top1")):
        return "final.json has no target_top1"
    if "action_top1" in row or "verb_top1" in row:
        lacking = [k for k in EPIC_KEYS if not number(row.get(k))]
        if lacking:
            return f"final.json has no {lacking[0]}"
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        try:
            read_jsonl(run_dir / "metrics.jsonl")
        except UserError:
            return "metrics.jsonl cut or damaged"
    return None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (results.jsonl, metrics.jsonl); a bad line is one error naming its number."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n} is not JSON ({e.msg} at column {e.colno}); the file is cut or "
                            f"damaged") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {n} is not a JSON object")
        rows.append(row)
    return rows


def mean_std(values: list[float], std: str = "sample") -> tuple[float, float | None]:
    """(mean, std) of seeds' values; std is the sample std (ddof 1; None for one value) or the population std."""
    if std not in ("sample", "population"):
        raise UserError(f"--std {std}: one of sample, population")
    n = len(values)
    if n == 0:
        return float("nan"), None
    m = math.fsum(values) / n
    ddof = 1 if std == "sample" else 0
    if n - ddof <= 0:
        return m, None
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - ddof))


def pair_label(source: str, target: str) -> str:
    """``D2→D1``; store paths by their names without ``.zarr`` and ``_train``."""
    def short(s):
        stem = Path(str(s)).stem if str(s).endswith(".zarr") else Path(str(s)).name
        return stem.removesuffix("_train")
    return f"{short(source)}→{short(target)}"


def pair_of(row: dict) -> str:
    return row.get("pair") or pair_label(row.get("source", "?"), row.get("target", "?"))


def pair_order(label: str):
    s, _, t = label.partition("→")
    return (t, s)


def row_label(row: dict, backbones: int) -> str:
    label = row.get("method", "?") + (f" [{row['tag']}]" if row.get("tag") else "")
    return label + (f" ({row.get('backbone')})" if backbones > 1 else "")


def row_order(rows: list[dict], backbones: int) -> list[str]:
    from adapt.methods import REGISTRY
    order = list(REGISTRY)
    first = {}
    for i, r in enumerate(rows):
        rank = order.index(r["method"]) if r.get("method") in order else len(order)
        first.setdefault(row_label(r, backbones), (rank, bool(r.get("tag")), i))  # method, untagged first, seen
    return sorted(first, key=lambda k: first[k])
