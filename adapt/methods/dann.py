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


class DANN(Method):
    name = "dann"
    title = "DANN, Ganin et al. 2016"
    citation = "Y. Ganin et al. Domain-Adversarial Training of Neural Networks. JMLR 2016."
    composition = "GRL + one discriminator on the concatenated video features"
    facts = facts(
        ("w_video_adv", 1.0, "DANN eq. 9 (lambda weighs the reversed gradient; the loss enters with 1)"),
        ("beta_video", 1.0, "DANN sec. 5.2.2 (lambda from 0 to 1)"),
        ("grl_gamma", 10.0, "DANN sec. 5.2.2 (gamma = 10)"),
    )

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
