"""Which frames of a clip go into the backbones: I3D windows, TSN segments, RGB -> flow frame numbers.

All frame numbers here are EPIC-Kitchens frame numbers: 1-based, as in the file names ``frame_%010d.jpg`` and in
the manifests' ``start_frame`` / ``stop_frame`` (REFERENCE.md, "EPIC-Kitchens frame layout").

Sources of the rules:

* I3D windows: MM-SADA (Munro and Damen, CVPR 2020, Sec. 4 "Implementation details") and its released code
  (jonmun/MM-SADA-code, ``src/data_gen/batch_generator.py``, ``c3d_sampling``): windows of 16 frames at stride 2
  around a centre frame ``c`` are the frames ``range(c - 16, c + 16, 2)``, i.e. ``c + (i - T//2) * stride``;
  at test time 5 windows with centres ``linspace(.., .., 7)[1:-1]`` cast to int (truncation, as the code's
  ``dtype=np.int32``).  REFERENCE.md states the centres as ``linspace(start, stop, 7)[1:-1]``; that is this
  module's default (``cfg.window_centres == "linspace"``).  The released code first shrinks the range by half a
  window at each end (``linspace(start + 16, stop + 1 - 16, 7)``, falling back to ``(start, stop)`` when the
  clip is shorter than a window, and keeping the first centre above frame 17); ``window_centres="mmsada_code"``
  reproduces that.
* TSN segments: Wang et al., "Temporal Segment Networks" (ECCV 2016) and TBN's ``dataset.py``
  (ekazakos/temporal-binding-network, ``_get_test_indices``): ``tick = (n - new_length + 1) / S``,
  offsets ``int(tick / 2 + tick * i)``.
* RGB -> flow frame numbers: REFERENCE.md, "EPIC-Kitchens frame layout" (MM-SADA ``int(n / 2)`` in
  ``batch_generator.py``; epic-kitchens-55-lib ``ceil(n / 2)``; TBN ``floor((start - 1) / 2) + i`` on 0-based
  names, i.e. ``floor((n - 1) / 2) + 1`` as a 1-based number).
* Flow stride and bound: EPIC-55 flow is TV-L1 at stride 2 (half the RGB rate) with bound 25; the EPIC-100
  extension videos (``PXX_1YY``) have flow at stride 1 with bound 8 (REFERENCE.md; EPIC-KITCHENS-100 paper,
  Damen et al., IJCV 2022, Sec. "Data").
"""

from __future__ import annotations

import math
import re

import numpy as np

from featstore.errors import UserError

FLOW_INDEX_RULES = ("mmsada", "ceil", "tbn")
WINDOW_CENTRE_RULES = ("linspace", "mmsada_code")
# EPIC-100 extension videos: the number after the participant has 3 digits (P01_101); EPIC-55 ones have 2.
_EPIC100_EXTENSION = re.compile(r"^P\d+_\d{3,}$")


# --------------------------------------------------------------------------------------------- I3D windows


