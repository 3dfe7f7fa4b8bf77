"""The adaptation model: per-modality streams composed from :mod:`adapt.parts`, switched by a TrainConfig.

For each clip the heads see ``T`` temporal units (one I3D window, or 5 TBN segments) per modality::

    x[m] (B, T, C[, H, W])
      -> MC / SMR gating across modalities (M3EM eqs. 1-4)         if cfg.mc       (C -> 2C)
      -> CC / CMC spatial consensus pooling (M3EM eq. 5)            if cfg.sc       else spatial mean
      -> Embedding: FC + ReLU + dropout (TA3N's shared layer)       -> frame features f[m] (B, T, D)
      -> temporal aggregation: mean, or TRN-multiscale (TA3N)       -> video features v[m] (B, D)
      -> classifier per modality; logits fused by a weighted sum (MM-SADA eq. 1; audio weight 0.5, M3EM)

Heads for the objectives hang off f and v: per-modality discriminators (MM-SADA eq. 2), a video-level
discriminator on concat(v) (DANN / CIA lambda_vd), frame-level discriminators on f (CIA lambda_fd, TA3N),
relation discriminators on the TRN scales (TA3N), the correspondence head (MM-SADA eq. 3), a shared projection
head (Kim et al. eq. 1), and MCD's second classifier.  Every part is functional (no running statistics, random
numbers from ``adapt.rng`` keys), so K runs can be stacked with ``torch.func`` and trained as one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adapt import parts, rng


class Heads(nn.Module):
    """Per-modality classifier(s): verb only, or verb + noun for EPIC-100."""

    def __init__(self, dim: int, verbs: int, nouns: int):
        super().__init__()
        self.verb = nn.Linear(dim, verbs)
        self.noun = nn.Linear(dim, nouns) if nouns else None

    def forward(self, v):
        return self.verb(v), (self.noun(v) if self.noun is not None else None)


class AdaptModel(nn.Module):
    def __init__(self, cfg, modalities: list[str], shapes: dict, verbs: int, nouns: int, units: int):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(modalities)
        self.spatial_mods = [m for m in modalities if len(shapes[m]) == 3 and cfg.spatial]
        channels = {m: shapes[m][0] for m in modalities}
        self.units = units
        D = cfg.embed_dim
        in_dim = dict(channels)
        if cfg.mc:
            self.mc = parts.MutualRefinement(self.modalities, [channels[m] for m in self.modalities],
                                             cfg.reduction, spatial=self.spatial_mods)
            if len(self.modalities) > 1:
                in_dim = {m: 2 * c for m, c in channels.items()}
        if cfg.sc:
            pair = [m for m in ("rgb", "flow") if m in self.spatial_mods]
            if len(pair) != 2:
                raise ValueError("spatial consensus needs rgb and flow spatial maps")
            if in_dim["rgb"] != in_dim["flow"]:
                raise ValueError("spatial consensus needs rgb and flow of the same width")
            self.sc = parts.SpatialConsensus(in_dim["rgb"], cfg.sc_dim, cfg.sc_k, modalities=self.modalities,
                                             consensus=("rgb", "flow"), spatial=self.spatial_mods)
        self.embed = nn.ModuleDict({m: parts.Embedding(in_dim[m], D, cfg.dropout) for m in modalities})
        if cfg.temporal == "trn" and units > 1:
            self.trn = nn.ModuleDict({m: parts.TRNMultiScale(D, units, D, 256) for m in modalities})
        self.classifier = nn.ModuleDict({m: Heads(D, verbs, nouns) for m in modalities})
        if cfg.mcd:
            self.classifier2 = nn.ModuleDict({m: Heads(D, verbs, nouns) for m in modalities})
        if cfg.w_adv:
            self.disc = nn.ModuleDict({m: parts.DomainDiscriminator(D, cfg.disc_hidden) for m in modalities})
        if cfg.w_video_adv or cfg.w_attn_entropy:
            self.disc_video = parts.DomainDiscriminator(D * len(modalities), cfg.disc_hidden)
        if cfg.w_frame_adv or (cfg.domain_attention and units > 1):
            self.disc_frame = nn.ModuleDict({m: parts.DomainDiscriminator(D, cfg.disc_hidden) for m in modalities})
        if cfg.w_relation_adv and hasattr(self, "trn"):
            self.disc_relation = nn.ModuleDict({m: nn.ModuleList(
                [parts.DomainDiscriminator(D, cfg.disc_hidden) for _ in range(units - 1)]) for m in modalities})
        if cfg.w_corr and "rgb" in modalities and "flow" in modalities:
            self.corr = parts.CorrespondenceHead(2 * D, cfg.disc_hidden)
        if cfg.w_xmodal:
            self.proj = parts.ProjectionHead(D, 128)
        self.audio_weight = cfg.audio_weight

    def fusion_weight(self, m: str) -> float:
        return self.audio_weight if m == "audio" else 1.0

    def forward(self, x: dict, key: torch.Tensor, coeff: torch.Tensor, b_s: int = 0) -> dict:
        """x[m]: (B, T, C[, H, W]) with the first ``b_s`` rows from the source domain; key: rng key of this step;
        coeff: GRL coefficient -> dict of outputs."""
        x = dict(x)
        flow_other = x.pop("flow_other", None)  # MM-SADA's synchronised negatives: flow of another window
        out: dict = {}
        frame, consensus = self._frame_features(x, key)
        if consensus is not None:
            out["consensus"] = consensus
        video = {}
        for m in self.modalities:
            if hasattr(self, "trn"):
                v, s = self.trn[m](frame[m], return_scales=True)
                if hasattr(self, "disc_relation"):
                    rel = torch.stack([d(s[:, j], coeff) for j, d in enumerate(self.disc_relation[m])], dim=1)
                    out.setdefault("disc_relation", {})[m] = rel  # (B, T-1, 2)
                    if self.cfg.domain_attention:  # TA3N: attend to the scales whose domain is uncertain
                        v = parts.DomainAttention()(s, rel).sum(dim=1)
                video[m] = v
            elif self.cfg.domain_attention and hasattr(self, "disc_frame") and frame[m].shape[1] > 1:
                video[m] = parts.DomainAttention()(frame[m], self.disc_frame[m](frame[m], coeff)).mean(dim=1)
            else:
                video[m] = parts.time_mean(frame[m])
        out["frame"], out["video"] = frame, video
        out["verb_m"], out["noun_m"] = {}, {}
        for m in self.modalities:
            out["verb_m"][m], out["noun_m"][m] = self.classifier[m](video[m])
        out["verb"] = sum(self.fusion_weight(m) * out["verb_m"][m] for m in self.modalities)
        out["noun"] = (sum(self.fusion_weight(m) * out["noun_m"][m] for m in self.modalities)
                       if out["noun_m"][self.modalities[0]] is not None else None)
        if hasattr(self, "classifier2"):
            heads = [self.classifier2[m](video[m]) for m in self.modalities]
            out["verb2"] = sum(self.fusion_weight(m) * h[0] for m, h in zip(self.modalities, heads))
        if hasattr(self, "disc"):
            out["disc"] = {m: self.disc[m](video[m], coeff) for m in self.modalities}
        if hasattr(self, "disc_video"):
            out["disc_video"] = self.disc_video(torch.cat([video[m] for m in self.modalities], dim=-1), coeff)
        if hasattr(self, "disc_frame"):
            out["disc_frame"] = {m: self.disc_frame[m](frame[m], coeff) for m in self.modalities}
        if hasattr(self, "corr") and b_s:
            if flow_other is not None:
                other, _ = self._frame_features({**x, "flow": flow_other}, rng.fold(key, 1_000_003))
                other = other["flow"]
                other = self.trn["flow"](other) if hasattr(self, "trn") else parts.time_mean(other)
            logits, targets = [], []
            for sl in (slice(0, b_s), slice(b_s, None)):  # negatives within each domain (MM-SADA eq. 3)
                if flow_other is not None:
                    rgb, flow, t = parts.sync_correspondence_pairs(video["rgb"][sl], video["flow"][sl], other[sl])
                else:
                    rgb, flow, t = parts.correspondence_pairs(video["rgb"][sl], video["flow"][sl])
                logits.append(self.corr(rgb, flow))
                targets.append(t)
            out["corr"] = (torch.cat(logits), torch.cat(targets))
        if hasattr(self, "proj"):
            out["proj"] = {m: self.proj(video[m]) for m in self.modalities}
        return out

    def _frame_features(self, x: dict, key: torch.Tensor):
        """MC gating, SC pooling (or the spatial mean) and the embedding: frame features (B, T, D) per modality."""
        feats, consensus = dict(x), None
        if hasattr(self, "mc"):
            feats = self.mc(feats)
        if hasattr(self, "sc"):
            feats, consensus = self.sc(feats)
        else:
            feats = {m: f.mean(dim=(-2, -1)) if m in self.spatial_mods else f for m, f in feats.items()}
        frame = {m: self.embed[m](feats[m], key, salt=i) for i, m in enumerate(self.modalities)}
        return frame, consensus

    def param_groups(self) -> tuple[list[str], list[str]]:
        """(generator parameter names, classifier parameter names): MCD updates them in separate steps."""
        gen, cls = [], []
        for name, _ in self.named_parameters():
            (cls if name.startswith(("classifier.", "classifier2.")) else gen).append(name)
        return gen, cls
