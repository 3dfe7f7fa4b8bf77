"""The project's own demo dataset: three synthetic "kitchens" in the EPIC-Kitchens layout.

Made here (no third-party media), deterministic given the seed, small and fast: with the defaults (6 train + 3 test
clips per class and kitchen) 108 clips, about 4,700 RGB frames of 160x90 and 2,350 flow pairs (~9,400 files,
~60 MB on disk), generated in about 10 s on two CPU cores (kitchens are rendered in parallel processes).  Used by
``make demo`` / ``adapt demo`` and by the tests.

Sanity check of the domain shift (random-init I3D of :mod:`extract.backbones`, DemoConfig windows, features
mean-pooled, logistic regression trained on K1 train): K1 test 1.00 / K2 0.83 / K3 0.75 from flow, 0.58 / 0.25 /
0.17 from RGB (chance 0.25) -- the classes are learnable in the source kitchen and transfer imperfectly.

What it is
----------
* Kitchens (domains) ``K1``, ``K2``, ``K3`` -- participant ids ``K1`` .. ``K3``; each has two videos, ``K?_01``
  holding the train clips and ``K?_02`` the test clips, at 30 fps.
* Action classes are MOTIONS of a foreground object (a disc or a square of a random colour, random size and speed):
  0 ``move left``, 1 ``move right``, 2 ``move up``, 3 ``move down`` (the ``verb`` column; ``verb_class`` 0..3).
  Clips last 24..40 frames; clips of one video follow each other in time with gaps of 6..15 frames in which the
  object is absent.
* The kitchens differ in appearance and recording conditions -- this is the domain shift adaptation has to undo:

  ==========  =============================  ==========================================================
  kitchen     appearance                     conditions
  ==========  =============================  ==========================================================
  K1          warm wood grain, bright        little sensor noise, steady camera, objects radius 6..9,
                                             0.7..1.2 px/frame
  K2          blue-grey tiles, dim, blue     more noise, light flicker, bigger and slower objects (radius
              cast                           8..11, 0.45..0.85 px/frame), mains hum in the audio
  K3          green speckled granite,        strong noise, hand-held camera shake (+-1 px per frame, which
              low contrast, green cast       also appears in the flow), small fast objects (5..8, 0.8..1.3
                                             px/frame), clatter in the audio
  ==========  =============================  ==========================================================

Files (default layout of :mod:`extract.config`, REFERENCE.md "EPIC-Kitchens frame layout"):

* ``<root>/<K>/rgb_frames/<video>/frame_%010d.jpg`` -- RGB JPEGs (quality 90), 1-based;
* ``<root>/<K>/flow_frames/<video>/{u,v}/frame_%010d.jpg`` -- greyscale flow JPEGs (quality 95) as EPIC-55's: stride 2
  (flow frame ``k`` is the displacement from RGB frame ``2k - 1`` to ``2k + 1``, the pairing of
  :func:`extract.flow.tvl1_pair`), bound 25, ``round(255 (clip(d, -25, 25) + 25) / 50)``
  (:func:`extract.flow.quantise`).  The flow is the rendered motion itself (analytic: object displacement inside the
  object, camera motion elsewhere) plus a little noise, not an estimate; video ids ``K1_01`` are not EPIC-100
  extension ids, so ``flow_stride = flow_bound = "auto"`` gives stride 2 and bound 25 for them;
* ``<root>/<K>/audio/<video>.wav`` -- 24 kHz mono 16-bit: a class-dependent tone (440 / 660 / 990 / 1320 Hz,
  slightly detuned per kitchen) during each clip, over kitchen-dependent noise;
* optionally (``video=True``) ``<root>/<K>/videos/<video>.MP4`` written with ``cv2.VideoWriter`` (``mp4v``), for
  ``rgb_source = "video"``;
* manifests ``<manifests_dir>/K{1,2,3}_{train,test}.csv`` in the project's CSV schema
  (:data:`featstore.manifests.COLUMNS`) and ``<manifests_dir>/classes.json`` = ``{"verb_classes": 4, "verbs": [...]}``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from extract.flow import quantise
from featstore.manifests import COLUMNS, DEMO_DOMAINS, MANIFEST_DIR, normalise, to_csv_text

VERBS = ("move left", "move right", "move up", "move down")
DIRECTIONS = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # (dx, dy) in image coordinates
TONES_HZ = (440.0, 660.0, 990.0, 1320.0)
FPS = 30.0
WIDTH, HEIGHT = 160, 90
AUDIO_RATE = 24000
FLOW_STRIDE, FLOW_BOUND = 2, 25.0
MARGIN = 4  # texture margin for camera shake
RGB_QUALITY, FLOW_QUALITY = 90, 95


@dataclass(frozen=True)
class Kitchen:
    name: str
    texture: str
    base: tuple[float, float, float]      # texture base colour (RGB, 0..1)
    gain: float                            # global lighting
    cast: tuple[float, float, float]      # per-channel colour cast
    noise: float                           # sensor noise (std, 0..1 scale)
    flicker: float                         # light flicker amplitude
    shake: int                             # camera shake (max integer pixels per frame)
    radius: tuple[float, float]           # object radius range
    speed: tuple[float, float]            # object speed range (pixels per frame)
    contrast: float                        # object saturation against grey
    flow_noise: float                      # std of the flow noise (pixels)
    detune: float                          # tone frequency factor
    audio_noise: float                     # background noise level
    hum: float                             # 50 Hz hum level


KITCHENS = {
    "K1": Kitchen("K1", "wood", (0.72, 0.55, 0.38), 1.05, (1.05, 1.0, 0.92), 0.015, 0.0, 0, (6, 9), (0.7, 1.2),
                  1.0, 0.15, 1.0, 0.02, 0.0),
    "K2": Kitchen("K2", "tiles", (0.55, 0.60, 0.68), 0.70, (0.88, 0.97, 1.15), 0.04, 0.08, 0, (8, 11), (0.45, 0.85),
                  0.9, 0.25, 1.06, 0.05, 0.12),
    "K3": Kitchen("K3", "granite", (0.42, 0.50, 0.40), 0.95, (0.93, 1.08, 0.92), 0.07, 0.03, 1, (5, 8),
                  (0.8, 1.3), 0.6, 0.4, 0.94, 0.12, 0.0),
}


# --------------------------------------------------------------------------------------------- rendering


def _texture(k: Kitchen, rng: np.random.Generator) -> np.ndarray:
    h, w = HEIGHT + 2 * MARGIN, WIDTH + 2 * MARGIN
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(k.base, dtype=np.float32)
    if k.texture == "wood":
        phase = rng.uniform(0, 2 * np.pi)
        grain = 0.07 * np.sin(0.45 * y + 2.5 * np.sin(0.04 * x + phase)) + 0.03 * np.sin(0.11 * y)
        tex = base[None, None] * (1 + grain[..., None])
    elif k.texture == "tiles":
        tile = 15
        ty, tx = (y // tile).astype(int), (x // tile).astype(int)
        shade = rng.uniform(-0.05, 0.05, size=(ty.max() + 1, tx.max() + 1)).astype(np.float32)[ty, tx]
        grout = ((y % tile) < 1.5) | ((x % tile) < 1.5)
        tex = base[None, None] * (1 + shade[..., None])
        tex[grout] = base * 0.55
    else:  # granite
        speckle = rng.normal(0, 0.09, size=(h, w)).astype(np.float32)
        speckle = (speckle + np.roll(speckle, 1, 0) + np.roll(speckle, 1, 1)) / 2.0
        tex = base[None, None] * (1 + speckle[..., None])
        tex += rng.normal(0, 0.02, size=(h, w, 3)).astype(np.float32)
    # a fixed piece of clutter (a "pot") per kitchen, moves with the camera
    cy, cx = rng.uniform(10, 25), rng.uniform(15, 30) if rng.random() < 0.5 else rng.uniform(130, 145)
    pot = ((y - cy) ** 2 / 64 + (x - cx) ** 2 / 144) < 1
    tex[pot] = np.array(rng.uniform(0.1, 0.5, 3), dtype=np.float32)
    return np.clip(tex, 0, 1).astype(np.float32)


def _random_colour(rng: np.random.Generator, contrast: float) -> np.ndarray:
    hue = rng.uniform(0, 1)
    rgb = np.clip(np.abs(((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)  # HSV with s = v = 1
    value = rng.uniform(0.75, 1.0)
    colour = value * (0.5 + contrast * (rgb - 0.5))
    return colour.astype(np.float32)


@dataclass
class _Clip:
    verb_class: int
    start: int            # first frame (1-based)
    stop: int             # last frame
    p0: np.ndarray        # world position at the first frame (x, y)
    vel: np.ndarray       # pixels per frame (dx, dy)
    radius: float
    square: bool
    colour: np.ndarray

    def position(self, t: int) -> np.ndarray:
        return self.p0 + self.vel * (t - self.start)


def _plan(k: Kitchen, classes: list[int], rng: np.random.Generator) -> tuple[list[_Clip], int]:
    """Place the clips of one video in time; returns the clips and the video's frame count."""
    t = int(rng.integers(8, 16))
    clips = []
    for c in classes:
        length = int(rng.integers(24, 41))
        speed = rng.uniform(*k.speed)
        direction = DIRECTIONS[c] + rng.uniform(-0.15, 0.15, 2) * DIRECTIONS[c][::-1]
        vel = speed * direction / np.linalg.norm(direction)
        centre = np.array([WIDTH / 2, HEIGHT / 2]) + rng.uniform(-6, 6, 2)
        p0 = centre - vel * (length - 1) / 2
        clips.append(_Clip(c, t + 1, t + length, p0, vel, rng.uniform(*k.radius), bool(rng.random() < 0.5),
                           _random_colour(rng, k.contrast)))
        t += length + int(rng.integers(6, 16))
    return clips, t + 6


