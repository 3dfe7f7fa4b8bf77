"""The trainer's step against a plain PyTorch loop of the same heads and against its arithmetic bound.

For TA3N-size heads (EPIC-100 layout: RGB, flow and audio of 5 segments concatenated to 3072, batch 32 + 32),
source-only on the same model, and CIA's MC + SC heads on I3D 7x7 maps, on one CPU thread:

* the project's step (``adapt.trainer.Training.step`` with its batch gathered by ``Training.batch``), timed over the
  steps after a warm-up;
* a plain loop a reviewer would write: the same composition as ``nn.Module``\\ s with ``nn.Dropout``, an autograd
  reversal, ``torch.optim.SGD`` / ``Adam`` and the batch indexed from float16 tensors, no stacking, no vmap;
* the arithmetic bound: every matrix product of one step (forward and backward; recorded with their shapes by a
  dispatch mode) timed alone at those shapes, summed: what the step would take if it were its matmuls only;
* the aten operations per step (kernel launches on a GPU), counted by a dispatch mode.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from adapt import config as C
from adapt import parts
from adapt.data import DomainPair
from adapt.trainer import Training
from bench import peak_rss_mb
from featstore.allocator import retain_freed_memory
from featstore.synthetic import make_store

class Recorder(TorchDispatchMode):
    """Counts the aten operations dispatched, and records the shapes of the matrix products."""

    def __init__(self):
        super().__init__()
        self.ops, self.mms = Counter(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self.mms.append((name, tuple(a.shape), tuple(b.shape)))
        elif name == "convolution" or name == "convolution_backward":
            # the heads' convolutions are SC's 1x1 projections: the product (N.H.W, Cin) @ (Cin, Cout); the backward
            # is two products of that size
            x, w = (args[1], args[2]) if name == "convolution_backward" else (args[0], args[1])
            k = math.prod(w.shape[1:])
            rows = x.shape[0] * math.prod(x.shape[2:])
            for _ in range(2 if name == "convolution_backward" else 1):
                self.mms.append(("mm", (rows, k), (k, w.shape[0])))
        return func(*args, **(kwargs or {}))


def mm_flops(rec) -> int:
    total = 0
    for name, a, b in rec.mms:
        total += 2 * math.prod(a) * b[-1]
    return total


def time_mms(rec, repeats: int = 5) -> float:
    """Seconds the recorded products take alone, each at its shapes (the best of ``repeats``)."""
    total = 0.0
    for name, a, b in rec.mms:
        x, y = torch.randn(a), torch.randn(b)
        fn = torch.bmm if len(a) == 3 else torch.mm
        fn(x, y)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x, y)
            best = min(best, time.perf_counter() - t)
        total += best
    return total


# ------------------------------------------------------------------------------------------------------------
# the plain loop's models


class GRL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.c * g, None


def disc(d, hidden=None):
    hidden = hidden or d
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2))


class PlainTA3N(nn.Module):
    """TA3N's model as its code builds it (modality ALL, TRN-multiscale, domain attention), written plainly."""

    def __init__(self, in_dim=3072, d=512, r=256, segments=5, verbs=97, nouns=300, adversarial=True):
        super().__init__()
        self.fc, self.drop_i, self.drop_v = nn.Linear(in_dim, d), nn.Dropout(0.5), nn.Dropout(0.5)
        self.trn = parts.TRNMultiScale(d, segments, r, 3)
        self.verb, self.noun = nn.Linear(r, verbs), nn.Linear(r, nouns)
        self.adversarial = adversarial
        if adversarial:
            self.d_frame, self.d_video = disc(d), disc(r)
            self.d_rel = nn.ModuleList(disc(r) for _ in range(segments - 1))

    def forward(self, x, c):
        f = self.drop_i(F.relu(self.fc(x)))
        rel = self.trn(f)
        out = {}
        if self.adversarial:
            d = torch.stack([m(GRL.apply(rel[:, j], c)) for j, m in enumerate(self.d_rel)], 1)
            h = -(d.softmax(-1) * d.log_softmax(-1)).sum(-1)
            rel = rel * (2 - h)[..., None]
            out["d_rel"], out["d_frame"] = d, self.d_frame(GRL.apply(f, c))
        v = self.drop_v(rel.sum(1))
        out["verb"], out["noun"] = self.verb(v), self.noun(v)
        if self.adversarial:
            out["d_video"] = self.d_video(GRL.apply(v, c))
        return out


def ta3n_loss(out, y, n, b_s, adversarial):
    loss = 0.5 * (F.cross_entropy(out["verb"][:b_s], y) + F.cross_entropy(out["noun"][:b_s], n))
    if adversarial:
        dom = (torch.arange(out["verb"].shape[0]) >= b_s).long()
        for k in ("d_rel", "d_frame"):
            d = out[k]
            loss = loss + F.cross_entropy(d.reshape(-1, 2), dom[:, None].expand(d.shape[:2]).reshape(-1))
        loss = loss + F.cross_entropy(out["d_video"], dom)
        hd = -(out["d_video"].softmax(-1) * out["d_video"].log_softmax(-1)).sum(-1)
        ent = [-(z.softmax(-1) * z.log_softmax(-1)).sum(-1) for z in (out["verb"], out["noun"])]
        loss = loss + 0.003 * 0.5 * sum(((1 + hd) * e).mean() for e in ent)
    return loss


