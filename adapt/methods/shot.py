"""SHOT: Liang et al., "Do we really need to access the source data? Source hypothesis transfer for unsupervised
domain adaptation", ICML 2020 (released code ``tim-learn/SHOT``, object/); the source-free setting of ATCoN, EXTERN
and CleanAdapt in video.

Two stages, the second without any source clip:

1. **Source** (image_source.py): the model trained on the source alone with label-smoothed cross-entropy,
   ``t = (1 - eps) onehot(y) + eps / K``, eps 0.1 (loss.py:54-87); the classifier (the "hypothesis") is a
   weight-normalised linear layer (network.py:95-97).  Saved once (``source_stage``: ``<out>/source_models/``)
   and reused by every target run of the same source, seed and settings.
2. **Target** (image_target.py): the classifier frozen (IT:141-143), the features trained with information
   maximisation and self-supervised pseudo-labels (IT:187-207)::

       L = ent_par [ mean_i H(p_i) - H(mean_i p_i) ] + cls_par CE(p, y^)      ent_par 1, cls_par 0.3

   ``H(p) = -sum p log(p + 1e-5)``.  The pseudo-labels ``y^`` are computed before the first target step and then
   every target epoch (IT:161, 174-185) by ``obtain_label`` (IT:242-297): the target clips' features (with a 1
   appended, L2-normalised) clustered around class centroids weighted by the softmax, then once more around the
   centroids of the hard labels, each clip taking its nearest centroid by cosine distance, among the classes
   predicted more than ``threshold`` (0) times.

Both stages: SGD, momentum 0.9, Nesterov, weight decay 1e-3, lr 0.01 annealed as ``(1 + 10 p)^-0.75`` over each
stage (image_source.py:25-31).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapt import losses, parts
from adapt.config import non_negative, one_of, positive, probability
from adapt.method import Method, MethodSettings, Phase, facts, term
from adapt.model import Heads

S = "tim-learn/SHOT object/"
E100 = {"when": {"dataset": "epic100"}}


def information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """``mean_i H(p_i) - H(mean_i p_i)`` (IT:196-204): confident, and diverse over the batch, with SHOT's
    ``H(p) = -sum_k p_k log(p_k + 1e-5)`` (loss.py:9-14)."""
    p = logits.softmax(-1)
    return (losses.entropy(p, "none", probs=True, eps=1e-5).mean()
            - losses.entropy(p.mean(0), "none", probs=True, eps=1e-5))


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Label-smoothed cross-entropy (loss.py:78-84): ``mean_i sum_k -t_ik log softmax_ik``."""
    logp = logits.log_softmax(-1)
    t = F.one_hot(labels, logits.shape[-1]).to(logp.dtype) * (1 - eps) + eps / logits.shape[-1]
    return -(t * logp).sum(-1).mean()


def cluster_labels(prob: np.ndarray, feat: np.ndarray, threshold: int = 0) -> np.ndarray:
    """``obtain_label`` (IT:263-297): (N, K) softmax, (N, D) features -> (N,) pseudo-labels."""
    fea = np.concatenate([feat, np.ones((len(feat), 1), feat.dtype)], axis=1)
    fea = fea / np.linalg.norm(fea, axis=1, keepdims=True)
    k = prob.shape[1]
    aff, predict = prob, prob.argmax(1)
    for _ in range(2):
        centroids = aff.T @ fea / (1e-8 + aff.sum(0)[:, None])
        labelset = np.flatnonzero(np.bincount(predict, minlength=k) > threshold)
        c = centroids[labelset]
        cos = fea @ c.T / np.maximum(np.linalg.norm(c, axis=1)[None, :], 1e-12)
        predict = labelset[(1 - cos).argmin(1)]
        aff = np.eye(k, dtype=fea.dtype)[predict]
    return predict


