"""MM-SADA: Munro and Damen, "Multi-modal domain adaptation for fine-grained action recognition", CVPR 2020
(``shared/papers/mm-sada_munro-damen_cvpr2020.txt``; released code ``jonmun/MM-SADA-code``).

Loss (eq. 4): ``L = L_y + lambda_d sum_m L_d^m + lambda_c L_c`` with the late-fused classification loss of eq. 1
(the modalities' logits summed), one discriminator per modality behind a gradient reversal layer (eq. 2) and the
self-supervised correspondence classifier on the concatenated features (eq. 3).

As the released code trains it (``scripts/submit_mmsada.sh``): stage 1 (3K steps) is ``1.0 CE + 5.0 L_c``; stage 2
(6K steps, restored from stage 1, its step counter and so its GRL schedule restarted) is
``0.2 CE + (L_d^rgb + L_d^flow) + 1.0 L_c`` with the reversed gradient scaled by
``0.2 x (2 / (1 + exp(-10 p)) - 1)``.  SGD with momentum 0.9 at 0.01 in both stages: the scripts' ``--lr`` never
reaches the optimiser (train.py:59-63 builds the Model without it; model.py:49, 108).  Half of each domain's 64 clips
are correspondence negatives, their flow from the next clip of that half (batch_generator.py:110-119); only the
corresponding source clips train the classifier (model.py:536-539); RGB and flow windows are drawn independently
(batch_generator.py:294-298).  The discriminators and the correspondence head see the features before dropout, the
classifier after it (i3d.py:466-469).  Reported: the mean top-1 of the checkpoints at stage-2 steps 5600..6000,
every 50 (submit_test.sh:11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from adapt import losses, parts
from adapt.datasets import EPIC55_BASE
from adapt.method import facts, term
from adapt.methods.dann import DANN

MM = "MM-SADA-code "


def negatives(batch: int) -> int:
    """How many of a domain's ``batch`` clips are correspondence negatives: the first ``batch // 2`` (MM-SADA
    batch_generator.py:110-119: half of each domain's clips, their flow taken from the next clip of that half)."""
    return batch // 2


def correspondence_targets(b_s: int, b_t: int, device) -> torch.Tensor:
    """1 where a row's RGB and flow come from the same clip, 0 for the negatives: the first half of each domain's
    rows (see :meth:`MMSADA.arrange`)."""
    t = torch.ones(b_s + b_t, dtype=torch.int64, device=device)
    t[:negatives(b_s)] = 0
    t[b_s:b_s + negatives(b_t)] = 0
    return t


