"""Ablation sweeps on frozen features: a grid of methods x domain pairs x settings x seeds, trained stacked.

A sweep is one TOML or YAML file (``adapt sweep SPEC``)::

    name = "demo"                                  # optional, shown in the table title
    methods = ["source_only", "dann", "cia"]       # built-in methods, or files / modules of your own
    pairs = [["K1", "K2"], ["K2", "K1"]]           # [source, target] or [source, target, eval]; domains, splits
                                                   # or store paths; or tables {source=, target=, eval=}
    seeds = [0, 1]
    backbone = "i3d"
    features_root = "features/demo"                # relative paths are relative to the working directory
    out = "runs/sweep_demo"
    dataset = "demo"                               # optional: whose schedule to start from (default: the source's)
    set = {steps = 200, stage1_steps = 60}         # base settings of every run (override the method presets)
    grid = {w_video_adv = [0, 1], sc = [true, false]}  # every combination of these settings

    [per_method.cia]                               # per-method overrides
    set = {sc_dim = 64}                            # a key set here leaves the global grid for this method
    grid = {w_frame_adv = [0.25, 0.5]}             # merged into the global grid for this method

A key of the top-level ``set`` or ``grid`` applies to the methods that have that setting, and must belong to one of
them at least (``w_video_adv`` above varies DANN and CIA, not source-only); a method is a built-in name or a method
of your own (``"path/to/my_method.py"``, ``"package.module:ClassName"``), and ``per_method`` takes either its
reference or its name.

Each run's configuration is ``adapt.config.resolve(method, dataset, overrides)`` with overrides = ``set``, then the
method's ``set``, then its grid point.  The grid point is the run's ``tag`` (``"w_adv=0,sc=false"``; only the grid
keys with more than one value appear), so its folder ``out/<method>_<S>-<T>_s<seed>_<tag>`` is its own.

Runs are grouped by stores and architecture (``architecture_key`` of :mod:`adapt.config`, which includes which loss
terms act: a zero weight removes a head and skips a loss term, so it changes the stacked model) and each group is trained in
stacks of at most ``--max-stack`` runs with one :func:`adapt.trainer.train` call.  A run whose ``final.json`` exists
(and whose ``config.json`` matches the sweep's settings) is skipped, so an interrupted sweep resumes where it
stopped.  With ``WORLD_SIZE > 1`` (``torchrun --nproc_per_node N --no-python adapt sweep SPEC``) rank ``r``
trains the groups ``g`` with ``g % N == r`` and rank 0 merges the results after a barrier.  The results:
``out/results.jsonl`` and ``out/results.csv`` (one row per run: its ``final.json`` and grid point), and the table
of :mod:`adapt.reports`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapt import provenance
from adapt.results import invalid_marks, pair_label, read_final
from featstore.errors import UserError
from featstore.store import is_store

SPEC_KEYS = {"name", "methods", "pairs", "seeds", "backbone", "features_root", "out", "dataset", "device", "log",
             "modalities", "set", "grid", "per_method"}
METHOD_KEYS = {"set", "grid"}
MAX_STACK = 16


# ------------------------------------------------------------------------------------------------------------
# the spec


def load_spec(path: str | Path) -> dict:
    """Read a sweep spec (``.toml``, ``.yaml`` / ``.yml``; other names: TOML, then YAML)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such sweep spec (a TOML or YAML file)")
    text = path.read_text()
    spec = parse_spec(text, "yaml" if path.suffix.lower() in (".yaml", ".yml") else "toml", str(path))
    return methods_beside(spec, path.parent)


def methods_beside(spec: dict, folder: Path) -> dict:
    """A method file named relative to the spec is found beside the spec (wherever the sweep is started from):
    ``methods`` and ``per_method`` keys rewritten to that path when the file is there."""
    def beside(ref):
        if not isinstance(ref, str):
            return ref
        path, sep, attr = ref.partition(":")
        if path.endswith(".py") and not Path(path).is_absolute() and (folder / path).is_file():
            return str(folder / path) + sep + attr
        return ref
    spec = dict(spec)
    methods = spec.get("methods")
    if isinstance(methods, list):
        spec["methods"] = [beside(m) for m in methods]
    elif isinstance(methods, dict):
        spec["methods"] = {beside(m): v for m, v in methods.items()}
    if isinstance(spec.get("per_method"), dict):
        spec["per_method"] = {beside(m): v for m, v in spec["per_method"].items()}
    return spec