class SHOT(Method):
    name = "shot"
    title = "SHOT, Liang et al., ICML 2020 (source-free)"
    citation = ("J. Liang et al. Do We Really Need to Access the Source Data? Source Hypothesis Transfer for "
                "Unsupervised Domain Adaptation. ICML 2020.")
    composition = ("stage 1: source CE with label smoothing 0.1 (saved once); stage 2, no source clips: classifier "
                   "frozen, IM + 0.3 CE on clustered pseudo-labels, refreshed every target epoch")
    facts = facts(
        ("w_cls_stage1", 1.0, S + "image_source.py:231 (the source stage's only loss)"),
        ("w_cls", 0.0, S + "image_target.py (no source data in the target stage)"),
        ("label_smoothing", 0.1, S + "image_source.py:325, 231; loss.py:54-87"),
        ("w_im", 1.0, S + "image_target.py:196-204, 315 (ent_par 1.0, gent)"),
        ("w_pseudo", 0.3, S + "image_target.py:187-192, 314 (cls_par 0.3)"),
        ("cluster_threshold", 0, S + "image_target.py:280-282, 316"),
        ("optimizer", "sgd", S + "image_source.py:29-31, 196-205"),
        ("lr", 0.01, S + "image_source.py:318; image_target.py:310"),
        ("momentum", 0.9, S + "image_source.py:29-31 (set by lr_scheduler)"),
        ("nesterov", True, S + "image_source.py:29-31"),
        ("weight_decay", 1e-3, S + "image_source.py:29-31"),
        ("lr_anneal", 10.0, S + "image_source.py:25-28 (lr0 (1 + 10 iter / max_iter)^-0.75, per stage)"),
        ("lr_anneal_power", 0.75, S + "image_source.py:25-28"),
        ("lr_steps", [], S + "no step decay"),
        ("source_holdout", 0.1, S + "image_source.py data_load (--trte val, the default: a random 90% of the "
                                    "source trains, 10% is held out)"),
        ("source_pick", "last", S + "image_source.py train_source ('best_netF = netF.state_dict()' keeps references "
                                    "to the live weights, which later steps update in place, so the file saved holds "
                                    "the last model)"),
        ("dropout", 0.0, S + "network.py:75-89 (the bottleneck's dropout is not used in forward)"),
        ("dropout_video", 0.0, S + "network.py:75-97 (none before the classifier)"),
        ("epochs", 45, "TA3N's 30 epochs for the source stage, then SHOT's 15 target epochs (image_target.py:305)",
         E100),
        ("stage1_epochs", 30, "the EPIC-100 base's 30 epochs", E100),
        ("lr_epochs", [], S + "no step decay", E100),
        (None, "classifier frozen in stage 2", S + "image_target.py:141-143"),
        (None, "pseudo-labels before the first target step, then every epoch", S + "image_target.py:161, 174-185"),
    )
    differences = (
        "The bottleneck (Linear 256 + BatchNorm, network.py:75-89) is the video model's embedding (FC + ReLU, no "
        "BatchNorm: the heads are functional, so K runs can be stacked); the backbone is frozen, so SHOT's 0.1 "
        "backbone learning rate has nothing to act on.",
        "Stage lengths: the dataset's (MM-SADA's 3K source + 6K target steps on D1/D2/D3; 30 + 15 epochs on "
        "EPIC-100) rather than SHOT's 20-100 source epochs and 15 target epochs; pseudo-labels are refreshed every "
        "target epoch as SHOT's interval.",
        "Pseudo-labels cluster the video features averaged over the evaluation views (I3D: every window); with "
        "nouns (EPIC-100) the verb and noun tasks each get the information maximisation and their own "
        "pseudo-labels, averaged as the classification is.",
    )

    @dataclass
    class Settings(MethodSettings):
        label_smoothing: float = probability(0.0)  # eps of the source stage's cross-entropy
        w_im: float = 0.0            # ent_par: information maximisation on the target
        w_pseudo: float = 0.0        # cls_par: CE on the clustered pseudo-labels
        pseudo_every: Optional[int] = positive(None, stage=2)  # target steps between pseudo-label refreshes;
                                     # none: an epoch
        cluster_threshold: int = non_negative(0, stage=2)  # a class keeps its centroid when predicted more often
        source_pick: str = one_of("last", "best")  # the source model kept: the last (what SHOT's code saves), or
                                     # the best on the held-out source clips, checked every tenth of the stage
                                     # (what its code means to keep: image_source.py train_source)

    source_stage = True

    def build(self, inputs):
        """The hypothesis: a weight-normalised classifier per stream (network.py:95-97), in place of the video
        model's linear one."""
        self.classifier = nn.ModuleDict({s: Heads(self.video_dim, inputs.verbs, inputs.nouns, parts.WeightNormLinear)
                                         for s in self.streams})
        self._best = {}  # source_pick=best: run -> (held-out accuracy, weights) of its best source model so far

    @classmethod
    def batches(cls, stage, source, target):
        return (source, 0) if stage == 1 else (0, target)

    @classmethod
    def check(cls, cfg, batches, streams):
        if not (cfg.stage1_epochs if cfg.epochs else cfg.stage1_steps):
            from featstore.errors import UserError
            raise UserError("shot: the source stage needs stage1_steps > 0 (or stage1_epochs with epochs)")

    def cls(self, out, ctx):
        """The source stage's label-smoothed cross-entropy, mean over tasks."""
        rows, eps = slice(0, ctx.b_s), self.cfg.label_smoothing
        ce = [smoothed_ce(out["verb"][rows], ctx.y_s, eps)]
        if out["noun"] is not None and ctx.n_s is not None:
            ce.append(smoothed_ce(out["noun"][rows], ctx.n_s, eps))
        return sum(ce) / len(ce)

    @term("w_im")
    def im(self, out, ctx):
        """Information maximisation on the target clips, mean over tasks."""
        tasks = [information_maximisation(out[k][ctx.b_s:]) for k in ("verb", "noun") if out[k] is not None]
        return sum(tasks) / len(tasks)

    @term("w_pseudo")
    def pseudo(self, out, ctx):
        """CE on the clustered pseudo-labels of the batch's target clips, mean over tasks."""
        idx = ctx.idx_t.to(torch.int64)
        tasks = [losses.cross_entropy(out[k][ctx.b_s:], ctx.state[f"pseudo_{k}"][idx])
                 for k in ("verb", "noun") if out[k] is not None]
        return sum(tasks) / len(tasks)

    def initial_state(self, n_source, n_target, device):
        tasks = ("verb", "noun") if self.classifier[self.streams[0]].noun is not None else ("verb",)
        return {f"pseudo_{k}": torch.zeros(n_target, dtype=torch.int64, device=device) for k in tasks}

    def parameter_groups(self):
        groups = {"features": [], "classifier": []}
        for name, _ in self.named_parameters():
            groups["classifier" if name.startswith("classifier.") else "features"].append(name)
        return groups

    def phases(self, stage):
        """The target stage updates the features only: the source hypothesis stays as it was trained."""
        return super().phases(stage) if stage == 1 else [self._target_phase]

    _target_phase = Phase("target", ("features",))

    def before_step(self, run):
        """``source_pick=best``: the held-out source accuracy every tenth of the source stage, and at its end the
        best model put back.  Then the pseudo-labels of every target clip, for each run, at the first target step
        and every target epoch (``pseudo_every`` steps)."""
        if self.cfg.source_pick == "best" and run.held_out_labels is not None and run.start < run.stage1_steps:
            self._keep_best_source(run)
        every = self.cfg.pseudo_every or run.epoch_steps
        if run.step < run.stage1_steps or (run.step - run.stage1_steps) % every:
            return
        scores = run.predict("target")
        for k in range(run.K):
            feat = scores["feat"][k].double().cpu().numpy()
            for task in ("verb", "noun"):
                if task in scores:
                    labels = cluster_labels(scores[task][k].double().cpu().numpy(), feat, self.cfg.cluster_threshold)
                    run.set_state(f"pseudo_{task}", k, torch.from_numpy(labels))

    def _keep_best_source(self, run):
        """SHOT's check of the source model (image_source.py train_source): after every tenth of the stage, the
        accuracy on the held-out source clips; the best (ties: the later) is kept and, when the stage ends, put
        back before the target stage starts (and before the source stage is saved)."""
        interval = max(1, run.stage1_steps // 10)
        if run.step == 0 or run.step > run.stage1_steps or (run.step % interval and run.step != run.stage1_steps):
            return
        scores = run.predict("held_out")["verb"]
        for k in range(run.K):
            acc = float((scores[k].argmax(-1).cpu().numpy() == run.held_out_labels).mean())
            if k not in self._best or acc >= self._best[k][0]:
                self._best[k] = (acc, run.weights(k))
        if run.step == run.stage1_steps:
            for k, (_, weights) in self._best.items():
                run.load_weights(k, weights)
