"""Stage-1 inputs: one manifest row -> the arrays each backbone takes, per modality.

:func:`load_clip` is what the runner calls for every clip; :func:`input_shape` gives the per-clip shapes without
decoding anything.  Data faults (a missing folder or file, a corrupt or truncated JPEG, a truncated video, a frame
past the end of a video, missing audio, an unknown fps for audio) raise :class:`ClipError`, whose message is one line
``clip <id>: <path>: <what>``; nothing is ever replaced by zeros.  Configuration mistakes raise
:class:`featstore.errors.UserError`.

What each backbone gets (REFERENCE.md, "I3D" and "TBN"; sampling rules in :mod:`extract.sampling`, transforms in
:mod:`extract.transforms`, flow quantisation in :mod:`extract.flow`):

=========  ========  =====================================  ============================================================
backbone   modality  shape                                  values
=========  ========  =====================================  ============================================================
i3d        rgb       (W, 3, T, crop, crop)                  RGB ``x / 255 * 2 - 1``
i3d        flow      (W, 2, T, crop, crop)                  (u, v); exact ``clip(jpeg*2b/255 - b, +-20) / 20`` or naive
                                                            ``jpeg / 255 * 2 - 1`` (``cfg.flow_scaling``)
tbn        rgb       (S, 3, crop, crop)                     BGR ``0..255`` minus ``[104, 117, 128]``
tbn        flow      (S, 2 * flow_stack, crop, crop)        ``x0, y0, x1, y1, ...`` minus 128
tbn        audio     (S, 1, 256, 256)                       TBN log spectrogram (:mod:`extract.audio`)
=========  ========  =====================================  ============================================================

``W = cfg.num_windows()`` I3D windows of ``T = cfg.frames_per_window`` frames; ``S = cfg.segments`` TSN segments.

Frame choice:

* I3D RGB: :func:`extract.sampling.i3d_window_frames`.  I3D flow: each RGB frame of a window mapped to its flow
  frame (:func:`extract.sampling.flow_frames_for` with ``cfg.flow_index_rule``).  With stride-2 flow this gives
  ``T`` consecutive flow frames per window (MM-SADA: "flow stride 1 on the half-rate flow"); with stride-1 flow
  (EPIC-100 extension) the flow frame equals the RGB frame, so the flow window covers the same frames as RGB.
* TBN RGB and audio: one frame per segment, :func:`extract.sampling.tsn_segment_frames` over the clip's RGB frames.
  Audio is centred at the frame's time ``(n - 1) / fps`` (TBN: ``(start_frame + idx) / fps`` with its 0-based
  ``start_frame = n - 1``), fps from the manifest row.
* TBN flow: as TBN, segments are taken in flow-frame numbers: the clip's flow frames ``f(start) .. f(stop)``
  (``f`` = the flow index rule, identity at stride 1), ``tsn_segment_frames(f(start), f(stop), S, flow_stack)``
  gives each stack's first flow frame, and a stack is ``flow_stack`` consecutive flow frames, the last one repeated
  if the clip is shorter (TBN's ``get``: ``if p < num_frames: p += 1``).

Sources of the pixels: ``cfg.rgb_source`` ``"frames"`` (JPEG folders, ``cfg.rgb_layout``) or ``"video"`` (decord,
``cfg.video_layout``); ``cfg.flow_source`` ``"frames"`` (EPIC u/v JPEGs, ``cfg.flow_layout``) or ``"tvl1"``
(computed from the RGB source with OpenCV's TV-L1, pairing and quantisation in :mod:`extract.flow`; the RGB frames
are first brought to a shorter side of at most 256 pixels, the size at which EPIC's flow was computed and stored, so
displacements are in the same units as EPIC's JPEGs); ``cfg.audio_source`` ``"wav"`` (``cfg.audio_layout``) or
``"video"`` (the video's audio track).  The flow stride and bound come from :func:`extract.sampling.flow_params`.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

from extract import decode, flow as flowlib, sampling, transforms
from extract.decode import ClipError
from featstore.errors import UserError

__all__ = ["ClipError", "check_config", "input_shape", "load_clip", "load_clip_pixels", "clip_frames"]

BACKBONE_MODALITIES = {"i3d": ("rgb", "flow"), "tbn": ("rgb", "flow", "audio")}
SPEC_SIZE = 256
TVL1_MAX_SHORT_SIDE = 256  # EPIC's frames (and its flow) are 456x256


# --------------------------------------------------------------------------------------------- configuration


def check_config(cfg) -> None:
    """Raise :class:`UserError` for settings :func:`load_clip` cannot honour (checked once per run by callers)."""
    if cfg.backbone not in BACKBONE_MODALITIES:
        raise UserError(f"backbone must be one of {', '.join(BACKBONE_MODALITIES)}, got {cfg.backbone!r}")
    if not cfg.modalities:
        raise UserError("no modalities selected")
    for m in cfg.modalities:
        if m not in BACKBONE_MODALITIES[cfg.backbone]:
            raise UserError(f"modality {m!r} is not available with backbone {cfg.backbone} "
                            f"(choose from {', '.join(BACKBONE_MODALITIES[cfg.backbone])})")
    for name, value, allowed in (("rgb_source", cfg.rgb_source, ("frames", "video")),
                                 ("flow_source", cfg.flow_source, ("frames", "tvl1")),
                                 ("audio_source", cfg.audio_source, ("wav", "video")),
                                 ("split_kind", cfg.split_kind, ("train", "test")),
                                 ("flow_index_rule", cfg.flow_index_rule, sampling.FLOW_INDEX_RULES),
                                 ("flow_scaling", cfg.flow_scaling, flowlib.FLOW_SCALINGS),
                                 ("window_centres", getattr(cfg, "window_centres", "linspace"),
                                  sampling.WINDOW_CENTRE_RULES)):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.crop < 1 or cfg.resize < cfg.crop:
        raise UserError(f"need 1 <= crop <= resize, got crop {cfg.crop} and resize {cfg.resize}")
    if cfg.frames_per_window < 1 or cfg.frame_stride < 1 or cfg.segments < 1 or cfg.flow_stack < 1:
        raise UserError("frames_per_window, frame_stride, segments and flow_stack must be >= 1")
    if not 0 <= int(cfg.stored_segments) <= int(cfg.segments):
        raise UserError(f"stored_segments={cfg.stored_segments}: between 1 and segments={cfg.segments} (0 = all)")
    if "audio" in cfg.modalities and int(cfg.audio_rate) != 24000:
        raise UserError(f"audio_rate {cfg.audio_rate}: TBN's spectrogram is defined at 24000 Hz")
    sampling.flow_params("P01_01", cfg)  # validates flow_stride / flow_bound


def input_shape(cfg, modality: str) -> tuple[int, ...]:
    """The per-clip array shape :func:`load_clip` returns for ``modality`` (no decoding)."""
    check_config_modality(cfg, modality)
    c = int(cfg.crop)
    if cfg.backbone == "i3d":
        w, t = cfg.num_windows(), int(cfg.frames_per_window)
        return (w, 3 if modality == "rgb" else 2, t, c, c)
    s = cfg.num_windows()
    if modality == "rgb":
        return (s, 3, c, c)
    if modality == "flow":
        return (s, 2 * int(cfg.flow_stack), c, c)
    return (s, 1, SPEC_SIZE, SPEC_SIZE)


def check_config_modality(cfg, modality: str) -> None:
    if cfg.backbone not in BACKBONE_MODALITIES:
        raise UserError(f"backbone must be one of {', '.join(BACKBONE_MODALITIES)}, got {cfg.backbone!r}")
    if modality not in BACKBONE_MODALITIES[cfg.backbone]:
        raise UserError(f"modality {modality!r} is not available with backbone {cfg.backbone} "
                        f"(choose from {', '.join(BACKBONE_MODALITIES[cfg.backbone])})")


# --------------------------------------------------------------------------------------------- frame choice


def clip_frames(row: dict, cfg) -> dict[str, np.ndarray]:
    """The frame numbers a clip reads, per modality (RGB frame numbers for rgb/audio, flow frame numbers for flow).

    i3d: ``rgb`` (W, T), ``flow`` (W, T).  tbn: ``rgb`` (S,), ``flow`` (S, flow_stack), ``audio`` (S,).
    """
    video = str(row["video_id"])
    start, stop = int(row["start_frame"]), int(row["stop_frame"])
    stride, _ = sampling.flow_params(video, cfg)
    out: dict[str, np.ndarray] = {}
    if cfg.backbone == "i3d":
        frames = sampling.i3d_window_frames(start, stop, cfg)
        out["rgb"] = frames
        out["flow"] = np.asarray(sampling.flow_frames_for(frames, stride, cfg.flow_index_rule))
    else:
        seg = sampling.tsn_segment_frames(start, stop, int(cfg.segments))
        out["rgb"] = seg
        out["audio"] = seg
        f0 = sampling.flow_frames_for(start, stride, cfg.flow_index_rule)
        f1 = sampling.flow_frames_for(stop, stride, cfg.flow_index_rule)
        first = sampling.tsn_segment_frames(f0, f1, int(cfg.segments), int(cfg.flow_stack))
        stacks = first[:, None] + np.arange(int(cfg.flow_stack), dtype=np.int64)[None, :]
        out["flow"] = np.minimum(stacks, max(f1, f0))
        keep = cfg.stored_segment_indices()
        if len(keep) < int(cfg.segments):  # stored_segments: only these segments are decoded and extracted
            out = {m: a[keep] for m, a in out.items()}
    return out


# --------------------------------------------------------------------------------------------- the clip


class _Clip:
    """Per-call context: the row's fields and a cache of raw decoded RGB frames (shared by rgb and tvl1 flow)."""

    def __init__(self, row: dict, cfg):
        try:
            self.id = str(row["id"])
            self.video = str(row["video_id"])
            self.start, self.stop = int(row["start_frame"]), int(row["stop_frame"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"manifest row {dict(row)!r}: {decode._one_line(e)}") from None
        participant = row.get("participant_id") if hasattr(row, "get") else None
        if participant is None or (isinstance(participant, float) and math.isnan(participant)) or participant == "":
            participant = self.video.split("_")[0]
        self.participant = str(participant)
        fps = row.get("fps") if hasattr(row, "get") else None
        try:
            self.fps = float(fps) if fps is not None and fps != "" else math.nan
        except (TypeError, ValueError):
            self.fps = math.nan
        self.cfg = cfg
        self.root = cfg.data_root
        self._raw: dict[int, np.ndarray] = {}

    def path(self, layout: str, frame: int | None = None, uv: str | None = None) -> Path:
        return decode.frame_path(layout, self.root, self.participant, self.video, frame, uv)

    # raw RGB frames (native size), each decoded once per clip
    def raw_rgb(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        need = [int(f) for f in np.unique(frames) if int(f) not in self._raw]
        if need:
            if self.cfg.rgb_source == "video":
                arr = decode.read_video_frames(self.path(self.cfg.video_layout), need, self.id)
            else:
                arr = decode.read_frame_folder(self.cfg.rgb_layout, self.root, self.participant, self.video, need,
                                               self.id)
            for f, a in zip(need, arr):
                self._raw[f] = a
            shapes = {a.shape for a in self._raw.values()}
            if len(shapes) > 1:
                raise ClipError(self.id, self.path(self.cfg.rgb_layout, need[0]), "frames differ in size")
        return np.stack([self._raw[int(f)] for f in frames])

    def rgb(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB ``frames.shape + (crop, crop, 3)`` after resize and centre crop."""
        frames = np.asarray(frames, dtype=np.int64)
        uniq, inverse = np.unique(frames, return_inverse=True)
        out = transforms.resize_crop(self.raw_rgb(uniq), self.cfg.resize, self.cfg.crop)
        return out[inverse.reshape(-1)].reshape(frames.shape + out.shape[1:])

    def flow(self, flow_frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """uint8 EPIC-quantised ``(u, v)``, each ``flow_frames.shape + (crop, crop)``, and the bound."""
        flow_frames = np.asarray(flow_frames, dtype=np.int64)
        uniq, inverse = np.unique(flow_frames, return_inverse=True)
        stride, bound = sampling.flow_params(self.video, self.cfg)
        if self.cfg.flow_source == "tvl1":
            u, v = self._tvl1(uniq, stride, bound)
        else:
            u = decode.read_frame_folder(self.cfg.flow_layout, self.root, self.participant, self.video, uniq,
                                         self.id, uv="u")
            v = decode.read_frame_folder(self.cfg.flow_layout, self.root, self.participant, self.video, uniq,
                                         self.id, uv="v")
            if u.shape != v.shape:
                raise ClipError(self.id, self.path(self.cfg.flow_layout, int(uniq[0]), "v"),
                                f"v frame size {v.shape[1:]} differs from u {u.shape[1:]}")
        both = transforms.resize_crop(np.concatenate([u, v]), self.cfg.resize, self.cfg.crop)
        u, v = both[:len(uniq)], both[len(uniq):]
        shape = flow_frames.shape + u.shape[1:]
        idx = inverse.reshape(-1)
        return u[idx].reshape(shape), v[idx].reshape(shape), bound

    def _tvl1(self, flow_frames: np.ndarray, stride: int, bound: float) -> tuple[np.ndarray, np.ndarray]:
        a, b = flowlib.tvl1_pair(flow_frames, stride)
        raw = self.raw_rgb(np.concatenate([a, b]))
        h, w = raw.shape[1:3]
        if min(h, w) > TVL1_MAX_SHORT_SIDE:
            raw = transforms.resize_shorter(raw, TVL1_MAX_SHORT_SIDE)
        n = len(flow_frames)
        us, vs = [], []
        for i in range(n):
            u, v = flowlib.tvl1(raw[i], raw[n + i], bound)
            us.append(u)
            vs.append(v)
        return np.stack(us), np.stack(vs)


# --------------------------------------------------------------------------------------------- audio

_AUDIO: dict = {}
_AUDIO_LOCK = threading.Lock()


def _audio_24k(ctx: _Clip) -> tuple[np.ndarray, Path]:
    """The whole recording of the clip's video at 24 kHz (cached for the last recording read)."""
    from extract import audio as audiolib  # written alongside; imported lazily

    cfg = ctx.cfg
    layout = cfg.audio_layout if cfg.audio_source == "wav" else cfg.video_layout
    path = ctx.path(layout)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        what = "audio file not found" if cfg.audio_source == "wav" else "video file not found (audio_source video)"
        raise ClipError(ctx.id, path, what) from None
    key = (str(path), cfg.audio_source, st.st_size, st.st_mtime_ns)
    with _AUDIO_LOCK:
        if key in _AUDIO:
            return _AUDIO[key], path
    try:
        if cfg.audio_source == "wav":
            samples, sr = audiolib.load_wav(path)
        else:
            samples, sr = audiolib.audio_from_video(path, audiolib.TBN_SAMPLE_RATE)
        x = audiolib.resample(samples, sr, audiolib.TBN_SAMPLE_RATE)
    except UserError as e:  # extract.audio.AudioError: "<path>: <reason>"
        msg = str(e)
        reason = msg[len(str(path)) + 2:] if msg.startswith(f"{path}: ") else msg
        raise ClipError(ctx.id, path, reason) from None
    with _AUDIO_LOCK:
        _AUDIO.clear()
        _AUDIO[key] = x
    return x, path


def _audio(ctx: _Clip, frames: np.ndarray) -> np.ndarray:
    from extract import audio as audiolib

    x, path = _audio_24k(ctx)
    if not (ctx.fps > 0 and math.isfinite(ctx.fps)):
        raise ClipError(ctx.id, path, "fps unknown for this video (fill the manifest's fps column)")
    centres = (np.asarray(frames, dtype=np.float64) - 1.0) / ctx.fps
    try:
        specs = audiolib.tbn_spectrograms(x, audiolib.TBN_SAMPLE_RATE, centres)
    except UserError as e:
        raise ClipError(ctx.id, path, str(e)) from None
    return specs[:, None].astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- entry point


def load_clip(row: dict, cfg) -> dict[str, np.ndarray]:
    """Decode and preprocess one clip (a manifest row as a dict) for ``cfg.backbone``; one float32 array per
    modality in ``cfg.modalities`` with the shapes of :func:`input_shape` (module docstring).

    The arrays are laid out channels-last in memory (a transposed view of a contiguous ``(..., H, W, C)`` array,
    the strides of torch's ``channels_last_3d`` / ``channels_last``): that is the order the frames decode in and
    the backbones' memory format, so no transpose is made before the runner's copy into its batch buffer.

    Raises :class:`ClipError` for data faults in this clip and :class:`UserError` for configuration mistakes.
    """
    return {m: v.to_float() if isinstance(v, transforms.Pixels) else v for m, v in load_clip_pixels(row, cfg).items()}


def load_clip_pixels(row: dict, cfg) -> dict:
    """:func:`load_clip` before the input scaling: RGB and flow as :class:`extract.transforms.Pixels` (uint8 in
    memory order and the table of their input values), audio as its float32 spectrograms.  The runner hands these
    over from its decoding workers (a quarter of the bytes of floats) and applies the tables where the batch is
    assembled (on the GPU when there is one)."""
    check_config(cfg)
    ctx = _Clip(row, cfg)
    if ctx.stop < ctx.start or ctx.start < 1:
        raise ClipError(ctx.id, ctx.video, f"bad frame range {ctx.start}..{ctx.stop}")
    frames = clip_frames(row, cfg)
    out: dict = {}
    for m in cfg.modalities:
        if cfg.backbone == "i3d":
            if m == "rgb":
                x, table = ctx.rgb(frames["rgb"]), transforms._I3D_RGB_TABLE  # (W, T, c, c, 3)
            else:
                u, v, bound = ctx.flow(frames["flow"])                  # (W, T, c, c) each
                x = np.stack([u, v], axis=-1)                            # (W, T, c, c, 2)
                table = flowlib.dequantise_table(bound, cfg.flow_scaling)
            out[m] = transforms.Pixels(np.ascontiguousarray(x), table, (0, 4, 1, 2, 3))  # (W, C, T, c, c)
        elif m == "rgb":
            x = np.ascontiguousarray(ctx.rgb(frames["rgb"])[..., ::-1])  # (S, c, c, 3) BGR
            out[m] = transforms.Pixels(x, transforms._TBN_RGB_TABLE, (0, 3, 1, 2))
        elif m == "flow":
            u, v, _ = ctx.flow(frames["flow"])                          # (S, L, c, c) each
            s, length = frames["flow"].shape
            x = np.stack([u, v], axis=-1).transpose(0, 2, 3, 1, 4)      # (S, c, c, L, 2)
            x = np.ascontiguousarray(x).reshape(*x.shape[:3], 2 * length)  # (S, c, c, 2L): x0, y0, x1, y1, ...
            out[m] = transforms.Pixels(x, transforms._TBN_FLOW_TABLE, (0, 3, 1, 2))
        else:
            x = np.ascontiguousarray(_audio(ctx, frames["audio"]).transpose(0, 2, 3, 1))  # (S, 256, 256, 1)
            out[m] = x.transpose(0, 3, 1, 2)                            # (S, 1, 256, 256), channels_last
    return out