def parse_spec(text: str, fmt: str = "toml", where: str = "spec") -> dict:
    import tomllib
    import yaml

    try:
        if fmt == "toml":
            spec = tomllib.loads(text)
        else:
            spec = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{where}: not valid {fmt.upper()} ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a table of settings at the top level")
    return spec


@dataclass
class Run:
    """One run of a sweep: its resolved configuration and the grid point it stands for."""

    cfg: object                      # adapt.config.TrainConfig
    grid: dict                       # the grid point (only keys with more than one value)
    pair: str                        # "S→T" label

    @property
    def name(self) -> str:
        from adapt.trainer import run_name
        return run_name(self.cfg)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out) / self.name


@dataclass
class Group:
    """Runs that can be trained stacked (same stores, same architecture, same non-zero loss weights)."""

    key: tuple
    runs: list = field(default_factory=list)


def _fmt(v) -> str:
    """A setting's value in a tag: true/false, 0.5, 1e-04, a+b for lists; no path separators."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, (list, tuple)):
        return "+".join(_fmt(x) for x in v)
    return str(v).replace("/", "_").replace(os.sep, "_")


def _table(spec: dict, key: str, where: str) -> dict:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be a table of settings, e.g. {key} = {{steps = 300}}")
    return value


def _pairs(spec: dict, where: str) -> list[tuple[str, str, str]]:
    pairs = spec.get("pairs")
    if not pairs or not isinstance(pairs, list):
        raise UserError(f"{where}: pairs must list [source, target] pairs, e.g. pairs = [[\"D1\", \"D2\"]]")
    out = []
    for p in pairs:
        if isinstance(p, dict):
            if "source" not in p or "target" not in p or set(p) - {"source", "target", "eval"}:
                raise UserError(f"{where}: pair {p!r}: expected keys source, target and optionally eval")
            out.append((str(p["source"]), str(p["target"]), str(p.get("eval") or "")))
        elif isinstance(p, (list, tuple)) and len(p) in (2, 3):
            out.append((str(p[0]), str(p[1]), str(p[2]) if len(p) == 3 else ""))
        else:
            raise UserError(f"{where}: pair {p!r}: expected [source, target] or [source, target, eval]")
    return out


def expand(spec: dict, where: str = "spec", out: str | None = None, extra_set: dict | None = None) -> list[Run]:
    """The runs of a spec in order pair, method, grid point, seed (see the module docstring for the format)."""
    from adapt import config as C
    from adapt.method import load
    from featstore.paths import resolve_store

    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(SPEC_KEYS))})")
    methods = spec.get("methods")
    per_method = dict(_table(spec, "per_method", where))
    if isinstance(methods, dict):  # methods = {cia = {set = ...}, dann = {}}
        for m, v in methods.items():
            per_method.setdefault(m, v or {})
        methods = list(methods)
    if isinstance(methods, str):
        methods = [methods]
    if not methods or not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise UserError(f"{where}: methods must list method presets, e.g. methods = [\"source_only\", \"cia\"]")
    classes = {m: load(m) for m in methods}
    by_name = {c.name: m for m, c in classes.items()}
    for m, v in per_method.items():
        if m not in classes and m not in by_name:
            raise UserError(f"{where}: per_method.{m}: not one of the sweep's methods ({', '.join(methods)})")
        if not isinstance(v, dict) or set(v) - METHOD_KEYS:
            raise UserError(f"{where}: per_method.{m} may hold only set and grid tables")
    per_method = {(m if m in classes else by_name[m]): v for m, v in per_method.items()}
    seeds = spec.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds) \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UserError(f"{where}: seeds must be a non-empty list of distinct integers from 0, e.g. seeds = [0, 1, 2] "
                        f"(got {seeds!r})")
    backbone = str(spec.get("backbone", "i3d"))
    root = str(spec.get("features_root", "features"))
    out = str(out or spec.get("out", "runs/sweep"))
    given = dict(backbone=backbone, features_root=root, out=out)
    if "device" in spec:
        given["device"] = str(spec["device"])
    if "modalities" in spec:
        mods = spec["modalities"]
        given["modalities"] = [m for m in (mods.split(",") if isinstance(mods, str) else mods) if m]
    if "log" in spec:  # the trackers every run logs to (adapt/tracking.py)
        log = spec["log"]
        given["log"] = [m.strip() for m in (log.split(",") if isinstance(log, str) else log) if m.strip()]
    given["experiment"] = str(spec.get("name") or "")  # a tracker's experiment: the sweep
    configs = {m: C.config_class(c) for m, c in classes.items()}
    base = dict(_table(spec, "set", where))
    cli_set = dict(extra_set or {})
    grid = _grid(_table(spec, "grid", where), f"{where}: grid")
    for table, label in ((base, f"{where}: set"), (cli_set, "--set"), (grid, f"{where}: grid")):
        for k in table:  # a key of the whole sweep must belong to one of its methods at least
            if not any(k in _names(cfg_cls) for cfg_cls in configs.values()):
                raise UserError(f"{label}: {k!r} is not a setting of any of the sweep's methods ({', '.join(methods)};"
                                f" `adapt train --method M --settings` lists them)")
    runs = []
    for source, target, ev in _pairs(spec, where):
        dataset = spec.get("dataset") or resolve_store(source, "train", backbone, root)[1]
        for method in methods:
            cfg_cls, names = configs[method], _names(configs[method])
            mspec = per_method.get(method, {})
            owned = lambda table, label: {k: C.typed_value(cfg_cls, k, v, label)  # noqa: E731
                                          for k, v in table.items() if k in names}
            mset = {k: C.typed_value(cfg_cls, k, v, f"{where}: per_method.{method}.set")
                    for k, v in _table(mspec, "set", where).items()}
            mgrid = {k: [C.typed_value(cfg_cls, k, v, f"{where}: grid") for v in vals]
                     for k, vals in grid.items() if k in names and k not in mset}
            mgrid.update({k: [C.typed_value(cfg_cls, k, v, f"{where}: per_method.{method}.grid") for v in vals]
                          for k, vals in _grid(_table(mspec, "grid", where), f"{where}: per_method.{method}.grid")
                          .items()})
            keys = list(mgrid)
            varying = [k for k in keys if len(mgrid[k]) > 1]
            for point in itertools.product(*(mgrid[k] for k in keys)):
                point = dict(zip(keys, point))
                tag = ",".join(f"{k}={_fmt(point[k])}" for k in varying)
                overrides = {**owned(base, f"{where}: set"), **owned(cli_set, "--set"), **mset, **point}
                for seed in seeds:
                    cfg = C.resolve(classes[method], dataset, overrides, source=source, target=target,
                                    eval=ev or None, seed=seed, tag=tag, **given)
                    runs.append(Run(cfg, {k: point[k] for k in varying}, pair_label(source, target)))
    names = {}
    for r in runs:
        if r.name in names:
            raise UserError(f"{where}: two runs would write the same folder {r.dir} (pairs whose stores have the "
                            f"same names? give them different names or put them in separate sweeps)")
        names[r.name] = r
    return runs


def _names(cfg_cls) -> set:
    import dataclasses
    return {f.name for f in dataclasses.fields(cfg_cls)}


def _grid(table: dict, where: str) -> dict:
    out = {}
    for k, values in table.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: {k} must be a non-empty list of values, e.g. {k} = [0, 1]")
        out[k] = list(values)
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs that can share one stacked training, in order of first appearance.

    Key: stores (source, target, eval) and ``architecture_key()`` (which includes which loss terms act: a zero
    weight drops a head from the model and a term from the objective, and the stacked model follows its first run).
    """
    groups: dict[tuple, Group] = {}
    for r in runs:
        c = r.cfg
        key = (c.source, c.target, c.eval, c.architecture_key())
        groups.setdefault(key, Group(key)).runs.append(r)
    return list(groups.values())