def window_centres(start: int, stop: int, windows: int, frames: int = 16, stride: int = 2,
                   rule: str = "linspace") -> np.ndarray:
    """Centre frames of ``windows`` equidistant windows in ``[start, stop]`` (int64, shape ``(windows,)``).

    ``"linspace"`` (default, REFERENCE.md): ``linspace(start, stop, windows + 2)[1:-1]`` truncated to int.
    ``"mmsada_code"``: the released MM-SADA code's range (module docstring): ``lo = start + stride*frames//2``,
    ``hi = stop + 1 - stride*frames//2``; if ``lo >= hi`` then ``lo, hi = start, stop``; if
    ``lo <= stride*frames//2 + 1`` then ``lo = stride*frames//2 + 2``; centres ``linspace(lo, hi, windows+2)[1:-1]``
    truncated to int.
    """
    if windows < 1:
        raise UserError(f"number of windows must be >= 1, got {windows}")
    if rule == "linspace":
        lo, hi = float(start), float(stop)
    elif rule == "mmsada_code":
        half = stride * (frames // 2)
        lo, hi = start + half, stop + 1 - half
        if lo >= hi:
            lo, hi = start, stop
        if lo <= half + 1:
            lo = half + 2
    else:
        raise UserError(f"window_centres must be one of {', '.join(WINDOW_CENTRE_RULES)}, got {rule!r}")
    return np.linspace(lo, hi, windows + 2)[1:-1].astype(np.int64)


def i3d_window_frames(start: int, stop: int, cfg) -> np.ndarray:
    """1-based RGB frame numbers of the I3D windows of a clip: int64 array ``(W, T)``.

    ``T = cfg.frames_per_window`` frames at stride ``cfg.frame_stride`` around each centre ``c``:
    ``c + (i - T // 2) * stride`` for ``i = 0 .. T-1`` (MM-SADA's ``range(c - 16, c + 16, 2)`` for T=16, stride 2).

    Windows (W = ``cfg.num_windows()``):

    * test split (``cfg.split_kind == "test"``): ``cfg.test_windows`` (5) equidistant windows, centres from
      :func:`window_centres` (default ``linspace(start, stop, 7)[1:-1]``, MM-SADA's test protocol).
    * train split: ``cfg.train_windows`` (K) windows placed by the same rule with K + 2 linspace points, i.e.
      spread evenly over the clip.  MM-SADA samples one random window per training iteration; a feature store
      instead keeps K fixed windows so that the trainer can draw among them.  The placement is deterministic
      (it does not depend on the seed, the clip id or the run), so a resumed or repeated extraction writes the
      same store.

    Clamping rule: every frame number is clamped to ``[start, stop]``, so a window never reads outside its
    action segment; near the ends of the clip (and for clips shorter than the window span, ``T * stride``
    frames) the first / last frame of the clip is repeated.  A one-frame clip gives ``T`` copies of that frame.
    """
    start, stop = int(start), int(stop)
    if stop < start:
        raise UserError(f"stop_frame {stop} is before start_frame {start}")
    t, stride = int(cfg.frames_per_window), int(cfg.frame_stride)
    if t < 1 or stride < 1:
        raise UserError(f"frames_per_window and frame_stride must be >= 1, got {t} and {stride}")
    windows = cfg.train_windows if cfg.split_kind == "train" else cfg.test_windows
    if cfg.split_kind not in ("train", "test"):
        raise UserError(f"split_kind must be 'train' or 'test', got {cfg.split_kind!r}")
    centres = window_centres(start, stop, int(windows), t, stride, getattr(cfg, "window_centres", "linspace"))
    offsets = (np.arange(t, dtype=np.int64) - t // 2) * stride
    return np.clip(centres[:, None] + offsets[None, :], start, stop)


# --------------------------------------------------------------------------------------------- TSN segments


def tsn_segment_frames(start: int, stop: int, segments: int, new_length: int = 1) -> np.ndarray:
    """First frame of each TSN test segment: int64 array ``(segments,)`` of frame numbers in ``[start, stop]``.

    ``n = stop - start + 1`` frames, ``tick = (n - new_length + 1) / segments``, frame
    ``start + int(tick / 2 + tick * i)`` (TSN / TBN ``_get_test_indices``).  ``new_length`` is the length of the
    stack read from each segment (1 for RGB and audio, 5 for TBN flow in flow-frame numbers), so the stacks fit in
    the clip.  When ``n < new_length`` the stack cannot fit and every segment starts at ``start`` (the reader
    then repeats the last frame, as TBN's ``get`` stops advancing at the end of the clip).

    TBN's own records count ``n`` slightly differently (``stop - start - 1`` frames from 0-based ``start - 1``);
    this module uses the clip's frame count so that segment frames always lie inside ``[start, stop]``.
    """
    start, stop = int(start), int(stop)
    if stop < start:
        raise UserError(f"stop_frame {stop} is before start_frame {start}")
    if segments < 1 or new_length < 1:
        raise UserError(f"segments and new_length must be >= 1, got {segments} and {new_length}")
    n = stop - start + 1
    tick = (n - new_length + 1) / float(segments)
    if tick <= 0:
        return np.full(segments, start, dtype=np.int64)
    offsets = np.array([int(tick / 2.0 + tick * i) for i in range(segments)], dtype=np.int64)
    return start + offsets


# --------------------------------------------------------------------------------------------- flow frames


def flow_frame(n, rule: str = "mmsada"):
    """Flow frame number (1-based) holding the half-rate (stride-2) flow at RGB frame ``n`` (1-based).

    * ``"mmsada"`` (default): ``int(n / 2)`` -- MM-SADA's ``batch_generator.py``;
    * ``"ceil"``: ``ceil(n / 2)`` -- epic-kitchens-55-lib;
    * ``"tbn"``: ``floor((n - 1) / 2) + 1`` -- TBN's ``floor((start - 1) / 2) + i`` on 0-based names.

    They differ by one frame: for odd ``n`` ``"mmsada"`` gives one less than the others (n=5: 2, 3, 3; n=6: 3, 3,
    3).  ``"tbn"`` equals ``"ceil"`` for every ``n >= 1``: TBN computes ``floor((start - 1) / 2) + i`` on 0-based
    file names (its ``preprocessing_epic/symlinks.py`` links ``x_{i}`` to ``frame_{i+1}``), which is
    ``ceil(n / 2)`` in EPIC's 1-based numbers; it is kept as a name so that a configuration can say which code it
    follows.  All are raised to at least 1 (``int(1 / 2) = 0`` has no file).  Accepts an int (returns int) or an
    integer array.  Only for stride-2 flow: with stride-1 flow (EPIC-100 extension videos) the flow frame equals the
    RGB frame number (see :func:`flow_frames_for`).
    """
    arr = np.asarray(n, dtype=np.int64)
    if rule == "mmsada":
        out = arr // 2
    elif rule == "ceil":
        out = (arr + 1) // 2
    elif rule == "tbn":
        out = (arr - 1) // 2 + 1
    else:
        raise UserError(f"flow_index_rule must be one of {', '.join(FLOW_INDEX_RULES)}, got {rule!r}")
    out = np.maximum(out, 1)
    return int(out) if out.ndim == 0 else out


def flow_frames_for(n, stride: int, rule: str = "mmsada"):
    """RGB frame numbers -> flow frame numbers for flow computed at ``stride`` (1 or 2).

    Stride 2: :func:`flow_frame` with ``rule``.  Stride 1: the same number (at least 1).
    """
    if int(stride) == 1:
        arr = np.maximum(np.asarray(n, dtype=np.int64), 1)
        return int(arr) if arr.ndim == 0 else arr
    if int(stride) == 2:
        return flow_frame(n, rule)
    raise UserError(f"flow stride must be 1 or 2, got {stride}")


def is_epic100_extension(video_id: str) -> bool:
    """True for EPIC-100 extension videos (``P01_101``: 3 digits after ``_``), False for EPIC-55 (``P01_01``)."""
    return bool(_EPIC100_EXTENSION.match(str(video_id)))


def flow_params(video_id: str, cfg) -> tuple[int, float]:
    """``(stride, bound)`` of the flow frames of a video.

    ``cfg.flow_stride`` / ``cfg.flow_bound`` set to ``"auto"``: stride 1 and bound 8 for EPIC-100 extension videos
    (:func:`is_epic100_extension`), else stride 2 and bound 25 (EPIC-55; also the demo kitchens' ``K1_01``).
    Otherwise the given number is used (stride ``"1"`` or ``"2"``, bound any positive number).
    """
    ext = is_epic100_extension(video_id)
    s = str(cfg.flow_stride).strip().lower()
    if s == "auto":
        stride = 1 if ext else 2
    elif s in ("1", "2"):
        stride = int(s)
    else:
        raise UserError(f"flow_stride must be 'auto', '1' or '2', got {cfg.flow_stride!r}")
    b = str(cfg.flow_bound).strip().lower()
    if b == "auto":
        bound = 8.0 if ext else 25.0
    else:
        try:
            bound = float(b)
        except ValueError:
            bound = math.nan
        if not (bound > 0 and math.isfinite(bound)):
            raise UserError(f"flow_bound must be 'auto' or a positive number, got {cfg.flow_bound!r}")
    return stride, bound