class MMSADA(DANN):
    """Per-modality DANN (:class:`adapt.methods.dann.DANN`'s ``adv``) with the self-supervised correspondence."""

    name = "mmsada"
    title = "MM-SADA, Munro and Damen, CVPR 2020"
    citation = "J. Munro, D. Damen. Multi-modal Domain Adaptation for Fine-grained Action Recognition. CVPR 2020."
    composition = ("per-modality discriminators summed (eq. 2, 4) + correspondence head (eq. 3); stage 1 CE + 5 L_c, "
                   "stage 2 0.2 CE + sum_m L_d + L_c, GRL 0.2 restarted")
    facts = facts(
        *EPIC55_BASE,  # MM-SADA's code's base, on every dataset
        ("w_adv", 1.0, MM + "src/models/model.py:642 (domain_loss enters with weight 1)"),
        ("beta_adv", 0.2, MM + "scripts/submit_mmsada.sh:24 (--lambda_in=0.2: scales the reversed gradient)"),
        ("disc_hidden", 100, MM + "src/models/arch.py:47-50 (dense(100)-ReLU-dense(2))"),
        ("w_corr_stage1", 5.0, MM + "src/train/train.py:347 (self_lambda default 5; stage 1 passes none)"),
        ("w_corr", 1.0, MM + "scripts/submit_mmsada.sh:24 (--self_lambda=1.0)"),
        ("init", "mmsada", MM + "src/models/arch.py:47-50, 58-63 (truncated normal 0.1); i3d.py:483-488"),
        (None, "classifier on corresponding source clips", MM + "src/models/model.py:536-539"),
        (None, "negatives: flow of the next clip, half a domain", MM + "src/data_gen/batch_generator.py:110-119"),
        (None, "L_d, L_c: batch means over both domains", MM + "src/models/model.py:482-512"),
        # the paper's form (sec. 4.1): Adam, stage 2 at 2e-4, the weights of eq. 4
        ("optimizer", "adam", "paper sec. 4.1 ('Adam optimiser')", {"form": "paper"}),
        ("lr_stage2", 2e-4, "paper sec. 4.1 (stage 2 at 2e-4)", {"form": "paper"}),
        ("w_cls", 1.0, "paper eq. 4", {"form": "paper"}),
        ("w_corr", 5.0, "paper sec. 4.1 (lambda_c = 5)", {"form": "paper"}),
        ("beta_adv", 1.0, "paper eq. 4 (lambda_d = 1)", {"form": "paper"}),
    )
    differences = (
        "Frozen features: MM-SADA fine-tunes both I3D streams end to end; here a trainable FC + ReLU (1024 -> 1024) "
        "per modality plays that part, and the heads sit on its output.",
        "The 16-way classifier of the code (8 columns trained, argmax over 16) is an 8-way one here.",
        "The code's 8 GPU towers give I3D's BatchNorm per-domain batch statistics in training; frozen features "
        "have no BatchNorm.",
    )

    @dataclass
    class Settings(DANN.Settings):
        w_corr: float = 0.0                   # lambda_c: the correspondence loss
        w_corr_stage1: Optional[float] = None  # in stage 1 (the code: 5.0); none = w_corr

    def build(self, inputs):
        super().build(inputs)
        if self.acts("corr"):
            if "rgb" not in self.streams or "flow" not in self.streams:
                from featstore.errors import UserError
                raise UserError("the correspondence head (w_corr) needs separate rgb and flow streams (fusion=late)")
            self.correspondence = parts.CorrespondenceHead(2 * self.video_dim, self.cfg.disc_hidden or 100)

    def forward(self, x, ctx):
        out = super().forward(x, ctx)
        if hasattr(self, "correspondence"):
            out["corr"] = self.correspondence(out["video"]["rgb"], out["video"]["flow"])
        return out

    def cls(self, out, ctx):
        """With the correspondence head, only the corresponding source clips train the classifier (model.py:
        536-539)."""
        if not hasattr(self, "correspondence"):
            return super().cls(out, ctx)
        rows = slice(negatives(ctx.b_s), ctx.b_s)
        n = ctx.n_s[rows] if ctx.n_s is not None else None
        return losses.tasks_ce(out["verb"], out["noun"], rows, ctx.y_s[rows], n)

    @term("w_corr", stage1="w_corr_stage1")
    def corr(self, out, ctx):
        """The correspondence cross-entropy over both domains' clips (eq. 3; model.py:505-512)."""
        b = out["verb"].shape[0]
        return losses.cross_entropy(out["corr"], correspondence_targets(ctx.b_s, b - ctx.b_s, out["corr"].device))

    def arrange(self, sel, batch):
        """The first half of a domain's clips take their flow (clip and window) from the next clip of that half:
        the correspondence negatives (batch_generator.py:110-119)."""
        if not self.acts("corr") or "flow" not in sel:
            return sel
        n = negatives(batch)
        order = np.concatenate([np.roll(np.arange(n), -1), np.arange(n, batch)])
        idx, units = sel["flow"]
        return {**sel, "flow": (idx[order], units[order])}

    @classmethod
    def check(cls, cfg, batches, streams):
        if cfg.w_corr or cfg.w_corr_stage1:
            small = min(min(b) for b in batches.values())
            if small < 4:
                from featstore.errors import UserError
                raise UserError(f"the correspondence head needs at least 4 clips per domain and step "
                                f"(batch {batches[2][0]} + {batches[2][1]})")
