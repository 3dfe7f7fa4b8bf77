"""BN-Inception as used per modality by the Temporal Binding Network (TBN), up to ``inception_5b_output``.

Sources of the facts implemented here:

* Architecture: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift", ICML 2015 (Inception with batch normalisation, Fig. 5: 5x5 convs replaced by two
  3x3, stride-2 modules ``3c``/``4e`` with a max-pool branch and no 1x1 branch).
* Layer names, Caffe-style pooling (``ceil_mode=True``, average pools counting the padding) and biased convs:
  the BN-Inception of TSN (L. Wang et al., "Temporal Segment Networks", ECCV 2016; yjxiong/tsn-pytorch
  ``bn_inception.yaml``), which TBN reuses: E. Kazakos et al., "EPIC-Fusion: Audio-Visual Temporal Binding for
  Egocentric Action Recognition", ICCV 2019 (ekazakos/temporal-binding-network).  One BN-Inception per
  modality: RGB (3 channels), flow (5 stacked (x, y) pairs = 10 channels), audio spectrogram (1 channel,
  called ``spec`` in the TBN checkpoint).
* Widths: read from ``shared/data/layouts/tbn_bninception_{rgb,flow,spec}.json`` (483 keys each); BatchNorm2d
  uses PyTorch's default eps 1e-5.

``(B, C, H, W) -> (B, 1024, H', W')`` with 224 -> 7x7 and 256 -> 8x8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ENDPOINT = "inception_5b_output"
OUT_CHANNELS = 1024


class InceptionSpec(NamedTuple):
    """Widths of one BN-Inception module (``None``: branch absent).

    ``pool`` is ``"avg"`` (3x3/1 pad 1), ``"max"`` (3x3/1 pad 1, only 5b) or ``"max_s2"`` (3x3/2 no pad, the
    stride-2 modules, which also stride their 3x3 convs and have no 1x1 nor pool projection).
    """

    name: str
    in_channels: int
    c1x1: int | None
    c3x3_reduce: int
    c3x3: int
    double_3x3_reduce: int
    double_3x3: int
    pool: str
    pool_proj: int | None

    @property
    def stride(self) -> int:
        return 2 if self.pool == "max_s2" else 1

    @property
    def out_channels(self) -> int:
        pool_out = self.pool_proj if self.pool_proj is not None else self.in_channels
        return (self.c1x1 or 0) + self.c3x3 + self.double_3x3 + pool_out


INCEPTION_SPECS = (
    InceptionSpec("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    InceptionSpec("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    InceptionSpec("3c", 320, None, 128, 160, 64, 96, "max_s2", None),
    InceptionSpec("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    InceptionSpec("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    InceptionSpec("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    InceptionSpec("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    InceptionSpec("4e", 608, None, 128, 192, 192, 256, "max_s2", None),
    InceptionSpec("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    InceptionSpec("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)


class BNInception(nn.Module):
    """BN-Inception trunk with the TSN/TBN flat layer names (``conv1_7x7_s2``, ``inception_3a_1x1_bn`` ...).

    Every conv ``X`` (with bias) is followed by BatchNorm2d ``X_bn`` and ReLU.  Modules are registered in the
    order of the TBN checkpoints so ``state_dict()`` lists keys in the same order.

    Args:
        in_channels: 3 (RGB, BGR order in TBN), 10 (flow) or 1 (audio spectrogram).
    """

    endpoint = ENDPOINT
    out_channels = OUT_CHANNELS

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.input_channels = in_channels
        # Each step is the name of a conv (run as conv -> bn -> relu) or of a parameter-free pool.
        self._stem: list[str] = []
        self._add_conv(self._stem, "conv1_7x7_s2", in_channels, 64, 7, stride=2, padding=3)
        self._add_pool(self._stem, "pool1_3x3_s2", nn.MaxPool2d(3, 2, ceil_mode=True))
        self._add_conv(self._stem, "conv2_3x3_reduce", 64, 64, 1)
        self._add_conv(self._stem, "conv2_3x3", 64, 192, 3, padding=1)
        self._add_pool(self._stem, "pool2_3x3_s2", nn.MaxPool2d(3, 2, ceil_mode=True))
        # Per inception module: a list of branches, each a list of steps; outputs are concatenated.
        self._inceptions: list[list[list[str]]] = [self._add_inception(spec) for spec in INCEPTION_SPECS]

    def _add_conv(self, steps: list[str], name: str, cin: int, cout: int, kernel: int, *, stride: int = 1,
                  padding: int = 0) -> None:
        self.add_module(name, nn.Conv2d(cin, cout, kernel, stride, padding, bias=True))
        self.add_module(name + "_bn", nn.BatchNorm2d(cout, eps=1e-5))
        steps.append(name)

    def _add_pool(self, steps: list[str], name: str, pool: nn.Module) -> None:
        self.add_module(name, pool)
        steps.append(name)

    def _add_inception(self, spec: InceptionSpec) -> list[list[str]]:
        p = f"inception_{spec.name}_"
        s = spec.stride
        branches: list[list[str]] = []
        if spec.c1x1 is not None:
            branches.append([])
            self._add_conv(branches[-1], p + "1x1", spec.in_channels, spec.c1x1, 1)
        branches.append([])
        self._add_conv(branches[-1], p + "3x3_reduce", spec.in_channels, spec.c3x3_reduce, 1)
        self._add_conv(branches[-1], p + "3x3", spec.c3x3_reduce, spec.c3x3, 3, stride=s, padding=1)
        branches.append([])
        self._add_conv(branches[-1], p + "double_3x3_reduce", spec.in_channels, spec.double_3x3_reduce, 1)
        self._add_conv(branches[-1], p + "double_3x3_1", spec.double_3x3_reduce, spec.double_3x3, 3, padding=1)
        self._add_conv(branches[-1], p + "double_3x3_2", spec.double_3x3, spec.double_3x3, 3, stride=s,
                       padding=1)
        branches.append([])
        if spec.pool == "avg":
            pool: nn.Module = nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True)
        elif spec.pool == "max":
            pool = nn.MaxPool2d(3, 1, 1, ceil_mode=True)
        else:
            pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self._add_pool(branches[-1], p + "pool", pool)
        if spec.pool_proj is not None:
            self._add_conv(branches[-1], p + "pool_proj", spec.in_channels, spec.pool_proj, 1)
        return branches

    def _run(self, steps: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in steps:
            layer = getattr(self, name)
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                x = F.relu(getattr(self, name + "_bn")(x), inplace=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"BN-Inception expects a (B, {self.input_channels}, H, W) tensor, "
                             f"got {tuple(x.shape)}")
        x = self._run(self._stem, x)
        for branches in self._inceptions:
            x = torch.cat([self._run(branch, x) for branch in branches], 1)
        return x
