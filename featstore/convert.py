"""Rewriting a store in the current layout (``adapt convert-store``): version 1 (whole-chunk Zstandard, no
checksums) -> version 2 (shards of one-unit inner chunks with CRC32C)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from featstore.errors import UserError
from featstore.schema import SCHEMA_VERSION, StoreAttrs
from featstore.store import FeatureStore, is_store

CONVERTING, OLD = ".converting", ".old"


def convert_store(src: str | Path, dst: str | Path | None = None, progress=None) -> Path:
    """Rewrite a store in the current layout (schema version 2): into ``dst``, or in place when ``dst`` is None.

    Resumable: the new store is written chunk by chunk through :meth:`FeatureStore.write` (features, then
    ``done``), so a run killed at any moment leaves the chunks it finished, and a new run skips them.  In place,
    the new store grows beside the old one (``X.zarr.converting``) and replaces it at the end by two renames
    (old -> ``X.zarr.old``, new -> ``X.zarr``; then the old one is deleted); a run killed between them finishes
    them.  ``progress(done, total)`` is called after each chunk.  Returns the converted store's path."""
    src = Path(src)
    in_place = dst is None
    dst = Path(str(src) + CONVERTING) if in_place else Path(dst)
    old = Path(str(src) + OLD)
    if in_place and not src.exists() and old.exists() and dst.exists():
        src = old  # killed between the two renames: the old store is complete under its new name
    old_store = FeatureStore.open(src)
    if old_store.version == SCHEMA_VERSION and in_place:
        if old.exists():
            shutil.rmtree(old)  # killed after the swap, before the old store was deleted
        return src
    if is_store(dst):
        new = FeatureStore.open(dst, mode="r+")
        if new.num_clips != old_store.num_clips or new.attrs.get("manifest_sha256") != old_store.attrs.get(
                "manifest_sha256"):
            raise UserError(f"{dst}: exists and holds another store; remove it or choose another --out")
    else:
        if dst.exists():
            shutil.rmtree(dst)  # a creation cut short before its metadata was complete
        import pandas as pd
        manifest = pd.DataFrame({k: old_store.meta(k) for k in
                                 ("id", "video_id", "verb_class", "noun_class", "start_frame", "stop_frame")})
        shapes = {m: tuple(old_store.attrs["window_shapes"][m]) for m in old_store.modalities}
        tmp = Path(str(dst) + ".creating")
        if tmp.exists():
            shutil.rmtree(tmp)
        FeatureStore.create(tmp, manifest, shapes, StoreAttrs.from_dict(old_store.attrs),
                            chunk_clips=old_store.chunk_clips)
        tmp.rename(dst)  # the new store appears whole or not at all
        new = FeatureStore.open(dst, mode="r+")
    readers = {m: old_store.reader(m) for m in old_store.modalities}
    done_old, done_new = old_store.done_mask(), new.done_mask()
    errors = old_store.errors()
    chunks = range(0, old_store.num_clips, old_store.chunk_clips)
    for i, lo in enumerate(chunks):
        hi = min(lo + old_store.chunk_clips, old_store.num_clips)
        rows = np.arange(lo, hi)
        todo = rows[done_old[lo:hi] & ~done_new[lo:hi]]
        if len(todo):
            feats = {m: r.rows(lo, hi)[todo - lo] for m, r in readers.items()}
            new.write(todo, feats)
        failed = rows[(errors[lo:hi] != "") & ~done_old[lo:hi]]
        if len(failed):
            new.mark_failed(failed, [str(e) for e in errors[failed]])
        if progress:
            progress(i + 1, len(chunks))
    new.finalise()
    if not in_place:
        return dst
    if src != old:
        src.rename(old)
    dst.rename(Path(str(old)[:-len(OLD)]))
    shutil.rmtree(old)
    return Path(str(old)[:-len(OLD)])
