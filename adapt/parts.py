"""Adaptation-head building blocks for stage 2 ("adapt").

Every part is a plain ``nn.Module`` (or function) that is safe under
``torch.func.functional_call`` + ``torch.func.vmap`` over K stacked runs:

* no in-place updates of parameters/buffers in ``forward`` and no BatchNorm running stats;
* no ``.item()``, no Python control flow on tensor values, no data-dependent shapes;
* randomness only through :mod:`adapt.rng` keys (``key`` arguments), never the global RNG.

Shape conventions: ``B`` batch, ``n`` segments/windows, ``c`` backbone channels (1024),
``h, w`` spatial size (7x7 for I3D / TBN RGB and flow), ``d`` feature width.

Papers (text in ``shared/papers``):

* MM-SADA: Munro & Damen, "Multi-modal domain adaptation for fine-grained action
  recognition", CVPR 2020 (eq. 1 late fusion, eq. 2 per-modality discriminator, eq. 3
  self-supervised correspondence, GRL of Ganin et al.).
* Kim et al., "Learning cross-modal contrastive features for video domain adaptation",
  ICCV 2021 (projection head h of eq. 1/3).
* M3EM: Yang et al., EPIC-100 UDA 2021 technical report (eqs. 1-4 SMR gating, eq. 5 CMC
  consensus); the same blocks are called MC / SC in CIA (Yang et al., CVPR 2022).
* TA3N: Chen et al., "Temporal attentive alignment for large-scale video domain
  adaptation", ICCV 2019 (TRN multi-scale relation module, domain attention, attentive
  entropy), built on TRN (Zhou et al., ECCV 2018).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rng
from .losses import entropy

__all__ = [
    "grad_reverse",
    "Embedding",
    "DomainDiscriminator",
    "CorrespondenceHead",
    "AdversarialNetwork",
    "WeightNormLinear",
    "init_normal",
    "ProjectionHead",
    "GatingUnit",
    "MutualRefinement",
    "mutual_refinement_param_count",
    "correlation_map",
    "SpatialConsensus",
    "InteractionSettings",
    "CrossModalInteraction",
    "time_mean",
    "TRNMultiScale",
    "DomainAttention",
    "attentive_entropy",
]

Features = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------
# Gradient reversal (Ganin & Lempitsky 2015; MM-SADA sec. 3.3, eq. 2)
# --------------------------------------------------------------------------------------
class _GradReverseFn(torch.autograd.Function):
    """Identity forward, ``-coeff * grad`` backward.

    Uses the ``setup_context`` form with ``generate_vmap_rule = True`` so that it works
    under ``torch.func.vmap`` / ``torch.func.grad`` with a batched ``coeff``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, coeff):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, coeff = inputs
        ctx.save_for_backward(coeff)

    @staticmethod
    def backward(ctx, grad_out):
        (coeff,) = ctx.saved_tensors
        return -coeff * grad_out, None


