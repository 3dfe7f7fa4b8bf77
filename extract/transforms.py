"""Spatial transforms and input scalings of the backbones (numpy / OpenCV, one call per clip).

Sources (REFERENCE.md, "I3D" and "TBN"):

* Resize: the shorter side to ``cfg.resize`` (256) with bilinear interpolation, the longer side
  ``int(size * long / short)`` (torchvision ``Resize`` with an int size, as used by pytorch-i3d and TSN/TBN's
  ``GroupScale``).  Implemented with ``cv2.resize(..., INTER_LINEAR)``; EPIC frames are 456x256 already, so with
  the default settings the resize is the identity and the OpenCV/PIL difference (PIL antialiases when shrinking)
  does not arise.
* Centre crop ``cfg.crop`` (224): top-left corner ``int(round((h - crop) / 2))``, ``int(round((w - crop) / 2))``
  (torchvision ``CenterCrop``; TSN's ``GroupCenterCrop``).
* I3D RGB: ``x / 255 * 2 - 1`` in ``[-1, 1]`` (pytorch-i3d; MM-SADA).  I3D flow: :func:`extract.flow.dequantise`.
* TBN RGB: BGR order, ``0..255`` minus the mean ``[104, 117, 128]`` (B, G, R), no division (TBN / TSN
  BN-Inception: ``input_mean = [104, 117, 128]``, ``Stack(roll=True)`` turns RGB into BGR,
  ``ToTorchFormatTensor(div=False)``).  TBN flow: ``x - 128`` (flow mean 128, std 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cv2
import numpy as np

from featstore.errors import UserError

TBN_RGB_MEAN_BGR = np.array([104.0, 117.0, 128.0], dtype=np.float32)
TBN_FLOW_MEAN = 128.0


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the shorter side ``size`` and the longer ``int(size * long / short)``."""
    if h <= w:
        return int(size), int(size * w / h)
    return int(size * h / w), int(size)


def resize_shorter(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, H, W)`` or ``(N, H, W, C)`` frames so the shorter side is ``size`` (bilinear, cv2 INTER_LINEAR).

    Returns the input itself when the shorter side already is ``size``.  Works on uint8 or float arrays.
    """
    frames = np.asarray(frames)
    n, h, w = frames.shape[:3]
    nh, nw = resized_size(h, w, size)
    if (nh, nw) == (h, w):
        return frames
    out = np.empty((n, nh, nw) + frames.shape[3:], dtype=frames.dtype)
    for i in range(n):
        out[i] = cv2.resize(frames[i], (nw, nh), interpolation=cv2.INTER_LINEAR).reshape(out.shape[1:])
    return out


def centre_crop(frames: np.ndarray, crop: int) -> np.ndarray:
    """Centre ``crop x crop`` of ``(N, H, W[, C])`` frames (torchvision ``CenterCrop`` corner rounding)."""
    h, w = frames.shape[1:3]
    if h < crop or w < crop:
        raise UserError(f"crop {crop} is larger than the resized frame {h}x{w} (set resize >= crop)")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return frames[:, top:top + crop, left:left + crop]


def resize_crop(frames: np.ndarray, size: int, crop: int) -> np.ndarray:
    """:func:`resize_shorter` then :func:`centre_crop` (the test-time transform of I3D and TBN)."""
    return np.ascontiguousarray(centre_crop(resize_shorter(frames, size), crop))


def _i3d_rgb_formula(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def byte_table(fn) -> np.ndarray:
    """``fn`` applied to the 256 byte values: a lookup table ``t`` with ``t[x] == fn(x)`` bit for bit for any
    ``uint8`` array ``x``, since ``fn`` works element by element."""
    return np.ascontiguousarray(fn(np.arange(256, dtype=np.uint8)), dtype=np.float32)


_I3D_RGB_TABLE = byte_table(_i3d_rgb_formula)
_I3D_RGB_TABLE.flags.writeable = False


def apply_table(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``table[x]`` for a ``uint8`` array ``x``, as a new C-contiguous float32 array in ``x``'s shape (a transposed
    view comes back transposed and contiguous).  ``cv2.LUT``, about 3x faster than ``np.take``, which first
    widens the indices to int64."""
    x = np.ascontiguousarray(x)
    if x.size == 0:
        return np.empty(x.shape, dtype=np.float32)
    return cv2.LUT(x.reshape(1, -1), table).reshape(x.shape)


