"""`make bench` (`python -m bench [--device cuda] [--quick]`): every benchmark in one run, then one table of ratios,
each against its goal, measured on the machine at hand.  The raw figures go to bench/out/bench.json."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps and clips")
    args = ap.parse_args()
    console = Console() if Console().is_terminal else Console(width=160)  # a file gets the tables whole
    started = time.time()
    figures: dict = {"device": args.device, "machine": platform.processor() or platform.machine(),
                     "cpus": torch.get_num_threads(), "torch": torch.__version__}

    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)

    def save():  # after every section: a section that fails keeps the figures of those before it
        (out / "bench.json").write_text(json.dumps(figures, indent=1, default=str))

    from bench import bench_extract, bench_store, bench_stream, bench_train
    from bench.bench_train import SPATIAL_ONLY
    from bench.bench_batched import bench_batched

    console.rule("extraction")
    # best of 5 interleaved runs on each side: single timings on a shared machine swing by tens of percent
    figures["extract"] = bench_extract.run(console.print, clips=8 if args.quick else 12, device=args.device,
                                           repeats=5)
    save()
    console.rule("store codecs")
    figures["store"] = bench_store.run(32 if args.quick else 64)
    save()
    console.rule("trainer")
    figures["train"] = bench_train.run(args.device, quick=args.quick)
    save()
    console.rule("batched sweep")
    # K = 8 runs stacked against one by one, for three head sizes: the gain is the per-step overhead that stacking
    # shares, so it shrinks as the heads' own compute grows
    sweep_steps = 40 if args.quick else 100
    figures["sweep"] = [
        {"heads": name, **bench_batched(k=8, steps=sweep_steps, pooled=True, device=args.device, channels=c,
                                        embed_dim=e, console=console, repeats=5)}
        for name, c, e in (("small (C=32, embed 128)", 32, 128), ("medium (C=32, embed 512)", 32, 512),
                           ("I3D-size (C=1024, embed 512)", 1024, 512))]
    save()

    console.rule("the step against a plain PyTorch loop and its arithmetic bound (one thread)")
    from bench import bench_plain
    figures["plain"] = bench_plain.run(steps=10 if args.quick else 30, threads=1, console=console)
    figures["stacking"] = {name: bench_plain.stacking(name, steps=5 if args.quick else 10, console=console)
                           for name in ("source_only", "ta3n", "cia")}
    save()

    console.rule("training beyond memory")
    figures["stream"] = bench_stream.run(quick=args.quick)
    save()

    ex, tr, sw, st = figures["extract"], figures["train"], figures["sweep"], figures["stream"]
    table = Table(title=f"benchmarks on {args.device} ({figures['cpus']} threads), {time.time() - started:.0f} s")
    for col in ("measure", "value", "goal"):
        table.add_column(col)
    table.add_row("extraction pipeline / slower stage (decode, backbone)", f"{ex['pipeline_ratio']:.2f}", ">= 0.85")
    table.add_row("  decode / backbone / pipeline clips/s",
                  f"{ex['decode_clips_per_s']:.2f} / {ex['backbone_clips_per_s']:.2f} / "
                  f"{ex['pipeline_clips_per_s']:.2f}", "")
    table.add_row("extraction peak RSS, 4x clips / 1x clips", f"{ex['rss_growth_4x_over_1x']:.2f}", "~1 (no growth)")
    table.add_row("  seconds per clip at 1x / 2x / 4x clips",
                  " / ".join(f"{ex['scale'][k]['seconds_per_clip']:.3f}" for k in ("1x", "2x", "4x")), "flat")
    # each method in the feature form it trains on by default (pooled, except m3em and cia on 7x7 maps); tiny heads
    # forced onto 7x7 maps are shown apart: copying the maps is then most of what a CPU step does
    default = [r for r in tr["methods"] if (r["features"] == "spatial") == (r["method"] in SPATIAL_ONLY)]
    worst = max(default, key=lambda r: r["data_share"])
    table.add_row("trainer: data path's share of a step (worst method, default features)",
                  f"{worst['data_share']:.1%} ({worst['method']}, {worst['features']})", "< 15%")
    forced = [r for r in tr["methods"] if r["features"] == "spatial" and r["method"] not in SPATIAL_ONLY]
    if forced:
        table.add_row("  tiny heads forced onto 7x7 maps (" + ", ".join(r["method"] for r in forced) + ")",
                      " / ".join(f"{r['data_share']:.0%}" for r in forced), "")
    table.add_row("trainer: step time with 4x larger stores / 1x", f"{tr['step_time_4x_over_1x']:.2f}", "~1")
    table.add_row("trainer peak memory / feature bytes loaded", f"{tr['memory']['ratio']:.2f}", "<= 1.5")
    # the goal is for heads whose step is overhead, which stacking shares; bigger heads' steps are memory passes
    # (medium) or matmul arithmetic (I3D-size) that eight runs need eight times over (README, Benchmarks)
    goals = ((">= 4x (CPU, pooled)", "(memory-bound on a CPU)", "(matmul-bound on a CPU, < 2x)")
             if args.device == "cpu" else ("more than on a CPU",) * 3)
    for r, goal in zip(sw, goals):
        table.add_row(f"batched sweep, K=8 stacked vs one by one, {r['heads']}",
                      f"{r['ratio']:.2f}x (CPU time {r['ratio_cpu']:.2f}x)", goal)
    for r in st["streamed"]:
        table.add_row(f"streamed / in-memory steps/s, stores 4x the budget: {r['method']} ({r['features']}, "
                      f"{r['threads']} thread{'s' if r['threads'] > 1 else ''})", f"{r['ratio']:.2f}",
                      ">= 0.8" if r["threads"] > 1 else "(a core left to the reader)")
    rd = st["readers"]
    table.add_row("read amplification, 5 of 25 segments: version 2 / version 1",
                  f"{rd['v2_read_amplification']:.2f} / {rd['v1_read_amplification']:.2f}", "<= 1.5 (v2)")
    table.add_row("reader MB/s, 5-of-25 units: tensorstore / zarr-python (v2)",
                  f"{rd['v2_tensorstore_units_MBps']:.0f} / {rd['v2_zarr_units_MBps']:.0f}", "")
    table.add_row("reader MB/s, whole shards: tensorstore / zarr-python (v2)",
                  f"{rd['v2_tensorstore_whole_MBps']:.0f} / {rd['v2_zarr_whole_MBps']:.0f}", "")
    dv = st["delivery"]
    table.add_row("streaming delivery GB/s; TA3N-size spatial step GB; steps/s storage allows",
                  f"{dv['GBps']:.2f}; {dv['ta3n_spatial_step_GB']:.2f}; {dv['steps_per_s_storage_allows']:.1f}", "")
    table.add_row("peak RSS growth of a streamed run / memory budget", f"{st['rss']['ratio']:.2f}", "<= 1.1")
    best = max(figures["store"], key=lambda r: r["ratio"])
    table.add_row("store codec (chosen: zstd-3): compression / read MB/s",
                  f"{best['ratio']:.2f} / {best['read_MBps']:.0f}", "")
    console.print(table)
    plain = Table(title="the step, one thread: against a plain PyTorch loop, its products' bound, K stacked")
    for col in ("method", "step ms", "plain loop ms", "plain / ours", "GFLOP", "GFLOP/s", "sgemm GFLOP/s",
                "of the bound", "aten ops", "K = 1 / 2 / 4 / 8 stacked vs one by one (peak RSS MB)"):
        plain.add_column(col)
    for r in figures["plain"]:
        ks = figures["stacking"].get(r["method"], [])
        plain.add_row(r["method"], f"{1e3 * r['step_s']:.1f}", f"{1e3 * r['plain_step_s']:.1f}",
                      f"{r['vs_plain']:.2f}", f"{r['gflop']:.2f}", f"{r['gflops']:.1f}", f"{r['sgemm_gflops']:.1f}",
                      f"{r['of_bound']:.2f}", str(r["ops"]),
                      " / ".join(f"{k['gain']:.2f}x ({k['peak_rss_mb']:.0f})" for k in ks))
    console.print(plain)
    steps = Table(title="trainer steps/s (batch 64 + 64)")
    for col in ("method", "features", "steps/s", "data share"):
        steps.add_column(col)
    for r in tr["methods"]:
        steps.add_row(r["method"], r["features"], f"{r['steps_per_s']:.1f}", f"{r['data_share']:.1%}")
    console.print(steps)
    console.print(f"figures in {out / 'bench.json'}")


if __name__ == "__main__":
    main()
