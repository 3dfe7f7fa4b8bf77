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
from featstore.errors import UserError

from .checkpoints import (CheckpointError, CheckpointInfo, check_destination, load_checkpoint, read_checkpoint,
                          save_checkpoint, sha256_file)
from .i3d import InceptionI3d, tf_same_pad

__all__ = [
    "BACKBONES", "INPUT_CHANNELS", "BNInception", "BackboneError", "CheckpointError", "CheckpointInfo", "InceptionI3d",
    "build", "check_destination", "convert_checkpoint", "fold_batch_norm", "load_checkpoint", "read_checkpoint",
    "resolve_backbone", "save_checkpoint", "sha256_file", "tf_same_pad",
]

# Input channels per backbone and modality: I3D takes RGB or 2-channel flow clips; TBN's BN-Inception takes
# one RGB frame, 5 stacked (x, y) flow pairs, or a 1-channel spectrogram.
INPUT_CHANNELS = {
    "i3d": {"rgb": 3, "flow": 2},
    "tbn": {"rgb": 3, "flow": 10, "audio": 1},
}
BACKBONES = tuple(INPUT_CHANNELS)
_ALIASES = {"bninception": "tbn", "bn_inception": "tbn", "bn-inception": "tbn", "spec": "audio"}


class BackboneError(UserError, ValueError):
    """An unknown backbone, or a modality the backbone does not take; the message is one line naming the setting."""


def resolve_backbone(name: str, modality: str) -> tuple[str, str]:
    """``(backbone, modality)`` in canonical spelling (aliases such as ``bninception`` or ``spec`` resolved);
    :class:`BackboneError` when either is not known."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    mod = _ALIASES.get(str(modality).lower(), str(modality).lower())
    if key not in INPUT_CHANNELS:
        raise BackboneError(f"--backbone {name!r}: unknown backbone; choose one of {', '.join(BACKBONES)}")
    if mod not in INPUT_CHANNELS[key]:
        raise BackboneError(f"--modality {modality!r}: backbone {key!r} does not support modality {modality!r}; "
                            f"choose one of {', '.join(INPUT_CHANNELS[key])}")
    return key, mod


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
        BackboneError: unknown backbone, or a modality the backbone does not support (a ``ValueError`` and a
            :class:`~featstore.errors.UserError` naming ``--backbone`` / ``--modality``).
        CheckpointError: the checkpoint does not fit (a ``ValueError`` with a one-line message).
    """
    key, mod = resolve_backbone(name, modality)
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


def convert_checkpoint(src: Any, dst: Any, backbone: str = "i3d",
                       modality: str = "rgb") -> tuple[CheckpointInfo, str]:
    """``adapt convert-checkpoint``: load ``src`` (any accepted layout, strictly) and write it to ``dst`` in this
    project's format; returns ``(what was loaded, sha256 of dst)``.

    The settings and the destination are checked before the checkpoint is read: an unknown ``--backbone`` /
    ``--modality``, a ``dst`` that is a folder, or one in a missing or unwritable folder raise a one-line
    :class:`~featstore.errors.UserError`; nothing is left behind when writing fails (see :func:`save_checkpoint`).
    """
    import os
    backbone, modality = resolve_backbone(backbone, modality)
    dst = check_destination(dst)
    model = build(backbone, modality, checkpoint=os.fspath(src))
    info = model.checkpoint_info
    sha = save_checkpoint(model, dst, source_layout=info.layout, source_sha256=info.sha256 or "")
    return info, sha


def _he_init(model: nn.Module) -> None:
    """Random weights that keep activations at unit scale through the depth (He et al. 2015, fan-in, ReLU).

    PyTorch's default conv initialisation shrinks the signal by about 2.4x per layer, so without this a random
    I3D's Mixed_5c features are ~1e-6, below float16's precision in the store."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every inference-mode BatchNorm into the convolution before it, in place; returns ``model``.

    ``bn(conv(x)) = s * (W x + b - mu) + beta`` with ``s = gamma / sqrt(var + eps)`` becomes one convolution with
    weights ``s * W`` and bias ``s * (b - mu) + beta`` (computed in float64), so inference runs one op where it
    ran two.  For extraction only: the running statistics are frozen into the weights, the model no longer has
    the checkpoint's keys, and it must not be trained.  I3D's ``Unit3D`` loses its ``bn``; BN-Inception's
    ``X_bn`` modules become identities.
    """
    from .bninception import BNInception
    from .i3d import Unit3D

    def fold(conv, bn):
        s = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
        w = conv.weight.detach().double() * s.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(s)
        conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(((b - bn.running_mean.double()) * s + bn.bias.detach().double())
                                 .to(conv.weight.dtype), requires_grad=False)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Unit3D) and module.bn is not None:
                fold(module.conv3d, module.bn)
                module.bn = None
            elif isinstance(module, BNInception):
                for name, layer in list(module.named_children()):
                    bn = getattr(module, name + "_bn", None)
                    if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                        fold(layer, bn)
                        setattr(module, name + "_bn", nn.Identity())
    return model
