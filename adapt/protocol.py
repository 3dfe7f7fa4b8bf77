"""EPIC-KITCHENS-100 UDA's protocol as one command (``adapt protocol SPEC``).

The challenge tunes on the validation splits and tests once:

1. **tune**: every method and grid point of the spec trains with ``source_val`` as its labelled source and
   ``target_val`` as its unlabelled target, and is evaluated on ``target_val`` (whose labels the protocol gives for
   this); a selection rule (:mod:`adapt.selection`: ``oracle`` = the ``target_val`` accuracy, the protocol's own,
   or a validator that needs no target labels) picks each method's grid point;
2. **train**: the chosen settings train again on the train splits (``source_train`` -> ``target_train``), evaluated
   on ``target_val``, and predict ``target_test`` into the challenge's ``test.json``;
3. ``protocol.json`` records, per method, the grid point chosen, the rule, the tuning score, the final scores and
   the ``test.json`` files.

The spec is a sweep spec (:mod:`adapt.sweeps`) without ``pairs``: the protocol sets them.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapt.results import invalid_marks
from featstore.errors import UserError

TUNE = ("source_val", "target_val", "target_val")
TRAIN = ("epic100_source", "epic100_target", "target_val")
TEST = "target_test"


def run_protocol(spec: dict | str | Path, out: str | Path | None = None, select: str = "oracle", console=None,
                 progress: bool = True, where: str | None = None) -> dict:
    """Tune, choose, train and predict; returns the protocol record written to ``<out>/protocol.json``."""
    from adapt import selection as S
    from adapt.metrics import write_atomic
    from adapt.sweeps import load_spec, run_sweep

    if select == "all":
        raise UserError("--select all: the protocol chooses by one rule (oracle or a validator)")
    S.check_name(select)  # before the tuning, not after it
    if not isinstance(spec, dict):
        where = where or str(spec)
        spec = load_spec(spec)
    where = where or "spec"
    if "pairs" in spec:
        raise UserError(f"{where}: the protocol sets the pairs ({' -> '.join(TUNE[:2])} to tune, "
                        f"{' -> '.join(TRAIN[:2])} to train); leave pairs out")
    out = Path(out or spec.get("out", "runs/epic100_protocol"))
    base = {k: v for k, v in spec.items() if k not in ("out", "name")}
    _check_first(base, select, where)

    if console is not None:
        console.print(f"[1/2] tuning on {TUNE[0]} -> {TUNE[1]} (selection: {select})")
    tune = run_sweep({**base, "name": "tune", "pairs": [list(TUNE)]}, console, progress=progress,
                     out=str(out / "tune"), where=f"{where} (tune)")
    if tune.failed:
        raise UserError(f"{len(tune.failed)} tuning stack(s) stopped; see above")
    chosen = {}
    for method in dict.fromkeys(r.get("method") for r in tune.rows):
        rows = [r for r in tune.rows if r.get("method") == method]
        passed: list = []
        pick = S.choose(rows, select, passed)
        if passed and passed[0] < 0 and console is not None:
            console.print(f"[yellow]warning:[/yellow] {method}: every tuning checkpoint had collapsed; its grid point "
                          f"is chosen among collapsed runs (marked in protocol.json)", highlight=False)
        if pick is None:
            raise UserError(f"--select {select}: the tuning runs of {method} carry no such validator (one of "
                            f"{', '.join(['oracle', *S.available(rows)])})")
        tag, steps, score = pick
        grid = next(r.get("grid") or {} for r in rows if (r.get("tag") or "") == tag)
        chosen[method] = {"grid_point": tag, "settings": grid, "tune_steps": steps, "tune_target_val_top1": score,
                          "tune_invalid_runs": sum(bool(invalid_marks(r)) for r in rows
                                                   if (r.get("tag") or "") == tag),
                          "tune_all_collapsed": bool(passed and passed[0] < 0)}

    if console is not None:
        console.print(f"[2/2] training the chosen settings on {TRAIN[0]} -> {TRAIN[1]}, predicting {TEST}")
    per_method = dict(spec.get("per_method") or {})
    final_spec = {**base, "name": "train", "pairs": [list(TRAIN)], "grid": {},
                  "set": {**dict(spec.get("set") or {}), "challenge": TEST},
                  "per_method": {m: {"set": {**dict((per_method.get(m) or {}).get("set") or {}), **c["settings"]}}
                                 for m, c in chosen.items()}}
    final = run_sweep(final_spec, console, progress=progress, out=str(out / "train"), where=f"{where} (train)")
    if final.failed:
        raise UserError(f"{len(final.failed)} training stack(s) stopped; see above")
    record = {"protocol": "EPIC-KITCHENS-100 UDA", "tune": list(TUNE), "train": list(TRAIN), "test": TEST,
              "select": select, "methods": {}}
    for method, c in chosen.items():
        rows = [r for r in final.rows if r.get("method") == method]
        scores = {k: sum(r[k] for r in rows) / len(rows) for k in ("verb_top1", "noun_top1", "action_top1",
                                                                     "target_top1") if all(k in r for r in rows)}
        tests = [str(Path(r["run_dir"]) / "test.json") for r in rows if (Path(r["run_dir"]) / "test.json").is_file()]
        if not tests:
            raise UserError(f"{method}: no test.json was written (the stores need verb and noun labels: EPIC-100)")
        bad = {r.get("run"): invalid_marks(r) for r in rows if invalid_marks(r)}
        record["methods"][method] = {**c, "target_val": scores, "seeds": [r.get("seed") for r in rows],
                                     "test_json": tests, "invalid": bad}
        if bad and console is not None:  # its test.json is written, and said to come from an invalid run
            why = "; ".join(f"{k}: {'+'.join(v)}" for k, v in bad.items())
            console.print(f"[yellow]warning:[/yellow] {method}: {len(bad)} of its final runs are invalid ({why}); "
                          f"their test.json files are marked invalid in protocol.json", highlight=False,
                          soft_wrap=True)
    write_atomic(out / "protocol.json", json.dumps(record, indent=1))
    if console is not None:
        for method, r in record["methods"].items():
            shown = ", ".join(f"{k} {v:.1f}" for k, v in r["target_val"].items())
            console.print(f"{method}: chose {r['grid_point'] or 'the base settings'} "
                          f"(tuning {r['tune_target_val_top1']:.1f}%); target_val {shown}; {r['test_json'][0]}",
                          highlight=False, soft_wrap=True)
        console.print(f"wrote {out / 'protocol.json'}")
    return record


def _check_first(base: dict, select: str, where: str) -> None:
    """What would refuse the protocol after hours of tuning, refused before it: a validator the tuning runs will
    not compute, and any store of the protocol (tuning, training, the test split) that is missing."""
    from adapt.sweeps import expand
    from featstore.paths import resolve_store
    from featstore.store import is_store
    runs = expand({**base, "name": "tune", "pairs": [list(TUNE)]}, f"{where} (tune)")
    if select != "oracle":
        off = [r for r in runs if not r.cfg.validators]
        if off:
            raise UserError(f"--select {select}: the tuning runs have validators off ({off[0].name}: "
                            f"validators=false); turn them on or choose by --select oracle")
        if select in ("source_val", "dev"):
            blind = [r for r in runs if not (r.cfg.source_holdout or r.cfg.source_val)]
            if blind:
                raise UserError(f"--select {select}: needs held-out source clips, which the tuning runs do not have "
                                f"({blind[0].name}); add source_holdout = 0.1 to the spec's set")
    backbone, root = str(base.get("backbone", "i3d")), str(base.get("features_root", "features"))
    missing = []
    for name, role in ((TUNE[0], "train"), (TUNE[1], "train"), (TUNE[2], "test"), (TRAIN[0], "train"),
                       (TRAIN[1], "train"), (TRAIN[2], "test"), (TEST, "test")):
        path = resolve_store(name, role, backbone, root)[0]
        if not is_store(path) and str(path) not in missing:
            missing.append(str(path))
    if missing:
        raise UserError(f"the protocol needs {len(missing)} feature store(s) that are missing: {', '.join(missing)} "
                        f"(extract or import them first)")
