"""Where stores live, and how a name resolves to one (the one path rule of both stages).

A split's store is ``<features_root>/<backbone>/<split>.zarr`` (``features/i3d/D1_train.zarr``); the demo's are
under ``features/demo``.  A name given to the trainer is a domain (``D1``: its train or test split, by role), a
split (``D1_train``) or a store's path (``x.zarr``).
"""

from __future__ import annotations

from pathlib import Path

from featstore import manifests as M
from featstore.errors import UserError

FEATURES_ROOT = Path("features")
DEMO_FEATURES = FEATURES_ROOT / "demo"


def split_store(features_root: str | Path, backbone: str, split: str | Path) -> Path:
    """The store of ``split`` (a split name, or a manifest path: its file name without the suffix)."""
    name = Path(split).stem if Path(split).suffix else str(split)
    return Path(features_root) / backbone / f"{name}.zarr"


def store_attrs(path: str | Path) -> dict:
    """A store's group attributes read without the store's checks ({} when ``path`` is not a readable store:
    whoever opens the store names the problem)."""
    try:
        import zarr
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001
        return {}


def resolve_store(name: str, role: str, backbone: str, features_root: str | Path) -> tuple[Path, str]:
    """A domain (``D1``), split (``D1_train``) or store path (``x.zarr``) -> (store path, dataset name).

    ``role`` is 'train' or 'test' and picks the split of a domain."""
    text = str(name)
    registry = M.load_registry()
    if text.endswith(".zarr") or Path(text).is_dir():
        return Path(text), _dataset_of_store(Path(text), registry)
    if text in registry["domains"]:
        dom = registry["domains"][text]
        return split_store(features_root, backbone, dom[role]), dom["dataset"]
    if text in registry["splits"]:
        return split_store(features_root, backbone, text), registry["splits"][text]["dataset"]
    raise UserError(f"unknown domain, split or store {text!r}: one of {', '.join(registry['domains'])}, "
                    f"a split name, or a path to a .zarr store")


def _dataset_of_store(path: Path, registry: dict) -> str:
    """The dataset of a store's manifest (its ``manifest_name`` attribute, a registered split), else "custom"."""
    name = store_attrs(path).get("manifest_name")
    entry = registry["splits"].get(str(name)) if name else None
    return entry["dataset"] if entry else "custom"
