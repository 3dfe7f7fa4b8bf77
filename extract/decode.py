"""Reading frames: EPIC-layout JPEG folders (OpenCV; PIL for anything unusual), greyscale flow JPEGs, and videos
(decord).

Every data fault raises :class:`ClipError` with one line naming the clip and the file, e.g.
``clip 12917: data/P08/rgb_frames/P08_01/frame_0000000437.jpg: corrupt JPEG (image file is truncated ...)``.
Nothing here substitutes zeros or neighbouring frames for missing data.

Layouts are ``str.format`` templates with the fields ``{root}``, ``{participant}``, ``{video}``, ``{frame}``
(an int, so ``{frame:010d}`` works) and ``{uv}`` (``"u"`` / ``"v"``); the EPIC defaults are in
:mod:`extract.config` (REFERENCE.md, "EPIC-Kitchens frame layout").

Videos: decord's ``VideoReader`` (dmlc/decord) returns RGB ``uint8`` frames indexed from 0, so the 1-based EPIC
frame ``n`` is index ``n - 1``.  A frame past the end of the video is an error (decord reports the frame count
from the container; a truncated file fails to open or to decode).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from featstore.errors import UserError


class ClipError(Exception):
    """A data fault in one clip (missing / corrupt / truncated input).  The message is one line naming the clip id
    and the file; the runner records it for the clip and carries on with the others."""

    def __init__(self, *args):
        """``ClipError(clip_id, path, reason)`` (formats the message) or ``ClipError(message)``."""
        if len(args) == 3:
            clip_id, path, reason = args
            self.clip_id, self.path = str(clip_id), str(path)
            self.reason = " ".join(str(reason).split())  # one line
            super().__init__(f"clip {self.clip_id}: {self.path}: {self.reason}")
        else:
            self.clip_id = self.path = self.reason = None
            super().__init__(*(" ".join(str(a).split()) for a in args))


def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line, without the reprs of in-memory buffers (PIL names its ``BytesIO``)."""
    import re
    text = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", " ".join(str(e).split()))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------------------------- paths


def frame_path(layout: str, root, participant: str, video: str, frame: int | None = None,
               uv: str | None = None) -> Path:
    """Fill a layout template.  A template with an unknown field or a bad format is a :class:`UserError`."""
    try:
        return Path(layout.format(root=str(root).rstrip("/") or "/", participant=participant, video=video,
                                  frame=int(frame) if frame is not None else 0, uv=uv or ""))
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"layout {layout!r}: {_one_line(e)} (fields: {{root}}, {{participant}}, {{video}}, "
                        f"{{frame}}, {{uv}})") from None


def frame_paths(layout: str, root, participant: str, video: str, frames, uv: str | None = None) -> list[str]:
    """:func:`frame_path` for several frame numbers, as strings (the template is checked once)."""
    frames = [int(f) for f in np.asarray(frames).reshape(-1)]
    if not frames:
        return []
    frame_path(layout, root, participant, video, frames[0], uv)  # a bad template raises UserError here
    fields = dict(root=str(root).rstrip("/") or "/", participant=participant, video=video, uv=uv or "")
    return [layout.format(frame=f, **fields) for f in frames]


# --------------------------------------------------------------------------------------------- JPEG folders


def read_image(path: Path, clip_id, mode: str = "RGB") -> np.ndarray:
    """One JPEG as ``uint8`` ``(H, W, 3)`` (mode ``"RGB"``) or ``(H, W)`` (mode ``"L"``).

    A complete JPEG of the expected colour type (ending with its EOI marker, 3 channels for ``"RGB"``, 1
    for ``"L"``) is decoded with OpenCV (``cv2.imdecode``, about twice as fast as PIL on small frames); anything
    else goes through PIL. Both wrap libjpeg-turbo's accurate integer IDCT and fancy upsampling, and
    ``tests/test_inputs.py`` checks that they agree bit for bit on the real frames in ``../shared/data/media`` (they
    did on the demo frames too). OpenCV is not allowed to judge damaged files, since it decodes a truncated JPEG
    with grey padding and only a warning: a file without the EOI marker at its end is left to PIL, which refuses
    truncated files (``LOAD_TRUNCATED_IMAGES`` is left False), so a truncated or garbage file raises
    :class:`ClipError` ("corrupt JPEG"). A missing file names its folder when the folder itself is missing.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        path = Path(path)
        folder = Path(path).parent
        if not folder.is_dir():
            # name the deepest missing folder's full path (e.g. the video's frame folder)
            raise ClipError(clip_id, folder, "frame folder not found") from None
        raise ClipError(clip_id, path, "frame file not found") from None
    except OSError as e:
        raise ClipError(clip_id, Path(path), f"unreadable ({_one_line(e)})") from None
    arr = _decode_complete_jpeg(data, mode)
    if arr is not None:
        return arr
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im if im.mode == mode else im.convert(mode))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ClipError(clip_id, Path(path), f"corrupt JPEG ({_one_line(e)})") from None


def _decode_complete_jpeg(data: bytes, mode: str) -> np.ndarray | None:
    """OpenCV's decode of ``data`` when it is a whole JPEG (SOI first, EOI last) of ``mode``'s colour type;
    None otherwise (PIL decides)."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)  # no EXIF rotation, as PIL
    if arr is None or arr.dtype != np.uint8:
        return None
    if mode == "L":
        return arr if arr.ndim == 2 else None
    if mode == "RGB" and arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)  # a channel swap (OpenCV decodes to BGR)
    return None


