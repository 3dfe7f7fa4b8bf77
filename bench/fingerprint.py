"""Fingerprints of every preset, to check that a refactor keeps the numbers: each built-in method (and its paper
form where it has one) on three small synthetic layouts (I3D spatial maps, TBN segments, EPIC-100 with nouns),
short schedules, two seeds; per run the accuracy at every evaluation and a sha256 of every trained tensor.

    python -m bench.fingerprint record before.json       # before the change
    python -m bench.fingerprint record after.json        # after it
    python -m bench.fingerprint compare before.json after.json

``compare`` prints the runs whose numbers or weights moved (bit for bit) and exits 1 when any did.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYOUTS = {  # name: (backbone, dataset, make_pair keywords)
    "i3d": ("i3d", "mmsada", dict(spatial=True, classes=4, n=48, units=1, channels=16)),
    "tbn": ("tbn", "mmsada", dict(spatial=True, classes=4, n=48, units=5, channels=16, audio=True)),
    "epic100": ("tbn", "epic100", dict(spatial=False, classes=4, n=48, units=25, channels=16, audio=True, nouns=3)),
}
SMALL = dict(batch_source=8, batch_target=8, embed_dim=32, sc_dim=8, trn_dim=16, validators=False)
STEPS = 24
SEEDS = (0, 1)


def cases() -> list[tuple]:
    from adapt.method import Fact
    from adapt.methods import REGISTRY
    out = []
    for name, cls in REGISTRY.items():
        forms = ["code"] + (["paper"] if any(isinstance(f, Fact) and f.form == "paper"
                                             for k in cls.__mro__ for f in vars(k).get("facts", ())) else [])
        for layout in LAYOUTS:
            for form in forms:
                out.append((name, layout, form))
    return out


RENAMED = {"interaction.": ""}  # parameter names a refactor moved (prefix -> old prefix): same tensors


def _digest(heads: dict) -> str:
    """sha256 of the trained tensors by name (names a refactor moved mapped back: RENAMED)."""
    def old(name):
        for new, was in RENAMED.items():
            if name.startswith(new):
                return was + name[len(new):]
        return name
    named = {old(k): v for k, v in heads.items()}
    h = hashlib.sha256()
    for k in sorted(named):
        h.update(k.encode())
        h.update(named[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record(path: str) -> None:
    from adapt import config as C
    from adapt import trainer as T
    from featstore.synthetic import make_pair
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for name, (backbone, _, kw) in LAYOUTS.items():
            roots[name] = make_pair(Path(tmp) / name, backbone, **kw)
        for method, layout, form in cases():
            backbone, dataset, _ = LAYOUTS[layout]
            key = f"{method}/{layout}/{form}"
            start = time.time()
            try:
                from adapt.config import config_class
                from adapt.method import load
                names = {f.name for f in __import__("dataclasses").fields(config_class(load(method)))}
                overrides = {**{k: v for k, v in SMALL.items() if k in names}, "form": form}
                base = roots[layout] / backbone
                cfgs = [C.resolve(method, dataset, overrides, source=str(base / "S_train.zarr"),
                                  target=str(base / "T_train.zarr"), eval=str(base / "T_test.zarr"),
                                  backbone=backbone, features_root=str(roots[layout]), out=str(Path(tmp) / "runs"),
                                  seed=s, steps=STEPS, device="cpu") for s in SEEDS]
                finals = [T.train([c], None, progress=False, overwrite=True)[0] for c in cfgs]
                heads = [torch.load(Path(tmp) / "runs" / T.run_name(c) / "heads.pt", weights_only=True)
                         for c in cfgs]
                results[key] = {"top1": [f["target_top1_per_eval"] for f in finals],
                                "per_modality": [f["per_modality"] for f in finals],
                                "weights": [_digest(h) for h in heads]}
            except Exception as e:  # noqa: BLE001 - a preset that does not run is a result too
                results[key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{key}: {time.time() - start:.1f} s {results[key].get('error', '')}", flush=True)
    Path(path).write_text(json.dumps(results, indent=1, sort_keys=True))


def compare(a: str, b: str) -> int:
    old, new = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    moved = 0
    for key in sorted(set(old) | set(new)):
        x, y = old.get(key), new.get(key)
        if x == y:
            continue
        moved += 1
        if x is None or y is None:
            print(f"{key}: only in {'after' if x is None else 'before'}")
        elif "error" in x or "error" in y:
            print(f"{key}: {x.get('error', 'ran')} -> {y.get('error', 'ran')}")
        else:
            same_acc = x["top1"] == y["top1"]
            print(f"{key}: {'weights only' if same_acc else 'accuracy'} moved: {x['top1']} -> {y['top1']}")
    print(f"{len(set(old) | set(new)) - moved} identical, {moved} moved")
    return 1 if moved else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