def grad_reverse(x: torch.Tensor, coeff: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """Gradient reversal layer R (Ganin et al. 2016; MM-SADA sec. 3.3).

    Forward ``R(x) = x``; backward ``dR/dx = -coeff * I``.  ``coeff`` may be a Python float
    or a tensor (e.g. a per-run scalar batched under vmap; the schedule is :mod:`adapt.schedule`);
    it receives no gradient.

    Shapes: x (...), coeff () -> (...).
    """
    if isinstance(coeff, torch.Tensor):
        coeff = coeff.detach().to(dtype=x.dtype)
    else:
        coeff = torch.tensor(float(coeff), dtype=x.dtype, device=x.device)
    return _GradReverseFn.apply(x, coeff)


# --------------------------------------------------------------------------------------
# Shared embedding (TA3N's shared FC layer; MM-SADA dropout on features)
# --------------------------------------------------------------------------------------
class Embedding(nn.Module):
    """Trainable FC + ReLU + dropout: ``e = dropout(relu(W x + b))`` (TA3N shared layer, 1024 -> 512).

    Dropout is :func:`adapt.rng.dropout` driven by ``key`` and ``salt`` (the key is required in training mode
    when ``dropout > 0``; layers sharing a key take different salts).

    * ``spatial=False``: x (..., in_dim) -> (..., out_dim).
    * ``spatial=True``: a 1x1 convolution, i.e. the same linear map on the channel axis of
      x (..., in_dim, H, W) -> (..., out_dim, H, W).
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.5, spatial: bool = False):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.p = float(dropout)
        self.spatial = bool(spatial)

    def forward(self, x: torch.Tensor, key=None, salt: int = 0) -> torch.Tensor:
        if self.spatial:
            x = x.movedim(-3, -1)
        y = self.fc(x)
        if self.training and self.p:  # relu(z) * m = relu(z * m) for the mask's m >= 0: one pass and buffer fewer
            y = (y * rng.keep_mask(key, y.shape, self.p, salt).to(y.dtype)).relu_()
        else:
            y = F.relu(y)
        if self.spatial:
            y = y.movedim(-1, -3)
        return y


class WeightNormLinear(nn.Module):
    """A linear layer with weight normalisation (Salimans and Kingma 2016), SHOT's classifier (tim-learn/SHOT
    object/network.py:95-97, ``weightNorm(nn.Linear)``): ``W = g v / ||v||`` row by row, so a class's direction
    and its scale are separate parameters.  Initialised as ``nn.Linear`` is, with ``g = ||v||`` (what
    ``weight_norm`` does; SHOT's Xavier call on the weight is overwritten by it), and a zero bias (SHOT
    network.py:14-24, 95-97: ``init_weights`` zeroes the bias, which the weight norm leaves alone).

    Shapes: x (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        lin = nn.Linear(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.v = nn.Parameter(lin.weight.detach().clone())
        self.g = nn.Parameter(lin.weight.detach().norm(dim=1))
        self.bias = nn.Parameter(torch.zeros_like(lin.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.g[:, None] * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(x, w, self.bias)


def init_normal(layer: nn.Linear, std: float, truncated: bool = False) -> None:
    """Weights from N(0, std) (truncated at two standard deviations, TensorFlow's ``truncated_normal``, when
    ``truncated``), bias zero: TA3N's ``normal_(w, 0, 0.001)`` (models.py:132-147) and MM-SADA's
    ``truncated_normal(stddev=0.1)`` heads (arch.py:47-50, 58-63)."""
    with torch.no_grad():
        if truncated:
            nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
        else:
            nn.init.normal_(layer.weight, 0.0, std)
        nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------------------
# MM-SADA heads
# --------------------------------------------------------------------------------------
class DomainDiscriminator(nn.Module):
    """Domain discriminator D_m (MM-SADA eq. 2): GRL -> FC(in-hidden) -> ReLU -> FC(hidden-2).

    ``hidden`` 100 in MM-SADA (arch.py:47-50); ``None`` = the input's width, as TA3N's frame (512-512-2), video
    (256-256-2) and relation (256-256-2) discriminators (models.py:165-178, 280-298, 303-311).

    ``L_d^m = sum_x -d log D_m(F_m(x)) - (1 - d) log(1 - D_m(F_m(x)))`` is the cross-entropy
    of the returned 2-way logits (computed by the caller).  The GRL (coefficient ``coeff``,
    a float or per-run tensor) makes the feature extractor maximise it.

    Shapes: x (..., in_dim), coeff () -> logits (..., num_domains).
    """

    def __init__(self, in_dim: int, hidden: Optional[int] = 100, num_domains: int = 2):
        super().__init__()
        hidden = in_dim if hidden is None else hidden
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_domains)

    def forward(self, x: torch.Tensor, coeff: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        x = grad_reverse(x, coeff)
        return self.fc2(F.relu(self.fc1(x)))


class AdversarialNetwork(nn.Module):
    """CDAN's domain discriminator (``AdversarialNetwork``, thuml/CDAN pytorch/network.py:365-402): GRL ->
    FC(in-hidden) -> ReLU -> dropout 0.5 -> FC(hidden-hidden) -> ReLU -> dropout 0.5 -> FC(hidden-1), one logit
    (the sigmoid is in the loss), Xavier-normal weights and zero biases (network.py:21-23).

    Dropout is :func:`adapt.rng.dropout` with ``key`` and two salts from ``salt`` (training mode only).

    Shapes: x (..., in_dim), coeff () -> logits (...,).
    """

    def __init__(self, in_dim: int, hidden: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)
        self.p = float(dropout)
        for fc in (self.fc1, self.fc2, self.fc3):
            nn.init.xavier_normal_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor, coeff: Union[float, torch.Tensor] = 1.0, key=None, salt: int = 0):
        x = grad_reverse(x, coeff)
        x = rng.dropout(F.relu(self.fc1(x)), self.p, key, self.training, salt)
        x = rng.dropout(F.relu(self.fc2(x)), self.p, key, self.training, salt + 1)
        return self.fc3(x).squeeze(-1)


class CorrespondenceHead(nn.Module):
    """MM-SADA self-supervised correspondence classifier C (MM-SADA eq. 3).

    ``C(F_rgb, F_flow) = FC(hidden-2)(ReLU(FC(in_dim-hidden)(concat(F_rgb, F_flow))))``, trained
    with ``L_c = sum_x -c log C(x) - (1 - c) log(1 - C(x))`` on source and target; ``c`` is 1 when
    the modalities correspond.  ``in_dim = d_rgb + d_flow`` (2048 for I3D).

    Its input are the features before dropout (MM-SADA model.py:446-449; arch.py:53-63), with no GRL.  The pairs
    are made by the trainer's sampler: the negatives' flow comes from another clip of the same domain.

    Shapes: rgb (..., d_r), flow (..., d_f) -> logits (..., 2).
    """

    def __init__(self, in_dim: int = 2048, hidden: int = 100):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.cat([rgb, flow], dim=-1))))