def chunks(items: list, size: int) -> list[list]:
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------------------------------------------------
# completion (resume)

_IGNORED = {"out", "device", "memory_budget", "log", "experiment", "mlflow_uri", "wandb_mode"}  # change no number


def is_complete(run: Run) -> tuple[bool, str]:
    """(complete, why not): a run is complete when its ``final.json`` exists and its ``config.json`` (when there is
    one) holds the same settings as the sweep's."""
    final = run.dir / "final.json"
    if not final.is_file():
        return False, "not trained"
    done = read_final(final)
    if done is None:
        return False, "final.json cut or unreadable"
    from adapt.method import load
    own = {"method": load(run.cfg.method).name, "seed": run.cfg.seed, "tag": run.cfg.tag}
    for k, v in own.items():  # final.json's own record of the run (with config.json's below)
        if k in done and done[k] != v:
            return False, f"final.json says {k}={done[k]!r}, the sweep {v!r}"
    cfg_path = run.dir / "config.json"
    if not cfg_path.is_file():
        return True, ""
    try:
        saved = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False, "unreadable config.json"
    want = run.cfg.to_dict()
    for k, v in want.items():
        if k in _IGNORED or (k == "modalities" and not v):
            continue
        if k in saved and saved[k] != v:
            return False, f"{k} changed ({saved[k]!r} -> {v!r})"
    changed = provenance.differences(saved.get("provenance"), current_provenance(run.cfg))
    if changed:
        return False, "; ".join(changed)
    return True, ""


