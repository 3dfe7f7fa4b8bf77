"""CDAN and CDAN+E: Long et al., "Conditional adversarial domain adaptation", NeurIPS 2018 (released code
``thuml/CDAN``, pytorch/; cited in the tables of TA3N, CoMix and TranSVAE).

The discriminator D sees the features ``f`` conditioned on the classifier's prediction ``g = softmax(logits)``
through the multilinear map ``T(f, g) = g (x) f`` (the outer product, flattened class-major: element
``c * d_f + j = g_c f_j``; loss.py:21-26); ``g`` is detached (loss.py:22), so the adversarial gradient reaches the
features only.  When ``d_f x d_g`` is large the randomized map ``T(f, g) = (R_f f) * (R_g g) / sqrt(d)`` replaces it
(eq. 6; network.py:25-41: R_f, R_g drawn once from N(0, 1), never trained, d = 1024).  The loss (eq. 7-8):

    L = L_y + lambda E(D, G),   E = BCE(D(T(f, g)), 1 for source, 0 for target)   (loss.py:30-31, 45)

with the gradient reversal in front of D (network.py:383-388).  CDAN+E weighs each clip by the certainty of its
prediction, ``w = 1 + exp(-H(g))`` (eq. 9), normalised to sum to one in each domain, the loss being
``sum_i w_i BCE_i / sum_i w_i`` (loss.py:32-43); H's gradient passes the same reversal (loss.py:33), so the
classifier is pushed to make the clips that D finds easy uncertain.

Here ``f`` is the video feature (the streams' concatenated, before dropout, as DANN's discriminator sees it) and
``g`` the fused verb prediction; the method runs on the dataset's base (MM-SADA's two stages on D1/D2/D3, TA3N's
30 epochs on EPIC-100), the adversarial term from stage 2 on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapt import losses, parts
from adapt.config import positive
from adapt.method import Method, MethodSettings, facts, term

C = "thuml/CDAN pytorch/"


def multilinear(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g (x) f`` flattened class-major: (B, d_f), (B, C) -> (B, C * d_f) (loss.py:24-26)."""
    return (g.unsqueeze(-1) * f.unsqueeze(-2)).flatten(-2)


def certainty_weights(entropy: torch.Tensor, b_s: int) -> torch.Tensor:
    """CDAN+E's weights: ``w = 1 + exp(-H)``, each domain's normalised to sum to one by its detached total
    (loss.py:34-42).  Shapes: (B,) -> (B,)."""
    w = 1.0 + torch.exp(-entropy)
    source = torch.arange(w.shape[0], device=w.device) < b_s
    total_s = torch.where(source, w, torch.zeros_like(w)).sum().detach()
    total_t = torch.where(source, torch.zeros_like(w), w).sum().detach()
    return w / torch.where(source, total_s, total_t)


