"""AdaBN (Li et al., Pattern Recognition 2018), the "AdaBN" row of MM-SADA Table 1: normalisation statistics
re-estimated on the target domain.

MM-SADA's code (``scripts/submit_BN.sh``, domain_mode "BN") adds no loss: its GPU towers hold one domain each, so
I3D's BatchNorm layers see per-domain batch statistics in training (model.py:160-181).  Frozen features have no
BatchNorm, so here each domain's inputs are standardised per channel with that domain's own store statistics, and
evaluation uses the target's: AdaBN applied to the head's input.
"""

from adapt.method import Method, facts


class AdaBN(Method):
    name = "adabn"
    title = "AdaBN, Li et al. 2018 (MM-SADA Table 1)"
    citation = "Y. Li et al. Adaptive Batch Normalization for practical domain adaptation. Pattern Recognition 2018."
    composition = "per-domain input statistics (each domain's own store), evaluation with the target's"
    facts = facts(
        (None, "per-domain statistics", "AdaBN sec. 3; MM-SADA paper sec. 4.2 ('BN layers updated with target "
                                        "statistics')"),
        (None, "stage 2: 0.2 CE, target clips in the batch", "MM-SADA-code scripts/submit_BN.sh:24"),
    )
    differences = ("Statistics of the head's input per domain, not of the frozen backbone's BatchNorm layers.",)
    per_domain_statistics = True
