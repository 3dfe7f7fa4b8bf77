"""The adaptation model: streams composed from :mod:`adapt.parts`, switched by a TrainConfig.

For each clip the heads see ``T`` temporal units (one I3D window, or 5 TBN segments) per modality::

    x[m] (B, T, C[, H, W])
      -> MC / SMR gating across modalities (M3EM eqs. 1-4)          if cfg.mc       (C -> 2C)
      -> SC / CMC spatial consensus pooling (M3EM eq. 5)             if cfg.sc       else the spatial mean
      -> streams (cfg.fusion): one per modality ("late"), one over the concatenated modalities ("concat", TA3N's
         ALL), or groups ("rgb+flow,audio", M3EM)
    per stream s:
      -> Embedding: FC + ReLU + dropout(cfg.dropout)                 -> frame features f[s] (B, T, D)
      -> temporal: the mean over T, or TRN-multiscale (TA3N): relation features (B, T-1, R), weighted by domain
         attention (2 - H(d_relation)), summed over scales        -> video feature v[s] (B, D or R)
      -> dropout(cfg.dropout_video) -> classifier (verb, + noun for EPIC-100)
    fused logits = sum_s w_s logits[s] (w = 1, audio_weight for an audio-only stream; divided by sum w when
    cfg.fusion_mean) (MM-SADA eq. 1; Kim et al. sec. 4.1; M3EM sec. 2.3)

Heads for the objectives: a discriminator per stream on v (MM-SADA eq. 2; M3EM L_d), one on concat(v) (DANN, CIA
lambda_vd, TA3N's video level; on the dropped-out v when cfg.video_disc_after_dropout), frame-level ones on f (CIA
lambda_fd, TA3N), relation ones per TRN scale (TA3N), the correspondence head on concat(v_rgb, v_flow) (MM-SADA
eq. 3), a projection head shared by the streams (Kim et al. eq. 1), and MCD's second classifier.  Each
discriminator's gradient reversal takes its level's coefficient from ``coeff`` (``adapt.schedule.LEVELS``).  Every
part is functional (no running statistics, random numbers from ``adapt.rng`` keys), so K runs can be stacked with
``torch.func`` and trained as one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from adapt import parts, rng
from featstore.errors import UserError


def stream_groups(fusion: str, modalities: list[str]) -> list[tuple]:
    """The streams' modalities: ``late`` -> one per modality, ``concat`` -> one of all, ``"rgb+flow,audio"`` ->
    those groups (a modality the stores lack is left out; every modality must be in one group)."""
    if fusion == "late":
        return [(m,) for m in modalities]
    if fusion == "concat":
        return [tuple(modalities)]
    groups = [tuple(m for m in g.split("+") if m in modalities) for g in fusion.split(",")]
    groups = [g for g in groups if g]
    placed = [m for g in groups for m in g]
    if sorted(placed) != sorted(modalities):
        raise UserError(f"fusion={fusion!r}: every modality of the stores ({', '.join(modalities)}) must be in "
                        f"exactly one group, e.g. fusion=rgb+flow,audio")
    return groups


class Heads(nn.Module):
    """A stream's classifier(s): verb only, or verb + noun for EPIC-100."""

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
                raise UserError("spatial consensus (sc) needs rgb and flow 7x7 maps in the stores")
            if in_dim["rgb"] != in_dim["flow"]:
                raise UserError("spatial consensus (sc) needs rgb and flow features of the same width")
            self.sc = parts.SpatialConsensus(in_dim["rgb"], cfg.sc_dim, cfg.sc_k, modalities=self.modalities,
                                             consensus=("rgb", "flow"), spatial=self.spatial_mods)
        self.groups = stream_groups(cfg.fusion, self.modalities)
        self.streams = ["+".join(g) for g in self.groups]
        S = self.streams
        self.embed = nn.ModuleDict({s: parts.Embedding(sum(in_dim[m] for m in g), D, cfg.dropout)
                                    for s, g in zip(S, self.groups)})
        self.use_trn = cfg.temporal == "trn" and units > 1
        if self.use_trn:
            self.trn = nn.ModuleDict({s: parts.TRNMultiScale(D, units, cfg.trn_dim, cfg.trn_relations) for s in S})
        V = cfg.trn_dim if self.use_trn else D
        self.classifier = nn.ModuleDict({s: Heads(V, verbs, nouns) for s in S})
        if cfg.w_mcd:
            self.classifier2 = nn.ModuleDict({s: Heads(V, verbs, nouns) for s in S})
        if cfg.w_adv:
            self.disc = nn.ModuleDict({s: parts.DomainDiscriminator(V, cfg.disc_hidden) for s in S})
        if cfg.w_video_adv or cfg.w_attn_entropy:
            self.disc_video = parts.DomainDiscriminator(V * len(S), cfg.disc_hidden)
        if cfg.w_frame_adv:
            self.disc_frame = nn.ModuleDict({s: parts.DomainDiscriminator(D, cfg.disc_hidden) for s in S})
        if self.use_trn and (cfg.w_relation_adv or cfg.domain_attention):
            self.disc_relation = nn.ModuleDict({s: nn.ModuleList(
                [parts.DomainDiscriminator(cfg.trn_dim, cfg.disc_hidden) for _ in range(units - 1)]) for s in S})
        if cfg.w_corr:
            if "rgb" not in S or "flow" not in S:
                raise UserError("the correspondence head (w_corr) needs separate rgb and flow streams (fusion=late)")
            self.corr = parts.CorrespondenceHead(2 * V, cfg.disc_hidden or 100)
        if cfg.w_xmodal:
            self.proj = parts.ProjectionHead(V, 128)
        self.fusion_weights = {s: (cfg.audio_weight if g == ("audio",) else 1.0) for s, g in zip(S, self.groups)}
        self._initialise(cfg.init)

    def _initialise(self, scheme: str) -> None:
        """The reference code's initialisers (``init``): TA3N's normal(0, 0.001) with zero bias on every layer but
        the TRN and relation discriminators (models.py:132-147, 165-180, 280-300); MM-SADA's truncated normal 0.1
        on the discriminators and the correspondence head (arch.py:47-50, 58-63) and Sonnet's default,
        truncated normal 1/sqrt(fan_in), on the classifier (i3d.py:483-488).  ``torch``: PyTorch's defaults."""
        def linears(*mods):
            return [m for mod in mods if mod is not None for m in mod.modules() if isinstance(m, nn.Linear)]
        get = lambda n: getattr(self, n, None)  # noqa: E731
        if scheme == "ta3n":
            for lin in linears(self.embed, self.classifier, get("classifier2"), get("disc_video"), get("disc_frame"),
                               get("disc"), get("corr"), get("proj")):
                parts.init_normal(lin, 0.001)
        elif scheme == "mmsada":
            for lin in linears(get("disc"), get("disc_video"), get("disc_frame"), get("corr")):
                parts.init_normal(lin, 0.1, truncated=True)
            for lin in linears(self.classifier, get("classifier2")):
                parts.init_normal(lin, 1.0 / math.sqrt(lin.in_features), truncated=True)

    def fused(self, logits: dict) -> torch.Tensor:
        """sum_s w_s logits[s] (divided by sum_s w_s when fusion_mean)."""
        total = sum(self.fusion_weights[s] * logits[s] for s in self.streams)
        return total / sum(self.fusion_weights.values()) if self.cfg.fusion_mean else total

    def forward(self, x: dict, key: torch.Tensor, coeff: torch.Tensor, b_s: int = 0, banks: dict | None = None):
        """x[m]: (B, T, C[, H, W]) with the first ``b_s`` rows from the source domain; key: rng key of this step;
        coeff: (5,) GRL coefficients of the levels (adv, video, frame, relation, mcd); banks: memory banks to
        project through h (Kim et al.) -> dict of outputs."""
        cfg = self.cfg
        c_adv, c_video, c_frame, c_rel, c_mcd = coeff.unbind(0) if torch.is_tensor(coeff) else [coeff] * 5
        out: dict = {}
        pooled, consensus = self._pooled(x)
        if consensus is not None:
            out["consensus"] = consensus
        frame, video, disc_in, logits, logits2 = {}, {}, {}, {}, {}
        for i, (s, g) in enumerate(zip(self.streams, self.groups)):
            inp = pooled[g[0]] if len(g) == 1 else torch.cat([pooled[m] for m in g], dim=-1)
            f = self.embed[s](inp, key, salt=i)
            frame[s] = f
            if self.use_trn:
                rel = self.trn[s](f)  # (B, T-1, R)
                if hasattr(self, "disc_relation"):
                    d = torch.stack([disc(rel[:, j], c_rel) for j, disc in enumerate(self.disc_relation[s])], dim=1)
                    out.setdefault("disc_relation", {})[s] = d  # (B, T-1, 2)
                    if cfg.domain_attention:  # TA3N models.py:401-410: (1 - H(d)) + 1, not detached
                        rel = parts.DomainAttention()(rel, d)
                v = rel.sum(dim=1)
            else:
                v = parts.time_mean(f)
            video[s] = v
            v_drop = rng.dropout(v, cfg.dropout_video, key, self.training, 64 + i)
            disc_in[s] = v_drop if cfg.video_disc_after_dropout else v
            v_cls = v_drop
            if hasattr(self, "classifier2") and cfg.mcd_form == "grl" and b_s:
                # MM-SADA i3d.py:470-471: a reversal between the target features and both classifiers
                v_cls = torch.cat([v_drop[:b_s], parts.grad_reverse(v_drop[b_s:], c_mcd)], dim=0)
            logits[s] = self.classifier[s](v_cls)
            if hasattr(self, "classifier2"):
                logits2[s] = self.classifier2[s](v_cls)
        out["frame"], out["video"] = frame, video
        out["verb_m"] = {s: lg[0] for s, lg in logits.items()}
        out["noun_m"] = {s: lg[1] for s, lg in logits.items()}
        out["verb"] = self.fused(out["verb_m"])
        out["noun"] = self.fused(out["noun_m"]) if out["noun_m"][self.streams[0]] is not None else None
        if logits2:
            out["verb2"] = self.fused({s: lg[0] for s, lg in logits2.items()})
            if out["noun"] is not None:
                out["noun2"] = self.fused({s: lg[1] for s, lg in logits2.items()})
        if hasattr(self, "disc"):
            out["disc"] = {s: self.disc[s](video[s], c_adv) for s in self.streams}
        if hasattr(self, "disc_video"):
            out["disc_video"] = self.disc_video(torch.cat([disc_in[s] for s in self.streams], dim=-1), c_video)
        if hasattr(self, "disc_frame"):
            out["disc_frame"] = {s: self.disc_frame[s](frame[s], c_frame) for s in self.streams}
        if hasattr(self, "corr"):
            out["corr"] = self.corr(video["rgb"], video["flow"])
        if hasattr(self, "proj"):
            out["proj"] = {s: self.proj(video[s]) for s in self.streams}
            if banks:
                with torch.no_grad():
                    out["proj_bank"] = {n: self.proj(b) for n, b in banks.items()}
        return out

    def _pooled(self, x: dict):
        """MC gating, then SC pooling (or the spatial mean): (B, T, C') per modality, and SC's consensus map."""
        feats, consensus = dict(x), None
        if hasattr(self, "mc"):
            feats = self.mc(feats)
        if hasattr(self, "sc"):
            feats, consensus = self.sc(feats)
        else:
            feats = {m: f.mean(dim=(-2, -1)) if m in self.spatial_mods else f for m, f in feats.items()}
        return feats, consensus

    def param_groups(self) -> tuple[list[str], list[str]]:
        """(generator parameter names, classifier parameter names): MCD's three-step form updates them apart."""
        gen, cls = [], []
        for name, _ in self.named_parameters():
            (cls if name.startswith(("classifier.", "classifier2.")) else gen).append(name)
        return gen, cls
