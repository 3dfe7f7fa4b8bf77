"""Pseudo-labelling: self-training on the target clips whose prediction is confident, the "Pseudo-labeling" row of
Kim et al. Table 4 (its threshold and weight are not stated; 0.8 is the threshold of Kim et al.'s own
pseudo-labels, sec. 3.3)."""

from adapt.methods.base import Method, facts

METHOD = Method(
    name="pseudo_label",
    title="self-training on confident target pseudo-labels (Kim et al. Table 4)",
    citation="",
    composition="CE on target predictions above 0.8",
    facts=facts(
        ("w_pseudo", 1.0, "not stated (Kim et al. Table 4)"),
        ("pl_threshold", 0.8, "Kim et al. sec. 3.3"),
    ),
)