def current_provenance(cfg) -> dict:
    """The provenance a run of ``cfg`` would record now (its code, settings and stores; stores not made yet are
    left out)."""
    from adapt.data import evaluation_store
    from adapt.method import load
    from featstore.paths import resolve_store
    paths = {"source": resolve_store(cfg.source, "train", cfg.backbone, cfg.features_root)[0],
             "target": resolve_store(cfg.target, "train", cfg.backbone, cfg.features_root)[0],
             "eval": evaluation_store(cfg)}
    return provenance.of_run(load(cfg.method), cfg.to_dict(),
                             provenance.store_identities({r: p for r, p in paths.items() if is_store(p)}))


# ------------------------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SweepResult:
    runs: list
    groups: list
    trained: list                    # names of the runs trained by this process
    skipped: list                    # names of the runs found complete
    failed: list                     # (names, message) of stacks that stopped
    rows: list                       # result rows (rank 0; empty on other ranks)
    files: list                      # files written


@contextlib.contextmanager
def _output_lock(out_dir: Path, rank: int, world: int, dry_run: bool, name: str | None = None):
    """One sweep (one per rank under torchrun) writes into ``out_dir`` at a time; a second one stops in one line."""
    from adapt.runs import hold_lock, release_lock
    if dry_run:
        yield
        return
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # the folders this sweep creates
    fd = hold_lock(out_dir / (name or (f".sweep-rank{rank}.lock" if world > 1 else ".sweep.lock")),
                   f"{out_dir}: another sweep is writing into this folder now (its lock is held); wait for it to "
                   f"finish (this sweep then resumes from its complete runs) or give another --out")
    try:
        yield
    finally:
        release_lock(fd)
        for p in made:  # a sweep refused (or stopped) before it wrote anything leaves no empty folder behind
            try:
                p.rmdir()
            except OSError:
                break


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    return rank, world