# --------------------------------------------------------------------------------------
# Kim et al. projection head
# --------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """Projection head h of Kim et al. (ICCV 2021, eqs. 1 and 3; SimCLR-style MLP).

    ``h(F) = W2 relu(W1 F + b1) + b2`` followed, if ``normalize``, by L2 normalisation so
    that ``h(F_i)^T h(F_j) / tau`` in eqs. 1/3 is a cosine similarity over a temperature.
    Shared by both domains (Kim et al. footnote 1); used only for the cross-modal loss.

    Shapes: x (..., in_dim) -> (..., out_dim).  ``hidden`` defaults to ``in_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: Optional[int] = None, normalize: bool = True):
        super().__init__()
        hidden = in_dim if hidden is None else hidden
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.normalize = bool(normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(F.relu(self.fc1(x)))
        return F.normalize(z, dim=-1) if self.normalize else z


# --------------------------------------------------------------------------------------
# M3EM / CIA: Semantic Mutual Refinement (SMR, "MC" in CIA), eqs. 1-4
# --------------------------------------------------------------------------------------
def _as_named(features: Features, names: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], bool]:
    if isinstance(features, Mapping):
        return dict(features), True
    features = list(features)
    if len(features) != len(names):
        raise ValueError(f"expected {len(names)} modality tensors ({names}), got {len(features)}")
    return dict(zip(names, features)), False


