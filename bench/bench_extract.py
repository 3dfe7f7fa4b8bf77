"""Extraction benchmarks on the demo dataset with the demo settings (I3D rgb+flow, 8-frame windows, 3 windows,
96x96 crops), measured in one run on this machine:

* decode-only throughput: clips/s of ``extract.inputs.load_clip`` through the runner's DataLoader worker setup,
  its steady rate after the first clip;
* backbone-only throughput: clips/s of the runner's batched inference on pre-decoded clips (warm);
* full pipeline throughput: ``run_extraction`` of 2N clips into a fresh store (decode in workers, inference,
  store writes); its steady rate (``steady_clips_per_s``: the clips after the first batch over the time after it)
  leaves out start-up (forking the workers, the first batch's wait), which a run of a few clips would otherwise
  be dominated by.  The ratio pipeline / min(decode, backbone): the goal is >= 0.85 (the slower stage hides the
  other).  On a CPU-only machine decoding and inference share the same cores, so the serial bound
  ``1 / (1/decode + 1/backbone)`` is the reference there; the ratio to it is printed too.  Backbone and pipeline
  runs are interleaved and the best of ``repeats`` is taken, since other processes' load makes single timings
  noisy;
* peak memory (RSS of the extracting process, and the largest decoding worker) and time per clip (after the first
  batch) for 1x, 2x and 4x clips, each in a fresh process (its backbone kernels warmed first): the peak should not
  grow with the number of clips (features are written a chunk at a time, decoding is bounded by the loader's
  prefetch), nor should the time per clip.

``run(report)`` prints lines through ``report`` (a callable taking a string) and returns the figures as a dict;
``python -m bench.bench_extract`` prints them and the dict as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent

_RSS_SCRIPT = r"""
import json, resource, sys, time
from pathlib import Path
from rich.console import Console
from extract.config import DemoConfig
from extract.runner import run_extraction
a = json.loads(sys.argv[1])
cfg = DemoConfig().extract
cfg = cfg.__class__(**{**cfg.__dict__, "backbone": "i3d", "modalities": ("rgb", "flow"),
                        "data_root": Path(a["root"]), "split_kind": "test"})
# warm the backbone's kernels (cached per shape for the process) so the time per clip is the steady state
import torch
from extract.inputs import input_shape
from extract.pipeline import Extractor, build_models, default_batch_size
from featstore.devices import resolve_device
dev = resolve_device(a["device"])
bs = a["batch_size"] or default_batch_size(dev, cfg)
models, _ = build_models(cfg, {}, dev)
Extractor(cfg, models, dev, bs, "auto")([{m: torch.zeros(input_shape(cfg, m)) for m in cfg.modalities}] * bs)
del models
s = run_extraction(a["split"], cfg, a["out"], {}, device=a["device"], workers=a["workers"],
                   batch_size=a["batch_size"], progress=False, console=Console(file=open("/dev/null", "w")))
from bench import peak_rss_mb
self_kb = peak_rss_mb() * 1024
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"extracted": s["extracted"], "run_seconds": s["run_seconds"], "seconds": s["seconds"],
                  "steady_clips_per_s": s["steady_clips_per_s"],
                  "rss_mb": self_kb / 1024, "worker_rss_mb": child_kb / 1024}))