def run_sweep(spec: dict | str | Path, console=None, max_stack: int | None = None, progress: bool = True,
              out: str | None = None, extra_set: dict | None = None, redo: bool = False, dry_run: bool = False,
              rank: int | None = None, world: int | None = None, where: str | None = None,
              only_groups: list | None = None) -> SweepResult:
    """Expand, skip the complete runs, train the rest group by group (stacked), write the results files.

    ``only_groups``: train only these groups (indices of the spec's groups; a Slurm array task's, adapt.slurm) and
    write no results files (the sweep's status or its next run merges them).

    Rank ``r`` of ``world`` processes trains the groups ``g`` with ``g % world == r`` (the groups of the whole
    spec, complete or not, so every rank partitions alike); rank 0 writes the results.  ``rank``/``world`` default
    to torchrun's RANK/WORLD_SIZE, with a gloo process group whose barrier makes rank 0 wait for the others."""
    from rich.markup import escape

    from adapt import trainer as T
    from adapt.data import DomainPair
    from adapt.method import load as load_method
    from featstore.devices import resolve_device

    if not isinstance(spec, dict):
        where = where or str(spec)
        spec = load_spec(spec)
    where = where or "spec"
    asked = max_stack is not None  # the user's stack size; otherwise a short probe chooses (stack_size)
    max_stack = MAX_STACK if max_stack is None else max_stack
    if max_stack < 1:
        raise UserError(f"--max-stack {max_stack}: expected 1 or more")
    runs = expand(spec, where, out=out, extra_set=extra_set)
    groups = group_runs(runs)
    dist = None
    if rank is None and world is None:  # torchrun: WORLD_SIZE, RANK; the ranks meet at barriers (gloo)
        rank, world = _dist()
        if world > 1 and not dry_run:
            dist = _init_dist()
    rank, world = rank or 0, world or 1  # given explicitly (tests): no process group, no barrier
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} outside a world of {world}")
    local = int(os.environ.get("LOCAL_RANK", rank))

    out_dir = Path(runs[0].cfg.out) if runs else Path(out or "runs/sweep")
    lock = f".sweep-group{'-'.join(map(str, only_groups))}.lock" if only_groups is not None else None
    with _output_lock(out_dir, rank, world, dry_run, lock):  # before reading which runs are complete
        skipped, todo_groups = [], []
        for gi, g in enumerate(groups):
            if gi % world != rank or (only_groups is not None and gi not in only_groups):
                continue
            todo = []
            for r in g.runs:
                done, why = (False, "redo") if redo else is_complete(r)
                if done:
                    skipped.append(r.name)
                else:
                    if why not in ("not trained", "redo") and console is not None:
                        verb = "would retrain" if dry_run else "retraining"
                        console.print(f"[yellow]{verb}[/yellow] {escape(r.name)}: {escape(why)}")
                    todo.append(r)
            if todo:
                todo_groups.append((gi, g, todo))
        n_todo = sum(len(t) for _, _, t in todo_groups)
        missing = missing_stores([r for _, _, t in todo_groups for r in t])
        if missing and not dry_run:  # before hours of training, not when the pair's turn comes
            raise UserError(f"{len(missing)} feature store(s) of the sweep are missing: {', '.join(missing)} "
                            f"(extract them first: `adapt extract`, or `adapt demo` for the demo kitchens)")
        if not dry_run:  # a pair whose target or evaluation store shares clips with its source, before any training
            overlapping_pairs([r for _, _, t in todo_groups for r in t])
        who = f"rank {rank}/{world}: " if world > 1 else ""
        if console is not None:
            name = escape(str(spec.get("name") or where))
            console.print(f"{who}sweep {name}: {len(runs)} runs in {len(groups)} groups; "
                          f"{len(skipped)} complete, {n_todo} to train (stacks of at most {max_stack})")
        if dry_run:
            if console is not None:
                _print_plan(console, groups, todo_groups, max_stack)
                if missing:
                    console.print(f"[yellow]missing feature stores:[/yellow] {escape(', '.join(missing))}")
            return SweepResult(runs, groups, [], skipped, [], [], [])

        # same stores and data settings next to each other, so a loaded DomainPair serves several groups
        def data_key(cfg):
            return (cfg.source, cfg.target, cfg.eval, cfg.backbone, cfg.features_root, tuple(cfg.modalities),
                    cfg.spatial, load_method(cfg.method).uses_target_labels, cfg.device)
        order = sorted(todo_groups, key=lambda t: (str(data_key(t[1].runs[0].cfg)), t[0]))
        trained, failed = [], []
        cached_key, cached_pair = None, None
        started = time.time()
        for i, (_, _, todo) in enumerate(order):
            cfg0 = todo[0].cfg
            if world > 1 and cfg0.device == "auto":
                import torch
                if torch.cuda.is_available():
                    for r in todo:
                        r.cfg.device = f"cuda:{local % torch.cuda.device_count()}"
            key = data_key(cfg0)
            if key != cached_key:
                cached_pair = None  # free the previous stores first
                cached_pair = DomainPair(cfg0, resolve_device(cfg0.device))
                cached_key = key
            k, why = ((max_stack, "as --max-stack asks") if asked else
                      stack_size(todo, cached_pair, max_stack, resolve_device(cfg0.device)))
            for stack in chunks(todo, k):
                if console is not None:
                    tags = sorted({r.cfg.tag for r in stack if r.cfg.tag})
                    shown = f" ({'; '.join(tags)})" if tags else ""
                    console.print(escape(f"{who}[{i + 1}/{len(order)}] {cfg0.method} {todo[0].pair}{shown}: "
                                         f"{len(stack)} run(s) stacked, {why} ({cfg0.dataset} base)"))
                try:
                    T.train([r.cfg for r in stack], console, progress, pair=cached_pair, overwrite=True)
                    trained.extend(r.name for r in stack)
                except T.TrainingError as e:
                    failed.append(([r.name for r in stack], str(e)))
                    if console is not None:
                        console.print(f"[red]stopped:[/red] {escape(str(e))}")
        if console is not None and trained:
            console.print(f"{who}trained {len(trained)} runs in {time.time() - started:.1f} s")

        if dist is not None:
            dist.barrier()
        rows, files = [], []
        if rank == 0 and only_groups is None:
            rows = collect_rows(runs)
            files = write_results(rows, Path(runs[0].cfg.out) if runs else Path(out or "runs/sweep"))
        if dist is not None:
            dist.barrier()
            dist.destroy_process_group()
        return SweepResult(runs, groups, trained, skipped, failed, rows, files)


