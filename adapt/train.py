"""The one training loop.  It reads top to bottom: data, models, optimiser, steps, evaluation, results.

K runs that share stores and architecture (seeds, loss weights; see ``TrainConfig.architecture_key``) are trained
together: their parameters are stacked with ``torch.func.stack_module_state`` and every step calls the model
through ``vmap(functional_call)``.  A single run is the case K = 1 of the same code, so a stacked run gives the
same numbers as the run alone (per-run index sampling with numpy generators, per-run dropout keys from
``adapt.rng``, element-wise optimisers).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from adapt import config as C
from adapt import metrics, rng
from adapt.data import (DomainPair, EpochSampler, Gatherer, Prefetcher, averaged_over_views, draw_batch, read_part,
                        standardisation)
from adapt.model import AdaptModel
from adapt.runs import RunFolder
from adapt.objectives import STAGE1, TERMS, apply_writes, bank_inputs, compute_terms, initial_state
from adapt.schedule import LEVELS, Schedule
from featstore.allocator import retain_freed_memory
from featstore.devices import resolve_device
from featstore.errors import UserError


@functools.cache
def _fast_optimiser_option() -> dict:
    """``fused=True`` where this torch has fused SGD and Adam kernels for the CPU and CUDA, else ``foreach=True``
    (probed once, at the first training)."""
    try:
        p = torch.zeros(2, requires_grad=True)
        p.grad = torch.ones(2)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        torch.optim.Adam([p], lr=0.1, fused=True).step()
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


class TrainingError(UserError):
    """A run that cannot go on (a non-finite loss); exit code 1."""

    exit_code = 1


def run_name(cfg: C.TrainConfig) -> str:
    name = f"{cfg.method}_{Path(str(cfg.source)).stem}-{Path(str(cfg.target)).stem}_s{cfg.seed}"
    return name + (f"_{cfg.tag}" if cfg.tag else "")


def train(cfgs: list[C.TrainConfig], console=None, progress: bool = True, pair: DomainPair | None = None,
          timings: dict | None = None, overwrite: bool = False) -> list:
    """Train the runs ``cfgs`` (one architecture) stacked; returns their ``final.json`` dicts.

    Each run is written as a whole (:mod:`adapt.runs`): a complete run already in its folder is refused unless
    ``overwrite``, and a run another process is training is refused, both before anything is read.

    ``timings``, when given, receives the seconds spent gathering batches ('data'), in the model's steps
    ('step') and in evaluation ('eval'), measured with device synchronisation (for benchmarks)."""
    cfg = cfgs[0]
    if any(c.architecture_key() != cfg.architecture_key() for c in cfgs):
        raise ValueError("stacked runs must share stores and architecture (only seeds and weights may differ)")
    names = [run_name(c) for c in cfgs]
    if len(set(names)) != len(names):
        raise UserError(f"two runs would write the same folder {names}: give them different seeds or tags")
    device = resolve_device(cfg.device)
    folders = []
    try:
        for c, n in zip(cfgs, names):
            folders.append(RunFolder(Path(c.out) / n, overwrite).claim())
        return _train(cfgs, console, progress, pair, timings, device, folders)
    finally:
        for f in folders:
            f.release()


def _train(cfgs, console, progress, pair, timings, device, folders) -> list:
    cfg, names = cfgs[0], [run_name(c) for c in cfgs]
    started = time.time()
    retain_freed_memory()  # every step allocates the same tensors again: reuse their pages

    # ---- data and schedule ------------------------------------------------------------------------------------
    pair = pair or DomainPair(cfg, device)
    if console is not None:
        console.print(pair.memory_line, highlight=False)
    sched = Schedule.of(cfg, pair.source.n, pair.target.n)
    K, Bs, Bt = len(cfgs), sched.batch_source, sched.batch_target
    mods, nouns = pair.modalities, pair.noun_classes
    # input standardisation: per-channel statistics of the source store for every domain, or, for AdaBN, of each
    # domain's own store (the target's at evaluation)
    norm_s = standardisation(pair.source) if (cfg.standardise or cfg.adabn) else None
    norm_t = standardisation(pair.target) if cfg.adabn else norm_s
    active = active_terms(cfg)
    if "corr" in active and min(Bs, Bt) < 4:
        raise UserError(f"the correspondence head needs at least 4 clips per domain and step (batch {Bs} + {Bt})")

    # ---- models: one per run, stacked ----------------------------------------------------------------------
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(AdaptModel(c, mods, pair.feature_shapes, pair.verb_classes, nouns, pair.heads_units))
    template = copy.deepcopy(models[0]).to("meta")
    stacked_params, buffers = stack_module_state([m.to(device) for m in models])
    # the optimiser's tensors (leaves), and ``params()``: the same as the model's parameters (views; see
    # _gradient_layout)
    leaves, params = _gradient_layout({k: v.detach() for k, v in stacked_params.items()}, models[0], K)
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    n_params = sum(p[0].numel() for p in leaves.values())
    three_step = "mcd" in active and cfg.mcd_form == "three_step"
    gen_names, cls_names = models[0].param_groups()
    opt_gen, opt_cls = ((_optimiser(cfg, [leaves[n] for n in gen_names]), _optimiser(cfg, [leaves[n] for n in cls_names]))
                        if three_step else (_optimiser(cfg, list(leaves.values())), None))
    optimisers = [o for o in (opt_gen, opt_cls) if o is not None]

    def fresh_optimisers():
        # stage 2 starts with fresh optimiser state, as the MM-SADA code's stage-2 run restores the weights but
        # not the momentum (utils.py:27-28, 57-58); it is also what lets stage 2's new heads join the fused step
        for o in optimisers:
            o.state.clear()

    # the loss weights of each stage per run (K,); terms with a zero weight in both stages are left out
    weights = {stage: {t: torch.tensor([c.weight(t, stage) if (stage == 2 or t in STAGE1) else 0.0 for c in cfgs],
                                       dtype=torch.float32, device=device) for t in active} for stage in (1, 2)}
    streams = models[0].streams
    width = models[0].classifier[streams[0]].verb.in_features
    state = initial_state(cfg, streams, pair.source.n, pair.target.n, width, device)
    state = {k: torch.stack([v] * K) for k, v in state.items()}
    rngs = [np.random.default_rng([c.seed, 7]) for c in cfgs]
    samplers = [(EpochSampler(pair.source.n, r), EpochSampler(pair.target.n, r)) for r in rngs]
    gatherer = Gatherer(device)
    run_keys = torch.tensor([c.seed for c in cfgs], dtype=torch.int64, device=device)

    # ---- the step function of one run (vmapped over K) ------------------------------------------------------
    def one_run(p, b, x, batch, key, coeff, w, st, phase, stage):
        banks = bank_inputs(st, cfg)
        out = functional_call(template, (p, b), (x, key, coeff, Bs, banks))
        now = active if stage == 2 else tuple(t for t in active if t in STAGE1)
        terms, writes = compute_terms(out, cfg, Bs, batch, st, now)
        total = _phase_total(phase, now, terms, w, cfg)
        return total, torch.stack([terms[t] for t in TERMS]), writes

    step_fns = {}

    def step_fn(phase, stage):
        if (phase, stage) not in step_fns:
            fn = functools.partial(one_run, phase=phase, stage=stage)
            step_fns[phase, stage] = _single(fn) if K == 1 else vmap(
                fn, in_dims=(0, 0, 0, 0, 0, None, 0, 0), randomness="error")
        return step_fns[phase, stage]

    pin = device.type == "cuda"
    streamed = [i for i, dom in enumerate((pair.source, pair.target)) if dom.streamed]

    def draw_step(step):
        """The step's clips and units (numpy, drawn in step order) and the streamed domains' features read."""
        per_run = [draw_batch(pair, cfg, r, smp, (Bs, Bt), "corr" in active) for r, smp in zip(rngs, samplers)]
        sel = [{m: (np.stack([run[d][m][0] for run in per_run]), np.stack([run[d][m][1] for run in per_run]))
                for m in mods} for d in (0, 1)]
        reads = {(d, m): read_part((pair.source, pair.target)[d].feats[m], *sel[d][m], pin=pin)
                 for d in streamed for m in mods}
        return sel, reads

    prefetch = Prefetcher(draw_step, sched.steps) if streamed else None

    def make_batch(step):
        sel_np, reads = prefetch.get(step) if prefetch else draw_step(step)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        sel = [{m: (t(i), t(u)) for m, (i, u) in part.items()} for part in sel_np]
        x = gatherer([(pair.source, sel[0], norm_s), (pair.target, sel[1], norm_t)], mods, reads=reads)
        idx_s, idx_t = sel[0][mods[0]][0], sel[1][mods[0]][0]
        batch = {"y_s": pair.source.verb[idx_s], "idx_s": idx_s, "idx_t": idx_t}
        if nouns:
            batch["n_s"] = pair.source.noun[idx_s].clamp_min(0)
        if "target_cls" in active:
            batch["y_t"] = pair.target.verb[idx_t]
            if nouns:
                batch["n_t"] = pair.target.noun[idx_t].clamp_min(0)
        return x, batch

    # ---- run folders ------------------------------------------------------------------------------------------
    run_dirs = [f.work for f in folders]  # written there, renamed into place when complete
    for c, d in zip(cfgs, run_dirs):
        resolved = {**c.to_dict(), "modalities": mods, "streams": streams, "schedule": sched.to_dict(),
                    "memory": pair.memory_line, "stores": {
            "source": str(pair.source.path), "target": str(pair.target.path), "eval": str(pair.eval.path)},
            "verb_classes": pair.verb_classes, "noun_classes": nouns, "trainable_parameters": n_params}
        _write(d / "config.json", json.dumps(resolved, indent=1))

    # ---- evaluation -------------------------------------------------------------------------------------------
    no_reversal = torch.zeros(len(LEVELS), device=device)
    eval_fn = vmap(lambda p, b, x: _scores(functional_call(template, (p, b), (x, run_keys[0], no_reversal))),
                   in_dims=(0, 0, None))
    views = pair.eval_views()

    def evaluate(dom=pair.eval):
        model_params = params()

        def forward(idx, units):
            x = gatherer([(dom, (idx[None], units[None]), norm_t)], mods, key="eval")
            return eval_fn(model_params, buffers, {m: v[0] for m, v in x.items()})

        template.train(False)
        with torch.no_grad():  # softmax averaged over views (MM-SADA)
            scores = averaged_over_views(torch.arange(dom.n, device=device), views, cfg.eval_batch, forward, dim=1)
        template.train(True)
        return scores

    history = [[] for _ in cfgs]
    first_bad = torch.full((K, len(TERMS)), -1, dtype=torch.int64, device=device)

    def check_finite():
        if first_bad.max().item() >= 0:
            k, t = divmod(int(torch.argmax((first_bad >= 0).flatten().int())), len(TERMS))
            raise TrainingError(f"run {names[k]}: loss term {TERMS[t]!r} is not finite at step "
                                f"{int(first_bad[k, t])}; stopped (check the features and the learning rate)")

    def record(step):
        sc = evaluate()
        for k in range(K):
            row = {"step": step, "target_top1": metrics.accuracy(sc["verb"][k], pair.eval.verb)}
            row["per_modality"] = {s: metrics.accuracy(sc[f"verb_{s}"][k], pair.eval.verb) for s in streams}
            if nouns:
                row.update(metrics.epic100(sc["verb"][k], sc["noun"][k], pair.eval.verb, pair.eval.noun))
            history[k].append(row)
            _append(run_dirs[k] / "metrics.jsonl", json.dumps(row))
        return sc

    # ---- the loop ---------------------------------------------------------------------------------------------
    template.train(True)
    bar = _progress(console, progress)
    task = bar.add_task(f"{cfg.method} {cfg.source}->{cfg.target} x{K}", total=sched.steps) if bar else None
    evals, last_scores = set(sched.eval_steps), None
    clock = _Clock(timings, device)
    try:
        for step in range(sched.steps):
            stage = sched.stage(step)
            if step == sched.stage1_steps and step > 0:
                fresh_optimisers()
            for o in optimisers:
                for g in o.param_groups:
                    g["lr"] = sched.lr(cfg, step)
            coeff = torch.from_numpy(sched.grl(cfg, step)).to(device)
            clock.start()
            x, batch = make_batch(step)
            clock.lap("data")
            keys = torch.tensor([rng.fold_int(c.seed, step) for c in cfgs], dtype=torch.int64, device=device)
            if three_step and stage == 2:  # Saito et al.: A) all on source, B) classifiers, C) generator x n
                plan = [("all", optimisers), ("classifiers", [opt_cls])] + \
                       [("generator", [opt_gen])] * cfg.mcd_generator_steps
            else:
                plan = [("all", optimisers)]
            writes = {}
            for phase, opts in plan:
                for o in optimisers:
                    o.zero_grad(set_to_none=True)
                total, terms, phase_writes = step_fn(phase, stage)(params(), buffers, x, batch, keys, coeff,
                                                                  weights[stage], state)
                total.sum().backward()
                if cfg.clip_grad_norm:
                    _clip_per_run(list(leaves.values()), cfg.clip_grad_norm, K)
                for o in opts:
                    o.step()
                if phase == "all":
                    writes = phase_writes
                    bad = ~torch.isfinite(terms.detach())
                    first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            apply_writes(state, writes)  # the memory banks, in place, once every pass has read them
            clock.lap("step")
            if step + 1 in evals:
                check_finite()
                last_scores = record(step + 1)
                clock.lap("eval")
            if bar:
                bar.update(task, advance=1)
    finally:
        if bar:
            bar.stop()
        if prefetch:
            prefetch.close()

    # ---- results ----------------------------------------------------------------------------------------------
    seconds = time.time() - started
    finals = []
    stacked = {k: v.detach().cpu() for k, v in params().items()}
    final_steps = set(sched.final_steps)
    for k, (c, d) in enumerate(zip(cfgs, run_dirs)):
        h = history[k]
        top1 = [r["target_top1"] for r in h]
        chosen = [r for r in h if r["step"] in final_steps]
        mean = lambda key: float(np.mean([r[key] for r in chosen]))  # noqa: E731
        final = {
            "method": c.method, "source": c.source, "target": c.target, "eval": c.eval or c.target,
            "seed": c.seed, "tag": c.tag, "backbone": c.backbone, "modalities": mods, "streams": streams,
            "target_top1": mean("target_top1"), "target_top1_per_eval": top1,
            "eval_steps": [r["step"] for r in h], "final_steps": sched.final_steps,
            "per_modality": {s: float(np.mean([r["per_modality"][s] for r in chosen])) for s in streams},
            "per_class_recall": metrics.per_class_recall(last_scores["verb"][k], pair.eval.verb, pair.verb_classes),
            "final_top1": top1[-1], "steps": sched.steps, "runs_stacked": K, "train_seconds": seconds,
            "trainable_parameters": n_params, "device": str(device),
        }
        if nouns:
            for key in ("verb_top1", "noun_top1", "action_top1", "verb_top5", "noun_top5", "action_top5"):
                final[key] = mean(key)
        try:
            heads = {n: v[k].clone(memory_format=torch.contiguous_format) for n, v in stacked.items()}
            buf = io.BytesIO()
            torch.save(heads, buf)  # to memory first: a full disk is then an OSError that names the file
            _write(d / "heads.pt", buf.getvalue())
            if c.challenge and nouns:
                _challenge(c, k, pair, evaluate, device, d)
            _write(d / "final.json", json.dumps(final, indent=1))  # last: marks the run complete
            folders[k].commit()
        except OSError as e:
            raise UserError(f"{folders[k].path}: could not write the results ({e.strerror or e}); "
                            f"nothing was put in its place (the partial run is in {d})") from None
        finals.append(final)
    return finals


def active_terms(cfg) -> tuple:
    """The loss terms with a non-zero weight in either stage, in :data:`TERMS` order (part of the architecture key,
    so the same in every stacked run); the others are left out of the objective rather than multiplied by zero."""
    return tuple(t for t in TERMS if cfg.weight(t, 2) or (t in STAGE1 and cfg.weight(t, 1)))


def _phase_total(phase: str, now: set, terms: dict, w: dict, cfg) -> torch.Tensor:
    """The loss one pass minimises.  MCD's discrepancy enters with a minus sign in the GRL form (the classifiers
    maximise it, the reversal makes the features minimise it: MM-SADA model.py:583-590, 642); in Saito's three-step
    form step A leaves it out, B maximises it against the classifiers' CE, C minimises it."""
    if phase == "classifiers":
        return w["cls"] * terms["cls"] - w["mcd"] * terms["mcd"]
    if phase == "generator":
        return w["mcd"] * terms["mcd"]
    total = 0.0
    for t in (t for t in TERMS if t in now):  # a fixed order: the sum rounds the same in every process
        if t == "mcd":
            if cfg.mcd_form == "grl":
                total = total - w[t] * terms[t]
            continue
        total = total + w[t] * terms[t]
    return total