class PlainCIA(nn.Module):
    """CIA on I3D 7x7 maps: MC + SC (the shared parts), an embedding per modality, the mean over time, the
    classifiers averaged, and video- and frame-level discriminators."""

    def __init__(self, c=1024, d=1024, classes=8):
        super().__init__()
        self.mc = parts.MutualRefinement(("rgb", "flow"), c, 16)
        self.sc = parts.SpatialConsensus(2 * c, 256, 3, modalities=("rgb", "flow"))
        self.fc = nn.ModuleDict({m: nn.Linear(2 * c, d) for m in ("rgb", "flow")})
        self.cls = nn.ModuleDict({m: nn.Linear(d, classes) for m in ("rgb", "flow")})
        self.drop = nn.Dropout(0.5)
        self.d_video, self.d_frame = disc(2 * d, 100), nn.ModuleDict({m: disc(d, 100) for m in ("rgb", "flow")})

    def forward(self, x, c):
        pooled, _ = self.sc(self.mc(x))
        f = {m: F.relu(self.fc[m](pooled[m])) for m in x}
        v = {m: f[m].mean(1) for m in x}
        logits = sum(self.cls[m](self.drop(v[m])) for m in x) / 2
        dv = self.d_video(GRL.apply(torch.cat([v["rgb"], v["flow"]], -1), c))
        df = [self.d_frame[m](GRL.apply(f[m], c)) for m in x]
        return logits, dv, df


# ------------------------------------------------------------------------------------------------------------
# the measurements


def stores(root: Path, kind: str) -> dict:
    if kind == "epic100":
        shape, units, classes, nouns, backbone = {m: (1024,) for m in ("rgb", "flow", "audio")}, 25, 97, 300, "tbn"
    else:
        shape, units, classes, nouns, backbone = {m: (1024, 7, 7) for m in ("rgb", "flow")}, 1, 8, 0, "i3d"
    out = {}
    for role, n, seed in (("source", 96, 1), ("target", 96, 2), ("eval", 16, 3)):
        p = root / backbone / f"{kind}_{role}.zarr"
        if not p.exists():
            make_store(p, n, classes, units, shape, float(role != "source"), seed, backbone, nouns, chunk_clips=32)
        out[role] = str(p)
    return out


def project_step(method: str, paths: dict, backbone: str, dataset: str, steps: int, sets: dict):
    """(seconds per step, the Training) of the project's step, after 2 warm-up steps; one run, one thread."""
    cfg = C.resolve(method, dataset, {"validators": "false", **sets}, backbone=backbone, out="/tmp/unused",
                    source=paths["source"], target=paths["target"], eval=paths["eval"])
    t = Training([cfg], DomainPair(cfg, torch.device("cpu")), torch.device("cpu"))
    return timed(t, steps), t


def timed(t, steps: int, repeats: int = 3) -> float:
    """Seconds per step of Training ``t`` (batch and step), the best of ``repeats`` stretches after 3 warm-up
    steps, with the trainer's allocator setting (featstore.allocator)."""
    retain_freed_memory()
    for s in range(3):
        t.step(s, t.batch(s))
    best, s = float("inf"), 3
    for _ in range(repeats):
        start = time.perf_counter()
        for s in range(s, s + steps):
            t.step(s, t.batch(s))
        s += 1
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def record_step(t) -> Recorder:
    inputs = t.batch(250)
    with Recorder() as rec:
        t.step(250, inputs)
    return rec


def plain_step(kind: str, t, steps: int, adversarial: bool, optimiser: str):
    """Seconds per step of the plain loop on the same stores (the features as float16 tensors in memory)."""
    pair = t.pair
    torch.manual_seed(0)
    if kind == "epic100":
        model = PlainTA3N(adversarial=adversarial)
    else:
        model = PlainCIA()
    opt = (torch.optim.SGD(model.parameters(), lr=3e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
           if optimiser == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-4))
    feats = {d: pair.source.feats if d == "s" else pair.target.feats for d in ("s", "t")}
    b_s, b_t = t.sched.batch_source, t.sched.batch_target
    units = torch.as_tensor(pair.fixed_units() if kind == "epic100" else [0])
    g = torch.Generator().manual_seed(0)

    def batch():
        i = torch.randint(0, pair.source.n, (b_s,), generator=g)
        j = torch.randint(0, pair.target.n, (b_t,), generator=g)
        x = {m: torch.cat([feats["s"][m][i][:, units], feats["t"][m][j][:, units]]).float() for m in pair.modalities}
        return x, pair.source.verb[i], pair.source.noun[i].clamp_min(0)

    def one():
        x, y, n = batch()
        opt.zero_grad(set_to_none=True)
        if kind == "epic100":
            out = model(torch.cat([x[m] for m in ("rgb", "flow", "audio")], -1), 0.5)
            loss = ta3n_loss(out, y, n, b_s, adversarial)
        else:
            logits, dv, df = model(x, 0.5)
            dom = (torch.arange(b_s + b_t) >= b_s).long()
            loss = (F.cross_entropy(logits[:b_s], y) + F.cross_entropy(dv, dom)
                    + 0.5 * sum(F.cross_entropy(d.reshape(-1, 2), dom[:, None].expand(d.shape[:2]).reshape(-1))
                                for d in df))
        loss.backward()
        if kind == "epic100":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
        opt.step()
    for _ in range(3):
        one()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            one()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