PROBE_STEPS, PROBE_MIN_WORK = 4, 400  # steps timed per side (after 2 warm-up steps); runs x steps worth a probe


def stack_size(todo: list, pair, max_stack: int, device) -> tuple[int, str]:
    """How many of a group's runs to train stacked, and why: a short probe times a few steps of one run alone and
    of the group's first ``max_stack`` runs stacked, and stacks only when a stacked step costs each run less than
    a step alone (K runs stacked share one step's overhead, but on a CPU their arithmetic is K times a run's: heads
    of TA3N's size gain little, and under memory or core pressure stacking can cost).  Groups too small to repay the
    probe (fewer than ``PROBE_MIN_WORK`` run-steps) are stacked unprobed."""
    from adapt.trainer import Training
    k = min(len(todo), max_stack)
    if k == 1:
        return 1, "one run"
    steps = todo[0].cfg.steps
    if steps * len(todo) < PROBE_MIN_WORK:
        return k, "a short group (not probed)"
    per_run = {}
    for size in (1, k):
        t = Training([r.cfg for r in todo[:size]], pair, device)
        try:
            for s in range(2):
                t.step(s, t.batch(s))
            _sync(t.device)
            start = time.perf_counter()
            for s in range(2, 2 + PROBE_STEPS):
                t.step(s, t.batch(s))
            _sync(t.device)
            per_run[size] = (time.perf_counter() - start) / PROBE_STEPS / size
        finally:
            t.close()
    alone, stacked = per_run[1], per_run[k]
    figures = f"a probe step took {1e3 * stacked:.1f} ms a run stacked by {k}, {1e3 * alone:.1f} ms alone"
    if stacked < 0.9 * alone:
        return k, f"stacked: {figures}"
    return 1, f"one by one: {figures}"


