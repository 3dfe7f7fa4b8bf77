"""Loss functions for stage 2 ("adapt").

All functions are pure (no module state, no in-place updates, no ``.item()``, no boolean
indexing), so they run unchanged under ``torch.func.vmap`` over K stacked runs.  Selections
(confident pseudo-labels, valid memory-bank slots, positives) are masks combined with
``torch.where`` and masked means.

Papers: DAN (Long et al., ICML 2015) for MK-MMD; MCD (Saito et al., CVPR 2018); Kim et al.,
"Learning cross-modal contrastive features for video domain adaptation", ICCV 2021 (eqs. 1-8,
text in ``shared/papers``); InfoNCE (van den Oord et al. 2018; CMC, Tian et al. 2020);
instance-discrimination memory bank (Wu et al., CVPR 2018).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "cross_entropy",
    "tasks_ce",
    "domain_ce",
    "mk_mmd",
    "multi_gaussian_kernel",
    "mmsada_mmd",
    "mcd_discrepancy",
    "info_nce",
    "cross_modal_contrastive",
    "cross_domain_contrastive",
    "memory_bank_rows",
    "update_memory_labels",
    "entropy",
    "pseudo_label_ce",
]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask) / max(sum(mask), 1); shapes (...), (...) -> ()."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``-mean_i log softmax(logits_i)[y_i]``, the value of ``F.cross_entropy`` (labels must be
    valid class indices: no ``ignore_index``).

    Written as log-softmax and a gather because under vmap over K stacked runs ``F.cross_entropy``'s ``nll_loss``
    batching rule costs about 1.5 times as much (0.35 against 0.24 ms forward and backward, K = 8, on this
    project's 2-core CPU; a small head's step has one to six of them).

    Shapes: logits (N, C), labels (N,) int64 -> ()."""
    return -logits.log_softmax(-1).gather(-1, labels[:, None]).mean()


