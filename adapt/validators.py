"""Validators: scores of a checkpoint computed without target labels, so that checkpoints and settings can be
chosen the way a user without target labels must (higher is better for every validator here).

=============  ===========================================================================================
name           what it computes (p: softmax scores, f: the model's video-level features)
=============  ===========================================================================================
source_val     top-1 (%) on held-out labelled source clips (``source_holdout`` or ``source_val``)
entropy        ``-mean_i H(p_i)`` on target clips: confident target predictions (Grandvalet & Bengio 2005;
               Morerio et al. ICLR 2018 select by it)
im             information maximisation ``H(mean_i p_i) - mean_i H(p_i)``: confident and diverse
               (Krause et al. NeurIPS 2010; the IM validator of Musgrave et al. ECCV 2022)
snd            soft neighbourhood density (Saito et al. ICCV 2021, eqs. 1-3): the L2-normalised target
               scores' similarities ``M = P P^T`` (the diagonal left out), ``S = softmax(M / 0.05)`` per row,
               SND = ``mean_i H(S_i)``: high when target points sit in dense neighbourhoods
dev            deep embedded validation (You et al. ICML 2019, eqs. 6-8), negated: a logistic-regression
               domain classifier on the features gives density ratios ``w_i = (n_s / n_t) p(t|f_i) /
               p(s|f_i)`` for the source validation clips; with their losses ``l_i`` (cross-entropy) and
               ``L_i = w_i l_i``, ``eta = -Cov(L, w) / Var(w)``, DEV = ``mean(L) + eta mean(w) - eta``
oracle         target top-1 (%) on the labelled evaluation split: what a validator is compared against,
               never a choice a user without target labels can make
=============  ===========================================================================================

Natural logarithms throughout.  Each function takes numpy arrays and returns a float.
"""

from __future__ import annotations

import numpy as np
import torch

from adapt.losses import entropy

NAMES = ("source_val", "entropy", "im", "snd", "dev")
CITATIONS = {
    "source_val": "held-out source accuracy",
    "entropy": "Grandvalet & Bengio, NeurIPS 2005 (entropy); Morerio et al., ICLR 2018 (selection by it)",
    "im": "Krause et al., NeurIPS 2010 (information maximisation)",
    "snd": "Saito et al., Tune It the Right Way, ICCV 2021 (soft neighbourhood density)",
    "dev": "You et al., Towards Accurate Model Selection in Deep UDA, ICML 2019 (deep embedded validation)",
    "oracle": "target accuracy with the target labels (for comparison only)",
}
SND_TEMPERATURE = 0.05  # Saito et al. sec. 3.2


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    """Each row's entropy (:func:`adapt.losses.entropy` of probabilities, float64, eps 1e-12)."""
    return entropy(torch.from_numpy(np.asarray(p, dtype=np.float64)), "none", probs=True, eps=1e-12).numpy()


def accuracy(p: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 (%) of scores ``p`` (N, C) against ``labels`` (N,)."""
    return float((np.asarray(p).argmax(-1) == np.asarray(labels)).mean() * 100.0)


def neg_entropy(p: np.ndarray) -> float:
    """``-mean_i H(p_i)``."""
    return float(-_entropy_rows(p).mean())


def information_maximisation(p: np.ndarray) -> float:
    """``H(mean_i p_i) - mean_i H(p_i)``."""
    p = np.asarray(p, dtype=np.float64)
    return float(_entropy_rows(p.mean(axis=0)) - _entropy_rows(p).mean())


def soft_neighbourhood_density(p: np.ndarray, temperature: float = SND_TEMPERATURE) -> float:
    """Saito et al.'s SND of target scores ``p`` (N, C), N >= 2."""
    f = np.asarray(p, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    m = f @ f.T / temperature
    np.fill_diagonal(m, -np.inf)
    m -= m.max(axis=1, keepdims=True)
    s = np.exp(m)
    s /= s.sum(axis=1, keepdims=True)
    return float(_entropy_rows(s).mean())


def deep_embedded_validation(f_train: np.ndarray, f_target: np.ndarray, f_val: np.ndarray,
                             p_val: np.ndarray, y_val: np.ndarray, seed: int = 0) -> float:
    """Negated DEV risk of You et al. (higher is better): features of source train, target and source validation
    clips, the validation clips' scores and labels."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([f_train, f_target]).astype(np.float64)
    d = np.concatenate([np.zeros(len(f_train)), np.ones(len(f_target))])
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit((x - mean) / std, d)
    prob = clf.predict_proba((np.asarray(f_val, dtype=np.float64) - mean) / std)
    w = prob[:, 1] / np.maximum(prob[:, 0], 1e-12) * (len(f_train) / len(f_target))
    p = np.clip(np.asarray(p_val, dtype=np.float64), 1e-12, 1.0)
    loss = -np.log(p[np.arange(len(p)), np.asarray(y_val)])
    weighted = w * loss
    var = w.var(ddof=1) if len(w) > 1 else 0.0
    eta = -np.cov(weighted, w, ddof=1)[0, 1] / var if var > 0 else 0.0
    return float(-(weighted.mean() + eta * w.mean() - eta))


def scores(p_target: np.ndarray, source_val: tuple | None = None, f_train: np.ndarray | None = None,
           f_target: np.ndarray | None = None) -> dict:
    """Every validator the data allows: the unsupervised ones on target scores ``p_target``; with ``source_val``
    = (scores, labels, features) of held-out source clips also ``source_val`` and (given the source train and
    target features) ``dev``."""
    out = {"entropy": neg_entropy(p_target), "im": information_maximisation(p_target)}
    if len(p_target) >= 2:
        out["snd"] = soft_neighbourhood_density(p_target)
    if source_val is not None:
        p_val, y_val, f_val = source_val
        out["source_val"] = accuracy(p_val, y_val)
        if f_train is not None and f_target is not None and len(f_train) and len(f_target):
            out["dev"] = deep_embedded_validation(f_train, f_target, f_val, p_val, y_val)
    return out
