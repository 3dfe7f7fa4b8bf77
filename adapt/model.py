"""The video model every method shares: the streams that turn stored features into predictions.

For each clip the heads see ``T`` temporal units (one I3D window, or 5 TBN segments) per modality::

    x[m] (B, T, C[, H, W])
      -> read_inputs: the spatial mean of each map (CIA / M3EM: MC gating, then SC pooling)     -> (B, T, C')
      -> streams (fusion): one per modality ("late"), one over the concatenated modalities ("concat", TA3N's
         ALL), or groups ("rgb+flow,audio", M3EM)
    per stream s:
      -> Embedding: FC + ReLU + dropout(dropout)                     -> frame features f[s] (B, T, D)
      -> temporal: the mean over T, or TRN-multiscale (TA3N): relation features (B, T-1, R) summed over scales
                                                                     -> video feature v[s] (B, D or R)
      -> dropout(dropout_video) -> classifier (verb, + noun for EPIC-100)
    fused logits = sum_s w_s logits[s] (w = 1, audio_weight for an audio-only stream; divided by sum w when
    fusion_mean) (MM-SADA eq. 1; Kim et al. sec. 4.1; M3EM sec. 2.3)

Its settings are the "model" group of :class:`adapt.config.RunSettings`.  A method (:class:`adapt.method.Method`)
is this model plus its own heads; it may change three steps of the forward pass by overriding
:meth:`VideoModel.read_inputs` (with :meth:`VideoModel.build_inputs`: how the streams read the stored features,
CIA's and M3EM's MC and SC), :meth:`VideoModel.relations` (what the relation features of a TRN scale become, TA3N's
domain attention) and :meth:`VideoModel.classify` (what the classifier sees, MCD's reversal), and it adds its own
heads on the outputs.

The forward pass returns a dict; every method's forward returns at least these keys (the trainer, the evaluation,
the validators and the plots read them):

==============  ==================================================================================
``verb``        fused verb logits (B, verbs)
``noun``        fused noun logits (B, nouns), or None without noun classes
``verb_m``      {stream: verb logits}, ``noun_m`` the same for nouns (values None without nouns)
``video``       {stream: video feature v (B, V)}, before dropout
``video_drop``  {stream: dropout(v)}, what the classifier saw
``frame``       {stream: frame features f (B, T, D)}
==============  ==================================================================================

Every part is functional (no running statistics, random numbers from ``adapt.rng`` keys), so K runs can be stacked
with ``torch.func`` and trained as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from adapt import parts, rng
from featstore.errors import UserError


@dataclass(frozen=True)
class Inputs:
    """What the stores give the model: modalities, per-unit feature shapes (C[, H, W]), class counts, and the
    temporal units per clip the heads see."""

    modalities: tuple
    shapes: dict
    verbs: int
    nouns: int
    units: int


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
    """A stream's classifier(s): verb only, or verb + noun for EPIC-100 (``layer``: ``nn.Linear`` or another
    layer of the same signature, SHOT's weight-normalised one)."""

    def __init__(self, dim: int, verbs: int, nouns: int, layer=nn.Linear):
        super().__init__()
        self.verb = layer(dim, verbs)
        self.noun = layer(dim, nouns) if nouns else None

    def forward(self, v):
        return self.verb(v), (self.noun(v) if self.noun is not None else None)


