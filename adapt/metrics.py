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


COLLAPSE_SHARE = 0.9   # one class: this share of the clips gets one class that is at most half of the truth
COLLAPSE_COVERED = 0.5  # few classes: the classes still recognised cover less than this share of the clips ...
COLLAPSE_TOP2 = 0.8    # ... and the two most predicted classes take at least this share of the predictions
COLLAPSE_EVALS = 3     # a run is told after this many collapsed evaluations in a row


def collapsed(scores: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """Whether an evaluation's predictions have collapsed, as ``{"kind", "class", "share", "recognised",
    "covered"}``, else None.  Two rules (README, "Invalid runs"):

    * one class: at least :data:`COLLAPSE_SHARE` of the clips are predicted as one class that is at most half of
      the true labels;
    * few classes: the classes the run still recognises (recall at least half of chance, ``0.5 / classes
      present``) are the true class of less than :data:`COLLAPSE_COVERED` of the clips, while its two most
      predicted classes take at least :data:`COLLAPSE_TOP2` of the predictions (a run that lost most classes:
      CDAN predicting class 0 for almost every clip, recalls 100/0/0/0/9/0/0/0).

    An honest run on imbalanced classes keeps the frequent ones, which cover most clips, so it is not caught."""
    if not len(labels):
        return None
    pred = scores.argmax(-1)
    counts = torch.bincount(pred, minlength=scores.shape[-1]).double()
    c = int(counts.argmax())
    share = float(counts[c]) / len(pred)
    truth = float((labels == c).float().mean())
    present = torch.unique(labels[labels >= 0])
    hit = [(int(k), float((pred[labels == k] == k).float().mean())) for k in present]
    recognised = [k for k, r in hit if r >= 0.5 / max(1, len(present))]
    covered = float(torch.isin(labels, torch.tensor(recognised, dtype=labels.dtype, device=labels.device))
                    .float().mean()) if recognised else 0.0
    top2 = float(counts.topk(min(2, len(counts))).values.sum()) / len(pred)
    kind = ("one class" if share >= COLLAPSE_SHARE and truth <= 0.5 else
            "few classes" if covered < COLLAPSE_COVERED and top2 >= COLLAPSE_TOP2 and len(present) > 2 else None)
    if kind is None:
        return None
    return {"kind": kind, "class": c, "share": round(share, 4), "recognised": recognised,
            "covered": round(covered, 4)}


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
