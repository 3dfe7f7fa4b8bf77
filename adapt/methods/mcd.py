"""MCD: Saito et al., "Maximum classifier discrepancy for unsupervised domain adaptation", CVPR 2018, as MM-SADA's
code runs it for its Table 1 (``domain_mode="MCD"``): one step, with a gradient reversal layer between the
(dropped-out) target features and both classifiers (i3d.py:470-471, model.py:181-184).  A second classifier per
stream (``AuxLogits``, i3d.py:472-481) is fused like the first (logits summed); its source CE is weighted like the
first's (model.py:615-638); the loss adds ``0.2 x (-mean |softmax(fused_1) - softmax(fused_2)|)`` on the target
(model.py:571-590, 642), so the classifiers maximise the discrepancy and, through the reversal, the features
minimise it.  Saito's own three-step update (A: both classifiers on the source; B: classifiers maximise the
discrepancy; C: the generator minimises it, 4 times) is ``mcd_form=three_step`` (``form=paper``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from adapt import losses, parts
from adapt.config import one_of, positive
from adapt.method import Method, MethodSettings, Phase, facts, term
from adapt.model import Heads
from adapt.step import weighted_sum

MM = "MM-SADA-code "


class MCD(Method):
    name = "mcd"
    title = "MCD, Saito et al., CVPR 2018 (MM-SADA Table 1)"
    citation = "K. Saito et al. Maximum Classifier Discrepancy for Unsupervised Domain Adaptation. CVPR 2018."
    composition = ("two classifiers per modality; the fused discrepancy on the target through a GRL (weight 0.2); "
                   "Saito's three-step update as a setting")
    facts = facts(
        ("mcd_form", "grl", MM + "src/models/i3d.py:470-471; src/models/model.py:181-184"),
        ("w_mcd", 0.2, MM + "src/models/model.py:642 (0.2 * classifier_discrepancy)"),
        ("beta_mcd", 1.0, MM + "src/train/train.py:346 (lambda_in default; no MCD script sets it)"),
        (None, "discrepancy of the fused softmaxes", MM + "src/models/model.py:583-590"),
        ("mcd_form", "three_step", "Saito et al. sec. 3.2 (steps A, B, C)", {"form": "paper"}),
        ("w_mcd", 1.0, "Saito et al. eq. 5", {"form": "paper"}),
        ("mcd_generator_steps", 4, "Saito et al. sec. 4 (n = 4)", {"form": "paper"}),
        ("w_cls", 1.0, "Saito et al. eq. 2", {"form": "paper"}),
    )
    differences = ("No submit script exists for MCD in the released code; its composition is the code's "
                   "domain_mode='MCD' path on the MM-SADA two-stage schedule.",)

    @dataclass
    class Settings(MethodSettings):
        w_mcd: float = 0.0
        beta_mcd: float = 1.0        # the reversal's scale in the GRL form (MM-SADA's lambda_in default)
        mcd_form: str = one_of("grl", "three_step")  # MM-SADA code: one step with a reversal | Saito et al.
        mcd_generator_steps: int = positive(4)  # step C's repetitions (Saito et al. n = 4)

    reversals = {"mcd": "beta_mcd"}

    def build(self, inputs):
        if self.acts("mcd"):
            self.classifier2 = nn.ModuleDict({s: Heads(self.video_dim, inputs.verbs, inputs.nouns)
                                              for s in self.streams})

    def classify(self, stream, v, ctx, out):
        """Both classifiers on the same input; in the GRL form the target rows pass a reversal first."""
        if not hasattr(self, "classifier2"):
            return super().classify(stream, v, ctx, out)
        if self.cfg.mcd_form == "grl" and ctx.b_s:
            v = torch.cat([v[:ctx.b_s], parts.grad_reverse(v[ctx.b_s:], ctx.grl["mcd"])], dim=0)
        first = self.classifier[stream](v)
        out.setdefault("logits2", {})[stream] = self.classifier2[stream](v)
        return first

    def forward(self, x, ctx):
        out = super().forward(x, ctx)
        if "logits2" in out:
            second = out.pop("logits2")
            out["verb2"] = self.fused({s: lg[0] for s, lg in second.items()})
            if out["noun"] is not None:
                out["noun2"] = self.fused({s: lg[1] for s, lg in second.items()})
        return out

    def cls(self, out, ctx):
        """Both classifiers' source CE, summed (model.py:615-638)."""
        ce = super().cls(out, ctx)
        if "verb2" in out:
            ce = ce + losses.tasks_ce(out["verb2"], out.get("noun2"), slice(0, ctx.b_s), ctx.y_s, ctx.n_s)
        return ce

    @term("w_mcd")
    def mcd(self, out, ctx):
        """The discrepancy mean |p1 - p2| of the fused target softmaxes (Saito eq. 1).  In the GRL form it enters
        negated: the classifiers maximise it, the reversal makes the features minimise it (model.py:583-590, 642)."""
        d = losses.mcd_discrepancy(out["verb"][ctx.b_s:], out["verb2"][ctx.b_s:])
        return -d if self.cfg.mcd_form == "grl" else d

    def phases(self, stage):
        if self.cfg.mcd_form != "three_step" or stage != 2:
            return super().phases(stage)
        # A: everything on the source (no discrepancy); B: the classifiers maximise the discrepancy on the target
        # against their source CE; C: the generator minimises it, mcd_generator_steps times
        a = Phase("all", loss=lambda t, w: weighted_sum({k: v for k, v in t.items() if k != "mcd"}, w))
        b = Phase("classifiers", ("classifiers",), lambda t, w: w["cls"] * t["cls"] - w["mcd"] * t["mcd"])
        c = Phase("generator", ("generator",), lambda t, w: w["mcd"] * t["mcd"])
        return [a, b] + [c] * self.cfg.mcd_generator_steps

    def parameter_groups(self):
        if self.cfg.mcd_form != "three_step":
            return super().parameter_groups()
        groups = {"generator": [], "classifiers": []}
        for name, _ in self.named_parameters():
            groups["classifiers" if name.startswith(("classifier.", "classifier2.")) else "generator"].append(name)
        return groups