class VideoModel(nn.Module):
    """The shared streams (see the module docstring), built from the run's settings ``cfg`` and the stores'
    :class:`Inputs`."""


    def __init__(self, cfg, inputs: Inputs):
        super().__init__()
        self.cfg = cfg
        modalities, shapes = list(inputs.modalities), inputs.shapes
        self.modalities = modalities
        self.spatial_mods = [m for m in modalities if len(shapes[m]) == 3 and cfg.spatial]
        channels = {m: shapes[m][0] for m in modalities}
        self.units = inputs.units
        D = cfg.embed_dim
        in_dim = self.build_inputs(inputs, channels)
        self.groups = stream_groups(cfg.fusion, modalities)
        self.streams = ["+".join(g) for g in self.groups]
        S = self.streams
        self.embed = nn.ModuleDict({s: parts.Embedding(sum(in_dim[m] for m in g), D, cfg.dropout)
                                    for s, g in zip(S, self.groups)})
        self.use_trn = cfg.temporal == "trn" and inputs.units > 1
        if self.use_trn:
            self.trn = nn.ModuleDict({s: parts.TRNMultiScale(D, inputs.units, cfg.trn_dim, cfg.trn_relations)
                                      for s in S})
        self.frame_dim = D
        self.video_dim = cfg.trn_dim if self.use_trn else D
        self.classifier = nn.ModuleDict({s: Heads(self.video_dim, inputs.verbs, inputs.nouns)
                                         for s in S})
        self.fusion_weights = {s: (cfg.audio_weight if g == ("audio",) else 1.0) for s, g in zip(S, self.groups)}

    # ---- the steps a method may change -------------------------------------------------------------------

    def build_inputs(self, inputs: Inputs, channels: dict) -> dict:
        """Build what acts on the stored features before the streams (CIA's MC and SC); return the channels each
        modality then has.  Here nothing: the stored channels."""
        return dict(channels)

    def read_inputs(self, x: dict, ctx, out: dict) -> dict:
        """The stored features ``{m: (B, T, C[, H, W])}`` as the streams read them, ``{m: (B, T, C')}``: here the
        spatial maps averaged (a method that keeps maps, CIA, reads them its own way)."""
        return {m: f.mean(dim=(-2, -1)) if m in self.spatial_mods else f for m, f in x.items()}

    def relations(self, rel: torch.Tensor, stream: str, ctx, out: dict) -> torch.Tensor:
        """A TRN stream's relation features (B, scales, R) before they are summed into the video feature; the
        identity here (TA3N weights them by its relation discriminators' entropy)."""
        return rel

    def classify(self, stream: str, v: torch.Tensor, ctx, out: dict):
        """The stream's (verb, noun) logits from its dropped-out video feature (MCD puts a reversal in front)."""
        return self.classifier[stream](v)

    # ---- the forward pass --------------------------------------------------------------------------------

    def fused(self, logits: dict) -> torch.Tensor:
        """sum_s w_s logits[s] (divided by sum_s w_s when fusion_mean)."""
        total = sum(self.fusion_weights[s] * logits[s] for s in self.streams)
        return total / sum(self.fusion_weights.values()) if self.cfg.fusion_mean else total

    def forward(self, x: dict, ctx) -> dict:
        """x[m]: (B, T, C[, H, W]) with the first ``ctx.b_s`` rows from the source domain -> the outputs (see the
        module docstring)."""
        cfg, key = self.cfg, ctx.key
        out: dict = {}
        pooled = self.read_inputs(x, ctx, out)
        frame, video, dropped, logits = {}, {}, {}, {}
        for i, (s, g) in enumerate(zip(self.streams, self.groups)):
            inp = pooled[g[0]] if len(g) == 1 else torch.cat([pooled[m] for m in g], dim=-1)
            f = self.embed[s](inp, key, salt=i)
            frame[s] = f
            if self.use_trn:
                v = self.relations(self.trn[s](f), s, ctx, out).sum(dim=1)
            else:
                v = parts.time_mean(f)
            video[s] = v
            dropped[s] = rng.dropout(v, cfg.dropout_video, key, self.training, 64 + i)
            logits[s] = self.classify(s, dropped[s], ctx, out)
        out["frame"], out["video"], out["video_drop"] = frame, video, dropped
        out["verb_m"] = {s: lg[0] for s, lg in logits.items()}
        out["noun_m"] = {s: lg[1] for s, lg in logits.items()}
        out["verb"] = self.fused(out["verb_m"])
        out["noun"] = self.fused(out["noun_m"]) if out["noun_m"][self.streams[0]] is not None else None
        return out


def initialise(model: nn.Module, rules: dict) -> None:
    """Apply initialisation ``rules`` ({part class: rule(linear layer)}, a code base's: :data:`adapt.datasets.
    INITIALISERS`) to the model's parts, in the order they were built; a part built with ``default_init = True``
    keeps PyTorch's."""
    for mod in model.modules():
        rule = rules.get(type(mod))
        if rule is not None and not getattr(mod, "default_init", False):
            for lin in mod.modules():
                if isinstance(lin, nn.Linear):
                    rule(lin)
