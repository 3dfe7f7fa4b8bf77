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
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from featstore import manifests as M
from featstore.errors import UserError
from featstore.integrity import is_own_store, refuse_foreign, replace_store, settle_writes, temporary_beside
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
    try:
        ids = [str(i) for i in ids]
        feats = {str(k): np.asarray(v) for k, v in doc["features"].items()}
    except Exception as e:  # noqa: BLE001 - ragged lists, ids that are not a list ...
        raise UserError(f"{path}: its features or narration_ids are not arrays ({type(e).__name__}: {e})") from None
    return feats, ids


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")


def is_hdf5(path: Path) -> bool:
    """An HDF5 file by its suffix (any case: ``x.H5``) or by its signature."""
    if path.suffix.lower() in HDF5_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def read_hdf5(path: Path) -> tuple[dict, list]:
    import h5py
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read as HDF5 ({type(e).__name__}: {e})") from None
    with f:
        names = [k for k in f.keys() if k.lower() in NAMES]
        key = next((k for k in f.keys() if k.lower() in ID_KEYS), None)
        if key is None:
            raise UserError(f"{path}: missing an id dataset (one of {', '.join(ID_KEYS)})")
        for k in (*names, key):
            if not isinstance(f[k], h5py.Dataset):
                raise UserError(f"{path}: {k!r} is an HDF5 {type(f[k]).__name__.lower()}, not a dataset; expected "
                                f"the {'ids' if k == key else 'features'} as a dataset at the file's top level")
        try:
            feats = {k: f[k][()] for k in names}
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in np.asarray(f[key][()]).reshape(-1)]
        except Exception as e:  # noqa: BLE001 - a dataset that does not decode (filters, truncation)
            raise UserError(f"{path}: a dataset does not read ({type(e).__name__}: {e})") from None
    return feats, ids


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: beyond it float16 holds inf


def _check_values(path: Path, m: str, v: np.ndarray, ids: list, block: int = 256) -> None:
    """Every value finite and within float16's range, checked a block of clips at a time (the memory of a
    block, not of the whole array); a bad value is one line naming the modality and the clip."""
    if v.dtype.kind not in "biuf":
        raise UserError(f"{path}: {m} features are of type {v.dtype}, expected numbers (float32 or float16)")
    if v.dtype.kind in "biu":
        big = np.flatnonzero(np.abs(v.reshape(len(v), -1)).max(axis=1) > FLOAT16_MAX) if v.size else []
        if len(big):
            raise UserError(f"{path}: {m} features of clip {ids[big[0]]} hold values beyond float16's range "
                            f"(|x| <= {FLOAT16_MAX:g}); scale them before importing")
        return
    for lo in range(0, len(v), block):
        b = v[lo:lo + block].reshape(min(block, len(v) - lo), -1)
        finite = np.isfinite(b)
        if not finite.all():
            row = int(np.flatnonzero(~finite.all(axis=1))[0])
            bad = b[row][~finite[row]][0]
            raise UserError(f"{path}: non-finite {m} features ({bad}) for clip {ids[lo + row]} (row {lo + row}); "
                            f"nothing was written")
        over = np.abs(b) > FLOAT16_MAX
        if over.any():
            row = int(np.flatnonzero(over.any(axis=1))[0])
            raise UserError(f"{path}: {m} features of clip {ids[lo + row]} (row {lo + row}) hold "
                            f"{b[row][over[row]][0]:g}, beyond float16's range (|x| <= {FLOAT16_MAX:g}, the store "
                            f"keeps float16); scale the features before importing; nothing was written")


def _check_out(out: Path, path: Path, overwrite: bool) -> None:
    """``out`` must be new, an empty folder, or (with ``overwrite``) a store this tool made."""
    refuse_foreign(out)
    if is_own_store(out) and not overwrite:
        raise UserError(f"{out}: a feature store is already there; pass --overwrite to replace it (it is replaced "
                        f"only once the new one is complete), or choose another --out")
    try:
        inside = out.resolve() in path.resolve().parents
    except OSError:
        inside = False
    if inside:
        raise UserError(f"{out}: holds the input file {path}; choose another --out")


def import_features(path: str | Path, manifest: str | Path, out: str | Path, backbone: str = "tbn",
                    features_name: str = "", overwrite: bool = False, dataset: str | None = None) -> FeatureStore:
    """Write the features of ``path`` (pickle or HDF5) for the clips of ``manifest`` into a new store ``out``.

    The store's dataset (whose base the trainer takes): ``dataset`` when given, else the manifest's when it is a
    registered split (or one of its original files), else EPIC-100's for the challenge's pickles, else none.

    Everything is read and checked first (ids, shapes, finite values within float16's range); the store is then
    written beside ``out`` (``.<name>.creating-<pid>``) and renamed into place once complete, replacing an existing
    store of ours (``overwrite``) only then.  An import is complete or absent: a failure or a Ctrl-C removes the
    half-made store, so an existing store at ``out`` stays as it was.  Anything at ``out`` that is not a store
    this tool made is refused, even with ``overwrite``."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    _check_out(out, path, overwrite)
    hdf5 = is_hdf5(path)
    raw, ids = read_hdf5(path) if hdf5 else read_pickle(path)
    feats = {}
    for k, v in raw.items():
        m = NAMES.get(k.lower())
        if m is None:
            raise UserError(f"{path}: unknown modality {k!r} (expected RGB, Flow, Audio)")
        if m in feats:
            raise UserError(f"{path}: two entries for {m} features ({k!r} and another); keep one")
        feats[m] = v
    if not feats:
        raise UserError(f"{path}: no features of RGB, Flow or Audio")
    n = len(ids)
    if n == 0:
        raise UserError(f"{path}: no clips (narration_ids is empty)")
    for m, v in feats.items():
        if v.ndim not in (3, 5) or v.shape[0] != n or 0 in v.shape:
            raise UserError(f"{path}: {m} features have shape {tuple(v.shape)}; expected (N={n}, segments, C) or "
                            f"(N, segments, C, H, W) with N = the number of narration_ids")
    segs = {v.shape[1] for v in feats.values()}
    if len(segs) != 1:
        raise UserError(f"{path}: modalities disagree on the number of segments {sorted(segs)}")
    if len(set(ids)) != n:
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise UserError(f"{path}: duplicate narration_ids (e.g. {dup})")
    if any(not i.strip() for i in ids):
        raise UserError(f"{path}: an empty narration_id (row {next(j for j, i in enumerate(ids) if not i.strip())})")
    for m, v in feats.items():
        _check_values(path, m, v, ids)

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
                            "epic100" if not hdf5 else None),
        manifest_sha256=M.manifest_sha256(rows), verb_classes=verbs, noun_classes=nouns,
        split_kind=M.split_kind_of(split.name),
        imported_from={"file": str(path), "sha256": file_sha, "manifest": str(manifest), "dataset": dataset})
    tmp = temporary_beside(out)
    try:
        store = FeatureStore.create(tmp, rows, shapes, attrs)
        chunk = store.chunk_clips
        for lo in range(0, n, chunk):
            sl = slice(lo, min(lo + chunk, n))
            store.write(np.arange(sl.start, sl.stop), {m: v[sl] for m, v in feats.items()})
        store.finalise()
        store.check_complete()
        replace_store(tmp, out)
    except BaseException as e:
        settle_writes()  # zarr's I/O thread may still be writing (after a Ctrl-C): let it finish first
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            e.filename = out  # not the temporary folder (zarr's store leaves the name out)
        raise
    return FeatureStore.open(out)
