"""Source-only: no adaptation, the "Source-only" rows of MM-SADA Table 1 and of the EPIC-100 UDA baseline.

On the MM-SADA splits it trains as the released code's ``scripts/submit_source_only.sh``: stage 1 ("Pretrain")
CE on source clips, stage 2 ("None") restored from it with the CE at 0.2 (model.py:102-105); on EPIC-100 as TA3N's
``script_test_sourceonly.sh``: the TA3N model and schedule with only ``0.5 (CE_verb + CE_noun)``.  The method is
the base class itself (:class:`adapt.method.Method`): the video model and the classification term.
"""

from adapt.method import Method, facts


class SourceOnly(Method):
    name = "source_only"
    title = "no adaptation (MM-SADA Table 1; the EPIC-100 baseline's source-only script)"
    composition = "the dataset's base model, classification loss only"
    facts = facts(
        (None, "no target clips in the batch", "MM-SADA-code src/train/train.py:35-40 (domain_mode Pretrain/None)"),
        (None, "TA3N model, use_target none", "EPIC-KITCHENS-100_UDA_TA3N script_test_sourceonly.sh:17, 87-103"),
    )
    differences = ("Target clips are still drawn each step (they change nothing: no head uses them).",)
