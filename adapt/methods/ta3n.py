"""TA3N: Chen et al., "Temporal attentive alignment for large-scale video domain adaptation", ICCV 2019, as the
EPIC-KITCHENS-100 UDA baseline runs it (``jonmun/EPIC-KITCHENS-100_UDA_TA3N``: script_test_ta3n.sh, main.py,
models.py, opts.py, dataset.py; TRNmodule.py and loss.py from ``cmhungsteve/TA3N``).

Model (modality ALL): RGB, flow and audio features of 5 fixed segments (2, 7, 12, 17, 22 of 25) concatenated to
3072, one shared FC 3072 -> 512 + ReLU + dropout 0.5; TRN-multiscale with at most 3 relations per scale, summed
(256 per scale); one relation discriminator per scale, whose entropy weights its scale by ``2 - H(d)`` (domain
attention); the scales summed to the 256-d video feature; dropout 0.5; one verb and one noun classifier; a
frame-level discriminator on the shared features and a video-level one on the dropped-out video feature.

Loss (main.py:488-639): ``0.5 (CE_verb + CE_noun) + L_relation + L_video + L_frame + 0.003 x 0.5 (AE_verb + AE_noun)``
where each domain loss is a cross-entropy averaged over all its rows and enters with weight 1; ``--beta 0.75 0.75
0.5`` (ordered relation, video, frame) scales the reversed gradients, warmed up by ``2 / (1 + exp(-p)) - 1``
(gamma 1) with p from 1/30 to 31/30 over the run.  The attentive entropy is ``mean (1 + H(d_video)) H(y)`` over
source and target clips.  SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 3e-3 divided by 10 at the start of
epochs 10 and 20 of 30, the gradient's global norm clipped at 20; 128 source clips a step and 207 target clips
(128 x 26115 / 16115); the last epoch's model is the one tested (script_test_ta3n.sh:147).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from adapt import losses, parts
from adapt.datasets import EPIC100_BASE
from adapt.method import facts, term
from adapt.methods.dann import DANN

TA = "EPIC-KITCHENS-100_UDA_TA3N "


class TA3N(DANN):
    """DANN at three levels (frame, relation, video) with domain attention and the attentive entropy."""

    name = "ta3n"
    title = "TA3N, Chen et al., ICCV 2019 (the EPIC-100 UDA baseline's code)"
    citation = "M.-H. Chen et al. Temporal Attentive Alignment for Large-Scale Video Domain Adaptation. ICCV 2019."
    composition = ("RGB+flow+audio concatenated, shared FC 3072->512, TRN (<=3 relations per scale, summed), "
                   "relation/video/frame discriminators (GRL 0.75/0.75/0.5, loss weight 1), domain attention, "
                   "attentive entropy 0.003")
    facts = facts(
        *EPIC100_BASE,  # its code's base, on every dataset
        ("w_relation_adv", 1.0, TA + "main.py:591, 594 (loss_adversarial summed over levels)"),
        ("w_video_adv", 1.0, TA + "main.py:591, 594"),
        ("w_frame_adv", 1.0, TA + "main.py:591, 594"),
        ("beta_relation", 0.75, TA + "script_test_ta3n.sh:63 (beta_0); opts.py:62 ([relation, video, frame])"),
        ("beta_video", 0.75, TA + "script_test_ta3n.sh:64 (beta_1)"),
        ("beta_frame", 0.5, TA + "script_test_ta3n.sh:65 (beta_2)"),
        ("domain_attention", True, TA + "script_test_ta3n.sh:67 (TransAttn); models.py:373-379, 401-410"),
        ("w_attn_entropy", 0.003, TA + "script_test_ta3n.sh:73 (gamma); main.py:625-639"),
        (None, "AE uses the video-level domain logits", TA + "main.py:631-634 (pred_domain_all[1])"),
        (None, "domain CE: mean over all rows, S then T", TA + "main.py:577-589"),
    )
    differences = (
        "The code pads the last, short source batch of an epoch (115 of 128) and drops a 127th target batch, and "
        "shuffles each loader anew every epoch (on a subset whose target runs out first, the source clips an "
        "epoch did not reach are skipped); here every step has full batches drawn without replacement in one "
        "running order per domain.  Its reversal warm-up counts p by the source loader's length within an epoch; "
        "here by the steps (the same at every epoch's boundary).",
        "Model selection: the code tests the last epoch's model; the reported figure here is the last evaluation.",
    )

    @dataclass
    class Settings(DANN.Settings):
        w_frame_adv: float = 0.0     # lambda of the frame-level discriminators (one per stream, every frame)
        beta_frame: float = 0.5       # its reversal scale (script_test_ta3n.sh:65)
        w_relation_adv: float = 0.0  # lambda of the relation-level discriminators (one per TRN scale)
        beta_relation: float = 0.75   # its reversal scale (script_test_ta3n.sh:63)
        domain_attention: bool = False  # relation features weighted by 2 - H(d) (models.py:373-379, 401-410)
        w_attn_entropy: float = 0.0  # gamma of the attentive entropy (eq. 7; loss.py:15-25)

    reversals = {"frame": "beta_frame", "relation": "beta_relation"}  # with DANN's adv and video

    def build(self, inputs):
        super().build(inputs)
        cfg, S = self.cfg, self.streams
        if self.acts("attn_entropy") and not hasattr(self, "disc_video"):  # the attentive entropy reads its output
            self.disc_video = parts.DomainDiscriminator(self.video_dim * len(S), cfg.disc_hidden)
        if self.acts("frame_adv"):
            self.disc_frame = nn.ModuleDict({s: parts.DomainDiscriminator(self.frame_dim, cfg.disc_hidden)
                                             for s in S})
        if self.use_trn and (self.acts("relation_adv") or cfg.domain_attention):
            self.disc_relation = nn.ModuleDict({s: nn.ModuleList(
                [parts.DomainDiscriminator(cfg.trn_dim, cfg.disc_hidden) for _ in range(self.units - 1)]) for s in S})
            for d in self.disc_relation.modules():
                d.default_init = True  # TA3N initialises them with PyTorch's defaults (models.py:280-300)

    def relations(self, rel, stream, ctx, out):
        """Each scale's relation feature through its discriminator; with domain attention, weighted by
        ``(1 - H(d)) + 1`` (models.py:401-410; the weights are not detached)."""
        if not hasattr(self, "disc_relation"):
            return rel
        d = torch.stack([disc(rel[:, j], ctx.grl["relation"]) for j, disc in enumerate(self.disc_relation[stream])],
                        dim=1)
        out.setdefault("disc_relation", {})[stream] = d  # (B, scales, 2)
        return parts.DomainAttention()(rel, d) if self.cfg.domain_attention else rel

    def forward(self, x, ctx):
        out = super().forward(x, ctx)
        if hasattr(self, "disc_frame"):
            out["disc_frame"] = {s: self.disc_frame[s](out["frame"][s], ctx.grl["frame"]) for s in self.streams}
        return out

    @term("w_frame_adv")
    def frame_adv(self, out, ctx):
        """sum over streams of the frame discriminators' cross-entropy over every frame (main.py:577-589)."""
        return sum(losses.domain_ce(d, ctx.b_s) for d in out["disc_frame"].values())

    @term("w_relation_adv")
    def relation_adv(self, out, ctx):
        """sum over streams of the relation discriminators' cross-entropy over every scale (0 without TRN)."""
        if "disc_relation" not in out:
            return out["verb"].new_zeros(())
        return sum(losses.domain_ce(d, ctx.b_s) for d in out["disc_relation"].values())

    @term("w_attn_entropy")
    def attn_entropy(self, out, ctx):
        """loss.py:15-25: mean over tasks of mean (1 + H(d_video)) H(y), over source and target clips."""
        ae = [parts.attentive_entropy(out["verb"], out["disc_video"])]
        if out["noun"] is not None:
            ae.append(parts.attentive_entropy(out["noun"], out["disc_video"]))
        return sum(ae) / len(ae)