def _object_alpha(clip: _Clip, pos: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - pos[0], yy - pos[1]
    if clip.square:
        dist = np.maximum(np.abs(dx), np.abs(dy))
    else:
        dist = np.sqrt(dx * dx + dy * dy)
    return np.clip(clip.radius - dist + 0.5, 0.0, 1.0)


_NOISE_TILES, _NOISE_PAD = 8, 32


def _noise(bank: np.ndarray, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Unit Gaussian noise (H, W, 3): a random window of a pre-drawn bank (drawing fresh noise per frame would
    dominate the generation time)."""
    i, dy, dx = rng.integers(0, len(bank)), rng.integers(0, _NOISE_PAD), rng.integers(0, _NOISE_PAD)
    return bank[i, dy:dy + shape[0], dx:dx + shape[1]]


def _render_video(k: Kitchen, clips: list[_Clip], n_frames: int, rng: np.random.Generator):
    """Frames (N, H, W, 3) uint8 and flow (N_flow, 2, H, W) uint8 (EPIC quantised, stride 2, bound 25)."""
    tex = _texture(k, rng)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    # camera offset per frame (integer pixels, a bounded random walk) -- image content moves by -offset
    offsets = np.zeros((n_frames + 2, 2), dtype=np.int64)
    if k.shake:
        for t in range(1, n_frames + 2):
            step = rng.integers(-k.shake, k.shake + 1, 2)
            offsets[t] = np.clip(offsets[t - 1] + step, -MARGIN + 1, MARGIN - 1)
    active: list[_Clip | None] = [None] * (n_frames + 2)  # index = 1-based frame
    for c in clips:
        for t in range(c.start, c.stop + 1):
            active[t] = c
    cast = np.array(k.cast, dtype=np.float32) * np.float32(k.gain)
    flicker = (1 + k.flicker * np.sin(np.arange(n_frames + 2) * 2 * np.pi / rng.uniform(20, 45)
                                      + rng.uniform(0, 6))).astype(np.float32)
    bank = rng.standard_normal((_NOISE_TILES, HEIGHT + _NOISE_PAD, WIDTH + _NOISE_PAD, 3), dtype=np.float32)
    frames = np.empty((n_frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(1, n_frames + 1):
        ox, oy = offsets[t]
        img = tex[MARGIN + oy:MARGIN + oy + HEIGHT, MARGIN + ox:MARGIN + ox + WIDTH].copy()
        c = active[t]
        if c is not None:
            a = _object_alpha(c, c.position(t) - offsets[t], yy, xx)[..., None]
            img = img * (1 - a) + c.colour[None, None] * a
        img = img * (cast * flicker[t]) + np.float32(k.noise) * _noise(bank, rng, (HEIGHT, WIDTH))
        frames[t - 1] = np.clip(img * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)
    # analytic flow: flow frame j (1-based) = displacement from RGB frame 2j-1 to 2j+1
    n_flow = (n_frames - 1) // FLOW_STRIDE
    flow = np.empty((n_flow, 2, HEIGHT, WIDTH), dtype=np.uint8)
    for j in range(1, n_flow + 1):
        a, b = FLOW_STRIDE * (j - 1) + 1, FLOW_STRIDE * j + 1
        cam = -(offsets[b] - offsets[a]).astype(np.float32)
        d = np.empty((2, HEIGHT, WIDTH), dtype=np.float32)
        d[0], d[1] = cam[0], cam[1]
        c = active[a]
        if c is not None and active[b] is c:
            pa = c.position(a) - offsets[a]
            mask = _object_alpha(c, pa, yy, xx) > 0.5
            disp = (c.position(b) - offsets[b]) - pa
            d[0][mask], d[1][mask] = disp[0], disp[1]
        d += np.float32(k.flow_noise) * _noise(bank, rng, (HEIGHT, WIDTH)).transpose(2, 0, 1)[:2]
        flow[j - 1] = quantise(d, FLOW_BOUND)
    return frames, flow


def _render_audio(k: Kitchen, clips: list[_Clip], n_frames: int, rng: np.random.Generator) -> np.ndarray:
    n = int(round(n_frames / FPS * AUDIO_RATE))
    t = np.arange(n) / AUDIO_RATE
    x = rng.normal(0, k.audio_noise, n)
    if k.name == "K3":  # clatter: short decaying bursts
        for start in rng.integers(0, max(n - 2400, 1), size=max(1, n // AUDIO_RATE)):
            burst = rng.normal(0, 0.3, 2400) * np.exp(-np.arange(2400) / 300.0)
            x[start:start + 2400] += burst[:len(x[start:start + 2400])]
    if k.hum:
        x += k.hum * np.sin(2 * np.pi * 50 * t) + 0.5 * k.hum * np.sin(2 * np.pi * 100 * t)
    fade = int(0.01 * AUDIO_RATE)
    for c in clips:
        s0, s1 = int(round((c.start - 1) / FPS * AUDIO_RATE)), int(round(c.stop / FPS * AUDIO_RATE))
        s1 = min(s1, n)
        m = s1 - s0
        env = np.ones(m)
        env[:fade] = np.linspace(0, 1, min(fade, m))[:len(env[:fade])]
        env[-fade:] = np.linspace(1, 0, min(fade, m))[-len(env[-fade:]):]
        f = TONES_HZ[c.verb_class] * k.detune * rng.uniform(0.98, 1.02)
        amp = rng.uniform(0.15, 0.3)
        x[s0:s1] += amp * env * (np.sin(2 * np.pi * f * t[s0:s1]) + 0.3 * np.sin(4 * np.pi * f * t[s0:s1]))
    return np.clip(x, -1, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------- writing


def _write_jpegs(folder: Path, arrays: np.ndarray, quality: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays, start=1):
        Image.fromarray(a).save(folder / f"frame_{i:010d}.jpg", quality=quality)


def _write_video(path: Path, frames: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: cv2.VideoWriter cannot write mp4v")
    try:
        for f in frames:
            writer.write(np.ascontiguousarray(f[..., ::-1]))
    finally:
        writer.release()


def _timestamp(frame: int) -> str:
    s = (frame - 1) / FPS
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{sec:05.2f}"


def _make_kitchen(args) -> dict:
    """Render and write one kitchen; returns its manifest rows per role (run in a worker process)."""
    name, index, root, seed, clips_per_class, test_clips_per_class, video = args
    import soundfile

    k = KITCHENS[name]
    rng = np.random.default_rng([seed, index])
    rows: dict[str, list[dict]] = {}
    counts = {"frames": 0, "flow": 0}
    for v, (role, per_class) in enumerate((("train", clips_per_class), ("test", test_clips_per_class)), start=1):
        vid = f"{name}_{v:02d}"
        classes = [c for c in range(len(VERBS)) for _ in range(per_class)]
        classes = [classes[i] for i in rng.permutation(len(classes))]
        clips, n_frames = _plan(k, classes, rng)
        frames, flow = _render_video(k, clips, n_frames, rng)
        audio = _render_audio(k, clips, n_frames, rng)
        base = Path(root) / name
        for sub in (base / "rgb_frames" / vid, base / "flow_frames" / vid):
            if sub.is_dir():
                shutil.rmtree(sub)
        _write_jpegs(base / "rgb_frames" / vid, frames, RGB_QUALITY)
        _write_jpegs(base / "flow_frames" / vid / "u", flow[:, 0], FLOW_QUALITY)
        _write_jpegs(base / "flow_frames" / vid / "v", flow[:, 1], FLOW_QUALITY)
        (base / "audio").mkdir(parents=True, exist_ok=True)
        soundfile.write(str(base / "audio" / f"{vid}.wav"), audio, AUDIO_RATE, subtype="PCM_16")
        if video:
            _write_video(base / "videos" / f"{vid}.MP4", frames)
        counts["frames"] += n_frames
        counts["flow"] += len(flow)
        rows[role] = [{
            "id": f"{vid}_{i}", "participant_id": name, "video_id": vid, "narration": VERBS[c.verb_class],
            "start_timestamp": _timestamp(c.start), "stop_timestamp": _timestamp(c.stop + 1),
            "start_frame": c.start, "stop_frame": c.stop, "fps": FPS, "verb": VERBS[c.verb_class],
            "verb_class": c.verb_class, "noun": "", "noun_class": -1,
        } for i, c in enumerate(clips)]
    return {"name": name, "rows": rows, **counts}


def make_demo(root: Path = Path("demo/data"), manifests_dir: Path = MANIFEST_DIR / "demo", clips_per_class: int = 6,
              seed: int = 0, video: bool = False, test_clips_per_class: int = 3,
              kitchens: tuple[str, ...] = DEMO_DOMAINS, workers: int = 2) -> dict:
    """Generate the demo dataset (module docstring); deterministic given ``seed``.

    Args:
        root: data root (the extraction's ``data_root``).
        manifests_dir: where ``K?_{train,test}.csv`` and ``classes.json`` go (the registry points at
            ``manifests/demo/``).
        clips_per_class / test_clips_per_class: clips per class and kitchen in the train / test video.
        video: also write ``<root>/<K>/videos/<video>.MP4`` (for ``rgb_source = "video"``).
        kitchens: a subset of ``K1, K2, K3``.
        workers: processes to render kitchens in parallel (1 = in this process); the output does not depend on it.

    Returns a summary: root, manifests_dir, kitchens, verbs, clips per split, frames, flow frames, seconds.
    """
    t0 = time.perf_counter()
    root, manifests_dir = Path(root), Path(manifests_dir)
    for name in kitchens:
        if name not in KITCHENS:
            raise ValueError(f"unknown demo kitchen {name!r} (one of {', '.join(KITCHENS)})")
    if clips_per_class < 1 or test_clips_per_class < 1:
        raise ValueError("clips_per_class and test_clips_per_class must be >= 1")
    jobs = [(name, int(name[1:]), str(root), int(seed), int(clips_per_class), int(test_clips_per_class), bool(video))
            for name in kitchens]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_make_kitchen, jobs))
    else:
        results = [_make_kitchen(j) for j in jobs]

    manifests_dir.mkdir(parents=True, exist_ok=True)
    clips = {}
    for res in results:
        for role, rows in res["rows"].items():
            df = normalise(pd.DataFrame(rows, columns=COLUMNS), f"demo {res['name']}_{role}", video_fps={})
            (manifests_dir / f"{res['name']}_{role}.csv").write_text(to_csv_text(df))
            clips[f"{res['name']}_{role}"] = len(df)
    (manifests_dir / "classes.json").write_text(
        json.dumps({"verb_classes": len(VERBS), "verbs": list(VERBS)}, indent=1) + "\n")
    return {
        "root": str(root), "manifests_dir": str(manifests_dir), "kitchens": list(kitchens), "verbs": list(VERBS),
        "clips": clips, "frames": sum(r["frames"] for r in results), "flow_frames": sum(r["flow"] for r in results),
        "size": [WIDTH, HEIGHT], "fps": FPS, "seconds": round(time.perf_counter() - t0, 2),
    }
