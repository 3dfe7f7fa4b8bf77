"""Trainer benchmarks: steps/s per method on pooled and spatial features, the data path's share of a step,
time per step against store size, and peak memory against the feature bytes loaded.

Synthetic stores in the real store format, sized like the MM-SADA splits (D1_train -> D2_train, D2_test) for
pooled features; spatial (1024x7x7) stores are smaller on a CPU so that the bench stays within minutes (a step's
cost does not depend on the number of clips: batches are gathered by index).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapt import config as C
from adapt.trainer import train
from featstore.synthetic import make_store

METHODS = ["source_only", "adabn", "mmd", "mcd", "dann", "pseudo_label", "mmsada", "contrastive", "ta3n", "m3em",
           "cia"]
SPATIAL_ONLY = {"m3em", "cia"}


def synthetic(path: Path, n: int, units: int, shape: tuple, seed: int, classes: int = 8) -> Path:
    """A synthetic I3D store (:mod:`featstore.synthetic`) drawn chunk by chunk (the large ones exceed memory)."""
    return make_store(path, n, classes, units, {"rgb": shape, "flow": shape}, 0.0, seed, chunk_clips=None,
                      by_chunk=True)


def make_pair(root: Path, sizes=(1543, 2495, 750), spatial=False, scale: int = 1) -> dict:
    shape = (1024, 7, 7) if spatial else (1024,)
    paths = {}
    for name, n, seed in zip(("source", "target", "eval"), sizes, (1, 2, 3)):
        p = root / f"{name}{'_sp' if spatial else ''}_x{scale}.zarr"
        if not p.exists():
            synthetic(p, n * scale, 5, shape, seed)
        paths[name] = str(p)
    return paths


def config(method, paths, steps, device, **kw):
    cfg = C.resolve(method, "mmsada", None, source=paths["source"], target=paths["target"], eval=paths["eval"],
                    out=kw.pop("out"), steps=steps, stage1_steps=0, eval_every=10 ** 9, device=device,
                    validators=False, **kw)  # the step is measured, not the evaluation
    cfg.epochs, cfg.lr_epochs = None, []  # TA3N's preset counts epochs: the benchmark counts steps
    return cfg


def steps_per_second(method, paths, steps, device, out, spatial):
    cfg = config(method, paths, steps, device, out=out, spatial=spatial)
    timings = {}
    train([cfg], progress=False, timings=timings, overwrite=True)
    total = timings["data"] + timings["step"]
    return {"method": method, "features": "spatial" if spatial else "pooled", "steps_per_s": steps / total,
            "data_share": timings["data"] / total}


def run(device="cpu", quick=False) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pooled = make_pair(root)
        spatial_sizes = (1543, 2495, 750) if device != "cpu" else (96, 96, 32)
        spatial = make_pair(root, spatial_sizes, spatial=True)
        rows = []
        steps = 20 if quick else 60
        # warm-up (first-call costs of the process: kernels, allocator), so that the first method is not charged
        steps_per_second("source_only", pooled, 3, device, str(root / "runs"), False)
        for m in METHODS:
            if m not in SPATIAL_ONLY:
                rows.append(steps_per_second(m, pooled, steps, device, str(root / "runs"), False))
        for m in ("source_only", "mmsada", "m3em", "cia"):
            rows.append(steps_per_second(m, spatial, max(5, steps // 6), device, str(root / "runs"), True))
        # how the step time grows with the store size (1x vs 4x clips): it should not
        big = make_pair(root, scale=4)
        t1 = steps_per_second("mmsada", pooled, steps, device, str(root / "runs"), False)["steps_per_s"]
        t4 = steps_per_second("mmsada", big, steps, device, str(root / "runs"), False)["steps_per_s"]
        memory = peak_memory(make_pair(root, (256, 256, 64), spatial=True, scale=2), device, spatial=True)
        return {"methods": rows, "step_time_4x_over_1x": t1 / t4, "memory": memory}


def peak_memory(paths, device, spatial=False) -> dict:
    """Peak RSS of a training process over its RSS just before it loads the stores (sampled every 5 ms from
    /proc/self/status), against the feature bytes it loads."""
    code = f"""
import json, threading, time, torch
from adapt import config as C
from adapt.data import DomainPair
from adapt.trainer import train
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
paths = {json.dumps(paths)}
cfg = C.resolve("mmsada", "mmsada", None, source=paths["source"], target=paths["target"], eval=paths["eval"],
                out="{tempfile.mkdtemp()}", steps=20, stage1_steps=0, eval_every=20, device="{device}",
                spatial={spatial}, validators=False)
import adapt.method, adapt.model, zarr, torch.optim  # imports before the baseline
base = rss()
threading.Thread(target=watch, daemon=True).start()
pair = DomainPair(cfg, torch.device("{device}"))
train([cfg], progress=False, pair=pair)
time.sleep(0.05)
print(json.dumps({{"feature_bytes": pair.feature_bytes, "rss_growth_bytes": peak[0] - base}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    d["ratio"] = d["rss_growth_bytes"] / d["feature_bytes"]
    return d


if __name__ == "__main__":
    t = time.time()
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu", quick="--quick" in sys.argv), indent=1))
    print(f"{time.time() - t:.0f} s")
