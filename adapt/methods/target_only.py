"""Supervised target: the upper bound of MM-SADA Table 1, trained on the target's own labels with the source-only
schedule (the target training split labelled; evaluation on the target test split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from adapt import losses
from adapt.method import Method, MethodSettings, facts, term


class TargetOnly(Method):
    name = "target_only"
    title = "supervised target, the upper bound (MM-SADA Table 1)"
    composition = "classification loss on the target's labels, the source-only schedule"
    facts = facts(
        ("w_cls", 0.0, "the source labels are not used"),
        ("w_cls_stage1", 0.0, "the source labels are not used"),
        ("w_target_cls", 0.2, "as source-only's stage 2 (MM-SADA-code src/models/model.py:102-105)"),
        ("w_target_cls_stage1", 1.0, "as source-only's stage 1"),
        ("w_target_cls", 1.0, "as source-only on EPIC-100 (one stage)", {"when": {"dataset": "epic100"}}),
        ("w_target_cls_stage1", None, "one stage", {"when": {"dataset": "epic100"}}),
    )
    uses_target_labels = True

    @dataclass
    class Settings(MethodSettings):
        w_target_cls: float = 0.0                  # the classification loss on the target's labels
        w_target_cls_stage1: Optional[float] = None  # in stage 1; none = w_target_cls

    @term("w_target_cls", stage1="w_target_cls_stage1")
    def target_cls(self, out, ctx):
        """Mean over tasks of the fused target logits' cross-entropy on the target's labels."""
        return losses.tasks_ce(out["verb"], out["noun"], slice(ctx.b_s, out["verb"].shape[0]), ctx.y_t, ctx.n_t)
