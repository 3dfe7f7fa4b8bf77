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
  :mod:`extract.store`), so a process killed at any moment loses at most its unflushed buffer (an interrupted
  run -- Ctrl-C, an error -- writes what it finished before stopping).
* **Damage repair.**  On resume the chunk files are checked (:func:`check_store`: a feature chunk missing although
  clips in it are marked done, a chunk that does not decode (cut, or with a bad checksum), a per-clip chunk that
  does not decode or does not match the manifest) and repaired so that the
  affected clips are extracted again (:func:`check_and_repair`).
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

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from extract.config import ExtractConfig
from extract.errors import UserError
from extract.store import FeatureStore

__all__ = ["CHECKED_ATTRS", "ExtractionFailed", "StoreMismatch", "check_and_repair", "check_store",
           "default_batch_size", "default_workers", "dist_env", "parse_shard", "resolve_device", "run_extraction",
           "window_shapes"]

# Store attributes a resumed run must agree with.
CHECKED_ATTRS = ("backbone", "modalities", "window_shapes", "checkpoints", "sampling", "preprocessing",
                 "precision", "manifest_sha256")
MAX_REASONS = 5  # failure reasons shown in the summary


class StoreMismatch(UserError):
    """An existing store was extracted with other settings (use another ``--out`` or ``--overwrite``)."""


class ExtractionFailed(UserError):
    """Some clips could not be extracted (their reasons are in the store); exit code 1."""

    exit_code = 1

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


# ------------------------------------------------------------------------------------------------------------
# devices, defaults, distributed environment


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when present else CPU; ``cuda`` without a GPU is a :class:`UserError`."""
    name = str(device).lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
        return torch.device(name)
    if name != "cpu":
        raise UserError(f"--device {device!r}: choose auto, cpu or cuda")
    return torch.device("cpu")


def default_batch_size(device: torch.device, cfg: ExtractConfig) -> int:
    """Clips per backbone batch: on a GPU about 64 windows / segments, on the CPU 2 clips."""
    if device.type == "cuda":
        return max(1, 64 // max(1, cfg.num_windows()))
    return 2


def default_workers(device: torch.device) -> int:
    """Decoding worker processes.  On a GPU all cores but one (up to 12), since decoding is then the slower stage.
    On the CPU the backbone's intra-op threads already use every core, so a worker process can only take time
    from them (and a preempted thread stalls the others at their next barrier) and adds the shared-memory hand-over
    of each clip: with fewer than 4 cores the clips are decoded in the extracting process between batches
    (measured on 2 cores, demo I3D: 9.2-9.5 clips/s against 8.5-8.8 with one niced worker); from 4 cores one
    worker, from 8 two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(12, cores - 1))
    if cores < 4:
        return 0
    return 1 if cores < 8 else 2


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call initialised the process group (and destroys it)

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_env() -> DistEnv:
    """Rank and world size from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise UserError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
    return DistEnv(rank, world, local)


def _init_dist(env: DistEnv, device: torch.device) -> None:
    import torch.distributed as dist
    if not env.active or dist.is_initialized():
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE is {env.world} but {var} is not set; start the ranks with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import atexit
    import datetime as _dt
    dist.init_process_group(backend, rank=env.rank, world_size=env.world, timeout=_dt.timedelta(hours=2))
    env.owns_group = True
    # kept for later calls in this process (a domain's train and test splits), destroyed at exit
    atexit.register(_destroy_group)


def _destroy_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _broadcast(env: DistEnv, obj):
    """rank 0's ``obj`` on every rank (identity without distribution)."""
    if not env.active:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(env: DistEnv, obj) -> list:
    if not env.active:
        return [obj]
    import torch.distributed as dist
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist
        dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# models and shapes


