"""Kim et al., "Learning cross-modal contrastive features for video domain adaptation", ICCV 2021
(``shared/papers/cross-modal-contrastive_kim-etal_iccv2021.txt``; no code released; built on MM-SADA's code).

Loss (eq. 7): ``L = L_src + lambda (L_mo^s + L_mo^t + L_do^a + L_do^m)``, lambda = 1.25, all sums.
* L_src: CE of the two streams' averaged logits (sec. 4.1).
* L_mo^d (eqs. 1-3), one per domain: each clip's feature in one modality is an anchor, the other modality of the
  same clip its positive, the other modality of the domain's other clips (in the batch and in the memory bank)
  its negatives, all through one projection head h shared by domains and modalities; tau = 0.1.  Both directions
  (RGB -> flow, flow -> RGB) are averaged (the paper does not say).
* L_do^k (eqs. 4-6), one per modality, no projection head: anchors are the target clips whose pseudo-label
  (softmax of the averaged logits) exceeds 0.8, positives the source bank's clips of that class, negatives the
  others.
* Memory banks (eq. 8): one per domain and modality, ``M <- 0.5 M + 0.5 F``, written at the end of each step.
Training (sec. 4.1): batch 32 (16 source + 16 target), 6K iterations, SGD lr 0.01 divided by 10 at 3K; RGB and flow
windows drawn independently (sec. 3.2, Table 5); the reported figure averages the last 9 evaluations (MM-SADA's
protocol).
"""

from adapt.methods.base import Method, facts
from adapt.methods.mmsada import EPIC55_BASE

P = "Kim et al. "

METHOD = Method(
    name="contrastive",
    title="Kim et al., ICCV 2021: cross-modal and cross-domain contrastive learning",
    citation="D. Kim et al. Learning Cross-modal Contrastive Features for Video Domain Adaptation. ICCV 2021.",
    base=EPIC55_BASE,
    composition="CE(averaged logits) + 1.25 (L_mo^s + L_mo^t + L_do^rgb + L_do^flow), memory banks (momentum 0.5), "
                "target-anchored L_do on pseudo-labels > 0.8, tau 0.1",
    facts=facts(
        ("w_xmodal", 1.25, P + "eq. 7, sec. 4.1 (lambda = 1.25 on each term; L_mo^s + L_mo^t summed)"),
        ("w_xdomain", 1.25, P + "eq. 7 (L_do = L_do^a + L_do^m)"),
        ("tau", 0.1, P + "sec. 4.1"),
        ("bank_momentum", 0.5, P + "eq. 8, sec. 4.1 (delta = 0.5)"),
        ("xmodal_bank", True, P + "sec. 3.4 ('features from the memory banks for positive and negative')"),
        ("pl_threshold", 0.8, P + "sec. 3.3 (T = 0.8)"),
        ("fusion_mean", True, P + "sec. 4.1 ('the logits from each stream are averaged')"),
        ("w_cls", 1.0, P + "eq. 7 (L_src)"),
        ("w_cls_stage1", None, P + "sec. 4.1 (one stage of 6K iterations)"),
        ("stage1_steps", 0, P + "sec. 4.1"),
        ("steps", 6000, P + "sec. 4.1 (6K iterations)"),
        ("batch_source", 16, P + "sec. 4.1 (batch 32; split equally as in MM-SADA's code, not stated)"),
        ("batch_target", 16, P + "sec. 4.1"),
        ("lr", 0.01, P + "sec. 4.1"),
        ("lr_steps", [3000], P + "sec. 4.1 (divided by 10 every 3K)"),
        ("lr_decay", 0.1, P + "sec. 4.1"),
        ("sync_windows", False, P + "sec. 3.2, Table 5 (RGB and flow windows sampled independently)"),
        (None, "last 9 evaluations averaged", P + "sec. 4.1 ('following [36]')"),
    ),
    differences=(
        "Frozen features: the contrastive losses act on the trainable embedding's output (the paper's F is I3D's, "
        "trained end to end).",
        "Unstated in the paper and chosen here: per-anchor InfoNCE reductions of eqs. 2 and 5, L2-normalised "
        "features, the bank storing F (projected through h when L_mo reads it, without gradient), zero-initialised "
        "banks whose unwritten slots are ignored, a 16 + 16 batch.",
    ),
)
