"""Reference implementations the tests check the library against, and small modules only the tests use
(the library composes its heads from :mod:`adapt.parts` directly)."""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import nn

from adapt import losses, rng
from adapt.parts import grad_reverse, time_mean


class GradReverse(nn.Module):
    """Module form of :func:`grad_reverse` (MM-SADA sec. 3.3, GRL before each D_m, eq. 2).

    ``forward(x, coeff=None)`` uses ``coeff`` if given, else the constructor's default.
    Shapes: x (...) -> (...).
    """

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor, coeff: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        return grad_reverse(x, self.coeff if coeff is None else coeff)


class TemporalAverage(nn.Module):
    """Temporal average pooling (TSN consensus; TA3N "AvgPool"): ``v = (1/n) sum_t x_t``.

    Shapes: x (B, n, ...) -> (B, ...) (mean over ``dim``, default 1).
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return time_mean(x, self.dim)


class Classifier(nn.Module):
    """Linear action classifier G_m (MM-SADA eq. 1; late fusion sums the logits of modalities).

    Shapes: x (..., in_dim) -> logits (..., num_classes).
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class VerbNounClassifier(nn.Module):
    """Two linear heads for EPIC-100 (97 verbs, 300 nouns; TA3N / TBN EPIC-100 heads).

    Shapes: x (..., in_dim) -> (verb_logits (..., num_verbs), noun_logits (..., num_nouns)).
    """

    def __init__(self, in_dim: int, num_verbs: int = 97, num_nouns: int = 300):
        super().__init__()
        self.verb = nn.Linear(in_dim, num_verbs)
        self.noun = nn.Linear(in_dim, num_nouns)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.verb(x), self.noun(x)


def update_memory_bank(bank: torch.Tensor, idx: torch.Tensor, feats: torch.Tensor, momentum: float = 0.5,
                       normalize: bool = True) -> torch.Tensor:
    """Momentum update of a memory bank, out of place: :func:`memory_bank_rows` written into a copy.

    ``M[idx_b] <- normalize(delta * M[idx_b] + (1 - delta) * F_b)``; other rows are unchanged.  ``idx`` must not
    repeat within one call (index_copy keeps an arbitrary one).  Use one bank per domain and modality (M_s^a,
    M_s^m, M_t^a, M_t^m).

    Shapes: bank (N, d), idx (B,) int64 in [0, N), feats (B, d) -> new bank (N, d).
    """
    return bank.index_copy(0, idx.to(torch.int64), losses.memory_bank_rows(bank, idx, feats, momentum, normalize))


def uniform(key: rng.KeyLike, shape, salt: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) from a counter-based hash (no global RNG state).

    ``u[c] = (murmur3(c; seed(key, salt)) >> 8) * 2**-24`` for ``c = 0..numel-1``
    (24 random bits, exactly representable in float32, so ``u < 1`` always).

    Shapes: key () int64 (batched scalar under vmap), shape tuple -> tensor of ``shape``.
    """
    return rng._srl(rng._bits(key, shape, salt), 8).to(dtype).mul_(2.0 ** -24)


def bernoulli(key: rng.KeyLike, shape, p_keep: float, salt: int = 0) -> torch.Tensor:
    """Boolean keep-mask with P(True) = ``p_keep``; shapes: key () -> bool tensor of ``shape``."""
    return uniform(key, shape, salt) < p_keep


def features(store, modality: str, rows=None):
    """A store's features of ``modality`` read whole (through the library's reader), or the given rows."""
    x = store.reader(modality).rows(0, store.num_clips)
    return x if rows is None else x[rows]