def _gap(x: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Global average pooling over (h, w) of (..., c, h, w); identity for (..., c)."""
    return x.mean(dim=(-2, -1)) if spatial else x


class GatingUnit(nn.Module):
    """Squeeze-and-excitation gate (Hu et al. 2018) used by M3EM eqs. 1 and 3.

    ``t = sigmoid(W2 relu(W1 f + b1) + b2)`` with ``W1 in R^{(c/r) x in_dim}``, ``W2 in R^{c x (c/r)}``.
    Parameters: ``in_dim*(c/r) + c/r + (c/r)*c + c``.

    Shapes: f (..., in_dim) -> t (..., c) in (0, 1).
    """

    def __init__(self, in_dim: int, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(f))))


def mutual_refinement_param_count(channels: Sequence[int], reduction: int = 16) -> int:
    """Parameter count of :class:`MutualRefinement` (M3EM sec. 2.1).

    For modality M with c_M channels, bottleneck b_M = c_M // r and c_in = sum of the other
    modalities' channels: self gate ``c_M*b_M + b_M + b_M*c_M + c_M``, cross gate
    ``c_in*b_M + b_M + b_M*c_M + c_M``.  With all c_M = c over m modalities this is
    ``m * ((m + 2) * c * (c/r) + 2 * c/r + 2 * c)``: 528,640 for (RGB, flow), c = 1024, r = 16;
    989,568 with audio as a third modality.
    """
    total = 0
    channels = list(channels)
    for i, c in enumerate(channels):
        b = max(1, c // reduction)
        c_in = sum(channels) - c
        total += (c * b + b + b * c + c) + (c_in * b + b + b * c + c)
    return total


class MutualRefinement(nn.Module):
    """Semantic Mutual Refinement, SMR (M3EM eqs. 1-4; "MC" module in CIA).

    For each modality M with feature ``F_M`` (..., c, h, w) (RGB, flow) or (..., c) (audio):

    * ``f_M = GAP(F_M)`` (..., c);
    * self gate, eq. 1: ``t_sM = sigmoid(W2^M relu(W1^M f_M))``; eq. 2: ``F_sM = F_M * t_sM``
      (broadcast over every spatial position (i, j));
    * cross gate, eq. 3: ``f_in_M = concat_{M' != M} f_M'`` (modality order of ``modalities``),
      ``t_cM = sigmoid(W2^in relu(W1^in f_in_M))``, ``F_cM = F_M * t_cM``;
    * eq. 4: ``F_rM = concat(F_sM, F_cM)`` along channels -> (..., 2c, h, w) or (..., 2c).

    Bottleneck ``c/r`` (r = 16).  Parameter count (all gates with bias), see
    :func:`mutual_refinement_param_count`: for m modalities of c channels,
    ``m * ((m + 2) * c^2 / r + 2c / r + 2c)`` = 528,640 for RGB+flow at c = 1024, r = 16.

    Input: dict ``{name: tensor}`` (or list in ``modalities`` order); the output has the same
    container type.  Leading (batch/segment) dims ``...`` must agree across modalities.
    With a single modality there is no cross gate and F_rM = F_sM (c channels).
    """

    def __init__(self, modalities: Sequence[str] = ("rgb", "flow"), channels: Union[int, Sequence[int]] = 1024,
                 reduction: int = 16, spatial: Iterable[str] = ("rgb", "flow")):
        super().__init__()
        self.modalities = list(modalities)
        if isinstance(channels, int):
            channels = [channels] * len(self.modalities)
        self.channels = dict(zip(self.modalities, channels))
        self.spatial = set(spatial)
        self.reduction = reduction
        self.self_gates = nn.ModuleDict({m: GatingUnit(c, c, reduction) for m, c in self.channels.items()})
        if len(self.modalities) > 1:
            total = sum(self.channels.values())
            self.cross_gates = nn.ModuleDict(
                {m: GatingUnit(total - c, c, reduction) for m, c in self.channels.items()})
        else:
            self.cross_gates = nn.ModuleDict()

    @staticmethod
    def _apply_gate(x: torch.Tensor, t: torch.Tensor, spatial: bool) -> torch.Tensor:
        return x * t[..., None, None] if spatial else x * t

    def forward(self, features: Features):
        feats, is_dict = _as_named(features, self.modalities)
        pooled = {m: _gap(feats[m], m in self.spatial) for m in self.modalities}
        out = {}
        for m in self.modalities:
            sp = m in self.spatial
            x = feats[m]
            t_s = self.self_gates[m](pooled[m])
            if len(self.modalities) > 1:
                f_in = torch.cat([pooled[o] for o in self.modalities if o != m], dim=-1)
                t_c = self.cross_gates[m](f_in)
                # eq. 4 with both gates in one product: (..., 2, c[, 1, 1]) * (..., 1, c[, h, w]), then the pair axis
                # merged into the channels (a view): no separate gated maps and no concatenation copy
                t = torch.stack([t_s, t_c], dim=-2)
                if sp:
                    out[m] = (x.unsqueeze(-4) * t[..., None, None]).flatten(-4, -3)
                else:
                    out[m] = (x.unsqueeze(-2) * t).flatten(-2, -1)
            else:
                out[m] = self._apply_gate(x, t_s, sp)
        return out if is_dict else [out[m] for m in self.modalities]


# --------------------------------------------------------------------------------------
# M3EM / CIA: Cross-Modality Consensus (CMC, "SC" in CIA), eq. 5
# --------------------------------------------------------------------------------------
def correlation_map(a: torch.Tensor, b: torch.Tensor, centred: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-position correlation over channels (M3EM eq. 5).

    ``C^(i,j) = <a^(i,j), b^(i,j)> / (||a^(i,j)||_2 ||b^(i,j)||_2)``; with ``centred=True``
    each channel vector is first centred by its mean over channels, which makes this exactly the
    Pearson correlation coefficient of the c channel values at (i, j) (numpy ``corrcoef``);
    ``centred=False`` gives the cosine similarity written in eq. 5.  The norm product is clamped
    below at ``eps`` (so a constant / zero vector gives 0, otherwise the value is exact).

    Shapes: a, b (..., d, h, w) -> (..., h, w) in [-1, 1].
    """
    if centred:
        a = a - a.mean(dim=-3, keepdim=True)
        b = b - b.mean(dim=-3, keepdim=True)
    num = (a * b).sum(dim=-3)
    den = torch.linalg.vector_norm(a, dim=-3) * torch.linalg.vector_norm(b, dim=-3)
    return num / den.clamp_min(eps)


class SpatialConsensus(nn.Module):
    """Cross-Modality Consensus, CMC (M3EM sec. 2.2, eq. 5; "SC" in CIA).

    For the two spatial modalities (RGB R, flow F) with refined maps ``F_rM`` (B, 2c, h, w):

    1. ``H_rM = Conv1x1_M(F_rM)`` (B, d, h, w): a per-modality 1x1 conv into a shared latent space.
    2. ``k`` downsamplings by 2 give ``H^0..H^k``: ``avg_pool2d(kernel 2, stride 2, ceil_mode=True)``
       (7 -> 4 -> 2 -> 1 for k = 3; a border window averages only its in-bounds cells).  An axis of size 1 is
       not pooled further.
    3. Per scale, eq. 5: ``C^s = correlation_map(H_R^s, H_F^s)`` (Pearson, i.e. channel-centred).
    4. Each ``C^s`` is upsampled to (h, w) (bilinear, align_corners=False) and summed: ``C = sum_s up(C^s)`` in
       [-(k+1), k+1], returned as the map.
    5. Weighted average with residual (Wang et al. 2017 residual attention):
       ``f_rM = sum_ij (1 + C~_ij) F_rM^(i,j) / (h w)`` with ``C~ = C / (k+1)`` (the mean of the scale
       correlations, so the weights lie in [0, 2] and C = 0 gives plain GAP).

    Non-spatial modalities (audio, (B, 2c)) pass through unchanged (and any spatial modality not
    among the two consensus modalities is plain GAP).  Extra leading dims (B, n, ...) are
    flattened and restored.

    Parameters: ``2 * (2c * d + d)``; d = ``proj_dim`` (default 256, the papers do not state it).

    Input: dict ``{name: tensor}`` or list in ``modalities`` order.
    Output: (pooled features in the same container, (B, 2c) each; consensus map C (B, h, w)).
    """

    def __init__(self, in_channels: int = 2048, proj_dim: int = 256, k: int = 3,
                 modalities: Sequence[str] = ("rgb", "flow", "audio"), consensus: Tuple[str, str] = ("rgb", "flow"),
                 spatial: Iterable[str] = ("rgb", "flow"), eps: float = 1e-6):
        super().__init__()
        self.modalities = list(modalities)
        self.consensus = tuple(consensus)
        self.spatial = set(spatial)
        self.k = int(k)
        self.eps = eps
        self.proj = nn.ModuleDict({m: nn.Conv2d(in_channels, proj_dim, kernel_size=1) for m in self.consensus})

    def scale_sizes(self, h: int, w: int) -> List[Tuple[int, int]]:
        """Spatial sizes of the k+1 scales for an (h, w) input: each halving rounds up, an axis already of size 1
        is not pooled (7x7, k = 3: 7 -> 4 -> 2 -> 1)."""
        sizes = [(h, w)]
        for _ in range(self.k):
            sizes.append(tuple(v if v <= 1 else (v + 1) // 2 for v in sizes[-1]))
        return sizes

    @staticmethod
    def _down(x: torch.Tensor) -> torch.Tensor:
        kh = 2 if x.shape[-2] > 1 else 1
        kw = 2 if x.shape[-1] > 1 else 1
        if kh == 1 and kw == 1:
            return x
        return F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw), ceil_mode=True)

    def consensus_map(self, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        """Consensus map C = sum_s up(C^s) (M3EM eq. 5 and text); f_a, f_b (B, 2c, h, w) -> (B, h, w)."""
        h, w = f_a.shape[-2:]
        ha = self.proj[self.consensus[0]](f_a)
        hb = self.proj[self.consensus[1]](f_b)
        total = None
        for s in range(self.k + 1):
            if s > 0:
                ha, hb = self._down(ha), self._down(hb)
            c = correlation_map(ha, hb, True, self.eps).unsqueeze(1)  # (B, 1, hs, ws)
            if c.shape[-2:] != (h, w):
                c = F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False)
            total = c if total is None else total + c
        return total.squeeze(1)

    def forward(self, features: Features):
        feats, is_dict = _as_named(features, self.modalities)
        a_name, b_name = self.consensus
        fa, fb = feats[a_name], feats[b_name]
        lead = fa.shape[:-3]
        fa4 = fa.reshape((-1,) + tuple(fa.shape[-3:]))
        fb4 = fb.reshape((-1,) + tuple(fb.shape[-3:]))
        cmap = self.consensus_map(fa4, fb4)  # (N, h, w)
        weight = 1.0 + cmap / (self.k + 1)
        out = {}
        for m in self.modalities:
            x = feats[m]
            if m in self.consensus:
                x4 = fa4 if m == a_name else fb4
                # sum_ij weight_ij F^(i,j) / (h w) as one contraction: no weighted copy of the map (forward) and
                # no full-size mean and product gradients (backward)
                pooled = torch.einsum("nchw,nhw->nc", x4, weight) / (x4.shape[-2] * x4.shape[-1])
                out[m] = pooled.reshape(tuple(lead) + (pooled.shape[-1],))
            else:
                out[m] = _gap(x, m in self.spatial)
        cmap = cmap.reshape(tuple(lead) + tuple(cmap.shape[-2:]))
        return (out if is_dict else [out[m] for m in self.modalities]), cmap


@dataclass
class InteractionSettings:
    """The settings of :class:`CrossModalInteraction`, for the methods that use it (CIA, M3EM)."""

    mc: bool = False                 # MC / SMR mutual-refinement gating (M3EM eqs. 1-4)
    sc: bool = False                 # SC / CMC spatial consensus pooling (M3EM eq. 5); else the spatial mean
    reduction: int = field(default=16, metadata={"range": "positive"})  # the gates' bottleneck c / r
    sc_k: int = field(default=3, metadata={"range": "non_negative"})    # consensus scales k + 1
    sc_dim: int = field(default=256, metadata={"range": "positive"})    # the consensus projection's width


class CrossModalInteraction(nn.Module):
    """What CIA and M3EM put between the stored features and the streams (CIA supp. sec. 1; M3EM sec. 2): MC / SMR
    gating across modalities (:class:`MutualRefinement`; the channels double where several modalities meet), then
    SC / CMC consensus pooling of the RGB and flow maps (:class:`SpatialConsensus`), else the spatial mean.

    ``channels``: stored channels per modality; ``spatial``: the modalities stored as maps.  ``out_channels``: what
    each modality has after it.  Forward: ``{m: (B, T, C[, H, W])}`` -> (``{m: (B, T, C')}``, consensus map or
    None)."""

    def __init__(self, modalities: Sequence[str], channels: Mapping[str, int], spatial: Sequence[str], mc: bool,
                 sc: bool, reduction: int = 16, k: int = 3, proj_dim: int = 256):
        super().__init__()
        self.spatial = list(spatial)
        out = dict(channels)
        if mc:
            self.mc = MutualRefinement(modalities, [channels[m] for m in modalities], reduction, spatial=self.spatial)
            if len(modalities) > 1:
                out = {m: 2 * c for m, c in channels.items()}
        if sc:
            pair = [m for m in ("rgb", "flow") if m in self.spatial]
            if len(pair) != 2:
                from featstore.errors import UserError
                raise UserError("spatial consensus (sc) needs rgb and flow 7x7 maps in the stores (spatial=true)")
            if out["rgb"] != out["flow"]:
                from featstore.errors import UserError
                raise UserError("spatial consensus (sc) needs rgb and flow features of the same width")
            self.sc = SpatialConsensus(out["rgb"], proj_dim, k, modalities=modalities, consensus=("rgb", "flow"),
                                       spatial=self.spatial)
        self.out_channels = out

    def forward(self, x: Mapping[str, torch.Tensor]):
        feats, consensus = dict(x), None
        if hasattr(self, "mc"):
            feats = self.mc(feats)
        if hasattr(self, "sc"):
            feats, consensus = self.sc(feats)
        else:
            feats = {m: f.mean(dim=(-2, -1)) if m in self.spatial else f for m, f in feats.items()}
        return feats, consensus


# --------------------------------------------------------------------------------------
# Temporal aggregation (TSN average; TRN multi-scale as in TA3N)
# --------------------------------------------------------------------------------------
def time_mean(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x.mean(dim)``; when that axis has one entry (one window or segment per clip, as in training on pooled
    features), the entry itself, as a squeezed view: the same values without a reduction kernel (which for a
    one-long axis cost more than a small head's matmuls under vmap), and a view again in the backward pass
    (``select``'s gradient would allocate and zero the full shape)."""
    return x.squeeze(dim) if x.shape[dim] == 1 else x.mean(dim=dim)


class TRNMultiScale(nn.Module):
    """Multi-scale temporal relations as TA3N runs them (TRN, Zhou et al. ECCV 2018, eq. 3; TA3N's TRNmodule.py
    ``RelationModuleMultiScale``).

    For each scale ``s = n, n-1, ..., 2`` the candidate relations are the time-ordered subsets of ``s`` of the
    ``n`` frames in lexicographic order; at most ``relations`` of them (3) are used, the same ones in training and
    at test: candidates ``ceil(i * N_s / r)`` for ``i < r`` (TRNmodule.py:71, the random draw commented out at :73).
    For 5 frames: {01234}; {0123, 0134, 1234}; {012, 024, 124}; {01, 12, 23}.  Each scale has one MLP
    ``g_s = ReLU o Linear(s*d -> out_dim) o ReLU`` applied to the frames of a relation concatenated in time order,
    and its relations' outputs are **summed** (TRNmodule.py:48-52, 67-79).

    ``relations=0`` uses every subset (C(n, s) per scale).

    Shapes: x (B, n, d) -> per-scale relation features (B, n-1, out_dim), ordered by scale n, n-1, ..., 2; the
    video feature is their sum over scales (after TA3N's domain attention, in the model).
    """

    def __init__(self, in_dim: int, num_segments: int, out_dim: int = 256, relations: int = 3):
        super().__init__()
        if num_segments < 2:
            raise ValueError("TRN needs at least 2 segments")
        self.num_segments = num_segments
        self.scales = list(range(num_segments, 1, -1))
        self.mlps = nn.ModuleList()
        for s in self.scales:
            self.mlps.append(nn.Sequential(nn.ReLU(), nn.Linear(s * in_dim, out_dim), nn.ReLU()))
            self.register_buffer(f"subsets_{s}", relation_subsets(num_segments, s, relations), persistent=False)

    def subsets(self, s: int) -> torch.Tensor:
        """The time-ordered subsets of size s that the module uses: (R_s, s) int64."""
        return getattr(self, f"subsets_{s}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, d = x.shape
        if n != self.num_segments:
            raise ValueError(f"expected {self.num_segments} segments, got {n}")
        per_scale = []
        for s, mlp in zip(self.scales, self.mlps):
            idx = self.subsets(s)  # (R, s)
            g = x[:, idx].reshape(B, idx.shape[0], s * d)
            per_scale.append(mlp(g).sum(dim=1))  # (B, out)
        return torch.stack(per_scale, dim=1)  # (B, n-1, out)


def relation_subsets(n: int, s: int, relations: int = 3) -> torch.Tensor:
    """The relations of scale ``s`` among ``n`` frames that TA3N's TRN uses (see :class:`TRNMultiScale`)."""
    combos = list(itertools.combinations(range(n), s))
    if relations and len(combos) > relations:
        combos = [combos[math.ceil(i * len(combos) / relations)] for i in range(relations)]
    return torch.tensor(combos, dtype=torch.int64)


# --------------------------------------------------------------------------------------
# TA3N domain attention and attentive entropy
# --------------------------------------------------------------------------------------
class DomainAttention(nn.Module):
    """TA3N domain attention (Chen et al. ICCV 2019, sec. 4.2, "TA2N"/"TA3N" attention).

    Weights ``w = 1 + (1 - H(d))`` (residual attention) where ``H(d)`` is the (natural-log)
    entropy of the domain discriminator's softmax for that frame/relation; features are
    re-weighted ``h~ = w * h``.  Binary H <= ln 2, so w in [2 - ln 2, 2].
    ``detach=True`` stops gradients into the discriminator through the weights.

    * ``weights(domain_logits)``: (..., 2) -> (...).
    * ``forward(features, domain_logits)``: features (..., d), domain_logits (..., 2) -> (..., d).
    """

    def __init__(self, detach: bool = False):
        super().__init__()
        self.detach = bool(detach)

    def weights(self, domain_logits: torch.Tensor) -> torch.Tensor:
        if self.detach:
            domain_logits = domain_logits.detach()
        return 1.0 + (1.0 - entropy(domain_logits, reduction="none"))

    def forward(self, features: torch.Tensor, domain_logits: torch.Tensor) -> torch.Tensor:
        return features * self.weights(domain_logits).unsqueeze(-1)


def attentive_entropy(logits: torch.Tensor, domain_logits: torch.Tensor) -> torch.Tensor:
    """TA3N attentive entropy loss (Chen et al. ICCV 2019, eq. 7): ``mean_i (1 + H(d_i)) H(y_i)``.

    ``H(y)`` entropy of the class prediction, ``H(d)`` of the video-level domain prediction
    (natural log).  The caller weights it by gamma = 0.003.

    Shapes: logits (B, K), domain_logits (B, 2) -> scalar.
    """
    return ((1.0 + entropy(domain_logits, reduction="none")) * entropy(logits, reduction="none")).mean()
