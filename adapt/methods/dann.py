"""DANN: Ganin et al., "Domain-adversarial training of neural networks", JMLR 2016.

A domain discriminator D learns to tell the source clips from the target clips; a gradient reversal layer in front
of it makes the features fool it (eq. 9): ``L = L_y + lambda_d L_d`` where ``L_d`` is D's cross-entropy (source
label 0, target 1), with the reversed gradient scaled by ``beta x (2 / (1 + exp(-gamma p)) - 1)`` (sec. 5.2.2:
gamma 10).  Two placements, both used by the papers that build on DANN:

* ``video_adv``: one discriminator on the fused video feature (the streams' features concatenated): Ganin et al.'s,
  and TA3N's video level;
* ``adv``: one discriminator per stream, their cross-entropies summed: MM-SADA eq. 2 (its code's adversarial-only
  run, ``submit_adversarial.sh``), M3EM's L_d.

Both see the video features before dropout, as the MM-SADA code's heads do (model.py:424-449), or after it
(``video_disc_after_dropout``: TA3N models.py:720).  On D1/D2/D3 the method runs on MM-SADA's two-stage schedule:
the discriminators act from stage 2, the reversal's p restarted there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from adapt import losses, parts
from adapt.config import positive
from adapt.method import Method, MethodSettings, facts, term

MM, TA = "MM-SADA-code ", "EPIC-KITCHENS-100_UDA_TA3N "
EPIC55 = {"when": {"dataset": ("mmsada", "custom", "demo")}}
E100 = {"when": {"dataset": "epic100"}}


class DANN(Method):
    name = "dann"
    title = "DANN, Ganin et al. 2016"
    citation = "Y. Ganin et al. Domain-Adversarial Training of Neural Networks. JMLR 2016."
    composition = ("MM-SADA's adversarial-only run: a discriminator per modality, GRL 0.2 (EPIC-55); TA3N's video "
                   "level (EPIC-100); Ganin et al.'s one discriminator, CE 1, annealed lr as form=paper")
    facts = facts(
        ("w_adv", 1.0, MM + "scripts/submit_adversarial.sh:24 (domain_mode DANN); model.py:422-441, 641-643 (one "
                            "discriminator per modality, their CEs summed, weight 1)", EPIC55),
        ("beta_adv", 0.2, MM + "scripts/submit_adversarial.sh:24 (--lambda_in=0.2); train.py:116-117", EPIC55),
        ("w_video_adv", 1.0, TA + "models.py:720; main.py:591 (the video-level discriminator of its code)", E100),
        ("beta_video", 0.75, TA + "script_test_ta3n.sh:64 (beta for the video level)", E100),
        # Ganin et al.'s own: one discriminator, CE weight 1, from the first step, the learning rate annealed
        ("w_adv", 0.0, "DANN paper: one discriminator", {"form": "paper"}),
        ("w_video_adv", 1.0, "DANN eq. 9 (the domain loss enters with weight 1)", {"form": "paper"}),
        ("beta_video", 1.0, "DANN sec. 5.2.2 (lambda from 0 to 1)", {"form": "paper"}),
        ("grl_gamma", 10.0, "DANN sec. 5.2.2 (gamma = 10)", {"form": "paper"}),
        ("w_cls", 1.0, "DANN eq. 9 (the label loss with weight 1)", {"form": "paper"}),
        ("w_cls_stage1", None, "DANN: one stage", {"form": "paper"}),
        ("stage1_steps", 0, "DANN: one stage", {"form": "paper"}),
        ("lr_anneal", 10.0, "DANN sec. 5.2.2 (mu_p = mu_0 / (1 + 10 p)^0.75)", {"form": "paper"}),
        ("lr_anneal_power", 0.75, "DANN sec. 5.2.2", {"form": "paper"}),
        # and nothing of the dataset's base that Ganin et al. do not have: no step decay on top of the annealing,
        # lambda from 0 (p from 0), no gradient clipping, plain momentum
        ("lr_steps", [], "DANN sec. 5.2.2 (the annealing is the only schedule)", {"form": "paper"}),
        ("lr_epochs", [], "DANN sec. 5.2.2 (the annealing is the only schedule)", {"form": "paper"}),
        ("grl_p0", 0.0, "DANN sec. 5.2.2 (p from 0 to 1: lambda starts at 0)", {"form": "paper"}),
        ("grl_restart", False, "DANN: one stage, p over the whole run", {"form": "paper"}),
        ("clip_grad_norm", None, "DANN: no gradient clipping", {"form": "paper"}),
        ("nesterov", False, "DANN sec. 5.2.2 (SGD with momentum 0.9)", {"form": "paper"}),
        ("momentum", 0.9, "DANN sec. 5.2.2", {"form": "paper"}),
    )
    differences = ("MM-SADA's adversarial-only run starts stage 2 from its stage-1 model ('PretrainM', source CE with "
                   "target clips in the batch), as every EPIC-55 method here does.",)

    @dataclass
    class Settings(MethodSettings):
        w_adv: float = 0.0           # lambda_d of the per-stream discriminators (MM-SADA eq. 4; M3EM eq. 6)
        beta_adv: float = 0.2        # their reversal's scale (MM-SADA code: --lambda_in 0.2)
        w_video_adv: float = 0.0     # lambda_d of the discriminator on the fused video feature (DANN; TA3N video)
        beta_video: float = 1.0      # its reversal's scale
        disc_hidden: Optional[int] = positive(100)  # hidden width (MM-SADA arch.py:47-50); none = the input's (TA3N)
        video_disc_after_dropout: bool = False  # the video discriminator sees dropout_video's output (TA3N)

    reversals = {"adv": "beta_adv", "video": "beta_video"}

    def build(self, inputs):
        cfg, V = self.cfg, self.video_dim
        if self.acts("adv"):
            self.disc = nn.ModuleDict({s: parts.DomainDiscriminator(V, cfg.disc_hidden) for s in self.streams})
        if self.acts("video_adv"):
            self.disc_video = parts.DomainDiscriminator(V * len(self.streams), cfg.disc_hidden)

    def forward(self, x, ctx):
        out = super().forward(x, ctx)
        if hasattr(self, "disc"):
            out["disc"] = {s: self.disc[s](out["video"][s], ctx.grl["adv"]) for s in self.streams}
        if hasattr(self, "disc_video"):
            v = out["video_drop"] if self.cfg.video_disc_after_dropout else out["video"]
            out["disc_video"] = self.disc_video(torch.cat([v[s] for s in self.streams], dim=-1), ctx.grl["video"])
        return out

    @term("w_adv")
    def adv(self, out, ctx):
        """sum over streams of the discriminators' cross-entropy (MM-SADA eq. 2, model.py:493-501)."""
        return sum(losses.domain_ce(d, ctx.b_s) for d in out["disc"].values())

    @term("w_video_adv")
    def video_adv(self, out, ctx):
        """The video discriminator's cross-entropy (DANN eq. 9; TA3N main.py:577-589)."""
        return losses.domain_ce(out["disc_video"], ctx.b_s)
