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
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from adapt import config as C
from adapt import metrics, parts, rng
from adapt.data import DomainPair, Gatherer, resolve_device, standardisation
from adapt.model import AdaptModel
from adapt.objectives import ALIGNMENT, TERMS, apply_writes, compute_terms, initial_state
from extract.allocator import retain_freed_memory
from extract.errors import UserError


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
          timings: dict | None = None) -> list:
    """Train the runs ``cfgs`` (one architecture) stacked; returns their ``final.json`` dicts.

    ``timings``, when given, receives the seconds spent gathering batches ('data'), in the model's steps
    ('step') and in evaluation ('eval'), measured with device synchronisation (for benchmarks)."""
    cfg = cfgs[0]
    if any(c.architecture_key() != cfg.architecture_key() for c in cfgs):
        raise ValueError("stacked runs must share stores and architecture (only seeds and weights may differ)")
    names = [run_name(c) for c in cfgs]
    if len(set(names)) != len(names):
        raise UserError(f"two runs would write the same folder {names}: give them different seeds or tags")
    device = resolve_device(cfg.device)
    started = time.time()
    retain_freed_memory()  # every step allocates the same tensors again: reuse their pages

    # ---- data -----------------------------------------------------------------------------------------------
    pair = pair or DomainPair(cfg, device)
    K, Bs, Bt = len(cfgs), cfg.batch_source, cfg.batch_target
    mods = pair.modalities
    nouns = pair.noun_classes
    # input standardisation: per-channel statistics of the source store for every domain, or, for AdaBN, of each
    # domain's own store (the target's at evaluation)
    norm_s = standardisation(pair.source) if (cfg.standardise or cfg.adabn) else None
    norm_t = standardisation(pair.target) if cfg.adabn else norm_s

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
    gen_names, cls_names = models[0].param_groups()
    n_params = sum(p[0].numel() for p in leaves.values())

    def make_opt(names_):
        # fused: one pass over each parameter per step (the foreach form makes one per term: weight decay,
        # momentum, update); on the CPU an I3D-size stacked K = 8 SGD step takes 7.7 ms against 28 ms.  The update
        # is element-wise either way, so a run's parameters move as they would alone
        ps, fast = [leaves[n] for n in names_], _fast_optimiser_option()
        if cfg.optimizer == "adam":
            return torch.optim.Adam(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
        return torch.optim.SGD(ps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fast)
    opt_gen, opt_cls = (make_opt(gen_names), make_opt(cls_names)) if cfg.mcd else (make_opt(list(leaves)), None)
    optimisers = [o for o in (opt_gen, opt_cls) if o is not None]

    # the loss terms with a non-zero weight (the same in every stacked run: part of the architecture key); the
    # others are left out of the total rather than multiplied by zero
    active = [t for t in TERMS if getattr(cfg, f"w_{t}")]
    weights = {f"w_{t}": torch.tensor([getattr(c, f"w_{t}") for c in cfgs], dtype=torch.float32, device=device)
               for t in active}
    state = initial_state(cfg, mods, pair.source.n, pair.target.n, device)
    state = {k: torch.stack([v] * K) for k, v in state.items()}
    samplers = [np.random.default_rng([c.seed, 7]) for c in cfgs]
    gatherer = Gatherer(device)
    run_keys = torch.tensor([c.seed for c in cfgs], dtype=torch.int64, device=device)

    # ---- the step function of one run (vmapped over K) ------------------------------------------------------
    def one_run(p, b, x, y_s, n_s, y_t, idx_s, idx_t, key, coeff, stage2, w, st, phase):
        out = functional_call(template, (p, b), (x, key, coeff, Bs))
        terms, writes = compute_terms(out, cfg, Bs, y_s, n_s, y_t, idx_s, idx_t, st)
        gate = {t: (stage2 if t in ALIGNMENT else 1.0) for t in TERMS}
        if phase == "classifiers":  # MCD step B: classifiers maximise the discrepancy
            total = w.get("w_cls", 0.0) * terms["cls"] - gate["mcd"] * w.get("w_mcd", 0.0) * terms["mcd"]
        elif phase == "generator":  # MCD step C: the generator minimises it
            total = gate["mcd"] * w.get("w_mcd", 0.0) * terms["mcd"]
        else:
            total = sum(gate[t] * w[f"w_{t}"] * terms[t] for t in active if t != "mcd")
        return total, torch.stack([terms[t] for t in TERMS]), writes

    in_dims = (0, 0, 0, 0, 0, 0, 0, 0, 0, None, None, 0, 0)

    def step_fn(phase):
        if K == 1:  # the same function without vmap's per-call overhead: index run 0, add the run axis back
            def single(*a):
                a = [x if d is None else torch.utils._pytree.tree_map(lambda t: t[0], x) for x, d in zip(a, in_dims)]
                return torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), one_run(*a, phase))
            return single
        return vmap(lambda *a: one_run(*a, phase), in_dims=in_dims, randomness="error")

    phases = {ph: step_fn(ph) for ph in (["all", "classifiers", "generator"] if cfg.mcd else ["all"])}

    def batch():
        idx_s = np.stack([r.choice(pair.source.n, Bs, replace=pair.source.n < Bs) for r in samplers])
        idx_t = np.stack([r.choice(pair.target.n, Bt, replace=pair.target.n < Bt) for r in samplers])
        u_s = np.stack([pair.sample_units(r, Bs) for r in samplers])
        u_t = np.stack([pair.sample_units(r, Bt) for r in samplers])
        t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        idx_s, idx_t = t(idx_s), t(idx_t)
        x = gatherer([(pair.source, idx_s, t(u_s), norm_s), (pair.target, idx_t, t(u_t), norm_t)], mods)
        if cfg.corr_sync and cfg.w_corr and "flow" in mods and pair.units_per_clip > 1:
            # MM-SADA's time-synchronised correspondence: negatives use flow of another window of the same clip
            U = pair.units_per_clip
            o_s = np.stack([(u + r.integers(1, U, size=(Bs, 1))) % U for u, r in zip(u_s, samplers)])
            o_t = np.stack([(u + r.integers(1, U, size=(Bt, 1))) % U for u, r in zip(u_t, samplers)])
            x["flow_other"] = gatherer([(pair.source, idx_s, t(o_s), norm_s), (pair.target, idx_t, t(o_t), norm_t)],
                                       ["flow"], key="other")["flow"]
        y_s, n_s = pair.source.verb[idx_s], pair.source.noun[idx_s].clamp_min(0)
        y_t = pair.target.verb[idx_t].clamp_min(0)  # -1 unless the method is supervised target
        return x, y_s, n_s, y_t, idx_s, idx_t

    # ---- run folders ------------------------------------------------------------------------------------------
    run_dirs = [Path(c.out) / n for c in cfgs for n in [run_name(c)]]
    for c, d in zip(cfgs, run_dirs):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        resolved = {**c.to_dict(), "modalities": mods, "stores": {
            "source": str(pair.source.path), "target": str(pair.target.path), "eval": str(pair.eval.path)},
            "verb_classes": pair.verb_classes, "noun_classes": nouns, "trainable_parameters": n_params}
        _write(d / "config.json", json.dumps(resolved, indent=1))

    # ---- evaluation -------------------------------------------------------------------------------------------
    eval_fn = vmap(lambda p, b, x: _scores(functional_call(template, (p, b), (x, run_keys[0], 0.0))),
                   in_dims=(0, 0, None))
    views = pair.eval_views()

    def evaluate(dom=pair.eval):
        model_params = params()
        template.train(False)
        with torch.no_grad():
            scores = None
            for view in views:
                outs = []
                for lo in range(0, dom.n, cfg.eval_batch):
                    idx = torch.arange(lo, min(lo + cfg.eval_batch, dom.n), device=device)
                    units = torch.from_numpy(view).to(device).expand(len(idx), -1)
                    x = gatherer([(dom, idx[None], units[None], norm_t)], mods, key="eval")
                    outs.append(eval_fn(model_params, buffers, {m: v[0] for m, v in x.items()}))
                s = {k: torch.cat([o[k] for o in outs], dim=1) for k in outs[0]}
                scores = s if scores is None else {k: scores[k] + s[k] for k in s}
        template.train(True)
        return {k: v / len(views) for k, v in scores.items()}  # softmax averaged over views (MM-SADA)

    history = [[] for _ in cfgs]
    first_bad = torch.full((K, len(TERMS)), -1, dtype=torch.int64, device=device)

    def check_finite(step):
        bad = first_bad.max().item()
        if bad >= 0:
            k, t = divmod(int(torch.argmax((first_bad >= 0).flatten().int())), len(TERMS))
            raise TrainingError(f"run {names[k]}: loss term {TERMS[t]!r} is not finite at step "
                                f"{int(first_bad[k, t])}; stopped (check the features and the learning rate)")

    def record(step):
        sc = evaluate()
        for k, c in enumerate(cfgs):
            row = {"step": step, "target_top1": metrics.accuracy(sc["verb"][k], pair.eval.verb)}
            row["per_modality"] = {m: metrics.accuracy(sc[f"verb_{m}"][k], pair.eval.verb) for m in mods}
            if nouns:
                row.update(metrics.epic100(sc["verb"][k], sc["noun"][k], pair.eval.verb, pair.eval.noun))
            history[k].append(row)
            _append(run_dirs[k] / "metrics.jsonl", json.dumps(row))
        return sc

    # ---- the loop ---------------------------------------------------------------------------------------------
    template.train(True)
    bar = _progress(console, progress)
    task = bar.add_task(f"{cfg.method} {cfg.source}->{cfg.target} x{K}", total=cfg.steps) if bar else None
    last_scores = None
    clock = _Clock(timings, device)
    try:
        for step in range(cfg.steps):
            stage2 = 1.0 if step >= cfg.stage1_steps else 0.0
            lr = cfg.lr if step < cfg.stage1_steps else cfg.lr_stage2
            for o in optimisers:
                for g in o.param_groups:
                    g["lr"] = lr
            coeff = parts.grl_coefficient(step, cfg.steps, 1.0)
            clock.start()
            x, y_s, n_s, y_t, idx_s, idx_t = batch()
            clock.lap("data")
            keys = torch.tensor([rng.fold_int(c.seed, step) for c in cfgs], dtype=torch.int64, device=device)
            args = (x, y_s, n_s, y_t, idx_s, idx_t, keys, coeff, stage2, weights, state)
            if cfg.mcd and stage2:  # MCD: A) all on source, B) classifiers vs discrepancy, C) generator x n
                plan = [("all", optimisers), ("classifiers", [opt_cls])] + \
                       [("generator", [opt_gen])] * cfg.mcd_generator_steps
            else:
                plan = [("all", optimisers)]
            for phase, opts in plan:
                for o in optimisers:
                    o.zero_grad(set_to_none=True)
                total, terms, phase_writes = phases[phase](params(), buffers, *args)
                total.sum().backward()
                for o in opts:
                    o.step()
                if phase == "all":
                    writes = phase_writes
                    bad = ~torch.isfinite(terms.detach())
                    first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            apply_writes(state, writes)  # the memory banks, in place, once every pass has read them
            clock.lap("step")
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                check_finite(step)
                last_scores = record(step + 1)
                clock.lap("eval")
            if bar:
                bar.update(task, advance=1)
    finally:
        if bar:
            bar.stop()

    # ---- results ----------------------------------------------------------------------------------------------
    seconds = time.time() - started
    finals = []
    stacked = {k: v.detach().cpu() for k, v in params().items()}
    for k, (c, d) in enumerate(zip(cfgs, run_dirs)):
        h = history[k]
        top1 = [r["target_top1"] for r in h]
        final = {
            "method": c.method, "source": c.source, "target": c.target, "eval": c.eval or c.target,
            "seed": c.seed, "tag": c.tag, "backbone": c.backbone, "modalities": mods,
            "target_top1": metrics.last_mean(top1, c.last_evals), "target_top1_per_eval": top1,
            "eval_steps": [r["step"] for r in h],
            "per_modality": {m: metrics.last_mean([r["per_modality"][m] for r in h], c.last_evals) for m in mods},
            "per_class_recall": metrics.per_class_recall(last_scores["verb"][k], pair.eval.verb, pair.verb_classes),
            "final_top1": top1[-1], "steps": c.steps, "runs_stacked": K, "train_seconds": seconds,
            "trainable_parameters": n_params, "device": str(device),
        }
        if nouns:
            for key in ("verb_top1", "noun_top1", "action_top1", "verb_top5", "noun_top5", "action_top5"):
                final[key] = metrics.last_mean([r[key] for r in h], c.last_evals)
        try:
            heads = {n: v[k].clone(memory_format=torch.contiguous_format) for n, v in stacked.items()}
            torch.save(heads, d / "heads.pt")
            if c.challenge and nouns:
                _challenge(c, k, pair, evaluate, device, d)
            _write(d / "final.json", json.dumps(final, indent=1))  # last: marks the run complete
        except OSError as e:
            for f in ("final.json", "final.json.tmp"):
                (d / f).unlink(missing_ok=True)
            raise UserError(f"{d}: could not write the results ({e.strerror or e}); the run is not marked "
                            f"complete (no final.json)") from None
        finals.append(final)
    return finals


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
    from adapt.data import load_domain, store_path
    path, _ = store_path(c.challenge, "challenge", c.backbone, c.features_root)
    dom = load_domain(path, c.challenge, pair.modalities, device, c.spatial, labels=False)
    sc = evaluate(dom)
    metrics.write_challenge_json(d / "test.json", dom.ids, sc["verb"][k], sc["noun"][k])


