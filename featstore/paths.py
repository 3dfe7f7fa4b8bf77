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
    path, dataset, _ = locate(name, role, backbone, features_root)
    return path, dataset


def locate(name: str, role: str, backbone: str, features_root: str | Path) -> tuple[Path, str, str]:
    """(store path, dataset, why that dataset) of a domain, split or store path."""
    text = str(name)
    registry = M.load_registry()
    if text.endswith(".zarr") or Path(text).is_dir():
        dataset, why = _dataset_of_store(Path(text), registry)
        return Path(text), dataset, why
    if text in registry["domains"]:
        dom = registry["domains"][text]
        return split_store(features_root, backbone, dom[role]), dom["dataset"], f"{text} is a {dom['dataset']} domain"
    if text in registry["splits"]:
        ds = registry["splits"][text]["dataset"]
        return split_store(features_root, backbone, text), ds, f"{text} is a {ds} split"
    raise UserError(f"unknown domain, split or store {text!r}: one of {', '.join(registry['domains'])}, "
                    f"a split name, or a path to a .zarr store")


def _dataset_of_store(path: Path, registry: dict) -> tuple[str, str]:
    """The dataset of a store: its manifest's (a registered split), else the one its producer recorded (an
    import of EPIC-100 challenge features), else "custom"; and why."""
    attrs = store_attrs(path)
    name = attrs.get("manifest_name")
    entry = registry["splits"].get(str(name)) if name else None
    if entry:
        return entry["dataset"], f"its clips are the {entry['dataset']} split {name}"
    if attrs.get("dataset"):
        return attrs["dataset"], f"recorded by its producer ({attrs['dataset']})"
    return "custom", "its manifest is no registered split"