def read_images(paths, clip_id, mode: str = "RGB") -> np.ndarray:
    """Several JPEGs (all the same size) stacked: ``(N, H, W, 3)`` or ``(N, H, W)`` ``uint8``.

    Each distinct path is decoded once (windows and stacks repeat frames).
    """
    paths = [str(p) for p in paths]
    cache: dict[str, np.ndarray] = {}
    out = []
    for p in paths:
        if p not in cache:
            cache[p] = read_image(p, clip_id, mode)
        out.append(cache[p])
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        first = out[0].shape
        bad = next(p for p, a in zip(paths, out) if a.shape != first)
        raise ClipError(clip_id, Path(bad), f"frame size {cache[bad].shape[:2]} differs from {first[:2]} of "
                                      f"{Path(paths[0]).name}")
    return np.stack(out)


def read_frame_folder(layout: str, root, participant: str, video: str, frames, clip_id,
                      uv: str | None = None) -> np.ndarray:
    """The distinct frames ``frames`` (1-based numbers) of one video from a JPEG folder.

    RGB (``uv`` None): ``(N, H, W, 3)`` ``uint8`` in RGB order.  Flow (``uv`` ``"u"`` / ``"v"``): greyscale
    ``(N, H, W)`` ``uint8``.
    """
    paths = frame_paths(layout, root, participant, video, frames, uv)
    return read_images(paths, clip_id, "RGB" if uv is None else "L")


# --------------------------------------------------------------------------------------------- videos

# Open readers are cached per thread (a decord VideoReader must not be used by two threads at once): clips of one
# video usually follow each other in a manifest, so the last two videos are kept open.
_LOCAL = threading.local()
_MAX_READERS = 2


def _readers() -> "OrderedDict[tuple, object]":
    cache = getattr(_LOCAL, "readers", None)
    if cache is None:
        cache = _LOCAL.readers = OrderedDict()
    return cache


def _video_reader(path: Path, clip_id):
    import decord

    try:
        st = os.stat(path)
    except FileNotFoundError:
        folder = path.parent
        raise ClipError(clip_id, path if folder.is_dir() else folder,
                        "video file not found" if folder.is_dir() else "video folder not found") from None
    key = (str(path), st.st_size, st.st_mtime_ns)
    cache = _readers()
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n = len(reader)
    except Exception as e:  # decord raises RuntimeError / DECORDError for truncated or unreadable files
        raise ClipError(clip_id, path, f"cannot open video ({_video_reason(e)})") from None
    if n <= 0:
        raise ClipError(clip_id, path, "video has no frames")
    cache[key] = reader
    while len(cache) > _MAX_READERS:
        cache.popitem(last=False)
    return reader


def _video_reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    # decord prefixes messages with "[time] /path/to/source.cc:123: "; keep the message itself
    if ".cc:" in text:
        text = text.split(".cc:", 1)[1].split(": ", 1)[-1]
    return text[:300] or type(e).__name__


def video_length(path, clip_id) -> int:
    """Number of frames decord reports for a video."""
    return len(_video_reader(Path(path), clip_id))


def video_fps(path, clip_id) -> float:
    """Average frame rate decord reports for a video."""
    return float(_video_reader(Path(path), clip_id).get_avg_fps())


def read_video_frames(path, frames, clip_id) -> np.ndarray:
    """Distinct 1-based frames ``frames`` of a video as ``(N, H, W, 3)`` ``uint8`` RGB (decord index ``n - 1``).

    A frame number below 1 or past the video's last frame raises :class:`ClipError`, as does any decoding failure.
    """
    path = Path(path)
    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    reader = _video_reader(path, clip_id)
    n = len(reader)
    bad = frames[(frames < 1) | (frames > n)]
    if bad.size:
        raise ClipError(clip_id, path, f"frame {int(bad[0])} is past the end of the video ({n} frames)"
                        if bad[0] > n else f"frame {int(bad[0])} is before the first frame (frames are 1-based)")
    uniq, inverse = np.unique(frames, return_inverse=True)
    try:
        batch = reader.get_batch([int(i) - 1 for i in uniq]).asnumpy()
    except Exception as e:  # partial files fail here with DECORDError
        _forget(path)
        raise ClipError(clip_id, path, f"cannot decode frames {int(uniq[0])}..{int(uniq[-1])} "
                        f"({_video_reason(e)})") from None
    if batch.shape[0] != uniq.size:
        raise ClipError(clip_id, path, f"decoded {batch.shape[0]} of {uniq.size} frames")
    return np.ascontiguousarray(batch[inverse])


def forget_readers() -> None:
    """Close this thread's cached video readers (before forking workers: a decord reader's decoder state copied
    into a forked child deadlocks the child's own decoding)."""
    _readers().clear()


def _forget(path: Path) -> None:
    cache = _readers()
    for key in [k for k in cache if k[0] == str(path)]:
        del cache[key]
