"""Import features users already have into a feature store.

* The EPIC-KITCHENS-100 UDA challenge pickles of the TA3N baseline (``source_train.pkl``, ``target_train.pkl``,
  ``target_test.pkl``): ``{'features': {'RGB': (N, 25, 1024), 'Flow': ..., 'Audio': ...}, 'narration_ids': [...]}``;
  also arrays of shape ``(N, segments, C, H, W)`` in the same layout.
* HDF5 files with one dataset per modality (``rgb``/``flow``/``audio``, any case) of the same shapes, and an id
  dataset (``narration_ids``, ``ids`` or ``id``).

Clips are joined to an annotation manifest on ``narration_id`` (the manifest's ``id``), which gives the labels.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from featstore import manifests as M
from featstore.errors import UserError
from featstore.schema import StoreAttrs
from featstore.store import FeatureStore

NAMES = {"rgb": "rgb", "flow": "flow", "audio": "audio", "spec": "audio"}
ID_KEYS = ("narration_ids", "narration_id", "ids", "id")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_pickle(path: Path) -> tuple[dict, list]:
    try:
        with open(path, "rb") as f:
            doc = pickle.load(f)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read as a pickle ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or "features" not in doc or not isinstance(doc["features"], dict):
        raise UserError(f"{path}: expected a dict with a 'features' dict (EPIC-100 UDA layout), "
                        f"found keys {list(doc)[:5] if isinstance(doc, dict) else type(doc).__name__}")
    ids = next((doc[k] for k in ID_KEYS if k in doc), None)
    if ids is None:
        raise UserError(f"{path}: missing key 'narration_ids'")
    return {k: np.asarray(v) for k, v in doc["features"].items()}, [str(i) for i in ids]


def read_hdf5(path: Path) -> tuple[dict, list]:
    import h5py
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read as HDF5 ({type(e).__name__}: {e})") from None
    with f:
        feats = {k: f[k][()] for k in f.keys() if k.lower() in NAMES}
        key = next((k for k in f.keys() if k.lower() in ID_KEYS), None)
        if key is None:
            raise UserError(f"{path}: missing an id dataset (one of {', '.join(ID_KEYS)})")
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f[key][()]]
    return feats, ids


def import_features(path: str | Path, manifest: str | Path, out: str | Path, backbone: str = "tbn",
                    features_name: str = "", overwrite: bool = False, dataset: str | None = None) -> FeatureStore:
    """Write the features of ``path`` (pickle or HDF5) for the clips of ``manifest`` into a new store ``out``.

    The store's dataset (whose base the trainer takes): ``dataset`` when given, else the manifest's when it is a
    registered split (or one of its original files), else EPIC-100's for the challenge's pickles, else none."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    raw, ids = read_hdf5(path) if path.suffix in (".h5", ".hdf5") else read_pickle(path)
    feats = {}
    for k, v in raw.items():
        m = NAMES.get(k.lower())
        if m is None:
            raise UserError(f"{path}: unknown modality {k!r} (expected RGB, Flow, Audio)")
        feats[m] = v
    if not feats:
        raise UserError(f"{path}: no features of RGB, Flow or Audio")
    n = len(ids)
    for m, v in feats.items():
        if v.ndim not in (3, 5) or v.shape[0] != n:
            raise UserError(f"{path}: {m} features have shape {tuple(v.shape)}; expected (N={n}, segments, C) or "
                            f"(N, segments, C, H, W) with N = the number of narration_ids")
    segs = {v.shape[1] for v in feats.values()}
    if len(segs) != 1:
        raise UserError(f"{path}: modalities disagree on the number of segments {sorted(segs)}")
    if len(set(ids)) != n:
        raise UserError(f"{path}: duplicate narration_ids")

    split = M.resolve_split(manifest)
    table = split.read().set_index("id", drop=False)
    missing = [i for i in ids if i not in table.index]
    if missing:
        raise UserError(f"{path}: {len(missing)} narration_ids absent from manifest {split.path} "
                        f"(e.g. {', '.join(missing[:3])})")
    rows = table.loc[ids].reset_index(drop=True)
    verbs, nouns = split.class_counts(rows)
    shapes = {m: tuple(v.shape[1:]) for m, v in feats.items()}
    file_sha = _sha256(path)
    attrs = StoreAttrs(
        backbone=backbone, checkpoints={m: None for m in feats},
        sampling={"backbone": backbone, "segments": int(next(iter(segs))), "imported": True},
        preprocessing={"imported": features_name or "epic100-uda-challenge"}, manifest_name=split.name,
        dataset=dataset or (split.dataset if split.dataset != "custom" else
                            "epic100" if path.suffix not in (".h5", ".hdf5") else None),
        manifest_sha256=M.manifest_sha256(rows), verb_classes=verbs, noun_classes=nouns,
        split_kind=M.split_kind_of(split.name), imported_from={"file": str(path), "sha256": file_sha})
    store = FeatureStore.create(out, rows, shapes, attrs, overwrite=overwrite)
    chunk = store.chunk_clips
    for lo in range(0, n, chunk):
        sl = slice(lo, min(lo + chunk, n))
        block = {m: v[sl] for m, v in feats.items()}
        bad = [m for m, b in block.items() if not np.isfinite(b).all()]
        if bad:
            raise UserError(f"{path}: non-finite {bad[0]} features among clips {lo}..{sl.stop - 1}")
        store.write(np.arange(sl.start, sl.stop), block)
    store.finalise()
    return store
