"""Supervised target: the upper bound of MM-SADA Table 1, trained on the target's own labels with the source-only
schedule (the target training split labelled; evaluation on the target test split)."""

from adapt.methods.base import Method, facts

METHOD = Method(
    name="target_only",
    title="supervised target, the upper bound (MM-SADA Table 1)",
    citation="",
    composition="classification loss on the target's labels, the source-only schedule",
    facts=facts(
        ("w_cls", 0.0, "the source labels are not used"),
        ("w_cls_stage1", 0.0, "the source labels are not used"),
        ("w_target_cls", 0.2, "as source-only's stage 2 (MM-SADA-code src/models/model.py:102-105)"),
        ("w_target_cls_stage1", 1.0, "as source-only's stage 1"),
        ("w_target_cls", 1.0, "as source-only on EPIC-100 (one stage)", {"when": {"dataset": "epic100"}}),
        ("w_target_cls_stage1", None, "one stage", {"when": {"dataset": "epic100"}}),
    ),
)
