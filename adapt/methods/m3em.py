"""M3EM: Yang et al., "Multi-modal mutual enhancement for video domain adaptation", EPIC-KITCHENS-100 UDA challenge
2021 technical report (``shared/papers/m3em_yang-etal_epic100-uda-2021-report.txt``).

Semantic mutual refinement (SMR, eqs. 1-4: self- and cross-modal squeeze-and-excitation gates, r = 16, the two gated
maps concatenated to 2c) and cross-modality consensus (CMC, eq. 5: RGB-flow correlation over k + 1 scales weighting
the spatial pooling); the RGB and flow features are classified together, audio separately and late-fused with
weight 0.5 (sec. 2.3); ``L = lambda_y L_y + lambda_d L_d`` (eq. 6), lambda_d = 3 with I3D, 1 otherwise.  Every model
of the report is "TA3N + M3EM" trained 30 epochs (secs. 3.2, 3.4: the I3D one too): here the module feeds TA3N's
model and losses on either backbone, one TA3N branch on RGB + flow and one on audio.
"""

from dataclasses import dataclass

from adapt import parts
from adapt.method import facts, where
from adapt.methods.ta3n import TA3N

R = "M3EM report "
I3D = {"when": {"backbone": "i3d"}}


class M3EM(TA3N):
    name = "m3em"
    title = "M3EM, Yang et al., EPIC-100 UDA 2021 report"
    citation = ("L. Yang et al. Multi-Modal Mutual Enhancement for Video Domain Adaptation. EPIC-KITCHENS-100 UDA "
                "challenge technical report, 2021.")
    composition = ("TA3N + SMR + CMC (every backbone, 30 epochs); RGB+flow classified together, audio late-fused "
                   "at 0.5; lambda_d 3 on TA3N's domain losses with I3D, 1 otherwise")
    facts = facts(
        *where(TA3N.facts),  # TA3N's base and losses, on every dataset (sec. 3.2, 3.4)
        ("spatial", True, R + "sec. 2 (7x7 maps)"),
        ("mc", True, R + "sec. 2.1, eqs. 1-4 (SMR)"),
        ("sc", True, R + "sec. 2.2, eq. 5 (CMC)"),
        ("reduction", 16, R + "sec. 2.1 (r = 16)"),
        ("sc_k", 3, "CIA supplementary sec. 1 (k = 3)"),
        ("fusion", "rgb+flow,audio", R + "sec. 2.3 (s1 = classifier(concat(f_rR, f_rF)), s2 = classifier(f_rA))"),
        ("audio_weight", 0.5, R + "sec. 2.3 (weights 1 and 0.5)"),
        ("w_cls", 1.0, R + "sec. 3.2 (lambda_y = 1)"),
        ("epochs", 30, R + "sec. 3.2 ('we train the model 30 epochs', every experiment)"),
        ("w_video_adv", 3.0, R + "sec. 3.2 (lambda_d = 3 with I3D; Model D is TA3N + M3EM, sec. 3.4)", I3D),
        ("w_frame_adv", 3.0, R + "sec. 3.2 (lambda_d weighs TA3N's domain loss: each of its levels)", I3D),
        ("w_relation_adv", 3.0, R + "sec. 3.2 (no relations with one I3D window a clip)", I3D),
        (None, "CMC's pooling weight 1 + C / (k + 1)", R + "eq. 5 and text (the residual form of [11]; the scale of C "
                                                           "is not stated: its mean over the k + 1 scales)"),
        (None, "one TA3N domain branch per stream", R + "sec. 2.3 (streams rgb+flow and audio each get TA3N's "
                                                        "discriminators; the report does not say)"),
    )
    differences = (
        "Where M3EM sits in TA3N and how lambda_d maps onto TA3N's three domain losses is not stated: here the "
        "module refines the per-segment features before TA3N's shared FC, lambda_d multiplies each of TA3N's domain "
        "losses (1 for TBN, 3 for I3D) and the RGB + flow and audio streams each get TA3N's model.",
        "Frozen features: SMR and CMC act on stored 7x7 maps; the public EPIC-100 features are pooled, so these "
        "runs need TBN maps extracted with `adapt extract --backbone tbn`.",
        "With I3D the model has one window a clip, so TA3N's relation level has nothing to align (the TRN needs "
        "segments) and its frame level sees the clip's window: lambda_d = 3 weighs the video and frame levels.",
    )

    @dataclass
    class Settings(TA3N.Settings, parts.InteractionSettings):
        """TA3N's settings and the module's: ``mc`` (SMR), ``sc`` (CMC), ``reduction`` (r), ``sc_k`` (k),
        ``sc_dim`` (the consensus projection's width, not stated)."""

    def build_inputs(self, inputs, channels):
        """SMR (sec. 2.1, eqs. 1-4: a self gate and a cross gate per modality, bottleneck c / r, the two gated maps
        concatenated to 2c) and CMC (sec. 2.2, eq. 5: the RGB-flow correlation over k + 1 scales, each upsampled
        and summed, weighting the spatial average), from :class:`adapt.parts.CrossModalInteraction`."""
        cfg = self.cfg
        self.interaction = parts.CrossModalInteraction(inputs.modalities, channels, self.spatial_mods, cfg.mc, cfg.sc,
                                                       cfg.reduction, cfg.sc_k, cfg.sc_dim)
        return self.interaction.out_channels

    def read_inputs(self, x, ctx, out):
        """The segments' maps through SMR and CMC: (B, T, c, 7, 7) -> (B, T, 2c) per modality, then TA3N's model
        on them (its shared FC, TRN, discriminators); the consensus map is kept as ``out["consensus"]``."""
        feats, consensus = self.interaction(x)
        if consensus is not None:
            out["consensus"] = consensus
        return feats
