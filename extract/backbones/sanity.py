"""``adapt check-checkpoint``: run an I3D checkpoint's own classifier on a real clip with the extraction's
preprocessing, so a user sees that weights and preprocessing agree before a long extraction.

The clip: up to ``frames`` consecutive frames from the middle of a video (decord) or of a folder of JPEG frames
(sorted by name), resized so the shorter side is ``resize`` (256), centre-cropped to ``crop`` (224), scaled to
[-1, 1] (:func:`extract.transforms.i3d_rgb`).  The classifier: DeepMind's Logits block (average pool 2x7x7,
1x1x1 conv, mean over time).  Class names: Kinetics-400 for a 400-way classifier, the MM-SADA verbs for a
fine-tuned 8-way one (MM-SADA's 16-way classifier trains its first 8 outputs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featstore.errors import UserError

MMSADA_VERBS = ["take", "put", "open", "close", "wash", "cut", "mix", "pour"]


def clip_frames(video: str | None = None, frames_dir: str | None = None, frames: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB: up to ``frames`` consecutive frames from the middle of the source."""
    from extract import decode
    if frames < 1:
        raise UserError(f"--length {frames}: must be a whole number >= 1")
    check_source(video, frames_dir)
    if video is not None:
        try:
            n = decode.video_length(video, "check")
            start = max(1, (n - frames) // 2 + 1)
            return decode.read_video_frames(video, np.arange(start, min(n, start + frames - 1) + 1), "check")
        finally:
            decode.forget_readers()
    try:
        paths = sorted(p for p in Path(frames_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    except OSError as e:
        raise UserError(f"--frames {frames_dir}: cannot list the folder ({e.strerror or e})") from None
    if not paths:
        raise UserError(f"{frames_dir}: no .jpg / .png frames")
    start = max(0, (len(paths) - frames) // 2)
    return decode.read_images(paths[start:start + frames], "check")


def check_source(video: str | None, frames_dir: str | None) -> None:
    """Exactly one of a video file and a folder of frames, each of its kind; a one-line UserError otherwise."""
    if (video is None) == (frames_dir is None):
        raise UserError("check-checkpoint: give one of --video FILE or --frames DIR")
    if video is not None:
        if Path(video).is_dir():
            raise UserError(f"--video {video}: a folder, not a video file (for a folder of frames use --frames)")
        if not Path(video).exists():
            raise UserError(f"--video {video}: no such file")
    else:
        if not Path(frames_dir).exists():
            raise UserError(f"--frames {frames_dir}: no such folder")
        if not Path(frames_dir).is_dir():
            raise UserError(f"--frames {frames_dir}: a file, not a folder of frames (give the folder that holds the "
                            f"JPEG frames, or a video file with --video)")


def check_arguments(video: str | None, frames_dir: str | None, modality: str, frames: int, resize: int, crop: int,
                    top: int) -> None:
    """Every argument of :func:`check_checkpoint`, before the checkpoint is loaded: a one-line UserError naming the
    setting (the command's option) for the first that is wrong."""
    if modality != "rgb":
        raise UserError("check-checkpoint runs RGB checkpoints on RGB frames (a flow checkpoint needs flow input: "
                        "check it through a short `adapt extract` instead)")
    for name, value in (("--length", frames), ("--top", top), ("resize", resize), ("crop", crop)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{name} {value}: must be a whole number >= 1")
    if crop > resize:
        raise UserError(f"crop {crop}: larger than resize {resize} (the centre crop is taken after resizing)")
    check_source(video, frames_dir)


def class_names(classes: int) -> list[str]:
    from extract.backbones.deepmind import kinetics400_classes
    if classes == 400:
        return kinetics400_classes()
    if classes in (8, 16):
        return MMSADA_VERBS + [f"(untrained output {i})" for i in range(8, classes)]
    return [f"class {i}" for i in range(classes)]


def check_checkpoint(checkpoint: str, video: str | None = None, frames_dir: str | None = None,
                     modality: str = "rgb", frames: int = 64, resize: int = 256, crop: int = 224,
                     top: int = 5) -> dict:
    """{'layout', 'sha256', 'classes', 'top': [(name, probability), ...]} of an I3D RGB checkpoint on a clip."""
    from extract.backbones import build
    from extract.transforms import i3d_rgb, resize_crop
    check_arguments(video, frames_dir, modality, frames, resize, crop, top)
    from extract.decode import ClipError
    model = build("i3d", "rgb", checkpoint=checkpoint)
    try:
        raw = clip_frames(video, frames_dir, frames)
    except ClipError as e:
        raise UserError(str(e)) from None
    pixels = resize_crop(raw, resize, crop)
    x = torch.from_numpy(i3d_rgb(pixels)).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W)
    with torch.no_grad():
        logits = model.classify(model(x))[0]
    n = int(logits.shape[0])
    if n == 16:
        logits = logits[:8]  # MM-SADA trains the first 8 of its 16 outputs
    probs = logits.softmax(-1)
    names = class_names(n)
    best = torch.topk(probs, min(top, len(probs)))
    info = model.checkpoint_info
    return {"layout": info.layout, "sha256": info.sha256, "classes": n,
            "top": [(names[int(i)], float(p)) for p, i in zip(best.values, best.indices)]}
