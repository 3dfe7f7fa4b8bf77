"""Optical flow: EPIC's JPEG quantisation, its inverse for I3D, and TV-L1 computed from RGB frames.

Sources:

* Quantisation (REFERENCE.md, "EPIC-Kitchens frame layout"): EPIC's flow frames were computed with TV-L1
  (Zach, Pock and Bischof, DAGM 2007) by the ``dense_flow`` tool (yjxiong/dense_flow, as used by TSN) and stored
  as greyscale JPEGs ``jpeg = round(255 * (d + b) / (2b))`` after clipping ``d`` to ``[-b, b]``; ``b = 25`` for
  EPIC-55 (stride 2), ``b = 8`` for the EPIC-100 extension (stride 1).  Rounding here is numpy's round half to even,
  like OpenCV's ``cvRound``.
* De-quantisation for I3D (REFERENCE.md, "I3D"): ``d = jpeg * 2b / 255 - b``, clip to ``[-20, 20]``, ``/ 20``
  (I3D's flow input, Carreira and Zisserman 2017); most EPIC code instead maps ``jpeg / 255 * 2 - 1``
  ("naive", ignores the bound).  Both are provided; the project default is "exact".
* TV-L1: OpenCV's ``cv2.optflow.DualTVL1OpticalFlow_create()`` with its default parameters (tau 0.25, lambda 0.15,
  theta 0.3, 5 scales, 5 warps, epsilon 0.01), on greyscale frames (``cv2.COLOR_RGB2GRAY``), as ``dense_flow``'s
  TV-L1 mode.  ``u`` is the horizontal (x) displacement in pixels from the first frame to the second, ``v`` the
  vertical (y) one, positive to the right / down.

Pairing (``cfg.flow_source == "tvl1"``): flow frame ``k`` (1-based) at stride ``s`` is computed from RGB frames
``a = s * (k - 1) + 1`` and ``a + s`` (:func:`tvl1_pair`): ``dense_flow`` with step ``s`` pairs the 0-based frames
``(0, s), (s, 2s), ...`` and numbers its outputs from 1.  The flow frame numbers themselves come from the same rules
as for EPIC's flow JPEGs (:mod:`extract.sampling`), and the computed ``u``/``v`` are quantised exactly like the
JPEGs, so both sources go through the same resize, crop and de-quantisation.
"""

from __future__ import annotations

import functools
import threading

import cv2
import numpy as np

from featstore.errors import UserError

I3D_FLOW_CLIP = 20.0  # I3D clips displacements to [-20, 20] pixels and divides by 20
FLOW_SCALINGS = ("exact", "naive")

_local = threading.local()


def quantise(d, bound: float) -> np.ndarray:
    """Displacement in pixels -> EPIC flow JPEG value: ``round(255 * (clip(d, -b, b) + b) / (2b))`` as uint8."""
    b = float(bound)
    d = np.clip(np.asarray(d, dtype=np.float64), -b, b)
    return np.round(255.0 * (d + b) / (2.0 * b)).astype(np.uint8)


def displacement(jpeg, bound: float) -> np.ndarray:
    """EPIC flow JPEG value -> displacement in pixels, ``jpeg * 2b / 255 - b`` (float32)."""
    b = np.float32(bound)
    return np.asarray(jpeg, dtype=np.float32) * (np.float32(2.0) * b / np.float32(255.0)) - b


def dequantise(jpeg, bound: float, scaling: str = "exact") -> np.ndarray:
    """EPIC flow JPEG values -> I3D flow input in ``[-1, 1]`` (float32).

    ``"exact"`` (default): ``d = jpeg * 2b / 255 - b``, clip to ``[-20, 20]``, ``/ 20`` (so with ``b = 25``:
    0 -> -1, 255 -> +1, 128 -> 0.098 / 20).  ``"naive"``: ``jpeg / 255 * 2 - 1``.  ``uint8`` input goes through a
    256-entry table of the same float32 arithmetic (:func:`extract.transforms.byte_table`: identical values, and a
    transposed view comes back contiguous in its own shape).
    """
    if scaling not in FLOW_SCALINGS:
        raise UserError(f"flow_scaling must be one of {', '.join(FLOW_SCALINGS)}, got {scaling!r}")
    jpeg = np.asarray(jpeg)
    if jpeg.dtype == np.uint8:
        from extract.transforms import apply_table

        return apply_table(dequantise_table(bound, scaling), jpeg)
    return _dequantise_formula(jpeg, bound, scaling)


def dequantise_table(bound: float, scaling: str = "exact") -> np.ndarray:
    """:func:`dequantise` of the 256 byte values (read-only float32, cached per bound and scaling)."""
    if scaling not in FLOW_SCALINGS:
        raise UserError(f"flow_scaling must be one of {', '.join(FLOW_SCALINGS)}, got {scaling!r}")
    return _dequantise_table(float(bound), scaling)


def _dequantise_formula(jpeg, bound: float, scaling: str) -> np.ndarray:
    if scaling == "exact":
        d = displacement(jpeg, bound)
        return np.clip(d, -I3D_FLOW_CLIP, I3D_FLOW_CLIP) / np.float32(I3D_FLOW_CLIP)
    return np.asarray(jpeg, dtype=np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


@functools.lru_cache(maxsize=16)
def _dequantise_table(bound: float, scaling: str) -> np.ndarray:
    from extract.transforms import byte_table

    table = byte_table(lambda x: _dequantise_formula(x, bound, scaling))
    table.flags.writeable = False
    return table


def _tvl1_engine():
    engine = getattr(_local, "engine", None)
    if engine is None:
        engine = cv2.optflow.DualTVL1OpticalFlow_create()
        _local.engine = engine
    return engine


def _grey(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 2:
        return np.ascontiguousarray(frame.astype(np.uint8))
    return cv2.cvtColor(np.ascontiguousarray(frame.astype(np.uint8)), cv2.COLOR_RGB2GRAY)


def tvl1_field(prev_rgb: np.ndarray, next_rgb: np.ndarray) -> np.ndarray:
    """TV-L1 flow ``(H, W, 2)`` float32 (``[..., 0]`` = u, ``[..., 1]`` = v) from ``prev`` to ``next``."""
    return _tvl1_engine().calc(_grey(prev_rgb), _grey(next_rgb), None)


def tvl1(prev_rgb: np.ndarray, next_rgb: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """TV-L1 flow between two RGB (or greyscale) uint8 frames, quantised as EPIC's JPEGs: ``(u_jpeg, v_jpeg)``."""
    field = tvl1_field(prev_rgb, next_rgb)
    return quantise(field[..., 0], bound), quantise(field[..., 1], bound)


def tvl1_pair(k, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames ``(a, a + stride)`` from which flow frame ``k`` is computed: ``a = stride * (k - 1) + 1``."""
    k = np.asarray(k, dtype=np.int64)
    a = int(stride) * (k - 1) + 1
    return a, a + int(stride)