def _build_models(cfg: ExtractConfig, checkpoints: dict, device: torch.device) -> tuple[dict, dict]:
    """Backbones per modality (eval mode, on ``device``) and ``{modality: sha256 or None}``."""
    from extract.backbones import build, fold_batch_norm, sha256_file  # noqa: F401 - sha256 from checkpoint_info

    models, shas = {}, {}
    for m in cfg.modalities:
        ckpt = checkpoints.get(m)
        if ckpt is not None:
            from extract.backbones.deepmind import tf_checkpoint_prefix
            ckpt = Path(ckpt)
            if not ckpt.is_file() and tf_checkpoint_prefix(ckpt) is None:
                raise UserError(f"--checkpoint {m}={ckpt}: no such file (nor a TensorFlow checkpoint prefix)")
        try:
            model = build(cfg.backbone, m, checkpoint=ckpt, seed=cfg.seed)
        except UserError:
            raise
        except ValueError as e:  # unknown backbone / modality
            raise UserError(str(e)) from None
        info = model.checkpoint_info
        shas[m] = None if info is None else (info.sha256 or sha256_file(ckpt))
        model = fold_batch_norm(model)  # inference only: BatchNorm folded into the convs
        model = model.to(device).to(memory_format=_memory_format(cfg))
        models[m] = model.eval()
    return models, shas


