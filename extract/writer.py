"""The extraction's side of the store: its attributes from the run's settings, its atomic creation, the checks
on resume (same settings, intact chunks), and the chunk writer that buffers per-clip features."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from extract.config import ExtractConfig
from featstore.errors import UserError
from featstore.integrity import check_and_repair, is_own_store, refuse_foreign, remove_stale_temporaries
from featstore.schema import StoreAttrs
from featstore.store import FeatureStore, is_store

# Store attributes a resumed run must agree with.
CHECKED_ATTRS = ("backbone", "modalities", "window_shapes", "checkpoints", "sampling", "preprocessing",
                 "precision", "manifest_sha256")


class StoreMismatch(UserError):
    """An existing store was extracted with other settings (use another ``--out`` or ``--overwrite``)."""


def run_attrs(cfg: ExtractConfig, split, df, shas: dict, precision: str,
                layouts: dict | None = None) -> StoreAttrs:
    """What this extraction says about its features: backbone, weights, sampling, preprocessing, the manifest."""
    from featstore.manifests import manifest_sha256
    verbs, nouns = split.class_counts(df)
    return StoreAttrs(
        backbone=cfg.backbone, checkpoints={m: shas.get(m) for m in cfg.modalities},
        checkpoint_layouts={m: (layouts or {}).get(m) for m in cfg.modalities}, sampling=cfg.sampling(),
        preprocessing=cfg.preprocessing(), precision=precision, manifest_name=split.name,
        manifest_path=str(split.path), manifest_sha256=manifest_sha256(df), dataset=split.dataset,
        domain=split.domain, verb_classes=int(verbs), noun_classes=int(nouns), split_kind=cfg.split_kind,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable differences between a store's attributes and this run's, for CHECKED_ATTRS."""
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731 - tuples -> lists as stored
    diffs = []
    for key in CHECKED_ATTRS:
        a, b = norm(stored.get(key)), norm(wanted.get(key))
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{key}.{k} {_short(b.get(k))} here vs {_short(a.get(k))} in the store")
        else:
            diffs.append(f"{key} {_short(b)} here vs {_short(a)} in the store")
    return diffs


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        s = v[:12]  # a sha256
    return s if len(s) <= 60 else s[:57] + "..."


def _create_store(out: Path, df, shapes: dict, attrs: StoreAttrs, chunk_clips: int | None, overwrite: bool,
                  race_ok: bool = False) -> bool:
    """Create the store in a temporary folder and rename it into place (atomic for a reader).

    Returns False when ``race_ok`` and another process put a store there first (the caller then opens it)."""
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        FeatureStore.create(tmp, df, shapes, attrs, chunk_clips=chunk_clips)
    except BaseException as e:  # a full disk or Ctrl-C: leave nothing half made behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            e.filename = out  # not the temporary folder, nor nothing (zarr's store leaves the name out)
        raise
    if overwrite and is_own_store(out) and not out.is_symlink():  # only a store this tool made is replaced
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        try:
            os.rename(out, old)
            os.rename(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.rename(old, out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        os.rename(tmp, out)  # fails when `out` is a non-empty folder (another process won the race)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if race_ok and is_store(out):
            return False
        raise UserError(f"{out}: already exists; use another --out or --overwrite") from None
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.creating-<pid>`` / ``.old-<pid>`` folders left by killed processes (nothing else)."""
    remove_stale_temporaries(out)


def prepare_store(out: Path, df, shapes: dict, attrs: StoreAttrs, chunk_clips: int | None, overwrite: bool,
                   retry_failed: bool, shard: tuple[int, int] | None = None, verify: bool = True) -> dict:
    """Create, replace or check the store (rank 0, or each process of a ``shard`` run for its own chunks).

    On an existing store: refuse other settings, repair damaged chunks (:func:`check_and_repair`), clear the
    failure records when ``retry_failed``.  Returns what happened, for the summary."""
    info = {"created": False, "reset_failed": 0, "repaired": []}
    _remove_stale_temporaries(out)
    exists = is_store(out)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
        exists = False
    elif (out.exists() or out.is_symlink()) and (overwrite or not exists):
        # only a store this tool made is ever replaced: a folder or file of the user's is refused, --overwrite or not
        refuse_foreign(out)
    if not exists or overwrite:
        if _create_store(out, df, shapes, attrs, chunk_clips, overwrite, race_ok=shard is not None):
            info["created"] = True
            return info
    store = FeatureStore.open(out, mode="r+")
    diffs = _differences(store.attrs, {**attrs.to_dict(), "modalities": list(shapes),
                                       "window_shapes": {m: list(s) for m, s in shapes.items()}})
    if diffs:
        raise StoreMismatch(f"{out}: the store was extracted with other settings ({'; '.join(diffs[:4])}"
                        f"{'; ...' if len(diffs) > 4 else ''}); use another --out, or --overwrite to replace it")
    if int(store.num_clips) != len(df):
        raise UserError(f"{out}: holds {store.num_clips} clips, the manifest {len(df)}; use another --out")
    chunks = _my_chunks(store, shard)
    if verify:
        info["repaired"] = check_and_repair(store, df, chunks)
        info["unchecked_bits"] = store.version < 2
    if retry_failed:
        info["reset_failed"] = store.reset_failed(chunks)
    return info


def _my_chunks(store: FeatureStore, shard: tuple[int, int] | None) -> np.ndarray:
    chunks = np.arange(store.num_chunks)
    if shard is not None:
        chunks = chunks[chunks % shard[1] == shard[0]]
    return chunks


class ChunkWriter:
    """Buffers per-clip features per store chunk and writes a chunk once all its pending rows are finished;
    :meth:`flush` writes whatever is buffered (partial chunks) -- called every ``flush_seconds``."""

    def __init__(self, store: FeatureStore, rows: np.ndarray, flush_seconds: float = 30.0):
        self.store = store
        self.chunk_clips = store.chunk_clips
        self.remaining: dict[int, int] = {}
        for r in rows:
            c = int(r) // self.chunk_clips
            self.remaining[c] = self.remaining.get(c, 0) + 1
        self.buffer: dict[int, dict[int, dict]] = {}
        self.flush_seconds = flush_seconds
        self.last_flush = time.monotonic()
        self.written = 0

    def add(self, row: int, features: dict[str, np.ndarray]) -> None:
        c = row // self.chunk_clips
        self.buffer.setdefault(c, {})[row] = features
        self._finished(c)

    def failed(self, row: int, reason: str) -> None:
        self.store.mark_failed([row], [reason])
        self._finished(row // self.chunk_clips)

    def _finished(self, c: int) -> None:
        self.remaining[c] -= 1
        if self.remaining[c] == 0:
            self._write(c)
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def _write(self, c: int) -> None:
        items = self.buffer.pop(c, {})
        if not items:
            return
        rows = np.array(sorted(items), dtype=np.int64)
        feats = {m: np.stack([items[int(r)][m] for r in rows]) for m in self.store.modalities}
        self.store.write(rows, feats)
        self.written += len(rows)

    def flush(self) -> None:
        for c in sorted(self.buffer):
            self._write(c)
        self.last_flush = time.monotonic()

    @property
    def buffered(self) -> int:
        return sum(len(v) for v in self.buffer.values())
