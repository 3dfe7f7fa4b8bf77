"""The extraction runner: the clips of a split -> backbone feature maps -> a feature store.

:func:`run_extraction` is what ``adapt extract`` calls for one split::

    manifest rows (pending, this rank's chunks)
        -> DataLoader worker processes: extract.inputs.load_clip (decode + transforms; a data fault is returned
           as a value, so one bad clip never stops the loader)
        -> batches of ``batch_size`` clips: the windows / segments of all clips of a batch stacked into one
           backbone batch per modality (torch.inference_mode, channels_last(_3d); on CUDA autocast bf16/fp16)
        -> per-clip features, float16, buffered per store chunk
        -> FeatureStore.write of a chunk once all its rows are finished (and of every buffered row every
           ``flush_seconds``), FeatureStore.mark_failed at once for a clip that failed

What is stored per clip and modality (``window_shapes`` in the store's attributes):

=========  ========  ================================  =====================================================
backbone   modality  per clip                          how
=========  ========  ================================  =====================================================
i3d        rgb/flow  (W, 1024, crop/32, crop/32)       ``Mixed_5c`` averaged over its time axis, per window
tbn        rgb/flow  (S, 1024, crop/32, crop/32)       ``inception_5b_output`` per TSN segment
tbn        audio     (S, 1024) or (S, 1024, 8, 8)      ``cfg.audio_map``: "pooled" (spatial mean) or "spatial"
=========  ========  ================================  =====================================================

Guarantees:

* **Resume.**  An existing store is opened and only its pending rows (neither done nor failed) are extracted.
  The store's attributes must match the run's (backbone, checkpoint sha256 per modality, sampling,
  preprocessing, precision, manifest sha256, modalities and shapes); otherwise a one-line :class:`UserError` says what
  differs.  A store is created in a temporary folder and renamed into place, so a kill during creation leaves
  no half-made store behind.
* **Kill safety.**  Features are written a chunk at a time and ``done`` is set last (see
  :mod:`featstore.store`), so a process killed at any moment loses at most its unflushed buffer (an interrupted
  run -- Ctrl-C, an error -- writes what it finished before stopping).
* **Damage repair.**  On resume the chunk files are checked (:func:`featstore.integrity.check_store`: a feature
  chunk missing although clips in it are marked done, a chunk that does not decode (cut, or with a bad checksum), a
  per-clip chunk that does not decode or does not match the manifest) and repaired so that the affected clips are
  extracted again (:func:`featstore.integrity.check_and_repair`).
* **Bit-for-bit repeatable.**  Every backbone call has the same batch shape (the last batch is padded with
  zeros, which are dropped): on the CPU a convolution's result for one sample depends on the batch size (oneDNN
  uses another algorithm for a batch of one) but not on the other samples, so a resumed, a sharded or a
  repeated run writes the same bits as an uninterrupted one, given the same ``batch_size``, device and number
  of intra-op threads (``torch.get_num_threads()``; torchrun sets ``OMP_NUM_THREADS=1`` per process).  On CUDA
  cuDNN picks its algorithms by timing (``cudnn.benchmark``), so runs agree to bf16 precision, not bit for bit.
* **Failures.**  A clip whose data is faulty is recorded with its reason (``store.mark_failed``); nothing is ever
  written as zeros in its place.  The run goes on; at the end :class:`ExtractionFailed` (exit code 1) is raised
  when the store holds failed clips, unless ``allow_failures``.  ``retry_failed`` clears the failure records
  first so the clips are tried again.
* **Distributed.**  Under torchrun (``WORLD_SIZE > 1``) rank ``r`` extracts the store chunks ``c`` with
  ``c % world == r``, so two ranks never write the same chunk; rank 0 creates (or checks) the store before the
  others open it and finalises it after all are done.  Without torch.distributed, ``shard=(i, n)``
  (``--shard i/n``) does the same for independent processes sharing the store's folder: whichever comes first
  creates the store (the others find it and check it), and the last to finish finalises it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from extract.config import ExtractConfig
from extract.distributed import (DistEnv, barrier, broadcast, destroy_group, dist_env, gather, init_dist,
                                 parse_shard)
from extract.pipeline import (ClipDataset, Extractor, build_models, default_batch_size, default_workers, loader,
                              resolve_precision, window_shapes)
from extract.writer import ChunkWriter, StoreMismatch, prepare_store, run_attrs
from featstore.devices import resolve_device
from featstore.errors import UserError
from featstore.integrity import is_empty_dir, refuse_foreign
from featstore.store import FeatureStore, is_store

__all__ = ["ExtractionFailed", "StoreMismatch", "run_extraction"]

MAX_REASONS = 5  # failure reasons shown in the summary


class ExtractionFailed(UserError):
    """Some clips could not be extracted (their reasons are in the store); exit code 1."""

    exit_code = 1

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


# ------------------------------------------------------------------------------------------------------------
# progress


def _progress(console, enabled: bool, total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn

    def clock(seconds) -> str:
        s = int(seconds)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    class Rate(ProgressColumn):
        def render(self, task):  # noqa: D401
            from rich.text import Text
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} clips/s" if speed else "-- clips/s")

    class Times(ProgressColumn):
        """'0:01:05 elapsed, 0:03:10 left'; the time left only while it can be estimated."""
        def render(self, task):  # noqa: D401
            from rich.text import Text
            text = f"{clock(task.finished_time if task.finished else task.elapsed or 0)} elapsed"
            if not task.finished and task.time_remaining is not None:
                text += f", {clock(task.time_remaining)} left"
            return Text(text)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), Times(),
                    console=console, disable=not enabled, transient=False)


# ------------------------------------------------------------------------------------------------------------
# the run


def run_extraction(split, cfg: ExtractConfig, out: str | Path, checkpoints: dict | None = None,
                   device: str = "auto", batch_size: int | None = None, workers: int | None = None,
                   allow_failures: bool = False, progress: bool = True, retry_failed: bool = False,
                   overwrite: bool = False, precision: str = "auto", chunk_clips: int | None = None,
                   flush_seconds: float = 30.0, console=None, limit: int | None = None,
                   shard: tuple[int, int] | str | None = None, verify: bool = True) -> dict:
    """Extract the features of ``split`` (a registry name, a manifest path or a :class:`~featstore.manifests.Split`)
    into the store ``out``; resume it if it exists.  See the module docstring.

    Args:
        checkpoints: ``{modality: path or None}``; a modality without one gets random (seeded) weights, with a
            one-line warning.
        device: ``auto`` | ``cpu`` | ``cuda`` (``cuda:N``).  Under torchrun each rank takes ``cuda:LOCAL_RANK``.
        batch_size: clips per backbone batch (all windows of these clips go in one call); default
            :func:`default_batch_size`.
        workers: decoding worker processes (0: decode in this process); default :func:`default_workers`.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on the CPU), ``bf16``, ``fp16`` (CUDA only) or
            ``fp32``; recorded in the store (``precision``) and checked on resume.
        chunk_clips: clips per store chunk when the store is created (default: ~8 MiB chunks).
        flush_seconds: write buffered (partial-chunk) features at least this often.
        limit: extract at most this many of the pending clips (for benchmarks and tests).
        shard: ``(index, count)`` or ``"index/count"``: without torch.distributed, extract only the store chunks
            ``c`` with ``c % count == index`` (independent processes or machines sharing the store's folder;
            whichever comes first creates the store).  Not with torchrun, which shards by rank itself.
        verify: on resume, check the store's chunk files and repair damage
            (:func:`featstore.integrity.check_and_repair`).

    Returns:
        The summary dict: ``split``, ``out``, ``clips``, ``extracted`` (this run), ``failed`` (clips failed in
        the store, or in this shard), ``failed_now``, ``failures`` (first few ``{id: reason}``), ``skipped``
        (already done or failed before), ``seconds``, ``clips_per_s``, ``steady_clips_per_s`` (clips after the
        first batch over the time after it: the rate once the pipeline is full), ``done`` (clips done in the store),
        ``complete``, ``rank``, ``world``, ``device``, ``batch_size``, ``workers``, ``created``, ``repaired``.

    Raises:
        UserError: a fixable mistake (unknown split, checkpoint that does not fit, store made otherwise...).
        ExtractionFailed: (exit code 1) clips failed and ``allow_failures`` is False.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    from featstore.allocator import retain_freed_memory
    retain_freed_memory()  # every batch allocates the same tensors again: reuse their pages
    out = Path(out)
    checkpoints = {k: v for k, v in (checkpoints or {}).items() if v is not None}
    cfg = _checked(cfg, checkpoints)
    env, shard_t = _ranks(shard, overwrite)
    dev = resolve_device(device, env.local_rank)
    if shard_t is None:
        init_dist(env, dev)
    coordinated = env.active and shard_t is None
    lead = env.rank == 0
    try:
        _check_out(out, overwrite)
        sp, df, models, attrs, precision, random_mods = _prepare_run(split, cfg, checkpoints, dev, precision,
                                                                     console, lead)
        prep = _open_store(out, df, window_shapes(cfg, models), attrs, chunk_clips, overwrite, retry_failed,
                           shard_t, verify, env, coordinated, lead, console)
        store = FeatureStore.open(out, mode="r+")
        pending, skipped = _pending(store, env, limit)
        bs = int(batch_size or default_batch_size(dev, cfg))
        if bs < 1:
            raise UserError(f"--batch-size {bs}: must be >= 1")
        nw = max(0, min(default_workers(dev) if workers is None else int(workers), len(pending)))
        label = f"{sp.name} {cfg.backbone}" + (f" shard {env.rank}/{env.world}" if env.active else "")
        bar = _progress(console, progress and (lead or shard_t is not None), len(pending), label)
        done_now = _extract(store, df, pending, cfg, models, dev, bs, nw, precision, flush_seconds, bar, label)
        counts = {**done_now, "skipped": skipped}
        counts = gather(env, counts) if coordinated else [counts]
        summary, failed = _finish(out, sp, env, shard_t, coordinated, lead, counts, prep, t0, dev, bs, nw,
                                  random_mods, console)
        if failed and not allow_failures:
            raise _failures(summary, failed, sp, env, shard_t, out)
        return summary
    except BaseException:
        if coordinated and env.owns_group:
            destroy_group()  # do not leave the other ranks waiting on a collective of this one
        raise