class CDAN(Method):
    name = "cdan"
    title = "CDAN, Long et al., NeurIPS 2018"
    citation = "M. Long et al. Conditional Adversarial Domain Adaptation. NeurIPS 2018."
    composition = ("GRL + a discriminator (1024-1024-1, dropout 0.5) on the multilinear map of the video features "
                   "and the prediction (randomized to 1024 when d_f x C > 4096), weight 1")
    facts = facts(
        ("w_cdan", 1.0, C + "train_image.py:189-190, 229 (loss = CE + trade_off x transfer, trade_off 1)"),
        ("w_cls", 1.0, C + "train_image.py:229 (total_loss = transfer_loss + classifier_loss: the features get the "
                           "classification and the reversed gradient at 1 : 1; MM-SADA's stage-2 0.2 would make "
                           "it 1 : 5)"),
        ("beta_cdan", 1.0, C + "network.py:10-11, 377-381 (calc_coeff: from 0 to high = 1)"),
        ("grl_gamma", 10.0, C + "network.py:10-11 (alpha = 10)"),
        ("cdan_hidden", 1024, C + "network.py:365-375; train_image.py:115, 118"),
        ("random_dim", 1024, C + "train_image.py:113-115 (random_dim 1024)"),
        ("randomized", None, "paper sec. 3 (randomized when d_f x d_g > 4096; the code: the --random flag)"),
        (None, "g = softmax(logits), detached", C + "loss.py:22"),
        (None, "source label 1, target 0; BCE mean", C + "loss.py:30-31, 45"),
    )
    differences = (
        "The code's p runs over 10,000 iterations (calc_coeff's max_iter) of a 100,004-iteration run; here over the "
        "run's stage of alignment (the dataset's schedule), as DANN's.",
        "The code trains on its own schedule (SGD 1e-3, inv annealing, batch 36 + 36); here the dataset's base "
        "(MM-SADA's two stages, or TA3N's epochs), so CDAN compares with the other methods on one protocol; its "
        "classification keeps CDAN's weight 1 against the adversarial 1 (not MM-SADA's 0.2).",
        "On EPIC-100 the prediction conditioning the map is the verb's (the code has one task).",
    )

    @dataclass
    class Settings(MethodSettings):
        w_cdan: float = 0.0          # lambda of eq. 8 (the code's trade_off)
        beta_cdan: float = 1.0       # the reversal's scale (calc_coeff's high)
        cdan_hidden: int = positive(1024)  # the discriminator's hidden width
        randomized: Optional[bool] = None  # the randomized map; none: the paper's rule, d_f x C > 4096
        random_dim: int = positive(1024)  # d of the randomized map
        entropy_conditioning: bool = False  # CDAN+E (eq. 9)

    reversals = {"cdan": "beta_cdan"}

    def build(self, inputs):
        if not self.acts("cdan"):
            return
        cfg = self.cfg
        d_f, d_g = self.video_dim * len(self.streams), inputs.verbs
        self.random_map = cfg.randomized if cfg.randomized is not None else d_f * d_g > 4096
        if self.random_map:  # drawn once per run, never trained (buffers), as the code's random_matrix
            self.register_buffer("R_f", torch.randn(d_f, cfg.random_dim))
            self.register_buffer("R_g", torch.randn(d_g, cfg.random_dim))
        self.disc_cdan = parts.AdversarialNetwork(cfg.random_dim if self.random_map else d_f * d_g, cfg.cdan_hidden)

    def conditioned(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The discriminator's input T(f, g): the multilinear map, or the randomized one (network.py:33-36)."""
        if self.random_map:
            return (f @ self.R_f) * (g @ self.R_g) / math.sqrt(self.cfg.random_dim)
        return multilinear(f, g)

    def forward(self, x, ctx):
        out = super().forward(x, ctx)
        if hasattr(self, "disc_cdan"):
            f = torch.cat([out["video"][s] for s in self.streams], dim=-1)
            g = out["verb"].softmax(-1)
            out["disc_cdan"] = self.disc_cdan(self.conditioned(f, g.detach()), ctx.grl["cdan"], ctx.key, salt=96)
            if self.cfg.entropy_conditioning:  # H(g) with its gradient reversed (loss.py:33)
                out["cdan_entropy"] = parts.grad_reverse(losses.entropy(g, "none", probs=True, eps=1e-5),
                                                         ctx.grl["cdan"])
        return out

    @term("w_cdan")
    def cdan(self, out, ctx):
        """E of eq. 8: the discriminator's BCE (source 1, target 0); with entropy conditioning weighted by
        :func:`certainty_weights` (eq. 9)."""
        d = out["disc_cdan"]
        labels = (torch.arange(d.shape[0], device=d.device) < ctx.b_s).to(d.dtype)
        bce = F.binary_cross_entropy_with_logits(d, labels, reduction="none")
        if not self.cfg.entropy_conditioning:
            return bce.mean()
        w = certainty_weights(out["cdan_entropy"], ctx.b_s)
        return (w * bce).sum() / w.sum().detach()


class CDANE(CDAN):
    name = "cdan_e"
    title = "CDAN+E, Long et al., NeurIPS 2018 (entropy conditioning)"
    composition = "CDAN with each clip's loss weighted by 1 + exp(-H(prediction)), normalised per domain"
    facts = (*CDAN.facts, *facts(
        ("entropy_conditioning", True, C + "loss.py:32-43; train_image.py:179-182 (method CDAN+E)"),
    ))
