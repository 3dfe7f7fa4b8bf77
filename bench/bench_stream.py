"""Training beyond memory: readers, read amplification, streamed against in-memory step rates, the streaming path's
delivery rate, peak memory against the budget, and the EPIC-100 sizes.

* readers: zarr-python against tensorstore on the version-2 layout (5 of 25 segments of random clips; whole
  shards), and tensorstore on the version-1 layout;
* read amplification of TA3N-style 5-of-25 reads: bytes the reader asked the file system for (``rchar`` of
  /proc/self/io) over the stored bytes of the units used (the store's bytes per unit on average);
* streamed / in-memory steps per second, the stores 4x the memory budget: cia on 7x7 maps, source_only on pooled
  features (one run each, side by side);
* the streaming path's delivery rate (GB/s of float16 features), against what a step needs;
* peak RSS growth of a streamed run (a subprocess) over the memory budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featstore.store import FeatureStore
from featstore.synthetic import make_store


def _store(path: Path, n: int, units: int, shape: tuple, seed: int, version: int = 2, classes: int = 8,
           modalities=("rgb", "flow")) -> Path:
    """A synthetic store (:mod:`featstore.synthetic`) drawn chunk by chunk; TBN's when it has 25 units."""
    return make_store(path, n, classes, units, {m: shape for m in modalities}, 0.0, seed,
                      backbone="tbn" if units == 25 else "i3d", version=version, chunk_clips=None, noise=2.0,
                      by_chunk=True)


def _rchar() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("rchar"):
            return int(line.split()[1])
    return 0


def _bytes(path: Path, name: str) -> int:
    return sum(f.stat().st_size for f in (path / name).rglob("*") if f.is_file() and f.name != "zarr.json")


def readers(root: Path, clips: int) -> dict:
    """MB/s of features used, for 5-of-25 reads and whole shards, and the read amplification."""
    import zarr
    out = {}
    stores = {v: _store(root / f"tbn_v{v}.zarr", clips, 25, (1024, 7, 7), 1, version=v, modalities=("rgb",))
              for v in (1, 2)}
    rng = np.random.default_rng(0)
    pick = rng.choice(clips, min(32, clips), replace=False)
    units = np.broadcast_to(np.array([2, 7, 12, 17, 22]), (len(pick), 5))
    used = len(pick) * 5 * 1024 * 49 * 2
    for v, path in stores.items():
        st = FeatureStore.open(path)
        r = st.reader("rgb")
        r.units(pick[:2], units[:2])  # open and warm
        c0, t0 = _rchar(), time.perf_counter()
        x = r.units(pick, units)
        dt, read = time.perf_counter() - t0, _rchar() - c0
        per_unit = _bytes(path, "rgb") / (clips * 25)
        out[f"v{v}_tensorstore_units_MBps"] = used / dt / 1e6
        out[f"v{v}_read_amplification"] = read / (per_unit * len(pick) * 5)
        t0 = time.perf_counter()
        r.rows(0, clips)
        out[f"v{v}_tensorstore_whole_MBps"] = clips * 25 * 1024 * 49 * 2 / (time.perf_counter() - t0) / 1e6
        arr = zarr.open_array(str(path / "rgb"), mode="r")
        t0 = time.perf_counter()
        y = np.stack([np.stack([arr[int(c), int(u)] for u in row]) for c, row in zip(pick, units)])
        out[f"v{v}_zarr_units_MBps"] = used / (time.perf_counter() - t0) / 1e6
        assert np.array_equal(x, y)
        t0 = time.perf_counter()
        arr[:]
        out[f"v{v}_zarr_whole_MBps"] = clips * 25 * 1024 * 49 * 2 / (time.perf_counter() - t0) / 1e6
    return out


def _config(method, paths, steps, budget=None, **kw):
    from adapt import config as C
    cfg = C.resolve(method, "mmsada", None, source=paths["source"], target=paths["target"], eval=paths["eval"],
                    steps=steps, stage1_steps=0, eval_every=10 ** 9, last_evals=1, memory_budget=budget,
                    validators=False, **kw)
    cfg.epochs, cfg.lr_epochs = None, []
    return cfg


def quarter_budget(cfg, paths: dict) -> int:
    """A memory budget whose room for features (what is left after the step's own memory and the evaluation
    store) is a quarter of the source and target stores."""
    from adapt.data import memory_needs
    stores = {r: FeatureStore.open(p) for r, p in paths.items()}
    sizes, need = memory_needs(cfg, stores, ["rgb", "flow"])
    return int(need["work"] + sizes["eval"] + max((sizes["source"] + sizes["target"]) // 4,
                                                  need["source"] + need["target"]))


def _rate(cfg, pair) -> float:
    from adapt.trainer import train
    timings = {}
    train([cfg], progress=False, pair=pair, timings=timings, overwrite=True)
    return cfg.steps / (timings["data"] + timings["step"])


