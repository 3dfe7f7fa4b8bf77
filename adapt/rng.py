"""Stateless, counter-based random numbers for the adaptation heads.

The stage-2 trainer stacks K runs into one model and calls it with
``torch.func.vmap(functional_call(...))``.  The global torch RNG cannot be used
inside such a forward (vmap refuses random ops in its default mode, and even
where allowed the draws would depend on how many runs are batched together).
So every random draw here is a pure function of an integer *key*:

    uniform(key, shape, salt) = hash(key, salt, counter) / 2**32,   counter = 0..numel-1

This is the counter-based design of Salmon et al., "Parallel random numbers: as easy as
1, 2, 3" (SC 2011), with a simpler bijective-mix hash: MurmurHash3_x86_32 (Appleby) applied to the 32-bit words
``(key_lo, key_hi, salt, counter)`` and finished with its ``fmix32`` avalanche
step.  All arithmetic is done on int64 tensors holding 32-bit values; every
multiplication (which may wrap in int64) is immediately masked with
``0xFFFFFFFF`` so the subsequent right shifts act on non-negative numbers.
Because only elementwise integer ops are used, the same key gives the same bits
whether the function is called alone or under ``vmap`` with other keys.

Keys are int64 tensors (a scalar per run; a batched scalar under vmap).  Derive
sub-keys with :func:`fold`, e.g. ``fold(run_key, step)`` per optimisation step
and ``fold(step_key, layer_id)`` per dropout layer, so that no two layers or
steps share a mask.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["as_key", "fold", "split", "uniform", "bernoulli", "dropout", "MASK32"]

MASK32 = 0xFFFFFFFF
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_SEED_LO = 0x9747B28C
_SEED_HI = 0x5BD1E995
_SEED_U = 0x2545F491

KeyLike = Union[int, torch.Tensor]


def as_key(key: KeyLike, device=None) -> torch.Tensor:
    """Return ``key`` as an int64 tensor (shape unchanged; a Python int becomes a 0-d tensor).

    Shapes: int or int tensor of any shape -> int64 tensor of the same shape.
    """
    if isinstance(key, torch.Tensor):
        if key.dtype != torch.int64:
            key = key.to(torch.int64)
        return key
    return torch.tensor(int(key), dtype=torch.int64, device=device)


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    """32-bit rotate-left of int64 tensors holding 32-bit values (MurmurHash3 ROTL32); shape kept."""
    return ((x << r) | (x >> (32 - r))) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 ``fmix32`` finaliser (Appleby) on int64 tensors holding 32-bit values; shape kept."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    h = h ^ (h >> 16)
    return h


def _absorb(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One MurmurHash3_x86_32 block step: mix the 32-bit word ``w`` into state ``h``."""
    w = (w & MASK32) * _C1 & MASK32
    w = _rotl(w, 15)
    w = (w * _C2) & MASK32
    h = h ^ w
    h = _rotl(h, 13)
    h = (h * 5 + 0xE6546B64) & MASK32
    return h


def _murmur(words: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """MurmurHash3_x86_32 of a sequence of 32-bit words; words broadcast elementwise -> hash of that shape."""
    h = torch.as_tensor(seed, dtype=torch.int64, device=words[0].device)
    for w in words:
        h = _absorb(h, w)
    h = h ^ (4 * len(words))
    return _fmix32(h)


def split(key: torch.Tensor):
    """Split an int64 key into its low and high 32-bit words, both in [0, 2**32).

    Shapes: key (...) -> (lo (...), hi (...)).
    """
    key = as_key(key)
    return key & MASK32, (key >> 32) & MASK32


def fold(key: KeyLike, *data: KeyLike) -> torch.Tensor:
    """Derive a sub-key from ``key`` and integers ``data`` (e.g. step, layer id).

    ``new = (murmur3(seed_hi; words) & 0x7FFFFFFF) << 32 | murmur3(seed_lo; words)``
    where ``words = (key_lo, key_hi, d1_lo, d1_hi, d2_lo, ...)``.  The result is a
    non-negative int64.  Pure elementwise integer ops, so it can be batched under vmap
    (``key`` batched, ``data`` Python ints or int tensors, possibly batched too).

    Shapes: key () (or any shape), each datum () or broadcastable -> key of the broadcast shape.
    """
    key = as_key(key)
    words = list(split(key))
    for d in data:
        d = as_key(d, device=key.device)
        lo, hi = split(d)
        words += [lo, hi]
    lo = _murmur(words, _SEED_LO)
    hi = _murmur(words, _SEED_HI) & 0x7FFFFFFF
    return (hi << 32) | lo


def _bits(key: KeyLike, shape, salt: int = 0) -> torch.Tensor:
    """32-bit hashes murmur3(key_lo, key_hi, salt, counter), counter = 0..numel-1; key () -> ``shape``."""
    key = as_key(key)
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    lo, hi = split(key)
    salt_t = torch.as_tensor(int(salt) & MASK32, dtype=torch.int64, device=key.device)
    # Hash the scalar words once, then absorb the counter last.
    h = torch.as_tensor(_SEED_U, dtype=torch.int64, device=key.device)
    h = _absorb(h, lo)
    h = _absorb(h, hi)
    h = _absorb(h, salt_t)
    counter = torch.arange(numel, dtype=torch.int64, device=key.device)
    h = _absorb(h, counter)
    h = _fmix32(h ^ 16)
    return h.reshape(shape)


def uniform(key: KeyLike, shape, salt: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) from a counter-based hash (no global RNG state).

    ``u[c] = (murmur3(key_lo, key_hi, salt, c) >> 8) * 2**-24`` for ``c = 0..numel-1``
    (24 random bits, exactly representable in float32, so ``u < 1`` always).

    Shapes: key () int64 (batched scalar under vmap), shape tuple -> tensor of ``shape``.
    """
    h = _bits(key, shape, salt)
    return (h >> 8).to(dtype) * (2.0 ** -24)


def bernoulli(key: KeyLike, shape, p_keep: float, salt: int = 0) -> torch.Tensor:
    """Boolean keep-mask with P(True) = ``p_keep``; shapes: key () -> bool tensor of ``shape``."""
    return uniform(key, shape, salt) < p_keep


def dropout(x: torch.Tensor, p: float, key: KeyLike = None, training: bool = True, salt: int = 0) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014) driven by :func:`uniform`.

    ``y = x * 1[u >= p] / (1 - p)`` with ``u = uniform(key, x.shape, salt)``; identity when
    ``training`` is False or ``p == 0``.  ``p`` must be a Python float (it selects the code
    path, never a tensor value).  The mask depends only on (key, salt, x.shape): under vmap
    ``x.shape`` is the per-run shape, so a run's mask equals the mask of a separate call.

    Shapes: x (...), key () int64 -> (...).
    """
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if key is None:
        raise ValueError("dropout in training mode needs an rng key (adapt.rng)")
    keep = uniform(key, x.shape, salt) >= p
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))
