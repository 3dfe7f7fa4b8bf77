"""The Python API, for notebooks and scripts: ``adapt.trainer``, ``adapt.sweeps`` and ``adapt.reports`` take the CLI's
arguments and return the results as objects (tables as pandas DataFrames); a mistake is raised as
:class:`AdaptError`, the one-line error the CLI prints.

    import adapt
    run = adapt.trainer("dann", source="K1", target="K2", features_root="features/demo", steps=150, w_adv=0.5)
    run.top1, run.invalid, run.metrics.tail()          # the number, its marks, the curve (DataFrame)
    res = adapt.sweeps("my_sweep.toml")                 # or a dict with the spec's keys
    res.table                                          # one row per run (DataFrame)
    rep = adapt.reports(["runs/my_sweep"], select="all")
    rep.tables[0], rep.selection                       # the papers' table, the validators' choices
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from featstore.errors import UserError

AdaptError = UserError  # every one-line error of the tool (a setting, a file, a store, a method's mistake)


@dataclass
class RunResult:
    """One trained run: its folder, its ``final.json`` and what a notebook reads first."""

    name: str
    dir: Path
    final: dict

    @property
    def top1(self) -> float:
        return float(self.final["target_top1"])

    @property
    def invalid(self) -> list:
        return list(self.final.get("invalid") or [])

    @property
    def per_modality(self) -> dict:
        return dict(self.final.get("per_modality") or {})

    @property
    def provenance(self) -> dict:
        return dict(self.final.get("provenance") or {})

    @property
    def metrics(self) -> pd.DataFrame:
        """Every evaluation (metrics.jsonl), nested numbers flattened (``per_modality/rgb``, ``loss/adv``)."""
        from adapt.results import read_jsonl
        from adapt.tracking import flatten
        rows = read_jsonl(self.dir / "metrics.jsonl") if (self.dir / "metrics.jsonl").is_file() else []
        return pd.DataFrame([{"step": r["step"], **flatten({k: v for k, v in r.items() if k != "step"})}
                             for r in rows])


@dataclass
class SweepResult:
    runs: list                       # RunResult of every complete run of the spec
    trained: list                    # names trained by this call
    skipped: list                    # names found complete
    failed: list                     # (names, message) of stacks that stopped
    table: pd.DataFrame              # one row per run: method, pair, seed, tag, grid point, numbers, invalid


@dataclass
class Report:
    tables: list                     # DataFrames of the papers' tables (mean, std, n, invalid per cell)
    files: dict                      # name -> path of what was written
    selection: pd.DataFrame | None = None
    skipped: list = field(default_factory=list)


def train(method: str | type = "source_only", source: str = "", target: str = "", *, eval: str | None = None,
          backbone: str | None = None, dataset: str | None = None, steps: int | None = None, seed: int = 0,
          features_root: str = "features", out: str = "runs", device: str = "auto", modalities: list | None = None,
          memory_budget: str | None = None, challenge: str | None = None, overwrite: bool = False,
          log: list | str | None = None, settings: dict | None = None, console=None, progress: bool = False,
          **overrides: Any) -> RunResult:
    """``adapt train``: one run.  ``settings`` (or keyword arguments) are ``--set`` overrides; ``method`` a name, a
    file, ``package.module:Class`` or a Method class."""
    from adapt import config as C
    from adapt import trainer as T
    from featstore.paths import locate
    backbone = backbone or _store_backbone(source) or "i3d"
    _, found, _ = locate(source, "train", backbone, features_root)
    sets = {**(settings or {}), **overrides}
    if log is not None:
        sets["log"] = log.split(",") if isinstance(log, str) else list(log)
    given = dict(backbone=backbone, seed=seed, steps=steps, features_root=features_root, out=out, device=device,
                 eval=eval, challenge=challenge, memory_budget=memory_budget, modalities=modalities or None)
    cfg = C.resolve(method, dataset or found, sets, source=source, target=target, **given)
    final = T.train([cfg], console, progress=progress, overwrite=overwrite)[0]
    name = T.run_name(cfg)
    return RunResult(name, Path(cfg.out) / name, final)


def sweep(spec: dict | str | Path, *, out: str | None = None, max_stack: int | None = None, settings: dict | None = None,
          redo: bool = False, console=None, progress: bool = False) -> SweepResult:
    """``adapt sweep``: a spec (a TOML / YAML file or a dict of its keys) trained, stacked where it pays, resumed
    from its complete runs."""
    from adapt.sweeps import run_sweep
    res = run_sweep(spec, console, max_stack=max_stack, progress=progress, out=out, extra_set=settings or {},
                    redo=redo)
    runs = [RunResult(r["run"], Path(r["run_dir"]), {k: v for k, v in r.items() if k not in ("run", "run_dir")})
            for r in res.rows]
    return SweepResult(runs, res.trained, res.skipped, res.failed, _table(res.rows))


def report(runs: list | str | Path, *, out: str | Path | None = None, metric: str = "target_top1",
           std: str = "sample", select: str | None = None, plots: bool = True, console=None) -> Report:
    """``adapt report``: the papers' tables of run folders, sweep folders or results.jsonl files, written beside
    them (or into ``out``) and returned as DataFrames; ``select``: a validator, or ``all``."""
    from adapt import reports as R
    from adapt.results import collect
    paths = [runs] if isinstance(runs, (str, Path)) else list(runs)
    files = R.write_report(paths, out, metric, std, console, plots=plots, select=select)
    skipped: list = []
    rows = collect(paths, skipped)
    tables = [_cells(t) for t in R.build_tables(rows, metric, std)]
    selection = None
    if select and "selection.csv" in files:
        selection = pd.read_csv(files["selection.csv"])
    return Report(tables, files, selection, skipped)


def _store_backbone(source: str) -> str | None:
    from featstore.paths import store_attrs
    if not (str(source).endswith(".zarr") or Path(str(source)).is_dir()):
        return None
    return store_attrs(source).get("backbone")


def _table(rows: list) -> pd.DataFrame:
    from adapt.results import invalid_marks
    out = []
    for r in rows:
        item = {k: r.get(k) for k in ("run", "method", "pair", "source", "target", "seed", "tag", "target_top1",
                                      "verb_top1", "noun_top1", "action_top1", "final_top1", "steps", "runs_stacked",
                                      "train_seconds") if k in r}
        item.update({f"grid/{k}": v for k, v in (r.get("grid") or {}).items()})
        item.update({f"top1/{m}": v for m, v in (r.get("per_modality") or {}).items()})
        item["invalid"] = "+".join(invalid_marks(r))
        item["run_dir"] = r.get("run_dir")
        out.append(item)
    return pd.DataFrame(out)


def _cells(t) -> pd.DataFrame:
    """A report table as a DataFrame: per row label, per column its mean, std, seeds and invalid runs."""
    out = []
    for label, cells, mean in t.rows:
        item = {"row": label}
        for c in t.columns:
            cell = cells.get(c)
            item[f"{c} mean"] = None if cell is None else cell.mean
            item[f"{c} std"] = None if cell is None else cell.std
            item[f"{c} n"] = 0 if cell is None else cell.n
            item[f"{c} invalid"] = 0 if cell is None else cell.invalid
        if t.mean_column:
            item["mean"] = mean
        out.append(item)
    return pd.DataFrame(out).set_index("row")


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