def _write(path: Path, text: str) -> None:
    metrics.write_atomic(path, text)


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _progress(console, enabled):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    bar.start()
    return bar


def train_one(method: str, source: str, target: str, overrides: dict | None = None, console=None,
              progress: bool = True, **given) -> dict:
    """Resolve one run's configuration from its method and the dataset of its stores, and train it."""
    from adapt.data import store_path
    backbone = given.get("backbone") or "i3d"
    root = given.get("features_root") or "features"
    _, dataset = store_path(source, "train", backbone, root)
    cfg = C.resolve(method, dataset, overrides, source=source, target=target, **given)
    return train([cfg], console, progress)[0]


def run_demo(console, features_root: str = "features", out: str = "runs/demo") -> list[dict]:
    """The demo's training part: source-only and CIA from kitchen K1 to K2 on the demo stores."""
    finals = []
    for method in ("source_only", "cia"):
        final = train_one(method, "K1", "K2", console=console, features_root=features_root, out=out,
                          backbone="i3d")
        finals.append(final)
        console.print(f"{method:12s} K1 -> K2: target top-1 {final['target_top1']:.1f}% "
                      f"(mean of the last {min(9, len(final['target_top1_per_eval']))} evaluations), "
                      f"per modality " + ", ".join(f"{m} {v:.1f}%" for m, v in final["per_modality"].items()))
    return finals

