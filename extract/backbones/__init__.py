"""Stage-1 backbones: build a feature extractor that maps a clip/frame batch to its last spatial map.

* ``"i3d"``: I3D (Carreira and Zisserman, CVPR 2017) in the piergiaj/pytorch-i3d layout, RGB or flow,
  ``(B, C, T, H, W) -> (B, 1024, ceil(T/8), H/32, W/32)`` at ``Mixed_5c`` (see :mod:`.i3d`).
* ``"tbn"``: the per-modality BN-Inception of TBN (Kazakos et al., ICCV 2019), RGB, flow or audio,
  ``(B, C, H, W) -> (B, 1024, H/32, W/32)`` at ``inception_5b_output`` (see :mod:`.bninception`).

Checkpoint formats and checks are described in :mod:`.checkpoints`.  Without a checkpoint the weights are
random but deterministic (seeded); :func:`build` does not warn about that, the caller does
(``model.checkpoint_info is None``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .bninception import BNInception
from .checkpoints import (CheckpointError, CheckpointInfo, load_checkpoint, read_checkpoint, save_checkpoint,
                          sha256_file)
from .i3d import InceptionI3d, tf_same_pad

__all__ = [
    "BACKBONES", "INPUT_CHANNELS", "BNInception", "CheckpointError", "CheckpointInfo", "InceptionI3d", "build",
    "load_checkpoint", "read_checkpoint", "save_checkpoint", "sha256_file", "tf_same_pad",
]

# Input channels per backbone and modality: I3D takes RGB or 2-channel flow clips; TBN's BN-Inception takes
# one RGB frame, 5 stacked (x, y) flow pairs, or a 1-channel spectrogram.
INPUT_CHANNELS = {
    "i3d": {"rgb": 3, "flow": 2},
    "tbn": {"rgb": 3, "flow": 10, "audio": 1},
}
BACKBONES = tuple(INPUT_CHANNELS)
_ALIASES = {"bninception": "tbn", "bn_inception": "tbn", "bn-inception": "tbn", "spec": "audio"}


def build(name: str, modality: str, checkpoint: Any = None, *, seed: int = 0,
          weights_only: bool = True) -> nn.Module:
    """Build backbone ``name`` (``"i3d"`` or ``"tbn"``) for ``modality`` (``"rgb"``, ``"flow"``, ``"audio"``).

    Args:
        checkpoint: ``None`` (random weights from ``seed``), a checkpoint path, or an already loaded
            checkpoint object (see :mod:`.checkpoints`).
        seed: seed of the random initialisation (the global RNG state is left untouched).
        weights_only: passed to ``torch.load``; set ``False`` only for checkpoint files you trust.

    Returns:
        The model in eval mode, with attributes ``name``, ``modality``, ``input_channels``, ``out_channels``
        (1024), ``endpoint`` and ``checkpoint_info`` (a :class:`CheckpointInfo`, or ``None`` when random).

    Raises:
        ValueError: unknown backbone, or a modality the backbone does not support.
        CheckpointError: the checkpoint does not fit (a ``ValueError`` with a one-line message).
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    mod = _ALIASES.get(str(modality).lower(), str(modality).lower())
    if key not in INPUT_CHANNELS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if mod not in INPUT_CHANNELS[key]:
        raise ValueError(f"backbone {key!r} does not support modality {modality!r}; "
                         f"it supports {', '.join(INPUT_CHANNELS[key])}")
    channels = INPUT_CHANNELS[key][mod]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = InceptionI3d(channels) if key == "i3d" else BNInception(channels)
        if checkpoint is None:
            _he_init(model)
    model.name = key
    model.modality = mod
    model.checkpoint_info = None
    if checkpoint is not None:
        model.checkpoint_info = load_checkpoint(model, checkpoint, backbone=key, modality=mod,
                                                weights_only=weights_only)
    return model.eval()


def _he_init(model: nn.Module) -> None:
    """Random weights that keep activations at unit scale through the depth (He et al. 2015, fan-in, ReLU).

    PyTorch's default conv initialisation shrinks the signal by about 2.4x per layer, so without this a random
    I3D's Mixed_5c features are ~1e-6, below float16's precision in the store."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
