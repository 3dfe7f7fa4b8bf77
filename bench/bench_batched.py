"""K runs stacked in one call against the same K runs one by one (``make bench`` prints the ratio)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from featstore.devices import resolve_device
from featstore.synthetic import make_store


def bench_batched(k: int = 8, steps: int = 60, pooled: bool = True, method: str = "source_only",
                  channels: int = 32, n: int = 48, classes: int = 4, units: int = 3, repeats: int = 3,
                  device: str = "cpu", threads: int | None = None, console=None, **settings) -> dict:
    """Seconds to train ``k`` runs (seeds 0..k-1) stacked in one call against the same runs one by one.

    Synthetic stores (:mod:`featstore.synthetic`: ``channels`` wide, ``n`` clips, ``units`` windows; pooled: (N, U, C),
    otherwise 3x3 maps), made in a temporary folder.  Both sides share one loaded DomainPair, so the ratio is the
    training itself; both are warmed up, then timed ``repeats`` times interleaved, keeping the fastest wall time
    (the machine may be shared) and the least process CPU time.  ``settings`` override the runs' settings
    (default: the TrainConfig defaults, batch 64 + 64, embed_dim 512, evaluation every steps / 4).
    ``threads``: torch intra-op threads while timing (one thread makes the CPU-time ratio ``ratio_cpu`` a robust
    figure on a machine shared with other processes: it counts no time spent waiting for a core)."""
    import torch

    dev = resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench(k, steps, pooled, method, channels, n, classes, units, repeats, device, dev, console, settings)
    finally:
        torch.set_num_threads(old_threads)


def _bench(k, steps, pooled, method, channels, n, classes, units, repeats, device, dev, console, settings):
    import dataclasses

    import torch

    from adapt import config as C
    from adapt.data import DomainPair
    from adapt.trainer import train

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="bench_batched_") as tmp:
        root = Path(tmp)
        shape = {m: (channels,) if pooled else (channels, 3, 3) for m in ("rgb", "flow")}
        base = root / "i3d"
        base.mkdir()
        s = make_store(base / "S_train.zarr", n, classes, units, shape, 0.0, 1)
        t = make_store(base / "T_train.zarr", n, classes, units, shape, 1.0, 2)
        e = make_store(base / "T_test.zarr", max(2, n // 2), classes, units, shape, 1.0, 3)
        overrides = {"steps": steps, "stage1_steps": steps // 3, "eval_every": max(1, steps // 4),
                     "device": device, "validators": False, **settings}
        cfgs = [C.resolve(method, "custom", overrides, source=str(s), target=str(t), eval=str(e),
                          out=str(root / "runs"), seed=i) for i in range(k)]
        pair = DomainPair(cfgs[0], dev)
        warm = [dataclasses.replace(c, steps=3, stage1_steps=1, eval_every=3, out=str(root / "warm")) for c in cfgs]
        train(warm, None, False, pair=pair, overwrite=True)      # first-call costs of both paths
        train(warm[:1], None, False, pair=pair, overwrite=True)

        sides = {"sequential": lambda: [train([c], None, False, pair=pair, overwrite=True) for c in cfgs],
                 "batched": lambda: train(cfgs, None, False, pair=pair, overwrite=True)}
        wall = {name: [] for name in sides}
        cpu = {name: [] for name in sides}
        for _ in range(max(1, repeats)):
            for name, fn in sides.items():
                sync()
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        best = {name: min(range(len(wall[name])), key=wall[name].__getitem__) for name in sides}
        result = {"k": k, "steps": steps, "pooled": pooled, "method": method, "channels": channels,
                  "batch": cfgs[0].batch_source + cfgs[0].batch_target, "embed_dim": cfgs[0].embed_dim,
                  "device": str(dev), "threads": torch.get_num_threads(),
                  "batched_s": wall["batched"][best["batched"]], "sequential_s": wall["sequential"][best["sequential"]],
                  "batched_cpu_s": min(cpu["batched"]),
                  "sequential_cpu_s": min(cpu["sequential"]),
                  "batched_all_s": wall["batched"], "sequential_all_s": wall["sequential"]}
        result["ratio"] = result["sequential_s"] / result["batched_s"]
        result["ratio_cpu"] = result["sequential_cpu_s"] / max(result["batched_cpu_s"], 1e-9)
        if console is not None:
            console.print(f"{k} runs x {steps} steps ({method}, {'pooled' if pooled else '3x3 maps'}, C={channels}, "
                          f"batch {result['batch']}, embed {result['embed_dim']}, {result['device']}, "
                          f"{result['threads']} threads): stacked {result['batched_s']:.2f} s, one by one "
                          f"{result['sequential_s']:.2f} s: {result['ratio']:.2f}x (CPU time "
                          f"{result['ratio_cpu']:.2f}x)")
        return result
