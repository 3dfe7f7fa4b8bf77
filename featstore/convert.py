"""Rewriting a store in the current layout (``adapt convert-store``): version 1 (whole-chunk Zstandard, no
checksums) -> version 2 (shards of one-unit inner chunks with CRC32C)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from featstore.errors import UserError
from featstore.integrity import (is_empty_dir, is_own_store, refuse_foreign, replace_store, settle_writes,
                                 temporary_beside)
from featstore.schema import SCHEMA_VERSION, StoreAttrs
from featstore.store import FeatureStore

CONVERTING, OLD = ".converting", ".old"


def _check_out(src: Path, dst: Path) -> None:
    """Refuse a ``dst`` that is, holds or lies inside the source, or that exists and is not a store of ours (an
    empty folder is taken)."""
    s, d = src.resolve(), dst.resolve()
    if d == s or d in s.parents:
        what = "the source store itself" if d == s else f"a folder holding the source store {src}"
        raise UserError(f"{dst}: --out is {what}; give a new path for the converted store (or no --out to convert "
                        f"in place)")
    if s in d.parents:
        raise UserError(f"{dst}: --out lies inside the source store {src}; give a path outside it")
    refuse_foreign(dst)


def _left_by_conversion(old: Path, new: FeatureStore) -> bool:
    """Whether ``old`` is the earlier-version copy of ``new`` that an in-place conversion put aside."""
    if not is_own_store(old):
        return False
    attrs = json.loads((old / "zarr.json").read_text())["attributes"]
    return (attrs["schema_version"] < SCHEMA_VERSION and attrs["num_clips"] == new.num_clips
            and attrs.get("manifest_sha256") == new.attrs.get("manifest_sha256"))


def convert_store(src: str | Path, dst: str | Path | None = None, progress=None) -> Path:
    """Rewrite a store in the current layout (schema version 2): into ``dst``, or in place when ``dst`` is None.

    Resumable: the new store is written chunk by chunk through :meth:`FeatureStore.write` (features, then
    ``done``), so a run killed at any moment leaves the chunks it finished, and a new run skips them.  In place,
    the new store grows beside the old one (``X.zarr.converting``) and replaces it at the end by two renames
    (old -> ``X.zarr.old``, new -> ``X.zarr``; then the old one is deleted); a run killed between them finishes
    them.  ``progress(done, total)`` is called after each chunk.  Returns the converted store's path.

    Nothing but a store this tool made is ever replaced or removed: a ``dst`` that exists and is anything else
    (a folder of the user's, a file), or that is, holds or lies inside the source, is refused in one line."""
    src = Path(src)
    in_place = dst is None
    dst = Path(str(src) + CONVERTING) if in_place else Path(dst)
    old = Path(str(src) + OLD)
    if in_place and not src.exists() and is_own_store(old) and is_own_store(dst):
        src = old  # killed between the two renames: the old store is complete under its new name
    old_store = FeatureStore.open(src)
    if old_store.version == SCHEMA_VERSION and in_place:
        if src != old and _left_by_conversion(old, old_store):
            shutil.rmtree(old)  # killed after the swap, before the old store was deleted
        return src
    _check_out(src, dst)
    if in_place and src != old and (old.exists() or old.is_symlink()) and not is_empty_dir(old):
        raise UserError(f"{old}: exists, and an in-place conversion puts the old store aside under this name; move "
                        f"it away first (nothing was changed)")
    if is_own_store(dst):
        new = FeatureStore.open(dst, mode="r+")
        same = ("num_clips", "manifest_sha256", "backbone", "modalities", "window_shapes")
        if any(new.attrs.get(k) != old_store.attrs.get(k) for k in same):
            raise UserError(f"{dst}: exists and holds another store; remove it or choose another --out")
    else:
        import pandas as pd
        manifest = pd.DataFrame({k: old_store.meta(k) for k in
                                 ("id", "video_id", "verb_class", "noun_class", "start_frame", "stop_frame")})
        shapes = {m: tuple(old_store.attrs["window_shapes"][m]) for m in old_store.modalities}
        tmp = temporary_beside(dst)
        try:
            FeatureStore.create(tmp, manifest, shapes, StoreAttrs.from_dict(old_store.attrs),
                                chunk_clips=old_store.chunk_clips)
            replace_store(tmp, dst)  # the new store appears whole or not at all
        except BaseException:
            settle_writes()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        new = FeatureStore.open(dst, mode="r+")
    readers = {m: old_store.reader(m) for m in old_store.modalities}
    done_old, done_new = old_store.done_mask(), new.done_mask()
    errors = old_store.errors()
    chunks = range(0, old_store.num_clips, old_store.chunk_clips)
    try:
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
    except KeyboardInterrupt:
        settle_writes()  # let the chunk being written finish (it is kept), without tracebacks at exit
        raise
    if not in_place:
        return dst
    if src != old:
        src.rename(old)
    dst.rename(Path(str(old)[:-len(OLD)]))
    shutil.rmtree(old)
    return Path(str(old)[:-len(OLD)])
