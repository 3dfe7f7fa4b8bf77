"""A store's integrity: which chunk files are cut, missing, corrupt (a flipped bit fails a version-2 store's
CRC32C) or out of step with the manifest, and their repair so that an extraction redoes those clips; and which
folders are stores this tool made, the only ones it ever replaces (:func:`is_own_store`, :func:`replace_store`).

The check decodes with the codec library (tensorstore for the features, zarr-python for the per-clip arrays);
it changes nothing.  The repair deletes what is damaged and marks its clips not done, under each chunk's lock.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np

from featstore.errors import UserError
from featstore.schema import CLIP_ARRAYS, READABLE_VERSIONS
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


def check_store(store: FeatureStore, chunks=None, decode: bool = True) -> list[tuple[str, int, str]]:
    """Problems of a store's chunk files, without changing anything: ``[(array, chunk, what)]``.

    * per-clip arrays (``done``, ``error``, ``id``...): every chunk must decode;
    * feature arrays: every chunk that holds a clip marked done must exist, and every existing chunk file must
      decode (a version-2 store's chunks carry checksums, so this also finds flipped bits); with
      ``decode=False`` only whether they exist (a quick look at a large store).
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
            what = _chunk_problem(store, m, int(c), reader) if decode else None
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


def damaged_clips(store: FeatureStore, problems: list[tuple[str, int, str]]) -> np.ndarray:
    """The rows marked done that :func:`check_store`'s ``problems`` make not really done: those of a damaged
    feature chunk or ``done`` chunk (a ``done`` chunk that does not decode says nothing about its clips)."""
    try:
        done = store.done_mask()
    except UserError:
        done = np.ones(store.num_clips, dtype=bool)
    rows = np.zeros(store.num_clips, dtype=bool)
    for name, c, _ in problems:
        if name in store.modalities or name == "done":
            rows[store.chunk_rows(c)] = True
    return np.flatnonzero(rows & done)


# ----------------------------------------------------------------------------------------------------------
# stores this tool made: the only folders it ever replaces, and only once their successor is complete

OWN_KEYS = ("schema_version", "backbone", "modalities", "window_shapes", "num_clips", "chunk_clips")


def is_own_store(path: str | Path) -> bool:
    """Whether ``path`` is a store this tool made: a Zarr v3 group whose attributes carry this project's schema
    version and layout keys.  Nothing else (a user's folder or file, another Zarr group) is ever deleted."""
    try:
        doc = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        return False
    attrs = doc.get("attributes")
    return (isinstance(attrs, dict) and attrs.get("schema_version") in READABLE_VERSIONS
            and all(k in attrs for k in OWN_KEYS))


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def refuse_foreign(out: Path, what: str = "--out") -> None:
    """Refuse an existing ``out`` that is not a store this tool made (an empty folder is taken: nothing is lost)."""
    if not (out.exists() or out.is_symlink()) or is_empty_dir(out):
        return
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link; give the folder it points to as {what}, or another {what}")
    if not is_own_store(out):
        kind = "a folder" if out.is_dir() else "a file"
        raise UserError(f"{out}: exists and is {kind}, not a feature store this tool made; nothing was changed; "
                        f"choose another {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.creating-<pid>`` / ``.<name>.old-<pid>`` folders beside ``out`` left by processes that
    were killed (their pid is gone); nothing else is touched.  A store put aside as ``.old-<pid>`` by a process
    killed before its successor took its place goes back to ``out``."""
    if not out.parent.is_dir():
        return
    for kind in ("old", "creating"):
        for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or p.is_symlink():
                continue
            if kind == "old" and not (out.exists() or out.is_symlink()) and is_own_store(p):
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def temporary_beside(out: Path) -> Path:
    """Where to build a store that is to replace ``out``: ``.<name>.creating-<pid>`` beside it (stale ones of
    killed processes removed first)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.write-test-{os.getpid()}")
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UserError(f"{out.parent}: cannot write a store there ({e.strerror or e}); give --out a folder you "
                        f"can write") from None
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # this process's own, from an earlier call
    return tmp


def replace_store(tmp: Path, out: Path) -> None:
    """Put the complete store ``tmp`` at ``out``.  An existing store of ours there is renamed aside, the new one
    renamed into place, and only then is the old one removed; an empty folder is replaced; anything else is
    refused (and ``tmp`` left for the caller to remove)."""
    if is_own_store(out) and not out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        try:
            os.rename(out, old)
            os.rename(tmp, out)
        except BaseException:  # a Ctrl-C between the renames included: the old store goes back
            if old.exists() and not out.exists():
                os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    refuse_foreign(out)
    os.rename(tmp, out)  # onto nothing or an empty folder


def settle_writes(timeout: float = 60.0) -> None:
    """Wait for the writes zarr-python is still doing on its I/O thread (after a Ctrl-C in the main thread they
    go on), then return: a folder can be removed without them failing, and the interpreter exits without
    pages of asyncio tracebacks from tasks cut off at shutdown."""
    try:
        from zarr.core import sync as zsync
    except ImportError:  # pragma: no cover
        return
    loop = zsync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def pending():
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    future = asyncio.run_coroutine_threadsafe(pending(), loop)
    try:
        future.result(timeout + 5)
    except BaseException:  # noqa: BLE001 - a second Ctrl-C, or a timeout: give up waiting
        future.cancel()