def _check_out(out: Path, overwrite: bool) -> None:
    """Before anything is built or said: an ``out`` that exists and is not a store this tool made (a folder or
    file of the user's) is refused, with ``--overwrite`` too; nothing is deleted (an empty folder is taken)."""
    if (out.exists() or out.is_symlink()) and not is_empty_dir(out) and (overwrite or not is_store(out)):
        refuse_foreign(out)


def _checked(cfg: ExtractConfig, checkpoints: dict) -> ExtractConfig:
    """The settings and the checkpoints' modalities checked before anything is built."""
    from extract.inputs import check_config
    cfg = replace(cfg, modalities=tuple(cfg.modalities))
    check_config(cfg)
    unknown = sorted(set(checkpoints) - set(cfg.modalities))
    if unknown:
        raise UserError(f"--checkpoint {unknown[0]}=...: modality {unknown[0]!r} is not extracted "
                        f"(modalities: {', '.join(cfg.modalities)})")
    if not Path(cfg.data_root).is_dir():
        raise UserError(f"data root {cfg.data_root}: no such folder; pass --data-root")
    return cfg


def _ranks(shard, overwrite: bool) -> tuple[DistEnv, tuple[int, int] | None]:
    """This process's rank and world: torchrun's, or ``--shard i/n``'s."""
    env = dist_env()
    shard_t = parse_shard(shard)
    if shard_t is not None:
        if env.active:
            raise UserError("--shard cannot be combined with torchrun (WORLD_SIZE > 1): ranks shard by themselves")
        if overwrite:
            raise UserError("--shard cannot be combined with --overwrite (the shards would replace each other's "
                            "store); delete the store first")
        env = DistEnv(rank=shard_t[0], world=shard_t[1], local_rank=0)
    return env, shard_t


