"""What a store holds, as a few digests a run records (its provenance) and compares: two stores with equal
identities hold the same clips with the same features, wherever they lie (a copy of a store has the identity of
its original).

* ``clips``: sha256 of the done clips' ids, video ids and frame ranges, in store order;
* ``features``: sha256 of how the features were made (backbone, checkpoints, sampling, preprocessing, imported
  file) and of every feature chunk's checksums: a version-2 chunk file is a shard whose index lists its inner
  chunks and whose inner chunks each end with the CRC32C of their compressed bytes (``default_compressors``), so
  the index and those CRCs stand for the content without decoding it (a few bytes read per inner chunk); a
  version-1 chunk (no checksums) is hashed whole;
* ``manifest_sha256`` and ``clips_done`` as the store says.

:func:`overlap` finds the clips two stores share (the same id, video and frames), which is how a copy of the source
given as the target or the evaluation store is caught.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from featstore.store import FeatureStore

MADE_BY = ("backbone", "checkpoints", "sampling", "preprocessing", "imported_from", "verb_classes", "noun_classes")
_EMPTY = 2 ** 64 - 1
_CACHE: dict = {}


def _clip_table(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """(keys of the done clips 'id|video|start|stop', done mask)."""
    done = store.done_mask()
    ids, vids = store.meta("id"), store.meta("video_id")
    start, stop = store.meta("start_frame"), store.meta("stop_frame")
    keys = np.array([f"{i}|{v}|{a}|{b}" for i, v, a, b in zip(ids, vids, start, stop)], dtype=object)
    return keys, done


def _chunk_digest(h, path: Path, inner: int, version: int) -> None:
    """Feed a chunk file's checksums (version 2: its shard index and each inner chunk's trailing CRC32C) or, for
    a version-1 file, its bytes, into ``h``."""
    with open(path, "rb") as f:
        if version < 2:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        size = os.fstat(f.fileno()).st_size
        index_bytes = inner * 16 + 4
        f.seek(size - index_bytes)
        index = f.read(index_bytes)
        h.update(index)
        pairs = struct.unpack(f"<{2 * inner}Q", index[:-4])
        fd = f.fileno()
        for k in range(inner):
            offset, nbytes = pairs[2 * k], pairs[2 * k + 1]
            if offset != _EMPTY and nbytes >= 4:
                h.update(os.pread(fd, 4, offset + nbytes - 4))


def identity(path: str | Path) -> dict:
    """The store's identity (see the module docstring); cached per process by the files' sizes and times."""
    store = FeatureStore.open(path)
    files = [store.chunk_file(m, c) for m in store.modalities for c in range(store.num_chunks)]
    stamp = tuple((str(f), *(lambda s: (s.st_size, s.st_mtime_ns))(f.stat())) if f.is_file() else (str(f),)
                  for f in files) + ((lambda s: (s.st_size, s.st_mtime_ns))((Path(path) / "zarr.json").stat()),)
    key = str(Path(path).resolve())
    if key in _CACHE and _CACHE[key][0] == stamp:
        return dict(_CACHE[key][1])
    keys, done = _clip_table(store)
    clips = hashlib.sha256("\n".join(keys[done]).encode()).hexdigest()
    h = hashlib.sha256(repr({k: store.attrs.get(k) for k in MADE_BY}).encode())
    h.update(np.packbits(done).tobytes())
    for m in store.modalities:
        shape = store.attrs["window_shapes"][m]
        inner = store.chunk_clips * int(shape[0])  # an inner chunk per (clip, unit) in a version-2 shard
        for c in range(store.num_chunks):
            f = store.chunk_file(m, c)
            if f.is_file():
                h.update(f"{m}/{c}".encode())
                _chunk_digest(h, f, inner, store.version)
    out = {"manifest_sha256": store.attrs.get("manifest_sha256"), "clips_done": int(done.sum()),
           "clips": clips, "features": h.hexdigest()}
    _CACHE[key] = (stamp, out)
    return dict(out)


def overlap(a: str | Path, b: str | Path) -> int:
    """How many done clips stores ``a`` and ``b`` share (the same id, video and frame range)."""
    ka, da = _clip_table(FeatureStore.open(a))
    kb, db = _clip_table(FeatureStore.open(b))
    return len(set(ka[da]) & set(kb[db]))


def short(ident: dict) -> str:
    """A store identity in a line: its clips and features digests, shortened."""
    return f"clips {ident['clips'][:12]}, features {ident['features'][:12]} ({ident['clips_done']} clips)"
