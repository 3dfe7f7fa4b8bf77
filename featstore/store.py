"""The feature store: the one contract between extraction and adaptation.

A store is a Zarr v3 group, by default ``features/<backbone>/<split>.zarr``, holding (README, "Feature store"):

* one float16 array per modality, ``rgb`` / ``flow`` / ``audio``, with dimension names
  ``(clip, window, channel, height, width)`` for spatial maps or ``(clip, window, channel)`` for vectors;
* per-clip arrays: ``id``, ``video_id`` (str), ``verb_class``, ``noun_class`` (int32, -1 unknown),
  ``start_frame``, ``stop_frame`` (int64), ``done`` (bool) and ``error`` (str, empty unless the clip failed);
* group attributes: schema version, backbone, modalities with their per-window shapes, checkpoint sha256 per
  modality, sampling and preprocessing settings, manifest name and sha256, class counts, package version.

Every array is chunked along ``clip`` with the same ``chunk_clips``, so a chunk index names the same clips in
every array.  Schema version 2 stores each feature chunk as a Zarr v3 shard of one-unit inner chunks (one window or
segment of one clip, Zstandard + CRC32C each), so a reader that wants 5 of a clip's 25 segments reads those 5 and
the shard's index, and a flipped bit fails its checksum; version 1 (whole-chunk Zstandard) stores are still read,
and ``adapt convert-store`` rewrites them (:func:`featstore.convert.convert_store`).  Reads go through tensorstore
(its C++ Zarr v3 reader: 4x zarr-python's speed on whole shards, 15-30x on 5-of-25 unit reads;
``bench/bench_stream.py``).  Writers may fill rows in any order and from several processes at once: each write takes
an exclusive byte-range lock (``fcntl.lockf``) for each chunk it touches, writes the features, and only then sets
``done``.  Chunk files are replaced atomically by Zarr's local store, so a writer killed at any moment leaves
every chunk either old or new, and the ``done`` mask says exactly which clips hold features.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from featstore.errors import UserError
from featstore.schema import (CLIP_ARRAYS, LOCK_FILE, MODALITIES, READABLE_VERSIONS, SCHEMA_VERSION,
                             StoreAttrs, chunk_clips_for, default_codec, default_compressors, package_version)


def redo_hint(attrs: dict, path: str | Path, what: str = "them") -> str:
    """What to run to redo a store's missing or damaged clips, by who made it: an imported store (its
    ``imported_from``) is imported again whole; an extracted one resumes (and repairs) with ``adapt extract``."""
    imported = attrs.get("imported_from")
    if not (isinstance(imported, dict) and imported.get("file")):
        return f"re-run `adapt extract` with this store as --out to redo {what}"
    q = shlex.quote
    cmd = [f"adapt import-features {q(str(imported['file']))}",
           f"--manifest {q(str(imported.get('manifest') or attrs.get('manifest_name') or 'SPLIT'))}",
           f"--out {q(str(path))}"]
    if attrs.get("backbone") and attrs["backbone"] != "tbn":
        cmd.append(f"--backbone {q(str(attrs['backbone']))}")
    name = (attrs.get("preprocessing") or {}).get("imported")
    if name and name != "epic100-uda-challenge":
        cmd.append(f"--features-name {q(str(name))}")
    if imported.get("dataset"):
        cmd.append(f"--dataset {q(str(imported['dataset']))}")
    return f"the store was imported: re-run `{' '.join(cmd)} --overwrite` to import it again"


def is_store(path: str | Path) -> bool:
    """Whether a store is at ``path`` (its group metadata exists; :meth:`FeatureStore.open` checks the rest)."""
    return (Path(path) / "zarr.json").is_file()


@dataclass
class StoreInfo:
    path: Path
    attrs: dict
    clips: int
    done: int
    failed: int


class FeatureStore:
    """A feature store opened for reading (``mode='r'``) or writing (``mode='r+'``); see the module docstring."""

    def __init__(self, path: str | Path, group: zarr.Group, mode: str):
        self.path = Path(path)
        self.group = group
        self.mode = mode
        self.attrs = dict(group.attrs)
        self.modalities: list[str] = list(self.attrs["modalities"])
        self.num_clips = int(self.attrs["num_clips"])
        self.chunk_clips = int(self.attrs["chunk_clips"])

    # ------------------------------------------------------------------------------------------------------
    # creation and opening

    @classmethod
    def create(cls, path: str | Path, manifest, window_shapes: dict[str, tuple[int, ...]], attrs: StoreAttrs,
               chunk_clips: int | None = None, overwrite: bool = False,
               version: int = SCHEMA_VERSION) -> "FeatureStore":
        """Create an empty store for the clips of ``manifest`` (a normalised manifest DataFrame).

        ``window_shapes`` maps each modality to the shape of one window's features, e.g.
        ``{"rgb": (5, 1024, 7, 7)}`` (windows first).  ``attrs`` is the producer's description of the features
        (:class:`~featstore.schema.StoreAttrs`).  ``version=1`` writes the old layout
        (whole-chunk Zstandard, no checksums), which readers still accept.
        """
        path = Path(path)
        for m in window_shapes:
            if m not in MODALITIES:
                raise UserError(f"{path}: unknown modality {m!r} (one of {', '.join(MODALITIES)})")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists (open it to resume, or pass overwrite)")
        n = len(manifest)
        chunk = chunk_clips or chunk_clips_for(window_shapes)
        chunk = max(1, min(chunk, max(n, 1)))
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        for m, shape in window_shapes.items():
            dims = ["clip", "window", "channel", "height", "width"][: 1 + len(shape)]
            if version == 1:
                group.create_array(m, shape=(n, *shape), chunks=(chunk, *shape), dtype="float16", fill_value=0,
                                   compressors=default_codec(), dimension_names=dims)
                continue
            # a shard per chunk of clips, an inner chunk per (clip, unit)
            group.create_array(m, shape=(n, *shape), shards=(chunk, *shape), chunks=(1, 1, *shape[1:]),
                               dtype="float16", fill_value=0, compressors=default_compressors(),
                               dimension_names=dims)
        for name, dtype in CLIP_ARRAYS.items():
            fill = "" if dtype is str else (False if dtype == "bool" else 0)
            group.create_array(name, shape=(n,), chunks=(chunk,), dtype=dtype, fill_value=fill,
                               dimension_names=["clip"],
                               compressors=default_compressors() if dtype is not str and version > 1 else "auto")
        group["id"][:] = manifest["id"].astype(str).to_numpy()
        group["video_id"][:] = manifest["video_id"].astype(str).to_numpy()
        for name in ("verb_class", "noun_class", "start_frame", "stop_frame"):
            group[name][:] = manifest[name].to_numpy()
        meta = {
            "schema_version": version, "num_clips": n, "chunk_clips": chunk,
            "modalities": list(window_shapes), "window_shapes": {m: list(s) for m, s in window_shapes.items()},
            "package_version": package_version(), "failed": {},
            **attrs.to_dict(),
        }
        group.attrs.update(json.loads(json.dumps(meta)))
        (path / LOCK_FILE).touch()
        return cls(path, group, "r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", require_complete: bool = False) -> "FeatureStore":
        """Open and validate a store; every check that fails is a one-line :class:`UserError` naming the store."""
        path = Path(path)
        if not is_store(path):
            raise UserError(f"{path}: not a feature store (no zarr.json); extract one with `adapt extract`")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: cannot open as a Zarr v3 group ({type(e).__name__}: {e})") from None
        attrs = dict(group.attrs)
        version = attrs.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise UserError(f"{path}: schema version {version!r}, this tool reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
        for key in ("backbone", "modalities", "num_clips", "chunk_clips", "manifest_sha256", "window_shapes"):
            if key not in attrs:
                raise UserError(f"{path}: attribute {key!r} missing; the store is not one this tool wrote")
        n = int(attrs["num_clips"])
        arrays = set(group.array_keys())
        for name in (*attrs["modalities"], *CLIP_ARRAYS):
            if name not in arrays:
                raise UserError(f"{path}: array {name!r} missing")
        for m in attrs["modalities"]:
            arr = group[m]
            expected = (n, *attrs["window_shapes"][m])
            if tuple(arr.shape) != expected or arr.dtype != np.float16:
                raise UserError(f"{path}: array {m!r} is {arr.dtype}{tuple(arr.shape)}, expected float16{expected}")
        for name in CLIP_ARRAYS:
            if group[name].shape != (n,):
                raise UserError(f"{path}: array {name!r} has shape {group[name].shape}, expected ({n},)")
        store = cls(path, group, mode)
        if require_complete:
            store.check_complete()
        return store

    # ------------------------------------------------------------------------------------------------------
    # status

    def _read(self, name: str) -> np.ndarray:
        """A per-clip array whole; one that does not decode is a one-line error naming it."""
        try:
            return self.group[name][:]
        except Exception as e:  # noqa: BLE001 - a cut or corrupt chunk (zstd / checksum errors of the codecs)
            raise UserError(f"{self.path}: its {name!r} array does not decode ({type(e).__name__}); "
                            f"{redo_hint(self.attrs, self.path, 'it')}") from None

    def done_mask(self) -> np.ndarray:
        return np.asarray(self._read("done"), dtype=bool)

    def errors(self) -> np.ndarray:
        return np.asarray(self._read("error"), dtype=object)

    def pending_rows(self) -> np.ndarray:
        """Rows neither done nor failed: what an extraction still has to do."""
        return np.flatnonzero(~self.done_mask() & (self.errors() == ""))

    def failed(self) -> dict[str, str]:
        errors = self.errors()
        ids = self._read("id")
        return {str(ids[i]): str(errors[i]) for i in np.flatnonzero(errors != "")}

    def check_complete(self) -> None:
        """Every clip must be done or recorded as failed, otherwise the extraction did not finish."""
        pending = self.pending_rows()
        if len(pending):
            ids = self.group["id"][pending[:3]]
            if isinstance(self.attrs.get("imported_from"), dict):
                raise UserError(f"{self.path}: {len(pending)} of {self.num_clips} clips not written (e.g. "
                                f"{', '.join(map(str, ids))}): its import was cut short; "
                                f"{redo_hint(self.attrs, self.path)}")
            raise UserError(f"{self.path}: {len(pending)} of {self.num_clips} clips not extracted yet "
                            f"(e.g. {', '.join(map(str, ids))}); re-run `adapt extract` to resume")

    def info(self) -> StoreInfo:
        done = self.done_mask()
        return StoreInfo(self.path, self.attrs, self.num_clips, int(done.sum()), int((self.errors() != "").sum()))

    def meta(self, name: str) -> np.ndarray:
        """A per-clip array (``id``, ``verb_class``, ...) as numpy."""
        return np.asarray(self._read(name))

    # ------------------------------------------------------------------------------------------------------
    # reading

    def chunk_file(self, name: str, chunk: int) -> Path:
        """The file of chunk ``chunk`` (along ``clip``) of array ``name``; it may not exist (never written)."""
        arr = self.group[name]
        key = arr.metadata.encode_chunk_key((int(chunk),) + (0,) * (len(arr.shape) - 1))
        return self.path / name / key

    def array(self, modality: str) -> zarr.Array:
        """The lazy Zarr array of a modality (read chunk by chunk)."""
        if modality not in self.modalities:
            raise UserError(f"{self.path}: no {modality!r} features (has {', '.join(self.modalities)})")
        return self.group[modality]

    @property
    def version(self) -> int:
        return int(self.attrs["schema_version"])

    def unit_bytes(self, modality: str) -> int:
        """Float16 bytes of one window / segment of one clip."""
        return int(np.prod(self.attrs["window_shapes"][modality][1:])) * 2

    def reader(self, modality: str) -> "UnitReader":
        """A tensorstore reader of a modality's features (thread-safe; reads whole rows or (clip, unit) sets)."""
        return UnitReader(self.path / self.array(modality).path, self.path, modality,
                          redo=redo_hint(self.attrs, self.path))

    # ------------------------------------------------------------------------------------------------------
    # writing

    @property
    def num_chunks(self) -> int:
        return -(-self.num_clips // self.chunk_clips)

    def chunk_rows(self, chunk: int) -> slice:
        """The clips of chunk ``chunk`` (the same in every array)."""
        return slice(int(chunk) * self.chunk_clips, min((int(chunk) + 1) * self.chunk_clips, self.num_clips))

    @contextlib.contextmanager
    def locked(self, chunk: int):
        """Exclusive lock on one chunk (a byte of the lock file), shared by every process writing this store."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, chunk)
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, chunk)
            os.close(fd)

    def write(self, rows, features: dict[str, np.ndarray]) -> None:
        """Write the features of clips ``rows`` (any order) and mark them done.

        ``features[m]`` has shape ``(len(rows), *window_shape)``; every modality of the store must be given.
        Non-finite values are refused: a clip is written whole and correct, or not at all.
        """
        if self.mode == "r":
            raise UserError(f"{self.path}: opened read-only")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(f"{self.path}: write needs every modality, missing {missing}")
        data = {}
        for m in self.modalities:
            arr = np.asarray(features[m])
            want = (len(rows), *self.attrs["window_shapes"][m])
            if arr.shape != want:
                raise ValueError(f"{self.path}: {m} features have shape {arr.shape}, expected {want}")
            arr16 = arr.astype(np.float16)
            if not np.isfinite(arr16).all():
                raise ValueError(f"{self.path}: non-finite {m} features for rows {rows.tolist()[:5]}")
            data[m] = arr16
        self._write_chunks(rows, lambda sel, r: self._put_features(r, {m: a[sel] for m, a in data.items()}))

    def mark_failed(self, rows, reasons: list[str]) -> None:
        """Record clips that could not be extracted, with their reasons; they stay not done."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        reasons = np.asarray([r.replace("\n", " ") or "failed" for r in reasons], dtype=object)
        self._write_chunks(rows, lambda sel, r: self._put_failed(r, reasons[sel]))

    def _write_chunks(self, rows: np.ndarray, put) -> None:
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.num_clips:
            raise IndexError(f"{self.path}: rows out of range 0..{self.num_clips - 1}")
        chunks = rows // self.chunk_clips
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            order = sel[np.argsort(rows[sel])]
            with self.locked(int(c)):
                try:
                    put(order, rows[order])
                except OSError as e:  # zarr's store leaves the file name out (a full disk reads "a file")
                    e.filename = e.filename or str(self.path)
                    raise

    def _put_features(self, rows: np.ndarray, data: dict[str, np.ndarray]) -> None:
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        index = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        for m, arr in data.items():
            if contiguous:
                self.group[m][index] = arr
            else:  # rows of one shard, under its lock: read, modify and write back their span (zarr-python's
                # orthogonal writes into sharded arrays fail)
                span = slice(int(rows[0]), int(rows[-1]) + 1)
                block = self.group[m][span]
                block[rows - rows[0]] = arr
                self.group[m][span] = block
        self._set(index, contiguous, "error", np.array([""] * len(rows)))
        self._set(index, contiguous, "done", np.ones(len(rows), dtype=bool))  # last: the commit

    def _put_failed(self, rows: np.ndarray, reasons: np.ndarray) -> None:
        self._set(rows, False, "done", np.zeros(len(rows), dtype=bool))
        self._set(rows, False, "error", reasons.astype(str))

    def _set(self, index, contiguous: bool, name: str, values) -> None:
        if contiguous:
            self.group[name][index] = values
        else:
            self.group[name].oindex[index] = values

    def reset_failed(self, chunks=None) -> int:
        """Clear the failure records (of the clips in ``chunks``, default all) so that a new run retries those
        clips; returns how many."""
        rows = np.flatnonzero(self.errors() != "")
        if chunks is not None:
            rows = rows[np.isin(rows // self.chunk_clips, np.asarray(chunks))]
        self._write_chunks(rows, lambda sel, r: self._set(r, False, "error", np.array([""] * len(r))))
        return len(rows)

    def forget(self, rows: slice) -> None:
        """Mark clips ``rows`` (within one chunk, whose lock the caller holds) not done: their features go."""
        self.group["done"][rows] = np.zeros(rows.stop - rows.start, dtype=bool)

    def write_meta(self, name: str, rows: slice, values: np.ndarray) -> None:
        """Rewrite a per-clip array's values for ``rows`` (within one chunk, whose lock the caller holds)."""
        self.group[name][rows] = values

    def update_attrs(self, **kw) -> None:
        """Update group attributes (call from one process, e.g. rank 0 after all ranks finished)."""
        self.group.attrs.update(json.loads(json.dumps(kw)))
        self.attrs.update(kw)

    def finalise(self) -> dict[str, str]:
        """Copy the per-clip failures into the group attributes for readers of plain Zarr; returns them."""
        failed = self.failed()
        self.update_attrs(failed=failed, num_done=int(self.done_mask().sum()))
        return failed


class UnitReader:
    """Reads a feature array with tensorstore (no cache: every read goes to the file).

    * ``rows(lo, hi)``: clips ``lo..hi-1`` whole, (n, U, ...) float16;
    * ``units(clips, units)``: clips (N,) with units (N, T) -> (N, T, ...) float16, reading only those units'
      inner chunks from a version-2 store (whole chunks from a version-1 store).
    A decode failure (a cut or corrupt chunk) raises :class:`UserError` naming the store and the clips."""

    def __init__(self, array_path: Path, store_path: Path, modality: str = "", redo: str | None = None):
        import tensorstore as ts
        self.store_path, self.modality = store_path, modality
        self.redo = redo or "re-run `adapt extract` with this store as --out to redo them"
        # tensorstore refuses relative paths with '..' in them: give it the absolute path
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(array_path).resolve())}}
        self._ts = ts
        self.arr = ts.open(spec, read=True, context=ts.Context({"cache_pool": {"total_bytes_limit": 0}})).result()
        self.shape = tuple(self.arr.shape)

    def _read(self, view, what: str, clips) -> np.ndarray:
        try:
            return view.read().result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError / its own errors on corrupt data
            kind = str(e).split(":")[0][:40]
            raise UserError(f"{self.store_path}: {self.modality} {what} do not decode ({kind}: a cut or corrupt "
                            f"chunk: {self._bad_chunk(clips)}); {self.redo}") from None

    def _bad_chunk(self, clips) -> str:
        """The first chunk file (along ``clip``) among those of ``clips`` that does not decode."""
        per = int(self.arr.chunk_layout.write_chunk.shape[0])
        for c in sorted({int(i) // per for i in clips}):
            try:
                self.arr[c * per:min((c + 1) * per, self.shape[0])].read().result()
            except Exception:  # noqa: BLE001
                return "/".join([self.modality, "c", str(c)] + ["0"] * (len(self.shape) - 1))
        return "?"

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return self._read(self.arr[lo:hi], f"features of clips {lo}..{hi - 1}", range(lo, hi))

    def units(self, clips: np.ndarray, units: np.ndarray) -> np.ndarray:
        clips = np.asarray(clips, dtype=np.int64)
        units = np.asarray(units, dtype=np.int64)
        flat = self._read(self.arr.vindex[np.repeat(clips, units.shape[1]), units.reshape(-1)],
                          f"features of clips {clips[:3].tolist()}...", clips.tolist())
        return flat.reshape(len(clips), units.shape[1], *self.shape[2:])


# ----------------------------------------------------------------------------------------------------------
# compatibility between stores (the trainer refuses stores that do not fit together)

COMPAT_KEYS = ("backbone", "checkpoints", "sampling", "preprocessing", "verb_classes", "noun_classes")
CLASS_KEYS = ("verb_classes", "noun_classes")


def _declared(store: "FeatureStore") -> bool:
    """Whether the store's class counts are its dataset's (a registered split), not counted from its labels."""
    return store.attrs.get("dataset") not in (None, "", "custom")


def check_compatible(stores: dict[str, FeatureStore], modalities: list[str] | None = None) -> None:
    """Refuse stores made differently: another backbone, checkpoint, sampling, preprocessing or class space,
    or a modality missing from one of them.  ``stores`` maps a role ('source', 'target', 'eval') to a store."""
    items = list(stores.items())
    ref_role, ref = items[0]
    for role, st in items[1:]:
        for key in COMPAT_KEYS:
            a, b = ref.attrs.get(key), st.attrs.get(key)
            if key in CLASS_KEYS and not (_declared(ref) and _declared(st)):
                continue  # a user's split counts its classes from the labels it holds: their range is checked
            if key == "sampling" and isinstance(a, dict) and isinstance(b, dict):
                # train and test splits may differ in the number of windows; the rest must agree
                a = {k: v for k, v in a.items() if k not in ("windows", "split_kind")}
                b = {k: v for k, v in b.items() if k not in ("windows", "split_kind")}
            if key == "checkpoints" and modalities and isinstance(a, dict) and isinstance(b, dict):
                a = {m: a.get(m) for m in modalities}
                b = {m: b.get(m) for m in modalities}
            if a != b:
                raise UserError(f"stores do not fit together: {key} of {role} store {st.path} is {b!r}, "
                                f"but {ref_role} store {ref.path} has {a!r}")
    for m in modalities or []:
        for role, st in items:
            if m not in st.modalities:
                raise UserError(f"{role} store {st.path} has no {m!r} features (has {', '.join(st.modalities)})")
    for role, st in items:
        shapes = {m: tuple(st.attrs["window_shapes"][m][1:]) for m in (modalities or st.modalities)}
        ref_shapes = {m: tuple(ref.attrs["window_shapes"][m][1:]) for m in (modalities or ref.modalities)}
        if shapes != ref_shapes:
            raise UserError(f"stores do not fit together: feature shapes {shapes} of {st.path} vs {ref_shapes}")