def i3d_rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(..., 3)`` (or any axis order) -> float32 in ``[-1, 1]``: ``x / 255 * 2 - 1``.

    ``uint8`` input goes through a 256-entry table of the same float32 arithmetic (identical values); the result is
    C-contiguous in the input's shape, so a transposed view of the frames comes back transposed and contiguous."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return apply_table(_I3D_RGB_TABLE, frames)
    return _i3d_rgb_formula(frames)


_TBN_RGB_TABLE = np.ascontiguousarray(np.arange(256, dtype=np.float32)[:, None] - TBN_RGB_MEAN_BGR[None, :])
_TBN_RGB_TABLE.flags.writeable = False  # (256, 3): column k is channel k of BGR minus its mean, as tbn_rgb


class Pixels(NamedTuple):
    """A backbone input kept as its uint8 pixels and the table that maps them to the input values.

    ``data``: C-contiguous ``uint8`` (numpy array or torch tensor) in memory order, channels last;
    ``table``: float32 ``(256,)`` for every channel or ``(256, C)`` with one column per channel (the last axis of
    ``data``); ``order``: the axis permutation that gives the input's logical shape, ``data.transpose(order)``
    (e.g. I3D: memory ``(W, T, h, w, C)``, logical ``(W, C, T, h, w)``).  The values are those of the float
    transforms above (:func:`i3d_rgb`, :func:`tbn_rgb`, :func:`tbn_flow`, :func:`extract.flow.dequantise`): the
    tables are those functions applied to the 256 byte values.  Handing over pixels rather than floats moves a
    quarter of the bytes between processes and to a GPU, where the table is applied.
    """

    data: Any
    table: np.ndarray
    order: tuple

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[a] for a in self.order)

    def to_float(self) -> np.ndarray:
        """The float32 input: the table applied with ``cv2.LUT`` in memory order, returned as the transposed view
        with the logical shape (channels-last strides)."""
        data = np.ascontiguousarray(np.asarray(self.data))
        if data.size == 0:
            out = np.empty(data.shape, dtype=np.float32)
        elif self.table.ndim == 1:
            out = cv2.LUT(data.reshape(1, -1), self.table).reshape(data.shape)
        else:
            c = self.table.shape[1]
            out = cv2.LUT(data.reshape(-1, 1, c), self.table.reshape(1, 256, c)).reshape(data.shape)
        return out.transpose(self.order)


def lookup(table, data):
    """:meth:`Pixels.to_float` in torch (for a device): ``table`` (256,) or (256, C) float tensor, ``data`` uint8
    tensor (..., C) in memory order -> float tensor of ``data``'s shape (the same values: a table lookup)."""
    import torch

    idx = data.long()
    if table.dim() == 1:
        return table[idx]
    return table[idx, torch.arange(table.shape[1], device=table.device)]


def tbn_rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(..., 3)`` -> float32 BGR ``0..255`` minus ``[104, 117, 128]``."""
    bgr = np.asarray(frames)[..., ::-1].astype(np.float32)
    return bgr - TBN_RGB_MEAN_BGR


def _tbn_flow_formula(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) - np.float32(TBN_FLOW_MEAN)


_TBN_FLOW_TABLE = byte_table(_tbn_flow_formula)
_TBN_FLOW_TABLE.flags.writeable = False


def tbn_flow(frames: np.ndarray) -> np.ndarray:
    """uint8 flow JPEG values -> float32 ``x - 128`` (C-contiguous in the input's shape, as :func:`i3d_rgb`)."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return apply_table(_TBN_FLOW_TABLE, frames)
    return _tbn_flow_formula(frames)
