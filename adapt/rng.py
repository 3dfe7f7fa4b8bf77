"""Stateless, counter-based random numbers for the adaptation heads.

The stage-2 trainer stacks K runs into one model and calls it with
``torch.func.vmap(functional_call(...))``.  The global torch RNG cannot be used
inside such a forward (vmap refuses random ops in its default mode, and even
where allowed the draws would depend on how many runs are batched together).
So every random draw here is a pure function of an integer *key*:

    bits(key, shape, salt) = hash(seed(key, salt), counter),   counter = 0..numel-1

(:func:`dropout` takes several narrower draws from each hash instead: 32 one-bit draws for p = 0.5).
This is the counter-based design of Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011), with
simpler hashes. Keys (one int64 per run and step, a few per step) are derived with the SplitMix64 finaliser
(Steele, Lea and Flood, OOPSLA 2014): a handful of int64 ops per scalar. The per-element hash is
MurmurHash3_x86_32 (Appleby) of the 32-bit counter word with a 32-bit seed, finished with its ``fmix32`` avalanche
step; it runs in place on int32 tensors, whose products wrap modulo 2**32 as the C reference does, so a mask costs
a few passes over memory. Because only elementwise integer ops are used, the same key gives the same bits whether
the function is called alone or under ``vmap`` with other keys.

The narrow draws (a p = 0.5 mask takes one bit of each 32-bit hash) are a micro-optimisation: a K = 8 stacked
dropout of 8 x 128 x 512 takes 1.2 ms against 2.1 ms for one draw per element (bench/README.md).

Keys are int64 tensors (a scalar per run; a batched scalar under vmap).  Derive
sub-keys with :func:`fold`, e.g. ``fold(run_key, step)`` per optimisation step
and ``fold(step_key, layer_id)`` per dropout layer, so that no two layers or
steps share a mask.
"""
from __future__ import annotations

import functools
import math
from typing import Union

import numpy as np
import torch

__all__ = ["as_key", "fold", "fold_int", "dropout", "keep_mask", "draw_bits", "MASK32"]

MASK32 = 0xFFFFFFFF
_C1 = 0xCC9E2D51
_C2 = 0x1B873593

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


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - 2 ** 64 if c >= 2 ** 63 else c