def _prepare_run(split, cfg, checkpoints, dev, precision, console, lead):
    """The split's manifest, the backbones (with a warning for random weights) and the store's attributes."""
    from featstore.manifests import Split, resolve_split
    sp = split if isinstance(split, Split) else resolve_split(split)
    df = sp.read()
    models, shas = build_models(cfg, checkpoints, dev)
    random_mods = [m for m in cfg.modalities if shas[m] is None]
    if random_mods and lead:
        console.print(f"[yellow]warning:[/yellow] no checkpoint for {', '.join(random_mods)}: the "
                      f"{cfg.backbone} weights are random (seed {cfg.seed}), so the features only test the "
                      f"pipeline; pass --checkpoint MODALITY=PATH", highlight=False, soft_wrap=True)
    precision = resolve_precision(precision, dev)
    layouts = {m: getattr(getattr(mod, "checkpoint_info", None), "layout", None) for m, mod in models.items()}
    return sp, df, models, run_attrs(cfg, sp, df, shas, precision, layouts), precision, random_mods


def _open_store(out, df, shapes, attrs, chunk_clips, overwrite, retry_failed, shard_t, verify, env, coordinated,
                lead, console) -> dict:
    """Create (or check and repair) the store: rank 0 for all ranks, or each shard process for its own chunks."""
    prep, error = None, None
    if lead or shard_t is not None:
        try:
            prep = prepare_store(out, df, shapes, attrs, chunk_clips, overwrite, retry_failed, shard=shard_t,
                                 verify=verify)
        except UserError as e:
            if not coordinated:
                raise
            error = (type(e).__name__, str(e))
    if coordinated:
        prep, error = broadcast(env, (prep, error))
        if error:
            raise (StoreMismatch if error[0] == "StoreMismatch" else UserError)(error[1])
    prep = prep or {}
    if lead:
        for line in prep.get("repaired", [])[:MAX_REASONS]:
            console.print(f"[yellow]repaired:[/yellow] {out}: {line}", highlight=False, soft_wrap=True)
        if prep.get("unchecked_bits"):
            console.print(f"[yellow]note:[/yellow] {out} is a schema-version-1 store: its chunks carry no "
                          f"checksums, so the check finds cut and missing chunks but not flipped bits (`adapt "
                          f"convert-store` writes a version-2 copy)", highlight=False, soft_wrap=True)
    return prep