"""


def _manifest(n: int, folder: Path) -> Path:
    """The first ``n`` clips of the demo splits K1_train, K1_test, K2_train, K2_test, K3_train, ... as one CSV."""
    from featstore.manifests import MANIFEST_DIR

    frames = []
    for k in ("K1", "K2", "K3"):
        for role in ("train", "test"):
            frames.append(pd.read_csv(MANIFEST_DIR / "demo" / f"{k}_{role}.csv", dtype=str, keep_default_na=False))
    df = pd.concat(frames, ignore_index=True)
    if n > len(df):
        raise ValueError(f"the demo dataset has {len(df)} clips, asked for {n}")
    path = folder / f"bench_{n}.csv"
    df.iloc[:n].to_csv(path, index=False)
    return path


def run(report=print, clips: int = 16, device: str = "cpu", workers: int | None = None,
        batch_size: int | None = None, scale_clips: int = 6, repeats: int = 3) -> dict:
    """Measure (module docstring); ``clips`` for the throughputs (best of ``repeats`` runs, interleaved),
    ``scale_clips`` x 1, 2, 4 for memory and time per clip."""
    from rich.console import Console

    from extract.commands import ensure_demo_data
    from extract.config import DemoConfig
    from extract.pipeline import (ClipDataset, Extractor, build_models, default_batch_size, default_workers, loader,
                                  resolve_precision)
    from extract.runner import _record, run_extraction
    from featstore.devices import resolve_device

    t_start = time.perf_counter()
    null = Console(file=open("/dev/null", "w"))
    root = DemoConfig.root if Path(DemoConfig.root).is_absolute() else ROOT / DemoConfig.root
    ensure_demo_data(null, root)
    cfg = replace(DemoConfig().extract, backbone="i3d", modalities=("rgb", "flow"), data_root=root,
                  split_kind="test")
    dev = resolve_device(device)
    bs = batch_size or default_batch_size(dev, cfg)
    nw = default_workers(dev) if workers is None else workers
    out: dict = {"device": str(dev), "threads": torch.get_num_threads(), "batch_size": bs, "workers": nw,
                 "settings": {k: getattr(cfg, k) for k in ("frames_per_window", "test_windows", "crop", "resize")}}
    report(f"extraction bench: i3d rgb+flow, demo settings {out['settings']}, device {dev}, "
           f"{out['threads']} threads, batch {bs} clips, {nw} decoding workers")

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        from featstore.manifests import read_manifest
        split = _manifest(clips, tmp)
        df = read_manifest(split, None, None)
        rows = list(range(len(df)))
        records = {r: _record(df, r) for r in rows}

        # decode only, through the workers (twice the clips: it is fast)
        big = read_manifest(_manifest(2 * clips, tmp), None, None)
        recs2 = {r: _record(big, r) for r in range(len(big))}
        ds = ClipDataset(recs2, list(range(len(big))), cfg)
        decode_runs = []
        for _ in range(repeats):
            # steady rate, as the pipeline's: the clips after the first over the time after it (forking the
            # workers and importing in them is start-up)
            n, t = 0, None
            for item in loader(ds, nw, bs, False):
                if item[1] is None:
                    raise RuntimeError(f"decode failed: {item[2] or item[3]}")
                if t is None:
                    t = time.perf_counter()
                else:
                    n += 1
            decode_runs.append(n / (time.perf_counter() - t))
        decode = max(decode_runs)
        out["decode_clips_per_s"] = round(decode, 3)
        report(f"decode only ({nw} workers, {2 * clips} clips, steady rate after the first): {decode:.2f} clips/s "
               f"(best of {repeats}: {', '.join(f'{v:.2f}' for v in decode_runs)})")

        # backbone only on pre-decoded clips, and the full pipeline, interleaved (the machine's load varies);
        # the same process, so the backbone's kernels are warm for both
        models, _ = build_models(cfg, {}, dev)
        ex = Extractor(cfg, models, dev, bs, resolve_precision("auto", dev))
        ds1 = ClipDataset(records, rows, cfg)
        decoded = [ds1[i][1] for i in range(len(rows))]
        ex(decoded[:bs])  # warm-up
        backbone_runs, pipeline_runs, startup_runs = [], [], []
        split2 = _manifest(2 * clips, tmp)
        for rep in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, len(decoded), bs):
                ex(decoded[i:i + bs])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            backbone_runs.append(len(decoded) / (time.perf_counter() - t))
            s = run_extraction(split2, cfg, tmp / f"pipeline_{rep}.zarr", {}, device=device, workers=nw,
                               batch_size=bs, progress=False, console=null)
            if s["extracted"] != 2 * clips:
                raise RuntimeError(f"pipeline run extracted {s['extracted']} of {2 * clips} clips")
            pipeline_runs.append(s["steady_clips_per_s"])
            startup_runs.append(s["clips_per_s"])
        del decoded, models, ex
        backbone, pipeline, with_startup = max(backbone_runs), max(pipeline_runs), max(startup_runs)
        ratio = pipeline / min(decode, backbone)
        serial = 1.0 / (1.0 / decode + 1.0 / backbone)
        out.update(backbone_clips_per_s=round(backbone, 3), pipeline_clips_per_s=round(pipeline, 3),
                   pipeline_with_startup_clips_per_s=round(with_startup, 3),
                   pipeline_ratio=round(ratio, 3), pipeline_ratio_goal=0.85,
                   serial_bound_clips_per_s=round(serial, 3), pipeline_ratio_to_serial=round(pipeline / serial, 3),
                   runs={"decode": [round(v, 3) for v in decode_runs], "backbone": [round(v, 3) for v in backbone_runs],
                         "pipeline": pipeline_runs, "pipeline_with_startup": startup_runs})
        report(f"backbone only (batch {bs}, {clips} clips): {backbone:.2f} clips/s "
               f"(best of {repeats}: {', '.join(f'{v:.2f}' for v in backbone_runs)})")
        report(f"pipeline ({2 * clips} clips), steady rate after the first batch: {pipeline:.2f} clips/s (best of "
               f"{repeats}: {', '.join(f'{v:.2f}' for v in pipeline_runs)}) = {ratio:.2f} x min(decode, backbone) "
               f"(goal >= 0.85); {pipeline / serial:.2f} x the serial bound 1/(1/decode + 1/backbone) = "
               f"{serial:.2f} clips/s, which is what a CPU-only run can reach when decoding and inference share "
               f"the same {out['threads']} cores; {with_startup:.2f} clips/s with start-up")

        # memory and time per clip at 1x, 2x, 4x clips, each in a fresh process
        scale = {}
        for k in (1, 2, 4):
            n = scale_clips * k
            args = {"root": str(root), "split": str(_manifest(n, tmp)), "out": str(tmp / f"scale_{n}.zarr"),
                    "device": device, "workers": nw, "batch_size": bs}
            done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, json.dumps(args)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"scale run {n} clips failed: {done.stderr[-2000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            per_clip = 1.0 / r["steady_clips_per_s"] if r["steady_clips_per_s"] else float("nan")
            scale[f"{k}x"] = {"clips": n, "peak_rss_mb": round(r["rss_mb"], 1),
                              "worker_peak_rss_mb": round(r["worker_rss_mb"], 1),
                              "seconds_per_clip": round(per_clip, 3),
                              "seconds_per_clip_with_startup": round(r["run_seconds"] / max(r["extracted"], 1), 3)}
            report(f"{k}x ({n} clips): peak RSS {r['rss_mb']:.0f} MB (worker {r['worker_rss_mb']:.0f} MB), "
                   f"{per_clip:.3f} s per clip after the first batch "
                   f"({r['run_seconds'] / max(r['extracted'], 1):.3f} with start-up)")
        out["scale"] = scale
        growth = scale["4x"]["peak_rss_mb"] / scale["1x"]["peak_rss_mb"]
        out["rss_growth_4x_over_1x"] = round(growth, 3)
        report(f"peak RSS 4x / 1x = {growth:.2f} (goal: ~1, no growth with the number of clips)")
    out["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    report(f"bench took {out['bench_seconds']:.0f} s")
    return out


def main() -> dict:
    figures = run(print)
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