def _single(fn):
    """The step function for K = 1 without vmap's per-call overhead: run 0 of each stacked argument (the
    coefficients are shared), the run axis added back to the results."""
    tree = torch.utils._pytree

    def single(p, b, x, batch, key, coeff, w, st):
        first = lambda a: tree.tree_map(lambda t: t[0], a)  # noqa: E731
        res = fn(first(p), first(b), first(x), first(batch), key[0], coeff, first(w), first(st))
        return tree.tree_map(lambda t: t.unsqueeze(0), res)
    return single


def _optimiser(cfg, params: list):
    """SGD (momentum, Nesterov where set) or Adam; fused where torch has it: one pass over each parameter per
    step (the foreach form makes one per term); an I3D-size stacked K = 8 CPU SGD step takes 7.7 ms against 28 ms.
    The update is element-wise either way, so a stacked run's parameters move as they would alone."""
    fast = _fast_optimiser_option()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, **fast)


def _clip_per_run(leaves: list, max_norm: float, K: int) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for each stacked run on its own: every run's gradients scaled by
    ``min(1, max_norm / (||g_k|| + 1e-6))``, its global L2 norm over all parameters (TA3N main.py:661-664)."""
    grads = [p.grad for p in leaves if p.grad is not None]
    sq = sum(g.reshape(K, -1).float().pow(2).sum(dim=1) for g in grads)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(K, *([1] * (g.dim() - 1))).to(g.dtype))


def _gradient_layout(stacked: dict, model: torch.nn.Module, K: int):
    """(leaves, params): the tensors the optimiser updates, and a function giving the model's parameters from them.

    Under vmap a linear layer's weight gradient comes out of the batched matmul as the transpose of a contiguous
    (K, in, out) tensor.  Were the stacked (K, out, in) weight the leaf, autograd would copy every such gradient
    into the weight's layout, a transposing copy of 10 ms of a 50 ms I3D-size K = 8 CPU step per modality; a leaf
    with the gradient's strides but not contiguous makes the fused optimiser copy it instead.  So for K > 1 the
    leaf is the contiguous (K, in, out) tensor and the model gets its transpose, a view: the gradient reaches the
    leaf contiguous, as it is.  K = 1 runs without vmap, where the gradient is already contiguous."""
    if K == 1:
        return stacked, lambda: stacked
    linear = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    leaves = {k: (v.transpose(1, 2).contiguous() if k in linear else v) for k, v in stacked.items()}
    return leaves, lambda: {k: (v.transpose(1, 2) if k in linear else v) for k, v in leaves.items()}


class _Clock:
    """Accumulates wall time per phase when asked to (benchmarks); free otherwise."""

    def __init__(self, timings, device):
        self.timings, self.cuda = timings, device.type == "cuda"
        self.t = 0.0

    def start(self):
        if self.timings is not None:
            self._sync()
            self.t = time.perf_counter()

    def lap(self, name):
        if self.timings is not None:
            self._sync()
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _scores(out: dict) -> dict:
    """Softmax scores of the fused prediction and of each modality's stream."""
    s = {"verb": out["verb"].softmax(-1)}
    for m, v in out["verb_m"].items():
        s[f"verb_{m}"] = v.softmax(-1)
    if out["noun"] is not None:
        s["noun"] = out["noun"].softmax(-1)
    return s


