"""Pseudo-labelling: self-training on the target clips whose prediction is confident, the "Pseudo-labeling" row of
Kim et al. Table 4 (its threshold and weight are not stated; 0.8 is the threshold of Kim et al.'s own
pseudo-labels, sec. 3.3)."""

from __future__ import annotations

from dataclasses import dataclass

from adapt import losses
from adapt.config import probability
from adapt.method import Method, MethodSettings, facts, term


class PseudoLabel(Method):
    name = "pseudo_label"
    title = "self-training on confident target pseudo-labels (Kim et al. Table 4)"
    composition = "CE on target predictions above 0.8"
    facts = facts(
        ("w_pseudo", 1.0, "not stated (Kim et al. Table 4)"),
        ("pl_threshold", 0.8, "Kim et al. sec. 3.3"),
    )

    @dataclass
    class Settings(MethodSettings):
        w_pseudo: float = 0.0
        pl_threshold: float = probability(0.8)  # a target clip trains when its top softmax score exceeds it

    @term("w_pseudo")
    def pseudo(self, out, ctx):
        """CE on the target clips' own confident predictions (losses.pseudo_label_ce)."""
        return losses.pseudo_label_ce(out["verb"][ctx.b_s:], self.cfg.pl_threshold)