def _pending(store: FeatureStore, env: DistEnv, limit: int | None) -> tuple[np.ndarray, int]:
    """This rank's rows still to extract, and how many of its rows are done or failed already."""
    pending = store.pending_rows()
    mine = np.arange(store.num_clips)
    if env.active:
        pending = pending[(pending // store.chunk_clips) % env.world == env.rank]
        mine = mine[(mine // store.chunk_clips) % env.world == env.rank]
    skipped = len(mine) - len(pending)
    if limit is not None:
        pending = pending[: max(0, int(limit))]
    return pending, skipped


def _extract(store, df, pending, cfg, models, dev, bs, nw, precision, flush_seconds, bar, label) -> dict:
    """Decode, run the backbones and write the pending clips; a failed clip is recorded and the run goes on.
    Returns this process's counts and the first failure reasons."""
    dataset = ClipDataset({int(r): _record(df, int(r)) for r in pending}, pending, cfg)
    extractor = Extractor(cfg, models, dev, bs, precision)
    writer = ChunkWriter(store, pending, flush_seconds)
    ids = df["id"].astype(str).to_numpy()
    failures: dict[str, str] = {}
    counts = {"failed_now": 0}
    pace = {"t": None, "first": 0, "clips": 0}  # the steady rate counts from the first batch's end
    batch: list[tuple[int, dict]] = []

    def fail(row, reason):
        counts["failed_now"] += 1
        if len(failures) < MAX_REASONS:
            failures[str(ids[row])] = reason
        writer.failed(row, reason)

    def run_batch():
        for (row, _), f in zip(batch, extractor([x for _, x in batch])):
            bad = [m for m, a in f.items() if not np.isfinite(a).all()]
            if bad:
                fail(row, f"clip {ids[row]}: non-finite {', '.join(bad)} features from the backbone "
                          f"(float16 overflow?)")
            else:
                writer.add(row, f)
        bar.advance(task, len(batch))
        pace["clips"] += len(batch)
        if pace["t"] is None:
            pace.update(t=time.perf_counter(), first=len(batch))
        batch.clear()

    t_run = time.perf_counter()
    with bar:
        task = bar.add_task(label, total=len(pending))
        try:
            for row, inputs, clip_error, user_error in loader(dataset, nw, bs, dev.type == "cuda"):
                if user_error:
                    raise UserError(user_error)
                if clip_error:
                    fail(row, clip_error)
                    bar.advance(task, 1)
                    continue
                batch.append((row, inputs))
                if len(batch) == bs:
                    run_batch()
            if batch:
                run_batch()
        except BaseException:
            try:  # interrupted (Ctrl-C, an error): keep what is finished, then stop
                writer.flush()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        writer.flush()
    t_end = time.perf_counter()
    after_first = pace["clips"] - pace["first"]
    steady = after_first / (t_end - pace["t"]) if after_first > 0 and t_end > pace["t"] else 0.0
    return {"extracted": writer.written, "failed_now": counts["failed_now"], "failures": failures,
            "run_seconds": t_end - t_run, "steady": steady}


def _finish(out, sp, env, shard_t, coordinated, lead, counts, prep, t0, dev, bs, nw, random_mods,
            console) -> tuple[dict, dict]:
    """Finalise the store (rank 0 after every rank; a shard process when the store is complete); the summary and
    the failed clips this process answers for."""
    if coordinated:
        barrier(env)
    store = FeatureStore.open(out, mode="r+")
    if (lead and shard_t is None) or (shard_t is not None and len(store.pending_rows()) == 0):
        store.finalise()
    if coordinated:
        barrier(env)
    store = FeatureStore.open(out, mode="r")
    failed_all = store.failed()
    if shard_t is not None:  # a shard answers for its own chunks
        errors = store.errors()
        rows = np.flatnonzero(errors != "")
        rows = rows[(rows // store.chunk_clips) % env.world == env.rank]
        store_ids = store.meta("id")
        failed_all = {str(store_ids[r]): str(errors[r]) for r in rows}
    done = int(store.done_mask().sum())
    extracted = sum(c["extracted"] for c in counts)
    shown: dict[str, str] = {}
    for failures in [c["failures"] for c in counts] + [failed_all]:
        for k, v in failures.items():
            if len(shown) < MAX_REASONS and k not in shown:
                shown[k] = v
    seconds_run = counts[env.rank if coordinated else 0]["run_seconds"]
    summary = {
        "split": sp.name, "out": str(out), "clips": store.num_clips, "extracted": extracted,
        "failed": len(failed_all), "failed_now": sum(c["failed_now"] for c in counts), "failures": shown,
        "skipped": sum(c["skipped"] for c in counts), "seconds": round(time.perf_counter() - t0, 3),
        "run_seconds": round(seconds_run, 3),
        "clips_per_s": round(extracted / seconds_run, 3) if seconds_run > 0 else 0.0,
        "steady_clips_per_s": round(counts[env.rank if coordinated else 0]["steady"], 3),
        "done": done, "complete": done + len(store.failed()) == store.num_clips, "rank": env.rank,
        "world": env.world, "device": str(dev), "batch_size": bs, "workers": nw,
        "created": bool(prep.get("created")), "reset_failed": int(prep.get("reset_failed", 0)),
        "repaired": list(prep.get("repaired", [])), "random_weights": random_mods,
    }
    if lead or shard_t is not None:
        _print_summary(console, summary)
    return summary, failed_all


def _failures(summary: dict, failed: dict, sp, env, shard_t, out) -> ExtractionFailed:
    first = next(iter(summary["failures"].values()), next(iter(failed.values())))
    where = f"shard {env.rank}/{env.world} of {sp.name}" if shard_t is not None else sp.name
    rest = (f"the other {summary['done']} clips are in {out}" if summary["done"] else
            f"no clip was extracted ({out} records why each failed)")
    return ExtractionFailed(f"{len(failed)} of {summary['clips']} clips of {where} failed (first: {first}); {rest}; "
                            f"fix the data and re-run with --retry-failed, or pass --allow-failures", summary)


def _record(df, row: int) -> dict:
    rec = df.iloc[row].to_dict()
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}


def _print_summary(console, s: dict) -> None:
    console.print(
        f"{s['split']}: {s['extracted']} clips extracted, {s['failed_now']} failed, {s['skipped']} skipped "
        f"(already done or failed before) in {s['seconds']:.1f} s ({s['clips_per_s']:.2f} clips/s); "
        f"store {s['out']}: {s['done']}/{s['clips']} done, {s['failed']} failed", highlight=False, soft_wrap=True)
    for clip, reason in list(s["failures"].items())[:MAX_REASONS]:
        console.print(f"  failed {clip}: {reason}", highlight=False, soft_wrap=True, markup=False)