# SplitMix64's increment and finaliser multipliers (unsigned), and the int64 values with the same bits
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GOLDEN, _MIX1, _MIX2 = _s64(GOLDEN), _s64(MIX1), _s64(MIX2)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (products wrap modulo 2**64; shifts are logical)."""
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * _MIX1
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def fold(key: KeyLike, *data: KeyLike) -> torch.Tensor:
    """Derive a sub-key from ``key`` and integers ``data`` (e.g. step, layer id).

    ``key <- mix64(key + (d + 1) * golden)`` for each datum ``d`` in turn (SplitMix64's step and finaliser),
    then the sign bit is cleared: a non-negative int64.  Pure elementwise integer ops, so it can be batched under
    vmap (``key`` batched, ``data`` Python ints or int tensors, possibly batched too).

    Shapes: key () (or any shape), each datum () or broadcastable -> key of the broadcast shape.
    """
    key = as_key(key)
    for d in data:
        if isinstance(d, int):  # a constant: (d + 1) * golden is computed here, one tensor op fewer per datum
            key = _mix64(key + _s64(((d + 1) * GOLDEN) % 2 ** 64))
        else:
            key = _mix64(key + (as_key(d, device=key.device) + 1) * _GOLDEN)
    return key & (2 ** 63 - 1)


def fold_int(key: int, *data: int) -> int:
    """:func:`fold` on Python integers (the same value), for keys the host derives without a tensor op."""
    m = 2 ** 64 - 1
    for d in data:
        z = (key + (d + 1) * GOLDEN) & m
        z = ((z ^ (z >> 30)) * MIX1) & m
        z = ((z ^ (z >> 27)) * MIX2) & m
        key = z ^ (z >> 31)
    return key & (2 ** 63 - 1)


def _int32(h: torch.Tensor) -> torch.Tensor:
    """int64 tensors holding 32-bit values -> int32 tensors with the same bits (two's complement)."""
    return torch.where(h >= 2 ** 31, h - 2 ** 32, h).to(torch.int32)


def _srl(h: torch.Tensor, r: int) -> torch.Tensor:
    """Logical right shift of int32 tensors read as unsigned 32-bit words (a new tensor)."""
    return (h >> r).bitwise_and_((1 << (32 - r)) - 1)


_COUNTER_WORDS: dict = {}


def _counter_words(numel: int, device) -> torch.Tensor:
    """The counters 0..numel-1 after MurmurHash3's key-independent word scramble (``w * C1``, ``rotl 15``,
    ``* C2``), as int32; cached per size and device (a few sizes per model)."""
    cache_key = (numel, str(device))
    w = _COUNTER_WORDS.get(cache_key)
    if w is None:
        c = torch.arange(numel, dtype=torch.int64, device=device)
        w = (c * _C1) & MASK32
        w = _rotl(w, 15)
        w = _int32((w * _C2) & MASK32)
        if len(_COUNTER_WORDS) >= 32:
            _COUNTER_WORDS.pop(next(iter(_COUNTER_WORDS)))
        _COUNTER_WORDS[cache_key] = w
    return w


def _signed(c: int) -> int:
    return c - 2 ** 32 if c >= 2 ** 31 else c


def _bits(key: KeyLike, shape, salt: int = 0) -> torch.Tensor:
    """32-bit hashes murmur3(counter; seed = low 32 bits of fold(key, salt)), counter = 0..numel-1;
    key () -> ``shape``.

    Returned as int32 holding the same bits (read them with :func:`_srl`).  The seed is derived in int64;
    the per-element part runs in place on int32 (products wrap modulo 2**32 as in the C reference), about 20x
    less work than int64 tensors with a mask after every product."""
    key = as_key(key)
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    seed = fold(key, int(salt) & MASK32)
    seed = seed.to(torch.int32)                             # its low 32 bits (the conversion wraps)
    h = _counter_words(numel, key.device) ^ seed           # MurmurHash3 block: h ^ w
    h = (h << 13).bitwise_or_(_srl(h, 19))                  # rotl 13
    h.mul_(5).add_(_signed(0xE6546B64))
    h.bitwise_xor_(4)                                       # length: one 4-byte word
    h.bitwise_xor_(_srl(h, 16)).mul_(_signed(0x85EBCA6B))   # fmix32
    h.bitwise_xor_(_srl(h, 13)).mul_(_signed(0xC2B2AE35))
    h.bitwise_xor_(_srl(h, 16))
    return h.reshape(shape)


@functools.lru_cache(maxsize=None)
def draw_bits(p: float) -> tuple[int, int]:
    """The width ``b`` of :func:`dropout`'s draws for drop probability ``p`` and its threshold ``t``: the smallest
    ``b`` in (1, 2, 4, 8, 16) with ``p * 2**b`` a whole number (``p`` taken in float32), ``t = p * 2**b``;
    otherwise ``b = 16`` and ``t = ceil(p * 2**16)``.  A ``b``-bit draw ``u`` is kept when ``u >= t``: P(keep) =
    1 - p exactly for the first case, up to ``p``'s rounding to a multiple of 2**-16 for the second.
    E.g. p = 0.5 -> (1, 1): one bit per element; p = 0.25 -> (2, 1); p = 0.1 -> (16, 6554)."""
    p32 = float(np.float32(p))
    for b in (1, 2, 4, 8, 16):
        if (p32 * 2 ** b).is_integer():
            return b, int(p32 * 2 ** b)
    return 16, math.ceil(p32 * 2 ** 16)


_FIELD_SHIFTS: dict = {}


def _fields(words: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """The first ``n`` ``b``-bit fields of int32 hash words, lowest field of each word first, as unsigned values
    in int32 (b < 16).  Shapes: words (m,) -> (n,)."""
    key = (b, str(words.device))
    shifts = _FIELD_SHIFTS.get(key)
    if shifts is None:
        shifts = _FIELD_SHIFTS[key] = torch.arange(0, 32, b, dtype=torch.int32, device=words.device)
    # an arithmetic shift is enough: the b bits kept after the mask are bits of the word, never copies of its sign
    return (words[:, None] >> shifts).bitwise_and_(2 ** b - 1).reshape(-1)[:n]


def keep_mask(key: KeyLike, shape, p: float, salt: int = 0) -> torch.Tensor:
    """:func:`dropout`'s scaled keep mask: float32 ``1[u_i >= t] / (1 - p)`` (values 0 and ``1 / (1 - p)``).

    For p = 0.5 the kept value 2.0 is the float32 whose bits are ``1 << 30``, so the one-bit draws are shifted
    into the exponent field and the int32 words read as float32: no conversion pass over the mask.

    Shapes: key () int64 -> ``shape``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if key is None:
        raise ValueError("dropout in training mode needs an rng key (adapt.rng)")
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    b, t = draw_bits(p)
    words = _bits(key, (-(-n // (32 // b)),), salt)
    if b == 1 and t == 1:  # p = 0.5: keep = 2.0 = bits 1 << 30, drop = 0.0 = bits 0
        return _fields(words, 1, n).bitwise_left_shift_(30).view(torch.float32).reshape(shape)
    if b == 16:  # int16 halves with the top bit flipped: u - 2**15
        keep = words.bitwise_xor_(_signed(0x80008000)).view(torch.int16)[:n].to(torch.float32)
        t -= 2 ** 15
    else:
        keep = _fields(words, b, n).to(torch.float32)
    if b != 1:
        keep.sub_(t - 1).clamp_min_(0.0).clamp_max_(1.0)
    return keep.mul_(1.0 / (1.0 - p)).reshape(shape)


def dropout(x: torch.Tensor, p: float, key: KeyLike = None, training: bool = True, salt: int = 0) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014) driven by the counter-based hash, ``b`` bits per draw.

    ``y = x * 1[u_i >= t] / (1 - p)`` for element ``i`` (row-major) of ``x``, where ``(b, t) = draw_bits(p)`` and
    ``u_i`` is the unsigned ``b``-bit field ``i mod (32 / b)`` (lowest bits first) of the 32-bit hash
    ``_bits(key, ceil(n * b / 32), salt)[i // (32 / b)]``.  Each hash thus gives ``32 / b`` draws: for the usual
    p = 0.5 one bit per element, so hashing costs 1/32 of a hash per element and the mask is a few passes over
    memory (cheap under vmap over K stacked runs, where the mask is most of a small head's arithmetic).  Identity
    when ``training`` is False or ``p == 0``.  ``p`` must be a Python float (it selects the code path, never a
    tensor value).  The mask depends only on (key, salt, x.shape): under vmap ``x.shape`` is the per-run shape, so a
    run's mask equals the mask of a separate call.  The test is done in float32 arithmetic,
    ``min(max(u - (t - 1), 0), 1)`` being exactly 1 or 0 (just ``u`` when ``b = 1``), because torch's bool
    comparison and bool-to-float kernels cost several times an arithmetic pass on the CPU.  For ``b = 16`` the
    fields are read as int16 after flipping their top bits (``u - 2**15``), with no shift.  The mask itself is
    :func:`keep_mask`.

    Shapes: x (...), key () int64 -> (...).
    """
    if not training or p == 0.0:
        return x
    return x * keep_mask(key, x.shape, p, salt).to(x.dtype)
