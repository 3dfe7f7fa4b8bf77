"""A store's integrity: which chunk files are cut, missing, corrupt (a flipped bit fails a version-2 store's
CRC32C) or out of step with the manifest, and their repair so that an extraction redoes those clips.

The check decodes with the codec library (tensorstore for the features, zarr-python for the per-clip arrays);
it changes nothing.  The repair deletes what is damaged and marks its clips not done, under each chunk's lock.
"""

from __future__ import annotations

import numpy as np

from featstore.errors import UserError
from featstore.schema import CLIP_ARRAYS
from featstore.store import FeatureStore


def _chunk_problem(store: FeatureStore, name: str, c: int, reader=None) -> str | None:
    """Whether a feature chunk decodes (with the codec library, through tensorstore): a cut file or, in a
    version-2 store, any flipped bit (each inner chunk carries a CRC32C) fails."""
    rows = store.chunk_rows(c)
    try:
        (reader or store.reader(name)).rows(rows.start, rows.stop)
    except UserError:
        return "does not decode"
    return None


def check_store(store: FeatureStore, chunks=None) -> list[tuple[str, int, str]]:
    """Problems of a store's chunk files, without changing anything: ``[(array, chunk, what)]``.

    * per-clip arrays (``done``, ``error``, ``id``...): every chunk must decode;
    * feature arrays: every chunk that holds a clip marked done must exist, and every existing chunk file must
      decode (a version-2 store's chunks carry checksums, so this also finds flipped bits).
    Readers can call it to catch a store damaged after it was written; :func:`check_and_repair` fixes them.
    """
    problems = []
    chunks = np.arange(store.num_chunks) if chunks is None else np.asarray(chunks)
    done = np.zeros(store.num_clips, dtype=bool)
    for name in CLIP_ARRAYS:
        arr = store.group[name]
        try:
            values = arr[:]
            if name == "done":
                done = np.asarray(values, dtype=bool)
            continue
        except Exception:  # noqa: BLE001 - find the chunk(s) that do not decode
            pass
        for c in chunks:
            try:
                v = arr[store.chunk_rows(c)]
                if name == "done":
                    done[store.chunk_rows(c)] = v
            except Exception as e:  # noqa: BLE001
                problems.append((name, int(c), f"does not decode ({type(e).__name__})"))
    for m in store.modalities:
        reader = store.reader(m)
        for c in chunks:
            path = store.chunk_file(m, c)
            has_done = bool(done[store.chunk_rows(c)].any())
            if not path.is_file():
                if has_done:
                    problems.append((m, int(c), "missing, but clips in it are marked done"))
                continue
            what = _chunk_problem(store, m, int(c), reader)
            if what:
                problems.append((m, int(c), what))
    return problems


def check_and_repair(store: FeatureStore, df, chunks=None) -> list[str]:
    """Fix what :func:`check_store` finds in ``chunks`` so that extraction redoes the affected clips.

    A damaged feature chunk is deleted and its clips are marked not done; a damaged ``done`` chunk is deleted
    (its clips read as not done); a damaged ``error`` chunk is deleted (its failure records are lost, so those
    clips are retried); a damaged or wrong chunk of ``id``, ``video_id``, the classes or the frame numbers is
    rewritten from the manifest.  Returns one line per repair."""
    problems = check_store(store, chunks)
    fixed = []
    for name, c, what in problems:
        with store.locked(c):
            path = store.chunk_file(name, c)
            if path.is_file():
                path.unlink()
            rows = store.chunk_rows(c)
            if name in store.modalities:
                store.forget(rows)
            elif name not in ("done", "error"):
                _rewrite_meta(store, df, name, rows)
        fixed.append(f"{name} chunk {c} {what}: its clips will be extracted again"
                     if name in store.modalities or name == "done" else
                     f"{name} chunk {c} {what}: " + ("failure records cleared" if name == "error"
                                                     else "rewritten from the manifest"))
    # per-clip metadata that decodes but does not match the manifest (e.g. a chunk file deleted -> fill values)
    chunks = np.arange(store.num_chunks) if chunks is None else np.asarray(chunks)
    for name in ("id", "video_id", "verb_class", "noun_class", "start_frame", "stop_frame"):
        stored = np.asarray(store.group[name][:])
        want = _meta_values(df, name)
        if name in ("id", "video_id"):
            stored, want = np.asarray(stored.tolist(), dtype=object), np.asarray(want.tolist(), dtype=object)
        bad = np.flatnonzero(stored != want)
        for c in np.unique(bad // store.chunk_clips):
            if c not in chunks:
                continue
            with store.locked(int(c)):
                _rewrite_meta(store, df, name, store.chunk_rows(c))
            fixed.append(f"{name} chunk {c} did not match the manifest: rewritten from it")
    return fixed


def _meta_values(df, name: str) -> np.ndarray:
    if name in ("id", "video_id"):
        return df[name].astype(str).to_numpy()
    return df[name].to_numpy()


def _rewrite_meta(store: FeatureStore, df, name: str, rows: slice) -> None:
    store.write_meta(name, rows, _meta_values(df, name)[rows])
