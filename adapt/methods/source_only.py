"""Source-only: no adaptation, the "Source-only" rows of MM-SADA Table 1 and of the EPIC-100 UDA baseline.

On the MM-SADA splits it trains as the released code's ``scripts/submit_source_only.sh``: stage 1 ("Pretrain")
CE on source clips, stage 2 ("None") restored from it with the CE at 0.2 (model.py:102-105); on EPIC-100 as TA3N's
``script_test_sourceonly.sh``: the TA3N model and schedule with only ``0.5 (CE_verb + CE_noun)``.  The method is
the base class itself (:class:`adapt.method.Method`): the video model and the classification term.
"""

from adapt.method import Method, facts

EPIC55 = {"when": {"dataset": ("mmsada", "custom", "demo")}}  # MM-SADA's code (D1/D2/D3 and the demo kitchens)


class SourceOnly(Method):
    name = "source_only"
    title = "no adaptation (MM-SADA Table 1; the EPIC-100 baseline's source-only script)"
    composition = "the dataset's base model, classification loss only"
    facts = facts(
        ("batch_source", 128, "MM-SADA-code src/train/train.py:35-40; training_loops.py:260-262 (domain_mode "
                              "Pretrain / None: every tower takes source clips, 128 a step)", EPIC55),
        ("batch_target", 0, "MM-SADA-code src/train/training_loops.py:260-262 (no target clip)", EPIC55),
        (None, "TA3N model, use_target none; target clips forwarded, unused", "EPIC-KITCHENS-100_UDA_TA3N "
                                                                            "script_test_sourceonly.sh:17, 87-103; "
                                                                            "main.py:329, 446"),
    )
    differences = ("On EPIC-100 the target clips are drawn and forwarded as TA3N's code does (its epoch is the "
                   "shorter loader's), and change nothing.",)
