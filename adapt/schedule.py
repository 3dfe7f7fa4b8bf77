"""A run's schedule, resolved from its configuration and the sizes of its stores: how many steps, the batch sizes,
the learning rate and the gradient-reversal coefficients at each step, and the steps that are evaluated.

* Batches: ``batch_source`` + ``batch_target`` clips a step (target none: ``floor(B_s * n_t / n_s)``, TA3N
  script_test_ta3n.sh:80: 207), as the method takes them in each stage (``Method.batches``: SHOT's source stage
  has no target clips and its target stage no source clips).
* Epochs (TA3N, ``epochs`` set): an epoch is one pass of ``zip(source loader, target loader)`` over the domains
  the stage draws from, so ``min(ceil(n_s / B_s), ceil(n_t / B_t))`` steps (EPIC-100: 126 = ceil(16115 / 128);
  TA3N main.py:329); ``stage1_epochs`` of them make stage 1 (else ``stage1_steps`` steps).
* Learning rate: ``lr`` in stage 1, ``lr_stage2`` (none = ``lr``) from stage 2 on, multiplied by ``lr_decay``
  after each of ``lr_steps`` (steps) or at the start of each of ``lr_epochs`` (1-based epochs, TA3N main.py:208-212),
  and, with ``lr_anneal`` = a, by ``(1 + a p)^-lr_anneal_power`` where p is the progress through the stage
  (Ganin et al. sec. 5.2.2: a = 10, power 0.75; SHOT image_source.py:25-28 restarts it in each stage).
* Gradient reversal (Ganin et al. 2016 sec. 5.2.2): ``beta x (2 / (1 + exp(-gamma p)) - 1)`` per reversal level
  of the method (``Method.reversals``: a level and the setting that holds its beta), ``p = grl_p0 + (step - start) / (steps - start)`` where ``start`` is ``stage1_steps`` when ``grl_restart``
  (the MM-SADA code restarts its step counter for stage 2: utils.py:86-91, train.py:116-117) and 0 otherwise.
  TA3N uses gamma 1 and p from 1/30 (main.py:332-333, 355-361).
* A prefix (``stop_after``): the run ends after ``stop`` steps of this schedule, which is otherwise unchanged
  (learning rate, reversal warm-up and stages as in the full run); its evaluations end there.
* Evaluations: every ``eval_every`` steps (none: once an epoch, TA3N main.py:226), and at the ``last_evals`` steps
  ``last_eval_every`` apart that end the run (MM-SADA submit_test.sh:11: 5600..6000 every 50); the reported top-1
  is their mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Schedule:
    steps: int
    epoch_steps: int                 # of stage 2 (of the run, for a method that draws alike in both stages)
    batch_source: int                # stage 2's batch, as the method takes it
    batch_target: int
    stage1_steps: int
    lr_milestones: list
    final_steps: list                # the evaluations whose mean is the reported top-1
    eval_steps: list                 # every evaluated step, ascending (1-based: after that many steps)
    batches: dict = None             # stage -> (B_s, B_t)
    stop: int = 0                    # the run ends after this many steps (stop_after: a prefix; else steps)

    @classmethod
    def of(cls, cfg, n_source: int, n_target: int, method=None) -> "Schedule":
        bs = cfg.batch_source
        bt = cfg.batch_target if cfg.batch_target is not None else max(1, bs * n_target // n_source)
        batches = {stage: method.batches(stage, bs, bt) if method else (bs, bt) for stage in (1, 2)}

        def epoch(stage):
            b_s, b_t = batches[stage]
            return max(1, min([math.ceil(n / b) for n, b in ((n_source, b_s), (n_target, b_t)) if b] or [1]))
        epoch_steps = epoch(2)
        stage1 = cfg.stage1_steps
        if cfg.epochs and cfg.stage1_epochs is not None:
            stage1 = cfg.stage1_epochs * epoch(1)
            steps = stage1 + (cfg.epochs - cfg.stage1_epochs) * epoch_steps
        else:
            steps = cfg.epochs * epoch_steps if cfg.epochs else cfg.steps
        milestones = sorted([int(s) for s in cfg.lr_steps] + [int((e - 1) * epoch_steps) for e in cfg.lr_epochs])
        stop = min(steps, getattr(cfg, "stop_after", None) or steps)  # a prefix ends its evaluations there
        final = sorted(s for s in {stop - j * cfg.last_eval_every for j in range(cfg.last_evals)} if s > 0)
        each = cfg.eval_every or epoch_steps
        every = set(range(each, stop + 1, each))
        return cls(steps, epoch_steps, *batches[2], min(stage1, steps), milestones, final,
                   sorted(every | set(final) | {stop}), batches, stop)

    def stage(self, step: int) -> int:
        return 1 if step < self.stage1_steps else 2

    def lr(self, cfg, step: int) -> float:
        base = cfg.lr if step < self.stage1_steps or cfg.lr_stage2 is None else cfg.lr_stage2
        lr = base * cfg.lr_decay ** sum(1 for m in self.lr_milestones if step >= m)
        if cfg.lr_anneal:
            start, end = (0, self.stage1_steps) if step < self.stage1_steps else (self.stage1_steps, self.steps)
            lr *= (1 + cfg.lr_anneal * (step - start) / max(1, end - start)) ** -cfg.lr_anneal_power
        return lr

    def grl_progress(self, cfg, step: int) -> float:
        start = self.stage1_steps if cfg.grl_restart else 0
        return max(0.0, cfg.grl_p0 + (step - start) / max(1, self.steps - start))

    def grl(self, cfg, step: int, reversals: dict) -> np.ndarray:
        """The coefficient of each reversal level ``{level: beta setting}`` at ``step``, in that order (float32)."""
        p = self.grl_progress(cfg, step)
        warm = 2.0 / (1.0 + math.exp(-cfg.grl_gamma * p)) - 1.0
        return np.array([getattr(cfg, beta) * warm for beta in reversals.values()], dtype=np.float32)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "epoch_steps": self.epoch_steps, "batch_source": self.batch_source,
                "batch_target": self.batch_target, "batches": {str(k): list(v) for k, v in self.batches.items()},
                "stage1_steps": self.stage1_steps, "stop": self.stop,
                "lr_milestones": self.lr_milestones, "final_steps": self.final_steps}