CASES = {  # name: (store kind, method, dataset, backbone, settings, adversarial, optimiser)
    "ta3n": ("epic100", "ta3n", "epic100", "tbn", {"batch_source": "32", "batch_target": "32", "steps": "300"},
             True, "sgd"),
    "source_only": ("epic100", "source_only", "epic100", "tbn", {"batch_source": "32", "batch_target": "32",
                                                                 "steps": "300"}, False, "sgd"),
    "cia": ("i3d", "cia", "mmsada", "i3d", {"batch_source": "16", "batch_target": "16", "steps": "300"}, True,
            "adam"),
}


def run(steps: int = 30, threads: int = 1, console=None) -> list[dict]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_plain_") as tmp:
            root = Path(tmp)
            for name, (kind, method, dataset, backbone, sets, adversarial, optimiser) in CASES.items():
                paths = stores(root, kind)
                n = steps if kind == "epic100" else max(3, steps // 6)
                ours, t = project_step(method, paths, backbone, dataset, n, sets)
                rec = record_step(t)
                bound = time_mms(rec)
                plain = plain_step(kind, t, n, adversarial, optimiser)
                t.close()
                row = {"method": name, "threads": threads, "step_s": ours, "plain_step_s": plain,
                       "vs_plain": plain / ours, "gflop": mm_flops(rec) / 1e9, "bound_s": bound,
                       "of_bound": bound / ours, "gflops": mm_flops(rec) / 1e9 / ours,
                       "sgemm_gflops": mm_flops(rec) / 1e9 / max(bound, 1e-9),
                       "ops": sum(rec.ops.values()), "top_ops": rec.ops.most_common(8)}
                rows.append(row)
                if console is not None:
                    console.print(f"{name}: step {1e3 * ours:.1f} ms, plain loop {1e3 * plain:.1f} ms "
                                  f"({row['vs_plain']:.2f}x), {row['gflop']:.2f} GFLOP: {row['gflops']:.1f} GFLOP/s "
                                  f"against {row['sgemm_gflops']:.1f} for its products alone ({row['of_bound']:.2f} "
                                  f"of the bound), {row['ops']} aten ops")
    finally:
        torch.set_num_threads(old)
    return rows


def stacked_step(name: str, k: int, steps: int, threads: int, root: str) -> dict:
    """Seconds per step of ``k`` runs of case ``name`` stacked (seeds 0..k-1) on the stores under ``root``, and
    this process's peak RSS (the stores made by the parent: the figure is the training's)."""
    torch.set_num_threads(threads)
    kind, method, dataset, backbone, sets, _, _ = CASES[name]
    paths = stores(Path(root), kind)
    cfgs = [C.resolve(method, dataset, {"validators": "false", **sets}, backbone=backbone, out="/tmp/unused",
                      seed=i, **paths) for i in range(k)]
    t = Training(cfgs, DomainPair(cfgs[0], torch.device("cpu")), torch.device("cpu"))
    seconds = timed(t, steps)
    t.close()
    return {"k": k, "step_s": seconds, "peak_rss_mb": peak_rss_mb()}


def stacking(name: str, ks=(1, 2, 4, 8), steps: int = 10, threads: int = 1, console=None) -> list[dict]:
    """K runs stacked against K one by one (K x the one-run step), each K in a fresh process (its peak memory)."""
    import json
    import subprocess
    import sys
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_stack_") as tmp:
        stores(Path(tmp), CASES[name][0])
        for k in ks:
            out = subprocess.run([sys.executable, "-m", "bench.bench_plain", "--stack", name, str(k), str(steps),
                                  str(threads), tmp], capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parent.parent)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    one = rows[0]["step_s"]
    for r in rows:
        r["gain"] = r["k"] * one / r["step_s"]  # one by one / stacked
        if console is not None:
            console.print(f"{name}: K = {r['k']} stacked {1e3 * r['step_s']:.1f} ms a step, {r['gain']:.2f}x one by "
                          f"one, peak RSS {r['peak_rss_mb']:.0f} MB")
    return rows


if __name__ == "__main__":
    import json
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "--stack":
        print(json.dumps(stacked_step(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                      sys.argv[6])))
    else:
        from rich.console import Console
        run(console=Console(width=250))