def _memory_format(cfg: ExtractConfig):
    """channels_last(_3d): faster with oneDNN on the CPU (measured ~1.4x for I3D) and with cuDNN on GPUs."""
    return torch.channels_last_3d if cfg.backbone == "i3d" else torch.channels_last


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` on the CPU; ``bf16`` / ``fp16`` / ``fp32`` as given (fp16 on the
    CPU is refused: CPU autocast is meant for bf16)."""
    p = str(precision).lower()
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--precision {precision!r}: choose auto, bf16, fp16 or fp32")
    if p == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs --device cuda; on the CPU use bf16 or fp32")
    return p


def window_shapes(cfg: ExtractConfig, models: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Per-clip feature shape of each modality, ``(W or S, 1024[, h, w])``.

    I3D: computed (``InceptionI3d.output_size``: TF-"SAME" padding gives ``ceil(size / 32)``).  TBN: one forward
    pass of a BN-Inception built on PyTorch's "meta" device (shapes only, no weights, no arithmetic) on the
    modality's input shape.  ``models`` is accepted for compatibility and not needed.
    """
    from extract.backbones import INPUT_CHANNELS, BNInception, InceptionI3d
    from extract.inputs import input_shape

    shapes = {}
    n = cfg.num_windows()
    for m in cfg.modalities:
        shp = input_shape(cfg, m)
        if cfg.backbone == "i3d":
            _, h, w = InceptionI3d.output_size(shp[2], shp[3], shp[4])
            shapes[m] = (n, 1024, h, w)
            continue
        if m == "audio" and cfg.audio_map == "pooled":
            shapes[m] = (n, 1024)
            continue
        with torch.device("meta"):
            model = BNInception(INPUT_CHANNELS["tbn"][m]).eval()
        with torch.inference_mode():
            y = model(torch.empty((1, *shp[1:]), device="meta"))
        shapes[m] = (n, int(y.shape[1]), int(y.shape[2]), int(y.shape[3]))
    return shapes


# ------------------------------------------------------------------------------------------------------------
# decoding in worker processes


class ClipDataset(torch.utils.data.Dataset):
    """The pending clips of one rank; an item is ``(row, inputs | None, clip_error | None, user_error | None)``.

    Errors are returned as values, never raised, so that the DataLoader keeps going after a bad clip.
    ``inputs`` maps each modality to its :class:`extract.transforms.Pixels` (RGB, flow: a uint8 tensor and its
    table, a quarter of the bytes of the float input) or a float32 tensor (audio), of
    :func:`extract.inputs.input_shape`.
    """

    def __init__(self, records: dict[int, dict], rows: np.ndarray, cfg: ExtractConfig):
        self.records = records
        self.rows = [int(r) for r in rows]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from extract.inputs import ClipError, input_shape, load_clip_pixels
        from extract.transforms import Pixels

        row = self.rows[i]
        rec = self.records[row]
        try:
            arrays = load_clip_pixels(rec, self.cfg)
            out = {}
            for m in self.cfg.modalities:
                a = arrays[m]
                want = tuple(input_shape(self.cfg, m))
                if a.shape != want:
                    return row, None, f"clip {rec['id']}: {m} input has shape {a.shape}, expected {want}", None
                if isinstance(a, Pixels):  # uint8 and its table: applied where the batch is assembled
                    if not np.isfinite(a.table).all():
                        return row, None, f"clip {rec['id']}: non-finite {m} input table", None
                    out[m] = Pixels(torch.from_numpy(a.data), a.table, a.order)
                    continue
                a = np.asarray(a, dtype=np.float32)
                if not np.isfinite(a).all():
                    return row, None, f"clip {rec['id']}: non-finite {m} input", None
                out[m] = torch.from_numpy(a if min(a.strides) >= 0 else a.copy())  # keeps channels-last strides
            return row, out, None, None
        except ClipError as e:
            return row, None, _one_line(str(e)), None
        except UserError as e:
            return row, None, None, _one_line(str(e))
        except Exception as e:  # noqa: BLE001 - an unexpected failure in one clip is recorded, not fatal
            return row, None, f"clip {rec['id']}: {type(e).__name__}: {_one_line(str(e))}", None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:1000] or "failed"


def _keep(item):
    """DataLoader collate for ``batch_size=None``: keep the per-clip tuple as it is."""
    return item


def _worker_init(_worker_id: int) -> None:
    """Decoding workers yield to the backbone: a lower CPU priority so that, where decoding and inference share
    the CPU cores, the backbone's threads are not preempted (the prefetch queue hides the decoding latency)."""
    nice = int(os.environ.get("ADAPT_WORKER_NICE", "10"))
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass


def start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)``, whose worker processes are forked with OpenCV single-threaded (the workers are the
    parallelism, so N workers must not start N pools of threads; torch's own pool is switched off by the
    DataLoader).  The thread count is set in this process around the fork, never in the child: OpenCV's pool is
    copied into a forked child without its threads, and ``cv2.setNumThreads`` there waits forever on the copied
    pool's condition variable.  The video readers this process has open are closed first: a decord reader copied
    into a forked child deadlocks the child's decoding (seen after `check-checkpoint` ran in the same process)."""
    import cv2

    from extract.decode import forget_readers
    forget_readers()  # no decord reader of this process is copied into the children
    n = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return iter(loader)
    finally:
        cv2.setNumThreads(n)


def _loader(dataset: ClipDataset, workers: int, batch_size: int, pin: bool):
    if workers <= 0:
        return (dataset[i] for i in range(len(dataset)))
    prefetch = max(2, math.ceil(2 * batch_size / workers))
    return start_workers(torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_keep,
        prefetch_factor=prefetch, pin_memory=pin, persistent_workers=False, worker_init_fn=_worker_init))


# ------------------------------------------------------------------------------------------------------------
# inference


class Extractor:
    """Runs the backbones on batches of clips; every call has the same batch shape (see the module docstring).

    The clips' inputs are copied straight into one persistent batch buffer per modality, in the backbone's memory
    format, on the device; RGB and flow arrive as uint8 pixels with their input table, applied during that copy
    (``cv2.LUT`` on the CPU; on CUDA the pixels go over from the loader's pinned tensors, asynchronously, and the
    table is looked up on the GPU).  The rows past the last clip of a short batch are zeros and their outputs are
    dropped.
    """

    def __init__(self, cfg: ExtractConfig, models: dict, device: torch.device, batch_size: int,
                 precision: str = "fp32"):
        from extract.inputs import input_shape

        self.cfg, self.models, self.device, self.batch_size = cfg, models, device, int(batch_size)
        self.in_shapes = {m: tuple(input_shape(cfg, m)) for m in cfg.modalities}
        precision = resolve_precision(precision, device)
        self.amp = precision != "fp32"
        self.amp_dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.memory_format = _memory_format(cfg)
        self._buffers: dict[str, torch.Tensor] = {}
        self._padded: dict[str, int] = {}  # rows of the buffer currently zero from a short batch
        self._tables: dict[bytes, torch.Tensor] = {}  # input tables on the device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every call has the same shapes

    def _buffer(self, m: str) -> torch.Tensor:
        if m not in self._buffers:
            shape = (self.batch_size * self.in_shapes[m][0], *self.in_shapes[m][1:])
            self._buffers[m] = torch.zeros(shape, dtype=torch.float32, device=self.device) \
                .contiguous(memory_format=self.memory_format)
            self._padded[m] = 0
        return self._buffers[m]

    def __call__(self, clips: list[dict]) -> list[dict[str, np.ndarray]]:
        """Features of each clip (float16 numpy per modality) for a list of at most ``batch_size`` clips."""
        n = len(clips)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch has 1..{self.batch_size} clips, got {n}")
        out: list[dict] = [{} for _ in range(n)]
        for m, model in self.models.items():
            per_clip = self.in_shapes[m][0]
            buf = self._buffer(m)
            for i, c in enumerate(clips):
                self._fill(buf[i * per_clip:(i + 1) * per_clip], c[m])
            if n * per_clip < buf.shape[0] and self._padded[m] != n:
                buf[n * per_clip:].zero_()
            self._padded[m] = n if n < self.batch_size else 0
            y = self._forward(model, m, buf)
            y = y[: n * per_clip].reshape(n, per_clip, *y.shape[1:])
            for i in range(n):
                out[i][m] = y[i]
        return out

    def _fill(self, dst: torch.Tensor, x) -> None:
        """Copy one clip's input into its rows of the batch buffer; :class:`~extract.transforms.Pixels` get their
        table applied on the way (``cv2.LUT`` on the CPU; on a GPU the uint8 pixels are copied over and looked up
        there)."""
        from extract.transforms import Pixels, lookup

        if not isinstance(x, Pixels):
            dst.copy_(x, non_blocking=True)
        elif self.device.type == "cpu":
            data = x.data.numpy() if isinstance(x.data, torch.Tensor) else x.data
            dst.copy_(torch.from_numpy(Pixels(data, x.table, x.order).to_float()))
        else:
            data = torch.as_tensor(x.data).to(self.device, non_blocking=True)
            dst.copy_(lookup(self._table(x.table), data).permute(x.order))

    def _table(self, table: np.ndarray) -> torch.Tensor:
        key = table.tobytes()
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = torch.from_numpy(np.array(table, dtype=np.float32)).to(self.device)
        return t

    @torch.inference_mode()
    def _forward(self, model, modality: str, x: torch.Tensor) -> np.ndarray:
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else nullcontext()
        with ctx:
            y = model(x)
        y = y.float()
        if self.cfg.backbone == "i3d":
            y = y.mean(dim=2)  # Mixed_5c averaged over time: (N, 1024, h, w)
        elif modality == "audio" and self.cfg.audio_map == "pooled":
            y = y.mean(dim=(2, 3))  # (N, 1024)
        return y.to(torch.float16).cpu().numpy()  # .cpu() waits for the device: the buffer is free again


# ------------------------------------------------------------------------------------------------------------
# the store


def _store_attrs(cfg: ExtractConfig, split, df, shas: dict, precision: str, layouts: dict | None = None) -> dict:
    verbs, nouns = split.class_counts(df)
    from extract.manifests import manifest_sha256
    return {
        "backbone": cfg.backbone,
        "checkpoints": {m: shas.get(m) for m in cfg.modalities},
        "checkpoint_layouts": {m: (layouts or {}).get(m) for m in cfg.modalities},
        "sampling": cfg.sampling(),
        "preprocessing": cfg.preprocessing(),
        "precision": precision,
        "manifest_name": split.name,
        "manifest_path": str(split.path),
        "manifest_sha256": manifest_sha256(df),
        "dataset": split.dataset,
        "domain": split.domain,
        "verb_classes": int(verbs),
        "noun_classes": int(nouns),
        "split_kind": cfg.split_kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


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


def _create_store(out: Path, df, shapes: dict, attrs: dict, chunk_clips: int | None, overwrite: bool,
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
    if out.exists() and overwrite:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        os.rename(tmp, out)  # fails when `out` is a non-empty folder (another process won the race)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if race_ok and (out / "zarr.json").is_file():
            return False
        raise UserError(f"{out}: already exists; use another --out or --overwrite") from None
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.creating-<pid>`` / ``.old-<pid>`` folders left by killed processes."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


def _prepare_store(out: Path, df, shapes: dict, attrs: dict, chunk_clips: int | None, overwrite: bool,
                   retry_failed: bool, shard: tuple[int, int] | None = None, verify: bool = True) -> dict:
    """Create, replace or check the store (rank 0, or each process of a ``shard`` run for its own chunks).

    On an existing store: refuse other settings, repair damaged chunks (:func:`check_and_repair`), clear the
    failure records when ``retry_failed``.  Returns what happened, for the summary."""
    info = {"created": False, "reset_failed": 0, "repaired": []}
    _remove_stale_temporaries(out)
    exists = (out / "zarr.json").is_file()
    if out.exists() and not exists and not overwrite:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise UserError(f"{out}: exists but is not a feature store; use another --out or --overwrite")
    if not exists or overwrite:
        if _create_store(out, df, shapes, attrs, chunk_clips, overwrite, race_ok=shard is not None):
            info["created"] = True
            return info
    store = FeatureStore.open(out, mode="r+")
    diffs = _differences(store.attrs, {**attrs, "modalities": list(shapes),
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
        info["reset_failed"] = _reset_failed(store, chunks)
    return info


def _my_chunks(store: FeatureStore, shard: tuple[int, int] | None) -> np.ndarray:
    n_chunks = math.ceil(store.num_clips / store.chunk_clips)
    chunks = np.arange(n_chunks)
    if shard is not None:
        chunks = chunks[chunks % shard[1] == shard[0]]
    return chunks


def _chunk_rows(store: FeatureStore, c: int) -> slice:
    return slice(int(c) * store.chunk_clips, min((int(c) + 1) * store.chunk_clips, store.num_clips))


def _reset_failed(store: FeatureStore, chunks: np.ndarray) -> int:
    errors = store.errors()
    rows = np.flatnonzero(errors != "")
    rows = rows[np.isin(rows // store.chunk_clips, chunks)]
    for c in np.unique(rows // store.chunk_clips):
        sel = rows[rows // store.chunk_clips == c]
        with store._locked(int(c)):
            store.group["error"].oindex[sel] = np.array([""] * len(sel))
    return len(rows)


# ------------------------------------------------------------------------------------------------------------
# checking a store's chunk files (a write cut short, a deleted or truncated chunk)


def _chunk_problem(store: FeatureStore, name: str, c: int, reader=None) -> str | None:
    """Whether a feature chunk decodes (with the codec library, through tensorstore): a cut file or, in a
    version-2 store, any flipped bit (each inner chunk carries a CRC32C) fails."""
    rows = _chunk_rows(store, c)
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
    from extract.store import CLIP_ARRAYS

    problems = []
    n_chunks = math.ceil(store.num_clips / store.chunk_clips)
    chunks = np.arange(n_chunks) if chunks is None else np.asarray(chunks)
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
                v = arr[_chunk_rows(store, c)]
                if name == "done":
                    done[_chunk_rows(store, c)] = v
            except Exception as e:  # noqa: BLE001
                problems.append((name, int(c), f"does not decode ({type(e).__name__})"))
    for m in store.modalities:
        reader = store.reader(m)
        for c in chunks:
            path = store.chunk_file(m, c)
            has_done = bool(done[_chunk_rows(store, c)].any())
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
        with store._locked(c):
            path = store.chunk_file(name, c)
            if path.is_file():
                path.unlink()
            rows = _chunk_rows(store, c)
            if name in store.modalities:
                store.group["done"][rows] = np.zeros(rows.stop - rows.start, dtype=bool)
            elif name not in ("done", "error"):
                _rewrite_meta(store, df, name, rows)
        fixed.append(f"{name} chunk {c} {what}: its clips will be extracted again"
                     if name in store.modalities or name == "done" else
                     f"{name} chunk {c} {what}: " + ("failure records cleared" if name == "error"
                                                     else "rewritten from the manifest"))
    # per-clip metadata that decodes but does not match the manifest (e.g. a chunk file deleted -> fill values)
    chunks = np.arange(math.ceil(store.num_clips / store.chunk_clips)) if chunks is None else np.asarray(chunks)
    for name in ("id", "video_id", "verb_class", "noun_class", "start_frame", "stop_frame"):
        stored = np.asarray(store.group[name][:])
        want = _meta_values(df, name)
        if name in ("id", "video_id"):
            stored, want = np.asarray(stored.tolist(), dtype=object), np.asarray(want.tolist(), dtype=object)
        bad = np.flatnonzero(stored != want)
        for c in np.unique(bad // store.chunk_clips):
            if c not in chunks:
                continue
            with store._locked(int(c)):
                _rewrite_meta(store, df, name, _chunk_rows(store, c))
            fixed.append(f"{name} chunk {c} did not match the manifest: rewritten from it")
    return fixed


def _meta_values(df, name: str) -> np.ndarray:
    if name in ("id", "video_id"):
        return df[name].astype(str).to_numpy()
    return df[name].to_numpy()


def _rewrite_meta(store: FeatureStore, df, name: str, rows: slice) -> None:
    store.group[name][rows] = _meta_values(df, name)[rows]


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
    """Extract the features of ``split`` (a registry name, a manifest path or a :class:`~extract.manifests.Split`)
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
        verify: on resume, check the store's chunk files and repair damage (:func:`check_and_repair`).

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

    from extract.inputs import check_config
    from extract.manifests import Split, resolve_split

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    from extract.allocator import retain_freed_memory
    retain_freed_memory()  # every batch allocates the same tensors again: reuse their pages
    out = Path(out)
    checkpoints = {k: v for k, v in (checkpoints or {}).items() if v is not None}
    cfg = replace(cfg, modalities=tuple(cfg.modalities))
    check_config(cfg)
    unknown = sorted(set(checkpoints) - set(cfg.modalities))
    if unknown:
        raise UserError(f"--checkpoint {unknown[0]}=...: modality {unknown[0]!r} is not extracted "
                        f"(modalities: {', '.join(cfg.modalities)})")
    if not Path(cfg.data_root).is_dir():
        raise UserError(f"data root {cfg.data_root}: no such folder; pass --data-root")

    env = dist_env()
    shard_t = parse_shard(shard)
    if shard_t is not None:
        if env.active:
            raise UserError("--shard cannot be combined with torchrun (WORLD_SIZE > 1): ranks shard by themselves")
        if overwrite:
            raise UserError("--shard cannot be combined with --overwrite (the shards would replace each other's "
                            "store); delete the store first")
        env = DistEnv(rank=shard_t[0], world=shard_t[1], local_rank=0)
    dev = resolve_device(device, env.local_rank)
    if shard_t is None:
        _init_dist(env, dev)
    coordinated = env.active and shard_t is None
    lead = env.rank == 0
    try:
        sp = split if isinstance(split, Split) else resolve_split(split)
        df = sp.read()
        if len(df) == 0:
            raise UserError(f"{sp.path}: the manifest has no clips")
        models, shas = _build_models(cfg, checkpoints, dev)
        random_mods = [m for m in cfg.modalities if shas[m] is None]
        if random_mods and lead:
            console.print(f"[yellow]warning:[/yellow] no checkpoint for {', '.join(random_mods)}: the "
                          f"{cfg.backbone} weights are random (seed {cfg.seed}), so the features only test the "
                          f"pipeline; pass --checkpoint MODALITY=PATH", highlight=False, soft_wrap=True)
        shapes = window_shapes(cfg, models)
        precision = resolve_precision(precision, dev)
        layouts = {m: getattr(getattr(mod, "checkpoint_info", None), "layout", None) for m, mod in models.items()}
        attrs = _store_attrs(cfg, sp, df, shas, precision, layouts)

        # create (or check and repair) the store: rank 0 for all ranks, or each shard process for its own chunks
        prep, error = None, None
        if lead or shard_t is not None:
            try:
                prep = _prepare_store(out, df, shapes, attrs, chunk_clips, overwrite, retry_failed,
                                      shard=shard_t, verify=verify)
            except UserError as e:
                if not coordinated:
                    raise
                error = (type(e).__name__, str(e))
        if coordinated:
            prep, error = _broadcast(env, (prep, error))
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
        store = FeatureStore.open(out, mode="r+")

        pending = store.pending_rows()
        mine = np.arange(store.num_clips)
        if env.active:
            pending = pending[(pending // store.chunk_clips) % env.world == env.rank]
            mine = mine[(mine // store.chunk_clips) % env.world == env.rank]
        skipped = len(mine) - len(pending)
        if limit is not None:
            pending = pending[: max(0, int(limit))]

        bs = int(batch_size or default_batch_size(dev, cfg))
        if bs < 1:
            raise UserError(f"--batch-size {bs}: must be >= 1")
        nw = default_workers(dev) if workers is None else int(workers)
        nw = max(0, min(nw, len(pending)))
        records = {int(r): _record(df, int(r)) for r in pending}
        dataset = ClipDataset(records, pending, cfg)
        extractor = Extractor(cfg, models, dev, bs, precision)
        writer = ChunkWriter(store, pending, flush_seconds)
        failures: dict[str, str] = {}
        failed_now = 0
        ids = df["id"].astype(str).to_numpy()

        label = f"{sp.name} {cfg.backbone}" + (f" shard {env.rank}/{env.world}" if env.active else "")
        show = progress and (lead or shard_t is not None)
        bar = _progress(console, show, len(pending), label)
        t_run = time.perf_counter()
        with bar:
            task = bar.add_task(label, total=len(pending))
            batch: list[tuple[int, dict]] = []

            def fail(row, reason):
                nonlocal failed_now
                failed_now += 1
                if len(failures) < MAX_REASONS:
                    failures[str(ids[row])] = reason
                writer.failed(row, reason)

            pace = {"t": None, "first": 0, "clips": 0}  # the steady rate counts from the first batch's end

            def run_batch():
                feats = extractor([x for _, x in batch])
                for (row, _), f in zip(batch, feats):
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

            try:
                for row, inputs, clip_error, user_error in _loader(dataset, nw, bs, dev.type == "cuda"):
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
                # interrupted (Ctrl-C, an error): keep what is finished, then stop
                try:
                    writer.flush()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
                raise
            writer.flush()
        t_end = time.perf_counter()
        seconds_run = t_end - t_run
        after_first = pace["clips"] - pace["first"]
        steady = after_first / (t_end - pace["t"]) if after_first > 0 and t_end > pace["t"] else 0.0

        # all done: finalise (rank 0 after every rank; a shard process when the store is complete)
        counts = _gather(env, {"extracted": writer.written, "failed_now": failed_now, "skipped": skipped,
                               "failures": failures}) if coordinated else \
            [{"extracted": writer.written, "failed_now": failed_now, "skipped": skipped, "failures": failures}]
        if coordinated:
            _barrier(env)
        if (lead and shard_t is None) or (shard_t is not None and len(store.pending_rows()) == 0):
            store.finalise()
        if coordinated:
            _barrier(env)
        store = FeatureStore.open(out, mode="r")
        failed_all = store.failed()
        if shard_t is not None:  # a shard answers for its own chunks
            errors = store.errors()
            rows = np.flatnonzero(errors != "")
            rows = rows[(rows // store.chunk_clips) % env.world == env.rank]
            store_ids = store.meta("id")
            failed_all = {str(store_ids[r]): str(errors[r]) for r in rows}
        done_mask = store.done_mask()
        done = int(done_mask.sum())
        extracted = sum(c["extracted"] for c in counts)
        shown: dict[str, str] = {}
        for c in counts:
            for k, v in c["failures"].items():
                if len(shown) < MAX_REASONS:
                    shown[k] = v
        for k, v in failed_all.items():
            if len(shown) < MAX_REASONS and k not in shown:
                shown[k] = v
        seconds = time.perf_counter() - t0
        all_failed = len(store.failed())
        summary = {
            "split": sp.name, "out": str(out), "clips": store.num_clips, "extracted": extracted,
            "failed": len(failed_all), "failed_now": sum(c["failed_now"] for c in counts), "failures": shown,
            "skipped": sum(c["skipped"] for c in counts), "seconds": round(seconds, 3),
            "run_seconds": round(seconds_run, 3),
            "clips_per_s": round(extracted / seconds_run, 3) if seconds_run > 0 else 0.0,
            "steady_clips_per_s": round(steady, 3),
            "done": done, "complete": done + all_failed == store.num_clips, "rank": env.rank,
            "world": env.world, "device": str(dev), "batch_size": bs, "workers": nw,
            "created": bool(prep.get("created")), "reset_failed": int(prep.get("reset_failed", 0)),
            "repaired": list(prep.get("repaired", [])), "random_weights": random_mods,
        }
        if lead or shard_t is not None:
            _print_summary(console, summary)
        if failed_all and not allow_failures:
            first = next(iter(shown.values()), next(iter(failed_all.values())))
            where = f"shard {env.rank}/{env.world} of {sp.name}" if shard_t is not None else sp.name
            rest = (f"the other {done} clips are in {out}" if done else
                    f"no clip was extracted ({out} records why each failed)")
            raise ExtractionFailed(
                f"{len(failed_all)} of {store.num_clips} clips of {where} failed (first: {first}); {rest}; fix the "
                f"data and re-run with --retry-failed, or pass --allow-failures", summary)
        return summary
    except BaseException:
        if coordinated and env.owns_group:
            _destroy_group()  # do not leave the other ranks waiting on a collective of this one
        raise


def parse_shard(shard) -> tuple[int, int] | None:
    """``None`` | ``(i, n)`` | ``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if shard is None:
        return None
    if isinstance(shard, str):
        a, sep, b = shard.partition("/")
        try:
            parsed = (int(a), int(b)) if sep else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise UserError(f"--shard {shard!r}: expected INDEX/COUNT, e.g. 0/2")
        shard = parsed
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {i}/{n}: need 0 <= INDEX < COUNT")
    return (i, n) if n > 1 else None


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