def _challenge(c, k, pair, evaluate, device, d):
    from adapt.data import load_domain
    from featstore.paths import resolve_store
    path, _ = resolve_store(c.challenge, "challenge", c.backbone, c.features_root)
    dom = load_domain(path, c.challenge, pair.modalities, device, c.spatial, labels=False)
    sc = evaluate(dom)
    metrics.write_challenge_json(d / "test.json", dom.ids, sc["verb"][k], sc["noun"][k])


def _write(path: Path, data: str | bytes) -> None:
    metrics.write_atomic(path, data)


def _append(path: Path, line: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def _progress(console, enabled):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    bar.start()
    return bar


def train_one(method: str, source: str, target: str, overrides: dict | None = None, console=None,
              progress: bool = True, overwrite: bool = False, **given) -> dict:
    """Resolve one run's configuration from its method and the dataset of its stores, and train it."""
    from featstore.paths import resolve_store
    backbone = given.get("backbone") or "i3d"
    root = given.get("features_root") or "features"
    _, dataset = resolve_store(source, "train", backbone, root)
    cfg = C.resolve(method, dataset, overrides, source=source, target=target, **given)
    return train([cfg], console, progress, overwrite=overwrite)[0]


def run_demo(console, features_root: str = "features", out: str = "runs/demo") -> list[dict]:
    """The demo's training part: source-only and CIA from kitchen K1 to K2 on the demo stores."""
    finals = []
    for method in ("source_only", "cia"):
        final = train_one(method, "K1", "K2", console=console, features_root=features_root, out=out,
                          backbone="i3d", overwrite=True)
        finals.append(final)
        console.print(f"{method:12s} K1 -> K2: target top-1 {final['target_top1']:.1f}% "
                      f"(mean of the evaluations at steps {', '.join(map(str, final['final_steps']))}), "
                      f"per modality " + ", ".join(f"{m} {v:.1f}%" for m, v in final["per_modality"].items()))
    return finals

