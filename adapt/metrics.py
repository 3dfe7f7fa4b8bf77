"""Evaluation metrics as the papers report them, and the EPIC-100 challenge file.

* top-1 target accuracy; MM-SADA reports the mean over the last 9 evaluations (``last_mean``);
* per-class recall (the classes are strongly imbalanced);
* EPIC-100: verb, noun and action top-1 / top-5, where an action is correct when both verb and noun are among
  the top k (TA3N / EPIC-100 evaluation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C), (N,) -> (N,) bool: the label is among the k highest scores."""
    k = min(k, scores.shape[-1])
    return (scores.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


def accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    return 100.0 * float(topk_correct(scores, labels, k).float().mean())


COLLAPSE_SHARE = 0.9   # an evaluation has collapsed when this share of its clips gets one class ...
COLLAPSE_EVALS = 3     # ... that is at most half of the true labels; a run is told after this many in a row


def collapsed(scores: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """{"class", "share"} when at least :data:`COLLAPSE_SHARE` of the clips are predicted as one class that is at
    most half of the true labels (a method that lost every class but one), else None."""
    pred = scores.argmax(-1)
    counts = torch.bincount(pred, minlength=scores.shape[-1])
    c = int(counts.argmax())
    share = float(counts[c]) / max(1, len(pred))
    truth = float((labels == c).float().mean()) if len(labels) else 0.0
    return {"class": c, "share": round(share, 4)} if share >= COLLAPSE_SHARE and truth <= 0.5 else None


def per_class_recall(scores: torch.Tensor, labels: torch.Tensor, classes: int) -> list:
    """Recall (%) of each class; None for classes absent from the labels."""
    pred = scores.argmax(dim=-1)
    out = []
    for c in range(classes):
        mask = labels == c
        out.append(None if not mask.any() else round(100.0 * float((pred[mask] == c).float().mean()), 3))
    return out


def epic100(verb: torch.Tensor, noun: torch.Tensor, y_verb: torch.Tensor, y_noun: torch.Tensor) -> dict:
    """Verb / noun / action top-1 and top-5 (%)."""
    out = {}
    for k in (1, 5):
        v, n = topk_correct(verb, y_verb, k), topk_correct(noun, y_noun, k)
        out[f"verb_top{k}"] = 100.0 * float(v.float().mean())
        out[f"noun_top{k}"] = 100.0 * float(n.float().mean())
        out[f"action_top{k}"] = 100.0 * float((v & n).float().mean())
    return out


def last_mean(values: list[float], n: int = 9) -> float:
    """Mean of the last ``n`` values (MM-SADA: top-1 averaged over the last 9 evaluations)."""
    tail = values[-n:]
    return float(np.mean(tail)) if tail else float("nan")


def write_challenge_json(path: Path, ids, verb_scores: torch.Tensor, noun_scores: torch.Tensor) -> None:
    """The EPIC-KITCHENS-100 UDA challenge submission: scores of every verb and noun class per narration_id."""
    results = {}
    v, n = verb_scores.cpu().numpy(), noun_scores.cpu().numpy()
    for i, nid in enumerate(ids):
        results[str(nid)] = {"verb": {str(c): float(s) for c, s in enumerate(v[i])},
                             "noun": {str(c): float(s) for c, s in enumerate(n[i])}}
    doc = {"version": "0.2", "challenge": "domain_adaptation", "sls_pt": 2, "sls_tl": 3, "sls_td": 3,
           "results": results}
    write_atomic(path, json.dumps(doc))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:  # a full disk raises at close, without the file's name
        e.filename = e.filename or str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