def tasks_ce(verb: torch.Tensor, noun: Optional[torch.Tensor], rows: slice, y: torch.Tensor,
             n: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over tasks (verb, and noun when there are noun logits and labels) of the cross-entropy of ``rows``
    (TA3N main.py:506: ``0.5 (CE_verb + CE_noun)``; verb alone on EPIC-55).

    Shapes: verb (B, V), noun (B, N) or None, y / n (len(rows),) int64 -> ()."""
    ce = [cross_entropy(verb[rows], y)]
    if noun is not None and n is not None:
        ce.append(cross_entropy(noun[rows], n))
    return sum(ce) / len(ce)


def domain_ce(logits: torch.Tensor, b_s: int) -> torch.Tensor:
    """A domain discriminator's cross-entropy with label 0 for the first ``b_s`` rows (source) and 1 for the rest
    (target); a (B, T, 2) input has one label per clip, repeated over its units, and the mean runs over every row
    (MM-SADA model.py:493-501; TA3N main.py:577-589).

    Shapes: logits (B, 2) or (B, T, 2) -> ()."""
    labels = (torch.arange(logits.shape[0], device=logits.device) >= b_s).long()
    if logits.dim() == 3:
        labels = labels[:, None].expand(logits.shape[:2])
    return cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))


# --------------------------------------------------------------------------------------
# MK-MMD (DAN)
# --------------------------------------------------------------------------------------
def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances; x (n, d), y (m, d) -> (n, m), clamped at 0."""
    xx = (x * x).sum(-1)
    yy = (y * y).sum(-1)
    return (xx[:, None] + yy[None, :] - 2.0 * x @ y.transpose(-1, -2)).clamp_min(0.0)


def multi_gaussian_kernel(x: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5,
                        fix_sigma: Optional[float] = None) -> torch.Tensor:
    """Multi-kernel Gram matrix of DAN (Long et al. 2015, eq. 3 family of Gaussian kernels).

    ``K_ij = (1/m) sum_u exp(-||x_i - x_j||^2 / sigma_u)``, ``sigma_u = sigma_0 * kernel_mul^(u - m//2)``,
    u = 0..m-1 (m = kernel_num), and ``sigma_0`` the mean squared distance over the distinct
    pairs of the pooled sample (detached; or ``fix_sigma``).  Uniform weights beta_u = 1/m
    (DAN constrains sum beta_u = 1; the public DAN code sums the kernels, i.e. m times this).

    Shapes: x (n, d) -> (n, n).
    """
    n = x.shape[0]
    d2 = _sq_dists(x, x)
    if fix_sigma is None:
        sigma0 = d2.detach().sum() / (n * n - n)
    else:
        sigma0 = torch.as_tensor(fix_sigma, dtype=x.dtype, device=x.device)
    sigma0 = sigma0.clamp_min(1e-12)
    mults = kernel_mul ** (torch.arange(kernel_num, dtype=x.dtype, device=x.device) - kernel_num // 2)
    sigmas = sigma0 * mults  # (m,)
    return torch.exp(-d2[None, :, :] / sigmas[:, None, None]).mean(0)


def mk_mmd(x_s: torch.Tensor, x_t: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5,
           fix_sigma: Optional[float] = None, unbiased: bool = False) -> torch.Tensor:
    """Multi-kernel MMD^2 between source and target features (DAN, Long et al. 2015, eq. 2-3).

    ``MMD^2 = mean(K_ss) + mean(K_tt) - 2 mean(K_st)`` with the kernel of
    :func:`multi_gaussian_kernel` computed on the pooled sample (bandwidth from all pooled pairs).
    Default: the biased (V-statistic) estimator, block means including the diagonals (>= 0).
    ``unbiased=True``: the U-statistic, the K_ss and K_tt means exclude the diagonal
    (needs n_s, n_t >= 2).  Works with unequal batch sizes n_s != n_t.

    Shapes: x_s (n_s, d), x_t (n_t, d) -> scalar.
    """
    ns, nt = x_s.shape[0], x_t.shape[0]
    K = multi_gaussian_kernel(torch.cat([x_s, x_t], dim=0), kernel_mul, kernel_num, fix_sigma)
    k_ss, k_tt, k_st = K[:ns, :ns], K[ns:, ns:], K[:ns, ns:]
    if unbiased:
        m_ss = (k_ss.sum() - k_ss.diagonal().sum()) / (ns * (ns - 1))
        m_tt = (k_tt.sum() - k_tt.diagonal().sum()) / (nt * (nt - 1))
    else:
        m_ss, m_tt = k_ss.mean(), k_tt.mean()
    return m_ss + m_tt - 2.0 * k_st.mean()


MMSADA_BANDWIDTHS = tuple(float(9.7 * 2.0 ** g) for g in np.arange(-8, 8, np.sqrt(2)))
"""The 12 RBF bandwidths of MM-SADA's MMD baseline (model.py:521-522, 530-531): 9.7 x 2^g, g = -8, -8 + sqrt 2, ..."""


def mmsada_mmd(x_s: torch.Tensor, x_t: torch.Tensor, bandwidths=MMSADA_BANDWIDTHS) -> torch.Tensor:
    """Biased MMD^2 with the sum of RBF kernels ``k(x, y) = sum_g exp(-||x - y||^2 / gamma_g)`` (MM-SADA mmd.py:27-54,
    ``mix_rbf_mmd2`` with ``biased=True``): ``mean K_ss + mean K_tt - 2 mean K_st``.

    Shapes: x_s (n_s, d), x_t (n_t, d) -> scalar.
    """
    ns = x_s.shape[0]
    x = torch.cat([x_s, x_t], dim=0)
    d2 = _sq_dists(x, x)
    gammas = torch.tensor(bandwidths, dtype=x.dtype, device=x.device)
    K = torch.exp(-d2[None] / gammas[:, None, None]).sum(0)
    return K[:ns, :ns].mean() + K[ns:, ns:].mean() - 2.0 * K[:ns, ns:].mean()


# --------------------------------------------------------------------------------------
# MCD
# --------------------------------------------------------------------------------------
def mcd_discrepancy(p1_logits: torch.Tensor, p2_logits: torch.Tensor) -> torch.Tensor:
    """Classifier discrepancy of MCD (Saito et al. 2018, eq. 1): ``d = mean |softmax(p1) - softmax(p2)|``.

    The mean runs over the batch and the K classes (the public MCD code; the paper's d(p1, p2)
    is (1/K) sum_k |p1k - p2k| averaged over samples - the same number).

    Shapes: p1_logits, p2_logits (B, K) -> scalar.
    """
    return (F.softmax(p1_logits, dim=-1) - F.softmax(p2_logits, dim=-1)).abs().mean()


# --------------------------------------------------------------------------------------
# Contrastive losses (Kim et al. ICCV 2021)
# --------------------------------------------------------------------------------------
def info_nce(query: torch.Tensor, key: torch.Tensor, tau: float = 0.1, negatives: Optional[torch.Tensor] = None,
             neg_mask: Optional[torch.Tensor] = None, in_batch: bool = True, normalize: bool = True,
             reduction: str = "mean") -> torch.Tensor:
    """InfoNCE (van den Oord et al. 2018; CMC, Tian et al. 2020), the per-anchor form of Kim et al. eq. 2.

    For anchor i: ``l_i = -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_{n in N_i} exp(q_i.n/tau)) )``
    where ``N_i`` = the other rows of ``key`` (``in_batch=True``) plus the rows of ``negatives``
    allowed by ``neg_mask``.  With ``normalize`` the vectors are L2-normalised first (cosine /
    tau).

    Shapes: query (N, d), key (N, d) (row i is the positive of query i); negatives (M, d) shared
    or (N, M, d) per query; neg_mask (N, M) or (M,) bool (True = use).  Returns a scalar
    (``reduction='mean'``) or (N,) (``'none'``).  ``reduction='sum_in_log'`` is Kim et al.'s eq. 2 as written,
    the sums over anchors inside the log: ``-log( sum_i exp(pos_i) / sum_i (exp(pos_i) + sum_{n in N_i}
    exp(q_i.n/tau)) )``, one ratio for the batch.
    """
    if normalize:
        query = F.normalize(query, dim=-1)
        key = F.normalize(key, dim=-1)
    pos = (query * key).sum(-1) / tau  # (N,)
    cols = [pos[:, None]]
    if in_batch:
        sim = query @ key.transpose(-1, -2) / tau  # (N, N)
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        cols.append(torch.where(eye, torch.full_like(sim, float("-inf")), sim))
    if negatives is not None:
        if normalize:
            negatives = F.normalize(negatives, dim=-1)
        if negatives.dim() == 2:
            neg = query @ negatives.transpose(-1, -2) / tau  # (N, M)
        else:
            neg = torch.einsum("nd,nmd->nm", query, negatives) / tau
        if neg_mask is not None:
            neg = torch.where(neg_mask.expand_as(neg), neg, torch.full_like(neg, float("-inf")))
        cols.append(neg)
    logits = torch.cat(cols, dim=1)
    if reduction == "sum_in_log":
        return torch.logsumexp(logits.reshape(-1), dim=0) - torch.logsumexp(pos, dim=0)
    loss = torch.logsumexp(logits, dim=1) - pos
    if reduction == "none":
        return loss
    return loss.mean()


def cross_modal_contrastive(z_a: torch.Tensor, z_b: torch.Tensor, tau: float = 0.1,
                            negatives_a: Optional[torch.Tensor] = None, negatives_b: Optional[torch.Tensor] = None,
                            neg_mask: Optional[torch.Tensor] = None, normalize: bool = True,
                            reduction: str = "mean", directions: str = "mean") -> torch.Tensor:
    """Cross-modal contrastive loss of Kim et al. (ICCV 2021, eqs. 1-3), one domain at a time.

    Reading of eq. 2: each clip's feature in modality k is an anchor; its positive is the other
    modality l != k of the *same* clip, its negatives the other modality of every other clip of
    the same domain's batch (regardless of label); only cross-modal pairs are contrasted.  The
    ``sum_{s_i}`` of eq. 2 is read as the average of per-anchor InfoNCE terms (the CMC form the
    paper follows) and both directions (k, l) = (a, m) and (m, a) are averaged:
    ``L_mo = 0.5 * (InfoNCE(z_a -> z_b) + InfoNCE(z_b -> z_a))``.  The similarity is eq. 1,
    ``exp(h(F_i)^T h(F_j) / tau)``; the caller applies the shared projection head h
    (:class:`adapt.parts.ProjectionHead`), and the vectors are L2-normalised here if
    ``normalize``.  Call once per domain (L_mo^s, L_mo^t; never mix domains).

    Optional memory-bank negatives (Kim et al. "Leveraging memory banks"): ``negatives_b``
    (M, d) are extra modality-b negatives for the a-anchors, ``negatives_a`` for the b-anchors,
    ``neg_mask`` (N, M) or (M,) marks usable slots (e.g. False at the batch clips' own slots).

    Shapes: z_a, z_b (N, d) -> scalar.
    """
    l_ab = info_nce(z_a, z_b, tau, negatives=negatives_b, neg_mask=neg_mask, normalize=normalize, reduction=reduction)
    l_ba = info_nce(z_b, z_a, tau, negatives=negatives_a, neg_mask=neg_mask, normalize=normalize, reduction=reduction)
    return l_ab + l_ba if directions == "sum" else 0.5 * (l_ab + l_ba)


def cross_domain_contrastive(anchors: torch.Tensor, anchor_labels: torch.Tensor, use: torch.Tensor,
                             keys: torch.Tensor, key_labels: torch.Tensor, tau: float = 0.1,
                             normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Cross-domain contrastive loss of Kim et al. (ICCV 2021, eqs. 4-6), one modality.

    Anchors are the target clips whose pseudo-label is confident (``use``: softmax of the two streams' averaged
    logits above 0.8); keys are the source memory bank's entries (eq. 8; ``key_labels`` their ground-truth labels,
    < 0 for slots not written yet).  For anchor i, positives P_i are the keys of its pseudo-class, negatives the
    keys of other classes, and with ``phi = exp(f_i . k_j / tau)`` (eq. 4: no projection head; L2-normalised if
    ``normalize``):

        ``l_i = -log( sum_{j in P_i} phi_ij / sum_{j valid} phi_ij )``,

    the per-anchor reading of eq. 5's ratio; the loss is ``sum_i l_i / A`` over the confident anchors with at least
    one positive, A being every anchor of the batch (confident or not), so its strength grows with the share of
    confident pseudo-labels: a few early confident clips, often of one class, do not get the weight of a full
    batch (which drags every target clip to that class: the collapse ``tests/test_methods.py`` reproduces).  ``reduction='sum_in_log'`` is eq. 5 as written, the sums over the anchors
    inside the log: ``-log( sum_i sum_{j in P_i} phi_ij / sum_i sum_{j valid} phi_ij )`` over those anchors, where an
    anchor whose positives are far (a wrong pseudo-label) adds little to the numerator and so pulls little.

    Shapes: anchors (A, d), anchor_labels (A,) int, use (A,) bool, keys (M, d), key_labels (M,) int -> scalar.
    """
    if normalize:
        anchors = F.normalize(anchors, dim=-1)
        keys = F.normalize(keys, dim=-1)
    sim = anchors @ keys.to(anchors.dtype).transpose(-1, -2) / tau  # (A, M)
    valid = (key_labels >= 0)[None, :].expand_as(sim)
    pos = valid & (anchor_labels.to(torch.int64)[:, None] == key_labels.to(torch.int64)[None, :])
    has_pos = pos.any(dim=1)
    # rows without a positive get a dummy mask (kept finite, masked out of the mean)
    pos_safe = torch.where(has_pos[:, None], pos, torch.ones_like(pos))
    valid_safe = torch.where(has_pos[:, None], valid, torch.ones_like(valid))
    neg_inf = torch.full_like(sim, float("-inf"))
    if reduction == "sum_in_log":
        rows = (use & has_pos)[:, None]
        both = torch.logsumexp(torch.where(rows & valid_safe, sim, neg_inf).reshape(-1), dim=0)
        positive = torch.logsumexp(torch.where(rows & pos_safe, sim, neg_inf).reshape(-1), dim=0)
        any_row = rows.any()
        return torch.where(any_row, both - torch.where(any_row, positive, both), torch.zeros_like(both))
    per_anchor = (torch.logsumexp(torch.where(valid_safe, sim, neg_inf), dim=1)
                  - torch.logsumexp(torch.where(pos_safe, sim, neg_inf), dim=1))
    return (per_anchor * (use & has_pos).to(per_anchor.dtype)).sum() / max(1, per_anchor.shape[0])


def memory_bank_rows(bank: torch.Tensor, idx: torch.Tensor, feats: torch.Tensor, momentum: float = 0.5,
                     normalize: bool = True) -> torch.Tensor:
    """The new rows of a memory bank's momentum update (Kim et al. eq. 8, following Wu et al. 2018).

    ``normalize(delta * M[idx_b] + (1 - delta) * F_b)`` with ``delta = momentum`` (0.5).  ``feats`` is detached
    (banks carry no gradient).  A bank initialised with zeros therefore holds the normalised feature after its
    first update.  The trainer writes these rows into its banks in place after the step
    (:func:`adapt.step.apply_writes`): an out-of-place bank would be copied whole every step.

    Shapes: bank (N, d), idx (B,) int64 in [0, N), feats (B, d) -> rows (B, d).
    """
    old = bank.index_select(0, idx.to(torch.int64))
    new = momentum * old + (1.0 - momentum) * feats.detach().to(bank.dtype)
    return F.normalize(new, dim=-1) if normalize else new


def update_memory_labels(labels: torch.Tensor, idx: torch.Tensor, new_labels: torch.Tensor) -> torch.Tensor:
    """Write labels (source labels, or target pseudo-labels with -1 = not confident) into bank slots.

    Shapes: labels (N,) int64, idx (B,), new_labels (B,) -> (N,) (out of place).
    """
    return labels.index_copy(0, idx.to(torch.int64), new_labels.to(labels.dtype))


# --------------------------------------------------------------------------------------
# Entropy and self-training
# --------------------------------------------------------------------------------------
def entropy(x: torch.Tensor, reduction: str = "mean", probs: bool = False, eps: float = 0.0) -> torch.Tensor:
    """The entropy of a prediction, natural log, over the last axis; the one implementation every method, part and
    validator uses:

    * from logits (default): ``H(p) = -sum_k p_k log p_k`` with ``p = softmax(x)``, through ``log_softmax``
      (entropy minimisation, Grandvalet & Bengio 2005; TA3N's ``H(y)`` and ``H(d)``, loss.py:15-25);
    * from probabilities (``probs=True``): ``H(p) = -sum_k p_k log(p_k + eps)`` as the references write it
      (SHOT loss.py:9-14 and CDAN loss.py:33 with ``eps = 1e-5``; the validators with 1e-12).

    Shapes: (..., K) -> scalar (``reduction='mean'``) or (...) (``'none'``)."""
    if probs:
        h = -(x * torch.log(x + eps)).sum(dim=-1)
    else:
        logp = F.log_softmax(x, dim=-1)
        h = -(logp.exp() * logp).sum(dim=-1)
    return h.mean() if reduction == "mean" else h


def pseudo_label_ce(logits: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """Confidence-thresholded self-training CE (pseudo-labelling; the baseline of Kim et al. Table 4).

    ``y^_i = argmax_k p_ik``, ``c_i = max_k p_ik`` (p from detached logits);
    ``L = sum_i 1[c_i > threshold] CE(logits_i, y^_i) / max(sum_i 1[c_i > threshold], 1)``.

    Shapes: logits (B, K) -> scalar (0 when no sample is confident).
    """
    probs = F.softmax(logits.detach(), dim=-1)
    conf, lab = probs.max(dim=-1)
    ce = F.cross_entropy(logits, lab, reduction="none")
    return _masked_mean(ce, conf > threshold)
