"""The extraction pipeline: backbones built for inference, clips decoded in worker processes, and the batched
backbone calls that turn them into per-clip features (see :mod:`extract.runner` for the whole run)."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from extract.config import ExtractConfig
from featstore.errors import UserError


# ------------------------------------------------------------------------------------------------------------
# defaults


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


# ------------------------------------------------------------------------------------------------------------
# models and shapes


def build_models(cfg: ExtractConfig, checkpoints: dict, device: torch.device) -> tuple[dict, dict]:
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
        model = model.to(device).to(memory_format=memory_format(cfg))
        models[m] = model.eval()
    return models, shas


def memory_format(cfg: ExtractConfig):
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


def keep_item(item):
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


def loader(dataset: ClipDataset, workers: int, batch_size: int, pin: bool):
    if workers <= 0:
        return (dataset[i] for i in range(len(dataset)))
    prefetch = max(2, math.ceil(2 * batch_size / workers))
    return start_workers(torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=keep_item,
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
        self.memory_format = memory_format(cfg)
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
