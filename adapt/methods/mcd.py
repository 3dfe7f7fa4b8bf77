"""MCD: Saito et al., "Maximum classifier discrepancy for unsupervised domain adaptation", CVPR 2018, as MM-SADA's
code runs it for its Table 1 (``domain_mode="MCD"``): one step, with a gradient reversal layer between the
(dropped-out) target features and both classifiers (i3d.py:470-471, model.py:181-184).  A second classifier per
modality (``AuxLogits``, i3d.py:472-481) is fused like the first (logits summed); its source CE is weighted like the
first's (model.py:615-638); the loss adds ``0.2 x (-mean |softmax(fused_1) - softmax(fused_2)|)`` on the target
(model.py:571-590, 642), so the classifiers maximise the discrepancy and, through the reversal, the features
minimise it.  Saito's own three-step update (A: both classifiers on the source; B: classifiers maximise the
discrepancy; C: the generator minimises it, 4 times) is ``mcd_form=three_step`` (``form=paper``).
"""

from adapt.methods.base import Method, facts

MM = "MM-SADA-code "

METHOD = Method(
    name="mcd",
    title="MCD, Saito et al., CVPR 2018 (MM-SADA Table 1)",
    citation="K. Saito et al. Maximum Classifier Discrepancy for Unsupervised Domain Adaptation. CVPR 2018.",
    composition="two classifiers per modality; the fused discrepancy on the target through a GRL (weight 0.2); "
                "Saito's three-step update as a setting",
    facts=facts(
        ("mcd_form", "grl", MM + "src/models/i3d.py:470-471; src/models/model.py:181-184"),
        ("w_mcd", 0.2, MM + "src/models/model.py:642 (0.2 * classifier_discrepancy)"),
        ("beta_mcd", 1.0, MM + "src/train/train.py:346 (lambda_in default; no MCD script sets it)"),
        (None, "discrepancy of the fused softmaxes", MM + "src/models/model.py:583-590"),
        ("mcd_form", "three_step", "Saito et al. sec. 3.2 (steps A, B, C)", {"form": "paper"}),
        ("w_mcd", 1.0, "Saito et al. eq. 5", {"form": "paper"}),
        ("mcd_generator_steps", 4, "Saito et al. sec. 4 (n = 4)", {"form": "paper"}),
        ("w_cls", 1.0, "Saito et al. eq. 2", {"form": "paper"}),
    ),
    differences=("No submit script exists for MCD in the released code; its composition is the code's "
                 "domain_mode='MCD' path on the MM-SADA two-stage schedule.",),
)