def streamed_over_memory(root: Path, quick: bool) -> list[dict]:
    """Steps/s streamed (source and target 4x over the budget) over steps/s in memory, side by side."""
    from adapt.data import DomainPair
    rows = []
    cases = [("cia", "spatial", (96, 96, 16) if quick else (160, 160, 16), (1024, 7, 7), 6 if quick else 10,
              dict(batch_source=16, batch_target=16, embed_dim=512)),
             ("source_only", "pooled", (1543, 2495, 750), (1024,), 60 if quick else 150, {})]
    for method, form, sizes, shape, steps, kw in cases:
        paths = {r: str(_store(root / f"{form}_{r}.zarr", n, 5, shape, i + 1))
                 for i, (r, n) in enumerate(zip(("source", "target", "eval"), sizes))}
        spatial = form == "spatial"
        memory_cfg = _config(method, paths, steps, out=str(root / "runs"), spatial=spatial, **kw)
        budget = str(quarter_budget(memory_cfg, paths))
        streamed_cfg = _config(method, paths, steps, budget, out=str(root / "runs"), spatial=spatial, **kw)
        pair_m = DomainPair(memory_cfg, torch.device("cpu"))
        pair_s = DomainPair(streamed_cfg, torch.device("cpu"))
        assert pair_s.source.streamed and pair_s.target.streamed, pair_s.memory_line
        _rate(_config(method, paths, 3, out=str(root / "warm"), spatial=spatial, **kw), pair_m)  # warm-up
        step_bytes = (memory_cfg.batch_source + memory_cfg.batch_target) * 2 * int(np.prod(shape)) * 2
        threads = torch.get_num_threads()
        # all threads; and the model on one thread, leaving the reader a core (as a GPU machine leaves it cores)
        for t in (threads, 1):
            torch.set_num_threads(t)
            best = {"memory": 0.0, "streamed": 0.0}
            for _ in range(2):  # interleaved, best of two
                best["memory"] = max(best["memory"], _rate(memory_cfg, pair_m))
                best["streamed"] = max(best["streamed"], _rate(streamed_cfg, pair_s))
            rows.append({"method": method, "features": form, "threads": t, "memory_steps_per_s": best["memory"],
                         "streamed_steps_per_s": best["streamed"], "ratio": best["streamed"] / best["memory"],
                         "step_MB": step_bytes / 1e6, "line": pair_s.memory_line})
        torch.set_num_threads(threads)
    return rows


def delivery(root: Path, quick: bool) -> dict:
    """GB/s of float16 features the streaming reader delivers for TA3N-size batches (128 + 207 clips, 5 of 25
    segments, RGB and flow 1024x7x7), and the bytes a step needs."""
    from adapt.data import load_domain
    n = 64 if quick else 128
    path = _store(root / "deliver.zarr", n, 25, (1024, 7, 7), 3)
    dom = load_domain(path, "d", ["rgb", "flow"], torch.device("cpu"), True, streamed=True)
    from adapt.data import read_part
    rng = np.random.default_rng(0)
    batch = 48 if quick else 96
    idx = rng.integers(0, n, size=(1, batch))
    units = np.broadcast_to(np.array([2, 7, 12, 17, 22]), (1, batch, 5))
    read_part(dom.feats["rgb"], idx, units)
    t0, got = time.perf_counter(), 0
    for _ in range(3):
        for m in ("rgb", "flow"):
            got += read_part(dom.feats[m], rng.integers(0, n, size=(1, batch)), units).numel() * 2
    gbps = got / (time.perf_counter() - t0) / 1e9
    ta3n_step = (128 + 207) * 5 * 2 * 1024 * 49 * 2
    return {"GBps": gbps, "ta3n_spatial_step_GB": ta3n_step / 1e9, "steps_per_s_storage_allows": gbps * 1e9 / ta3n_step}


def peak_rss(root: Path, quick: bool) -> dict:
    """Peak RSS growth of a streamed cia run (a subprocess) over its memory budget, the stores 4x the budget."""
    n = 96 if quick else 256
    paths = {r: str(_store(root / f"rss_{r}.zarr", k, 5, (1024, 7, 7), i + 7))
             for i, (r, k) in enumerate(zip(("source", "target", "eval"), (n, n, 16)))}
    code = f"""
import json, threading, time, torch
from adapt import config as C
from adapt.data import DomainPair
from adapt.trainer import train
from bench.bench_stream import quarter_budget
from featstore.store import FeatureStore
from featstore.synthetic import make_store
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
paths = {json.dumps(paths)}
cfg = C.resolve("cia", "mmsada", None, source=paths["source"], target=paths["target"], eval=paths["eval"],
                out="{tempfile.mkdtemp()}", steps=8, stage1_steps=0, eval_every=8, last_evals=1,
                batch_source=16, batch_target=16, embed_dim=512, validators=False)
cfg.memory_budget = str(quarter_budget(cfg, paths))
import adapt.method, adapt.model, torch.optim  # imports before the baseline
torch.zeros(1) @ torch.zeros(1)
base = rss(); peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
pair = DomainPair(cfg, torch.device("cpu"))
train([cfg], progress=False, pair=pair)
time.sleep(0.05)
print(json.dumps({{"budget": int(cfg.memory_budget), "growth": peak[0] - base, "line": pair.memory_line}}))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    d["ratio"] = d["growth"] / d["budget"]
    return d


def epic100_sizes() -> list[dict]:
    """Bytes of the EPIC-100 UDA splits per modality and form, from the shipped manifests' clip counts."""
    from featstore import manifests as M
    rows, registry = [], M.load_registry()
    for split in ("source_train", "source_val", "target_train", "target_val", "target_test"):
        n = int(registry["splits"][split]["clips"])
        for form, per in (("spatial 1024x7x7, float16", 1024 * 49 * 2), ("spatial, int8", 1024 * 49),
                          ("pooled 1024, float16", 1024 * 2)):
            rows.append({"split": split, "clips": n, "form": form, "per_modality_GB": n * 25 * per / 1e9})
    return rows


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        return {"readers": readers(root, 24 if quick else 48), "streamed": streamed_over_memory(root, quick),
                "delivery": delivery(root, quick), "rss": peak_rss(root, quick),
                "epic100": epic100_sizes()}


if __name__ == "__main__":
    t = time.time()
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
    print(f"{time.time() - t:.0f} s")