def _sync(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch
        torch.cuda.synchronize()


def missing_stores(runs: list[Run]) -> list[str]:
    """The store paths (source, target, eval) of ``runs`` that hold no feature store."""
    from featstore.paths import resolve_store
    seen, missing = set(), []
    for r in runs:
        c = r.cfg
        for name, role in ((c.source, "train"), (c.target, "train"), (c.eval or c.target, "test")):
            path, _ = resolve_store(name, role, c.backbone, c.features_root)
            if path not in seen:
                seen.add(path)
                if not is_store(path):
                    missing.append(str(path))
    return missing


def overlapping_pairs(runs: list[Run]) -> None:
    """Refuse, in one line, a pair of the sweep whose target or evaluation store shares clips with its source
    (adapt.data.shared_clips; allowed per run with ``allow_overlap``)."""
    from adapt.data import evaluation_store, shared_clips
    from featstore.paths import resolve_store
    seen = set()
    for r in runs:
        c = r.cfg
        key = (c.source, c.target, c.eval, c.backbone, c.features_root, c.allow_overlap)
        if key in seen:
            continue
        seen.add(key)
        src = resolve_store(c.source, "train", c.backbone, c.features_root)[0]
        shared_clips(src, {"target": resolve_store(c.target, "train", c.backbone, c.features_root)[0],
                           "eval": evaluation_store(c)}, c.allow_overlap)


def _init_dist():
    import datetime

    import torch.distributed as dist
    if not dist.is_initialized():
        # gloo works on CPU and GPU hosts alike; the barrier waits as long as the slowest rank trains
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist


def _print_plan(console, groups, todo_groups, max_stack):
    from rich.table import Table
    t = Table(title="sweep plan")
    for c in ("group", "method", "pair", "tags", "seeds", "runs", "to train", "stacks"):
        t.add_column(c)
    todo = {gi: len(r) for gi, _, r in todo_groups}
    for gi, g in enumerate(groups):
        c = g.runs[0].cfg
        tags = sorted({r.cfg.tag for r in g.runs})
        seeds = sorted({r.cfg.seed for r in g.runs})
        n = todo.get(gi, 0)
        t.add_row(str(gi), c.method, g.runs[0].pair, "; ".join(x or "-" for x in tags), ",".join(map(str, seeds)),
                  str(len(g.runs)), str(n), str(len(chunks(list(range(n)), max_stack))))
    console.print(t)


# ------------------------------------------------------------------------------------------------------------
# results files

SCALARS = ("target_top1", "final_top1", "verb_top1", "noun_top1", "action_top1", "verb_top5", "noun_top5",
           "action_top5", "steps", "runs_stacked", "train_seconds", "trainable_parameters", "device")


def collect_rows(runs: list[Run]) -> list[dict]:
    """One row per complete run of the sweep: its final.json plus run, pair, run_dir and grid point."""
    rows = []
    for r in runs:
        final = read_final(r.dir / "final.json")
        if final is None:
            continue
        rows.append({"run": r.name, "pair": r.pair, "grid": r.grid, **final, "run_dir": str(r.dir)})
    return rows


def write_results(rows: list[dict], out: Path) -> list[Path]:
    """``results.jsonl`` (the rows) and ``results.csv`` (their scalar columns, grid and per-modality flattened)."""
    from adapt.metrics import write_atomic
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(out / "results.csv", results_csv(rows))
    return [out / "results.jsonl", out / "results.csv"]


def results_csv(rows: list[dict]) -> str:
    grid_keys = list(dict.fromkeys(k for r in rows for k in r.get("grid", {})))
    mods = list(dict.fromkeys(m for r in rows for m in r.get("per_modality", {})))
    scalars = [k for k in SCALARS if any(k in r for r in rows)]
    header = ["run", "method", "pair", "source", "target", "eval", "backbone", "seed", "tag", *grid_keys,
              *scalars, *(f"top1_{m}" for m in mods), "invalid"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        g = r.get("grid", {})
        w.writerow([r.get("run"), r.get("method"), r.get("pair"), r.get("source"), r.get("target"), r.get("eval"),
                    r.get("backbone"), r.get("seed"), r.get("tag"),
                    *(_fmt(g[k]) if k in g else "" for k in grid_keys),
                    *(r.get(k, "") for k in scalars),
                    *(r.get("per_modality", {}).get(m, "") for m in mods),
                    "+".join(invalid_marks(r))])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------
# command line
