"""CIA: Yang et al., "Interact before align: leveraging cross-modal knowledge for domain adaptive action
recognition", CVPR 2022 (supplementary material: ``shared/papers/cia-...supplementary.txt``).

Mutual complementarity (MC) and spatial consensus (SC) modules, built here as M3EM's SMR and CMC (same authors;
r = 16, k = 3), then video- and frame-level adversarial alignment: ``L = lambda_y L_y + lambda_vd L_vd +
lambda_fd L_fd`` with 1, 1 and 0.5 (supp. sec. 1).  I3D: Adam 1e-4, per-modality classifiers averaged (supp.
Table 3, "◇").  On TBN features CIA is built on TA3N (TRN aggregation, SGD 3e-3, supp. sec. 1).
"""

from dataclasses import dataclass

from adapt import parts
from adapt.method import facts, where
from adapt.methods.ta3n import TA3N

S = "CIA supplementary "
TBN = {"when": {"backbone": "tbn"}}
I3D = {"when": {"backbone": "i3d"}}


class CIA(TA3N):
    name = "cia"
    title = "CIA, Yang et al., CVPR 2022"
    citation = ("L. Yang et al. Interact before Align: Leveraging Cross-Modal Knowledge for Domain Adaptive Action "
                "Recognition. CVPR 2022.")
    composition = ("MC + SC + video-level (lambda_vd 1) and frame-level (lambda_fd 0.5) adversarial; I3D: Adam 1e-4; "
                   "TBN: TA3N + the modules, SGD 3e-3")
    facts = facts(
        ("spatial", True, S + "sec. 1 (1024x7x7 for RGB and flow)"),
        ("mc", True, S + "sec. 1 (MC, r = 16)"),
        ("sc", True, S + "sec. 1 (SC, k = 3)"),
        ("reduction", 16, S + "sec. 1"),
        ("sc_k", 3, S + "sec. 1"),
        ("w_cls", 1.0, S + "sec. 1 (lambda_y = 1)"),
        ("w_cls_stage1", None, "one stage"),
        ("stage1_steps", 0, "one stage (none is stated)"),
        ("w_video_adv", 1.0, S + "sec. 1 (lambda_vd = 1)"),
        ("w_frame_adv", 0.5, S + "sec. 1 (lambda_fd = 0.5)"),
        ("beta_video", 1.0, "standard GRL (not stated)", I3D),
        ("beta_frame", 1.0, "standard GRL (not stated)", I3D),
        ("fusion_mean", True, S + "Table 3 ('◇': per-modality classifier outputs averaged)", I3D),
        ("optimizer", "adam", S + "sec. 1 (E55 / E100 with I3D: Adam 1e-4)", I3D),
        ("lr", 1e-4, S + "sec. 1", I3D),
        *where(TA3N.facts, backbone="tbn"),  # TA3N's base and losses, on TBN only
        ("w_frame_adv", 0.5, S + "sec. 1 (lambda_fd = 0.5)", TBN),
        ("lr", 3e-3, S + "sec. 1 (SGD 3e-3 when TRN aggregates)", TBN),
    )
    differences = (
        "The supplement does not give MC's and SC's equations: they are M3EM's SMR and CMC.",
        "Frozen features: CIA trains I3D end to end on EPIC-55; here MC and SC act on stored 7x7 maps, and with one "
        "stored window per clip the frame-level discriminator sees the same clip feature as the video-level one.",
        "Batch, steps and GRL schedule are not stated: the dataset's (MM-SADA's 9K steps with I3D; TA3N's 30 "
        "epochs with TBN).",
    )

    @dataclass
    class Settings(TA3N.Settings, parts.InteractionSettings):
        """TA3N's settings and the interaction's: ``mc`` (MC), ``sc`` (SC), ``reduction`` (r), ``sc_k`` (k),
        ``sc_dim`` (the consensus projection's width, not stated); an ablation is ``--set sc=false``."""

    def build_inputs(self, inputs, channels):
        """MC (M3EM's SMR, eqs. 1-4: self and cross gates, r = 16, each modality's map doubled to 2c) on the
        stored maps, then SC (M3EM's CMC, eq. 5: the RGB-flow correlation over k + 1 = 4 scales weighting the
        spatial pooling), from :class:`adapt.parts.CrossModalInteraction`."""
        cfg = self.cfg
        self.interaction = parts.CrossModalInteraction(inputs.modalities, channels, self.spatial_mods, cfg.mc, cfg.sc,
                                                       cfg.reduction, cfg.sc_k, cfg.sc_dim)
        return self.interaction.out_channels

    def read_inputs(self, x, ctx, out):
        """The stored maps through MC and SC: (B, T, c, 7, 7) -> (B, T, 2c) per modality; the consensus map
        (B, T, 7, 7) is kept as ``out["consensus"]``."""
        feats, consensus = self.interaction(x)
        if consensus is not None:
            out["consensus"] = consensus
        return feats
