"""The one training loop: :func:`train` claims the run folders, builds a :class:`Training` and runs its steps,
evaluating at the schedule's steps, then writes each run's results.

The loop knows no method by name: a run's method (:mod:`adapt.method`) is a model class with its terms, and one
step of one run is, in the order a paper writes it::

    batch -> forward (the method's model) -> terms -> sum_t w_t(stage) L_t -> backward -> update -> state writes

K runs that share stores and architecture (seeds, loss weights; see ``architecture_key`` in :mod:`adapt.config`)
are trained together: their parameters are stacked with ``torch.func.stack_module_state`` and every step calls the
model through ``vmap(functional_call)`` over one pytree of per-run inputs (features, labels, dropout key, loss
weights, state).  A single run is the case K = 1 of the same code, so a stacked run gives the same numbers as the
run alone (per-run index sampling with numpy generators, per-run dropout keys from ``adapt.rng``, element-wise
optimisers).  The step's pieces and their reasons are in :mod:`adapt.step`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from adapt import config as C
from adapt import method as M
from adapt import cache, method_check, metrics, provenance, rng, tracking
from adapt import step as S
from adapt.data import (DomainPair, EpochSampler, Gatherer, Prefetcher, averaged_over_views, draw_batch, load_domain,
                        read_part, standardisation)
from adapt.model import Inputs
from adapt.results import invalid_marks
from adapt.runs import RunFolder
from adapt.schedule import Schedule
from featstore.allocator import retain_freed_memory
from featstore.devices import resolve_device
from featstore.errors import UserError
from featstore.paths import resolve_store
from featstore.store import FeatureStore

# settings a source stage does not depend on: the target's and the evaluation's
SOURCE_STAGE_IGNORES = {"target", "eval", "challenge", "out", "tag", "memory_budget", "device", "validators",
                        "validator_clips", "source_val", "eval_every", "eval_batch", "last_evals", "last_eval_every",
                        "batch_target", "steps", "epochs", "log", "experiment", "mlflow_uri", "wandb_mode"}


class TrainingError(UserError):
    """A run that cannot go on (a non-finite loss); exit code 1."""

    exit_code = 1


def run_name(cfg) -> str:
    name = f"{M.load(cfg.method).name}_{Path(str(cfg.source)).stem}-{Path(str(cfg.target)).stem}_s{cfg.seed}"
    return name + (f"_{cfg.tag}" if cfg.tag else "")


def train(cfgs: list, console=None, progress: bool = True, pair: DomainPair | None = None,
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
    method = M.load(cfg.method)
    if not M.is_builtin(method):  # a user's method: checked on random inputs before any store is read
        method_check.check(method, cfg)
    device = resolve_device(cfg.device)
    folders = []
    try:
        for c, n in zip(cfgs, names):
            folders.append(RunFolder(Path(c.out) / n, overwrite).claim())
        return _train(cfgs, console, progress, pair, timings, device, folders)
    except BaseException:
        for f in folders:
            f.abandon()  # a run that stopped before its first evaluation leaves nothing behind
        raise
    finally:
        for f in folders:
            f.release()


def _train(cfgs, console, progress, pair, timings, device, folders) -> list:
    retain_freed_memory()  # every step allocates the same tensors again: reuse their pages (featstore.allocator)
    t = Training(cfgs, pair or DomainPair(cfgs[0], device), device, console)
    dirs = [f.work for f in folders]  # written there, renamed into place when complete
    t.write_configs(dirs)
    t.open_trackers(folders)
    for k, rows in enumerate(getattr(t, "restored_history", [])):  # a restored source stage's evaluations
        t.history[k] = list(rows)
        for row in rows:
            _append(dirs[k] / "metrics.jsonl", json.dumps(row))
            if t.trackers:
                t.trackers[k].evaluation(row["step"], row)
    bar = _progress(console, progress)
    task = bar.add_task(f"{t.method.name} {t.cfg.source}->{t.cfg.target} x{t.K}", total=t.sched.stop,
                        completed=t.start) if bar else None
    evals, clock = set(t.sched.eval_steps), _Clock(timings, device)
    try:
        for step in range(t.start, t.sched.stop):
            t.template.before_step(M.RunView(t, step))  # the method's own hook (SHOT's source model, pseudo-labels)
            if step == t.sched.stage1_steps and t.method.source_stage:
                t.save_source_stage()
            clock.start()
            inputs = t.batch(step)
            clock.lap("data")
            t.step(step, inputs)
            clock.lap("step")
            if step + 1 in evals:
                t.record(step + 1, dirs)
                clock.lap("eval")
            if bar:
                bar.update(task, advance=1)
    finally:
        if bar:
            bar.stop()
        t.close()
    return [t.finish(k, folders[k]) for k in range(t.K)]


class Training:
    """K stacked runs: their data, models, optimisers and state, and the loop's named pieces (:meth:`batch`,
    :meth:`step`, :meth:`evaluate`, :meth:`record`, :meth:`finish`)."""

    def __init__(self, cfgs: list, pair: DomainPair, device: torch.device, console=None):
        self.cfgs, self.cfg, self.pair, self.device, self.console = cfgs, cfgs[0], pair, device, console
        self.names = [run_name(c) for c in cfgs]
        self.started = time.time()
        cfg = self.cfg
        if console is not None:
            console.print(pair.memory_line, highlight=False, markup=False)
            for note in getattr(pair, "notes", []):
                console.print(note, highlight=False, markup=False, soft_wrap=True)
        self.mods, self.nouns = pair.modalities, pair.noun_classes
        self._validation_split()
        self.method = M.load(cfg.method)
        self.sched = Schedule.of(cfg, len(self.train_rows), pair.target.n, self.method)
        if console is not None:
            console.print(C.schedule_line(cfg, self.sched), highlight=False, soft_wrap=True, markup=False)
        self.K = len(cfgs)
        # input standardisation: per-channel statistics of the source store for every domain, or, for AdaBN, of
        # each domain's own store (the target's at evaluation)
        self.norm_s = standardisation(pair.source) if (cfg.standardise or self.method.per_domain_statistics) else None
        self.norm_t = standardisation(pair.target) if self.method.per_domain_statistics else self.norm_s
        self._models()
        self.method.check(cfg, self.sched.batches, self.streams)
        for stage, sizes in self.sched.batches.items():  # a batch far beyond the store is a mistake, not a choice
            for role, b, dom in (("batch_source", sizes[0], pair.source), ("batch_target", sizes[1], pair.target)):
                if b > 10 * dom.n:
                    raise UserError(f"{role}={b}: more than ten times the {dom.n} clips of {dom.path} (each clip "
                                    f"drawn {b // dom.n} times a step); lower it")
        if cfg.challenge:  # before the training, not after it
            self._challenge_store()
        self.start = self.restore_source_stage()
        self._data()
        self.history = [[] for _ in cfgs]
        self.term_names = [t.name for t in self.method.terms()]
        self.first_bad = torch.full((self.K, len(self.term_names)), -1, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((self.K, len(self.term_names)), device=device)  # since the last evaluation
        self.loss_steps = 0
        self.trackers: list = []  # one adapt.tracking.Run per run, opened with its folder
        self.last_scores = None
        self.best: dict = {}  # run -> validator -> (step, value) of its best checkpoint so far
        self.collapse: dict = {}  # run -> the evaluations at which its predictions had collapsed to one class
        self._challenge = None  # (split, scores) of the challenge's test split, once evaluated

    # ---- models: one per run, stacked ----------------------------------------------------------------------

    def _models(self):
        cfgs, cfg, pair, device, K = self.cfgs, self.cfg, self.pair, self.device, self.K
        inputs = Inputs(tuple(self.mods), pair.feature_shapes, pair.verb_classes, self.nouns, pair.heads_units)
        models = []
        for c in cfgs:
            torch.manual_seed(c.seed)
            models.append(self.method(c, inputs))
        self.template = copy.deepcopy(models[0]).to("meta")
        stacked, self.buffers = stack_module_state([m.to(device) for m in models])
        # the optimiser's tensors (leaves), and ``params()``: the model's parameters (views of the leaves)
        leaves, self.params = S.gradient_layout({k: v.detach() for k, v in stacked.items()}, models[0], K)
        self.leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
        self.n_params = sum(p[0].numel() for p in self.leaves.values())
        # one optimiser per parameter group of the method (one group unless its update steps some apart)
        self.optimisers = {g: S.optimiser(cfg, [self.leaves[n] for n in names])
                           for g, names in models[0].parameter_groups().items()}
        # the loss weights of each stage per run (K,): the terms acting in that stage
        self.weights = {stage: {t.name: torch.tensor([t.weight_in(c, stage) for c in cfgs], dtype=torch.float32,
                                                     device=device)
                                for t in self.method.terms() if t.name in cfg.active_terms(stage)}
                        for stage in (1, 2)}
        self.streams = models[0].streams
        state = models[0].initial_state(pair.source.n, pair.target.n, device)
        self.state = {k: torch.stack([v] * K) for k, v in state.items()}
        self.run_keys = torch.tensor([c.seed for c in cfgs], dtype=torch.int64, device=device)
        self._step_fns, self._plans = {}, {}
        self.template.train(True)
        no_reversal = {level: torch.zeros((), device=device) for level in self.method.reversals}
        evaluation = lambda: M.Context(self.run_keys[0], no_reversal)  # noqa: E731
        self.eval_fn = vmap(lambda p, b, x: _scores(functional_call(self.template, (p, b), (x, evaluation()))),
                            in_dims=(0, 0, None))
        self.feature_fn = vmap(lambda p, b, x: _scores_and_features(
            functional_call(self.template, (p, b), (x, evaluation()))), in_dims=(0, 0, None))

    def _step_fn(self, phase: M.Phase, stage: int):
        """One run's pass: forward, terms, the phase's loss (vmapped over the K runs; :func:`adapt.step.single`
        for K = 1) -> (loss, every term's value, the state's writes)."""
        if (phase, stage) not in self._step_fns:
            Bs, model, names = self.sched.batches[stage][0], self.template, self.term_names
            now = self.cfg.active_terms(stage)
            loss = phase.loss or S.weighted_sum

            def one_run(p, b, run, coeff):
                ctx = M.Context(run["key"], coeff, Bs, run["state"], run["batch"], stage)
                out = functional_call(model, (p, b), (run["x"], ctx))
                terms = {t: _term(model, t, out, ctx) for t in now}
                zero = out["verb"].new_zeros(())
                values = torch.stack([terms[t] if t in terms else zero for t in names])
                return loss(terms, run["w"]), values, model.writes(out, ctx)

            self._step_fns[phase, stage] = S.single(one_run) if self.K == 1 else vmap(
                one_run, in_dims=(0, 0, 0, None), randomness="error")
        return self._step_fns[phase, stage]

    # ---- a source stage saved once and reused (Method.source_stage) -------------------------------------------

    def _source_stage_entries(self) -> list[tuple[Path, dict]]:
        """Per run, where its source stage is kept and the fingerprint it is kept for:
        ``<out>/source_models/<method>_<source>_s<seed>_<key>.pt``, the key a digest of everything stage 1 depends
        on (the source store's content, the settings but the target's and stage 2's, the method's and the tool's
        code), verified on reuse (:mod:`adapt.cache`)."""
        import hashlib
        cfg, sched, src = self.cfg, self.sched, self.pair.source
        later = {t.weight for t in self.method.terms() if t.stage1 is None} | {  # what acts in stage 2 only
            f.name for f in dataclasses.fields(self.cfg) if f.metadata.get("stage") == 2}
        store = provenance.store_identities({"source": src.path})["source"]
        code = provenance.code(self.method)
        out = []
        for c in self.cfgs:
            settings = {k: v for k, v in c.to_dict().items() if k not in SOURCE_STAGE_IGNORES and k not in later}
            key = {"settings": settings, "source": {k: store[k] for k in ("clips", "features")},
                   "clips": src.n, "stage1_steps": sched.stage1_steps, "batches": list(sched.batches[1]),
                   "method_code": code["method_sha256"], "package_code": code["package"]["sha256"]}
            key = json.loads(json.dumps(key, sort_keys=True, default=str))
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            out.append((Path(c.out) / "source_models" / f"{self.method.name}_{Path(str(c.source)).stem}_s{c.seed}_"
                                                        f"{digest}.pt", key))
        return out

    def restore_source_stage(self) -> int:
        """The first step to train: stage 2's when every run's source stage is saved whole for this run's
        fingerprint (it is loaded), else 0 (a damaged or mismatched one is said and trained again)."""
        if not (self.method.source_stage and self.sched.stage1_steps):
            return 0
        saved = []
        for f, key in self._source_stage_entries():
            entry, why = cache.load(f, key, self.device)
            if entry is None:
                if f.exists() and self.console is not None:
                    self.console.print(f"source stage {f}: {why}; training it again", highlight=False,
                                       soft_wrap=True)
                return 0
            saved.append(entry)
        self.restored_history = []
        with torch.no_grad():
            params = self.params()
            for k, entry in enumerate(saved):
                for name, value in entry["params"].items():
                    params[name][k].copy_(value)
                self.restored_history.append(entry["history"])
        return self.sched.stage1_steps

    def save_source_stage(self) -> None:
        """Each run's parameters at the end of its source stage, for the next target run to start from."""
        if self.start:
            return
        for k, (f, key) in enumerate(self._source_stage_entries()):
            cache.save(f, {"params": self._heads(k), "history": self.history[k]}, key)  # its evaluations too

    # ---- data ------------------------------------------------------------------------------------------------

    def _validation_split(self):
        """The source rows trained on, and the clips the validators look at: held-out source clips (or a source
        validation store), and fixed subsets of the source train and target clips (the same for every run)."""
        cfg, pair = self.cfg, self.pair
        n, cap = pair.source.n, cfg.validator_clips
        order = np.random.default_rng(12345).permutation(n)
        held = int(round(cfg.source_holdout * n))
        if cfg.source_holdout and not 0 < held < n:
            raise UserError(f"source_holdout={cfg.source_holdout}: holds out {held} of the {n} source clips")
        self.train_rows = np.sort(order[held:]) if held else np.arange(n)
        self.val_dom, self.val_rows = None, None
        if held:
            self.val_dom, self.val_rows = pair.source, np.sort(order[:held])[:cap]
        elif cfg.source_val and cfg.validators:
            self.val_dom = self._load(cfg.source_val, "test", labels=True)
            self.val_rows = np.arange(min(self.val_dom.n, cap))
        if self.val_dom is not None:
            labels = self.val_dom.verb
            self.val_labels = labels[torch.as_tensor(self.val_rows).to(labels.device)].cpu().numpy()
        pick = lambda rows, seed: np.sort(np.random.default_rng(seed).permutation(rows)[:cap])  # noqa: E731
        self.fit_rows = pick(self.train_rows, 1)                  # source train clips for DEV's domain classifier
        self.target_rows = pick(np.arange(pair.target.n), 2)      # unlabelled target clips

    def _load(self, name: str, role: str, labels: bool):
        """A store besides the pair's (the source validation split, the challenge's test split), in memory."""
        cfg = self.cfg
        path, _ = resolve_store(name, role, cfg.backbone, cfg.features_root)
        return load_domain(path, name, self.mods, self.device, cfg.spatial, labels=labels)

    def _data(self):
        pair = self.pair
        self._samplers()
        self.gatherer = Gatherer(self.device)
        self.pin = self.device.type == "cuda"
        self.streamed = [i for i, dom in enumerate((pair.source, pair.target)) if dom.streamed]
        self.prefetch = Prefetcher(self._draw, self.sched.stop, start=self.start) if self.streamed else None

    def _samplers(self, *stream):
        """Per run, the generator of its clip and unit draws (numpy, seeded by the run's seed) and its epoch
        samplers of the source and the target."""
        pair = self.pair
        self.rngs = [np.random.default_rng([c.seed, 7, *stream]) for c in self.cfgs]
        rows = None if len(self.train_rows) == pair.source.n else self.train_rows
        self.samplers = [(EpochSampler(pair.source.n, r, rows), EpochSampler(pair.target.n, r)) for r in self.rngs]

    def _draw(self, step):
        """The step's clips and units (numpy, drawn in step order) and the streamed domains' features read."""
        pair, mods = self.pair, self.mods
        if step == self.sched.stage1_steps and self.method.source_stage:
            self._samplers(2)  # the target stage draws the same whether its source stage was trained or restored
        sizes = self.sched.batches[self.sched.stage(step)]
        per_run = [draw_batch(pair, self.cfg, r, smp, sizes, self.template.arrange)
                   for r, smp in zip(self.rngs, self.samplers)]
        sel = [{m: (np.stack([run[d][m][0] for run in per_run]), np.stack([run[d][m][1] for run in per_run]))
                for m in mods} for d in (0, 1)]
        reads = {(d, m): read_part((pair.source, pair.target)[d].feats[m], *sel[d][m], pin=self.pin)
                 for d in self.streamed for m in mods}
        return sel, reads

    def batch(self, step: int) -> dict:
        """The step's inputs of every run, one pytree (K leading): features ``x`` and labels / indices ``batch``."""
        pair, mods, device = self.pair, self.mods, self.device
        sel_np, reads = self.prefetch.get(step) if self.prefetch else self._draw(step)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        sel = [{m: (t(i), t(u)) for m, (i, u) in part.items()} for part in sel_np]
        x = self.gatherer([(pair.source, sel[0], self.norm_s), (pair.target, sel[1], self.norm_t)], mods,
                          reads=reads)
        idx_s, idx_t = sel[0][mods[0]][0], sel[1][mods[0]][0]
        batch = {"y_s": pair.source.verb[idx_s], "idx_s": idx_s, "idx_t": idx_t}
        if self.nouns:
            batch["n_s"] = pair.source.noun[idx_s].clamp_min(0)
        if self.method.uses_target_labels:
            batch["y_t"] = pair.target.verb[idx_t]
            if self.nouns:
                batch["n_t"] = pair.target.noun[idx_t].clamp_min(0)
        return {"x": x, "batch": batch}

    # ---- the step --------------------------------------------------------------------------------------------

    def step(self, step: int, inputs: dict) -> None:
        """One optimisation step of every run: the learning rate and reversal coefficients of the step, the
        method's passes (one, unless its update has several: MCD's three steps), then its state's writes."""
        cfg, sched = self.cfg, self.sched
        stage = sched.stage(step)
        if step == sched.stage1_steps and step > 0:
            # stage 2 starts with fresh optimiser state, as the MM-SADA code's stage-2 run restores the weights but
            # not the momentum (utils.py:27-28, 57-58); it also lets stage 2's new heads join the fused step
            for o in self.optimisers.values():
                o.state.clear()
        for o in self.optimisers.values():
            for g in o.param_groups:
                g["lr"] = sched.lr(cfg, step)
        levels = self.method.reversals
        coeff = dict(zip(levels, torch.from_numpy(sched.grl(cfg, step, levels)).to(self.device).unbind(0)))
        keys = torch.tensor([rng.fold_int(c.seed, step) for c in self.cfgs], dtype=torch.int64, device=self.device)
        run = {**inputs, "key": keys, "w": self.weights[stage], "state": self.state}
        writes = None
        if stage not in self._plans:
            self._plans[stage] = self.template.phases(stage)
        for phase in self._plans[stage]:
            for o in self.optimisers.values():
                o.zero_grad(set_to_none=True)
            try:
                loss, terms, phase_writes = self._step_fn(phase, stage)(self.params(), self.buffers, run, coeff)
            except method_check.PartError as e:  # a user's term that raised: one line, naming it and the step
                if M.is_builtin(self.method):
                    raise e.error from None
                raise method_check.fail(self.method, f"{e.part} at step {step}", e.error) from None
            loss.sum().backward()
            if cfg.clip_grad_norm:
                S.clip_per_run(list(self.leaves.values()), cfg.clip_grad_norm, self.K)
            for g in phase.groups or self.optimisers:
                self.optimisers[g].step()
            if writes is None:  # the first pass's: its terms are the step's, its writes read the state as it was
                writes = phase_writes
                bad = ~torch.isfinite(terms.detach())
                self.loss_sum += torch.where(bad, torch.zeros_like(terms), terms.detach())  # for the evaluation's row
                self.loss_steps += 1
                self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                             self.first_bad)
        S.apply_writes(self.state, writes)  # in place, once every pass has read the state

    # ---- evaluation ------------------------------------------------------------------------------------------

    def evaluate(self, dom=None, rows=None, fn=None, norm=None) -> dict:
        """Softmax scores (K, N, classes) of the fused prediction and of each stream, averaged over the evaluation
        views (MM-SADA's protocol: :func:`adapt.data.averaged_over_views`); ``rows`` of ``dom`` (default all of
        the evaluation split), ``fn`` another output function (the validators' scores and features)."""
        dom = dom or self.pair.eval
        model_params, fn = self.params(), fn or self.eval_fn
        norm = self.norm_t if norm is None else norm

        def forward(idx, units):
            x = self.gatherer([(dom, (idx[None], units[None]), norm)], self.mods, key="eval")
            return fn(model_params, self.buffers, {m: v[0] for m, v in x.items()})

        rows = torch.arange(dom.n) if rows is None else torch.as_tensor(rows)
        self.template.train(False)
        with torch.no_grad():
            scores = averaged_over_views(rows.to(self.device), self.pair.eval_views(dom), self.cfg.eval_batch,
                                         forward, dim=1)
        self.template.train(True)
        return scores

    def validate(self) -> list[dict]:
        """Each run's validators (:mod:`adapt.validators`) at this checkpoint."""
        from adapt import validators as V
        target = self.evaluate(self.pair.target, self.target_rows, self.feature_fn, self.norm_t)
        val = fit = None
        if self.val_dom is not None:
            val = self.evaluate(self.val_dom, self.val_rows, self.feature_fn, self.norm_s)
            fit = self.evaluate(self.pair.source, self.fit_rows, self.feature_fn, self.norm_s)
        out = []
        for k in range(self.K):
            np_ = lambda d, key: d[key][k].cpu().numpy()  # noqa: E731
            sv = (np_(val, "verb"), self.val_labels, np_(val, "feat")) if val is not None else None
            out.append(V.scores(np_(target, "verb"), sv, np_(fit, "feat") if fit is not None else None,
                                np_(target, "feat")))
        return out

    def record(self, step: int, dirs: list) -> None:
        """Stop on a non-finite loss; evaluate; append each run's row to its metrics.jsonl."""
        if self.first_bad.max().item() >= 0:
            k, t = divmod(int(torch.argmax((self.first_bad >= 0).flatten().int())), len(self.term_names))
            text = (f"run {self.names[k]}: loss term {self.term_names[t]!r} is not finite at step "
                    f"{int(self.first_bad[k, t])}; stopped")
            if not M.is_builtin(self.method):  # a user's method: its file named, a mistake to fix (exit 2)
                raise method_check.MethodError(f"{method_check.where(self.method)}: {text} (check the term's logs, "
                                               f"divisions and square roots, and the learning rate)")
            raise TrainingError(f"{text} (check the features and the learning rate)")
        sc = self.last_scores = self.evaluate()
        loss_means = (self.loss_sum / max(1, self.loss_steps)).tolist()
        checks = self.validate() if self.cfg.validators else None
        ev = self.pair.eval
        for k in range(self.K):
            row = {"step": step, "target_top1": metrics.accuracy(sc["verb"][k], ev.verb)}
            row["per_modality"] = {s: metrics.accuracy(sc[f"verb_{s}"][k], ev.verb) for s in self.streams}
            if self.nouns:
                row.update(metrics.epic100(sc["verb"][k], sc["noun"][k], ev.verb, ev.noun))
            if self.loss_steps:  # each loss term's mean over the steps since the last evaluation
                row["loss"] = {t: round(v, 6) for t, v in zip(self.term_names, loss_means[k])}
            if checks is not None:
                row["validators"] = checks[k]
                if not (self.method.source_stage and step <= self.sched.stage1_steps):  # a source model is no choice
                    self._keep_best(k, step, checks[k], dirs[k])
            one_class = metrics.collapsed(sc["verb"][k], ev.verb)
            if one_class:
                row["collapsed"] = one_class
            self.history[k].append(row)
            _append(dirs[k] / "metrics.jsonl", json.dumps(row))
            self._warn_collapse(k)
            if self.trackers:
                self.trackers[k].evaluation(step, row)
        self.loss_sum.zero_()
        self.loss_steps = 0

    def _warn_collapse(self, k: int) -> None:
        """Say once, in one line, when run k's predictions have collapsed (:func:`adapt.metrics.collapsed`): for
        several evaluations in a row after it had learned more, or, at its end, at every evaluation its reported
        number is the mean of (kept for final.json as ``collapse``)."""
        rows = self.history[k]
        if k in self.collapse or not rows:
            return
        last = rows[-metrics.COLLAPSE_EVALS:]
        ended = rows[-1]["step"] >= self.sched.stop
        reported = [r for r in rows if r["step"] in set(self.sched.final_steps)]
        if ended and reported and all("collapsed" in r for r in reported):
            last = reported
        elif len(last) < metrics.COLLAPSE_EVALS or not all("collapsed" in r for r in last):
            return
        elif all("collapsed" in r for r in rows) and not ended:
            return  # a fresh model that has not yet learned more than one class; told at the end if it never does
        what = last[-1]["collapsed"]
        self.collapse[k] = {**what, "steps": [r["step"] for r in last]}
        if self.console is not None:
            detail = (f"to one class (class {what['class']}, {100 * what['share']:.0f}% of the evaluation clips)"
                      if what["kind"] == "one class" else
                      f"to a few classes (the classes it still recognises, {what['recognised']}, are "
                      f"{100 * what['covered']:.0f}% of the evaluation clips)")
            self.console.print(f"[yellow]warning:[/yellow] run {self.names[k]}: its predictions have collapsed "
                               f"{detail} at steps {', '.join(str(r['step']) for r in last)}; its number is marked "
                               f"invalid", highlight=False, soft_wrap=True, markup=True)

    def _keep_best(self, k: int, step: int, checks: dict, d: Path) -> None:
        """The heads of the checkpoint each validator prefers so far (``best/<validator>.pt``, with its step), so
        a selected checkpoint can be evaluated again and exported: one file per validator, not one per step."""
        best = self.best.setdefault(k, {})
        heads = None
        for name, value in checks.items():
            if name in best and value <= best[name][1]:
                continue
            best[name] = (step, value)
            if heads is None:
                heads = self._heads(k)
            (d / "best").mkdir(exist_ok=True)
            buf = io.BytesIO()
            torch.save({"step": step, "validator": name, "value": value, "heads": heads}, buf)
            _write(d / "best" / f"{name}.pt", buf.getvalue())

    def _heads(self, k: int) -> dict:
        return {n: v[k].detach().cpu().clone(memory_format=torch.contiguous_format) for n, v in self.params().items()}

    # ---- run folders and results -----------------------------------------------------------------------------

    def provenance(self, k: int) -> dict:
        """Run ``k``'s fingerprint (:mod:`adapt.provenance`): its method's and the tool's code, its settings, its
        stores' identities."""
        if not hasattr(self, "_store_ids"):
            pair = self.pair
            self._store_ids = provenance.store_identities({"source": pair.source.path, "target": pair.target.path,
                                                           "eval": pair.eval.path})
        return provenance.of_run(self.method, self.cfgs[k].to_dict(), self._store_ids)

    def write_configs(self, dirs: list) -> None:
        pair = self.pair
        for k, (c, d) in enumerate(zip(self.cfgs, dirs)):
            resolved = {**c.to_dict(), "modalities": self.mods, "streams": self.streams,
                        "schedule": self.sched.to_dict(), "memory": pair.memory_line, "stores": {
                            "source": str(pair.source.path), "target": str(pair.target.path),
                            "eval": str(pair.eval.path)},
                        "verb_classes": pair.verb_classes, "noun_classes": self.nouns,
                        "trainable_parameters": self.n_params, "provenance": self.provenance(k)}
            _write(d / "config.json", json.dumps(resolved, indent=1))

    def _challenge_store(self):
        """The challenge's test store: checked before training (it exists, holds the run's modalities and
        features of the same shapes), loaded at the end."""
        cfg = self.cfg
        path, _ = resolve_store(cfg.challenge, "challenge", cfg.backbone, cfg.features_root)
        from featstore.store import is_store
        if not is_store(path):
            raise UserError(f"--challenge {cfg.challenge}: {path} is not a feature store")
        store = FeatureStore.open(path)
        missing = [m for m in self.mods if m not in store.modalities]
        if missing:
            raise UserError(f"--challenge {path}: has no {', '.join(missing)} features (the run uses "
                            f"{', '.join(self.mods)})")
        return path

    def _challenge_scores(self):
        """The challenge split and every run's scores on it, evaluated once for the K runs (at the end)."""
        if self._challenge is None:
            dom = self._load(self.cfg.challenge, "challenge", labels=False)
            self._challenge = (dom, self.evaluate(dom))
        return self._challenge

    def open_trackers(self, folders: list) -> None:
        """Each run's live trackers (:mod:`adapt.tracking`: TensorBoard by default when installed, MLflow, W&B),
        with its settings; a tracker asked for but not installed is said in one line."""
        names = tracking.chosen(self.cfg.log)
        line = tracking.missing_line(names)
        if line and self.console is not None:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
        self.trackers = []
        for k, (c, folder) in enumerate(zip(self.cfgs, folders)):
            tags = {"method": self.method.name, "pair": f"{Path(str(c.source)).stem}->{Path(str(c.target)).stem}",
                    "seed": c.seed, "grid": c.tag or "-"}
            self.trackers.append(tracking.Run(names, self.names[k], folder.work, Path(c.out), c.to_dict(),
                                              c.experiment or None, tags))

    def close(self) -> None:
        if self.prefetch:
            self.prefetch.close()
        for tr in self.trackers:
            tr.close()

    def finish(self, k: int, folder: RunFolder) -> dict:
        """Run ``k``'s final.json (the mean of the evaluations at the final steps) and heads.pt, written into its
        working folder, which is then put in place."""
        c, d, sched, pair = self.cfgs[k], folder.work, self.sched, self.pair
        h = self.history[k]
        top1 = [r["target_top1"] for r in h]
        final_steps = set(sched.final_steps)
        chosen = [r for r in h if r["step"] in final_steps]
        mean = lambda key: float(np.mean([r[key] for r in chosen]))  # noqa: E731
        final = {
            "method": self.method.name, "source": c.source, "target": c.target, "eval": c.eval or c.target,
            "seed": c.seed, "tag": c.tag, "backbone": c.backbone, "modalities": self.mods, "streams": self.streams,
            "target_top1": mean("target_top1"), "target_top1_per_eval": top1,
            "eval_steps": [r["step"] for r in h], "final_steps": sched.final_steps,
            "collapsed_per_eval": [("collapsed" in r) for r in h],
            "per_modality": {s: float(np.mean([r["per_modality"][s] for r in chosen])) for s in self.streams},
            "per_class_recall": metrics.per_class_recall(self.last_scores["verb"][k], pair.eval.verb,
                                                         pair.verb_classes),
            "final_top1": top1[-1], "steps": sched.stop, "schedule_steps": sched.steps, "runs_stacked": self.K,
            "train_seconds": time.time() - self.started, "trainable_parameters": self.n_params,
            "device": str(self.device),
        }
        if self.nouns:
            for key in ("verb_top1", "noun_top1", "action_top1", "verb_top5", "noun_top5", "action_top5"):
                final[key] = mean(key)
        final["collapse"] = self.collapse.get(k)
        final["overlap"] = dict(pair.overlap) or None
        final["invalid"] = invalid_marks(final)
        final["provenance"] = self.provenance(k)
        if h and "validators" in h[0]:
            final["validators_per_eval"] = {name: [r["validators"].get(name) for r in h]
                                            for name in h[0]["validators"]}
            final["validator_best_steps"] = {name: s for name, (s, _) in self.best.get(k, {}).items()}
        try:
            heads = self._heads(k)
            buf = io.BytesIO()
            torch.save(heads, buf)  # to memory first: a full disk is then an OSError that names the file
            _write(d / "heads.pt", buf.getvalue())
            if c.challenge and self.nouns:
                dom, sc = self._challenge_scores()
                metrics.write_challenge_json(d / "test.json", dom.ids, sc["verb"][k], sc["noun"][k])
            _write(d / "final.json", json.dumps(final, indent=1))  # last: marks the run complete
            if self.trackers:  # the trackers' last words, while the run is still in its working folder
                self.trackers[k].finish(final, [d / "final.json", d / "config.json", d / "metrics.jsonl"])
            folder.commit()
        except OSError as e:
            raise UserError(f"{folder.path}: could not write the results ({e.strerror or e}); "
                            f"nothing was put in its place (the partial run is in {d})") from None
        return final


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


def _term(model, name: str, out: dict, ctx):
    """A loss term's value; its exception is carried out with the term's name (:class:`adapt.method_check.PartError`)."""
    try:
        return getattr(model, name)(out, ctx)
    except Exception as e:  # noqa: BLE001 - said with the term's name by Training.step
        raise method_check.PartError(f"term {name!r}", e) from e


def _scores(out: dict) -> dict:
    """Softmax scores of the fused prediction and of each modality's stream."""
    s = {"verb": out["verb"].softmax(-1)}
    for m, v in out["verb_m"].items():
        s[f"verb_{m}"] = v.softmax(-1)
    if out["noun"] is not None:
        s["noun"] = out["noun"].softmax(-1)
    return s


def _scores_and_features(out: dict) -> dict:
    """The validators' inputs: the fused predictions' softmax and the video-level features of every stream."""
    s = {"verb": out["verb"].softmax(-1), "feat": torch.cat([v for v in out["video"].values()], dim=-1)}
    if out["noun"] is not None:
        s["noun"] = out["noun"].softmax(-1)
    return s


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
