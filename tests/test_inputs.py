"""load_clip on real frames, flow JPEGs, videos and audio in a temporary EPIC layout; every bad input -> ClipError."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from extract import flow as F
from extract import transforms as T
from extract.config import ExtractConfig
from featstore.errors import UserError
from extract.inputs import ClipError, clip_frames, input_shape, load_clip

MEDIA = Path("/work/shared/data/media")
IMGS = MEDIA / "imgs"  # img_00001..10 (320x240 RGB), x/y_00001..5 (greyscale flow)
pytestmark = pytest.mark.skipif(not (IMGS / "img_00001.jpg").is_file(), reason="shared media not available")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """EPIC layout for participant P01, video P01_01: the 10 real frames, 5 flow pairs, test.mp4 and test.wav."""
    r = tmp_path_factory.mktemp("epic")
    rgb = r / "P01" / "rgb_frames" / "P01_01"
    rgb.mkdir(parents=True)
    for i in range(1, 11):
        (rgb / f"frame_{i:010d}.jpg").symlink_to(IMGS / f"img_{i:05d}.jpg")
    for uv, xy in (("u", "x"), ("v", "y")):
        d = r / "P01" / "flow_frames" / "P01_01" / uv
        d.mkdir(parents=True)
        for i in range(1, 6):
            (d / f"frame_{i:010d}.jpg").symlink_to(IMGS / f"{xy}_{i:05d}.jpg")
    (r / "P01" / "videos").mkdir()
    (r / "P01" / "videos" / "P01_01.MP4").symlink_to(MEDIA / "test.mp4")  # 300 frames, 340x256, 30 fps
    (r / "P01" / "audio").mkdir()
    (r / "P01" / "audio" / "P01_01.wav").symlink_to(MEDIA / "test.wav")  # 16 kHz stereo, 6.56 s
    return r


def row(**kw) -> dict:
    base = dict(id="c1", participant_id="P01", video_id="P01_01", start_frame=1, stop_frame=10, fps=30.0)
    base.update(kw)
    return base


def i3d(root, **kw) -> ExtractConfig:
    kw.setdefault("modalities", ("rgb", "flow"))
    return ExtractConfig(backbone="i3d", data_root=root, **kw)


def tbn(root, **kw) -> ExtractConfig:
    kw.setdefault("modalities", ("rgb", "flow", "audio"))
    return ExtractConfig(backbone="tbn", data_root=root, **kw)


def expected_rgb(n: int, cfg) -> np.ndarray:
    """Frame n through PIL decode + cv2 bilinear resize + centre crop, written out independently."""
    img = np.asarray(Image.open(IMGS / f"img_{n:05d}.jpg").convert("RGB"))
    h, w = img.shape[:2]
    nh, nw = cfg.resize, int(cfg.resize * w / h)  # landscape: shorter side is the height
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = int(round((nh - cfg.crop) / 2)), int(round((nw - cfg.crop) / 2))
    return img[top:top + cfg.crop, left:left + cfg.crop]


def expected_grey(path: Path, cfg) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("L"))
    h, w = img.shape
    nh, nw = cfg.resize, int(cfg.resize * w / h)
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = int(round((nh - cfg.crop) / 2)), int(round((nw - cfg.crop) / 2))
    return img[top:top + cfg.crop, left:left + cfg.crop]


# ------------------------------------------------------------------------------------------------ good inputs


def test_i3d_frames_shapes_values(root):
    cfg = i3d(root)
    out = load_clip(row(), cfg)
    assert list(out) == ["rgb", "flow"]
    assert out["rgb"].shape == (5, 3, 16, 224, 224) == input_shape(cfg, "rgb")
    assert out["flow"].shape == (5, 2, 16, 224, 224) == input_shape(cfg, "flow")
    assert all(a.dtype == np.float32 for a in out.values())
    assert out["rgb"].min() >= -1 and out["rgb"].max() <= 1 and out["rgb"].std() > 0.1
    assert out["flow"].min() >= -1 and out["flow"].max() <= 1
    frames = clip_frames(row(), cfg)
    # window 2, step 5 holds RGB frame frames["rgb"][2, 5]; compare with PIL + cv2 written out here
    n = int(frames["rgb"][2, 5])
    want = expected_rgb(n, cfg).astype(np.float32) / 255 * 2 - 1
    assert np.allclose(out["rgb"][2, :, 5].transpose(1, 2, 0), want, atol=1e-6)
    # flow: exact de-quantisation (EPIC-55 video id -> bound 25) of the u/v JPEGs of frame int(n/2)
    k = int(frames["flow"][2, 5])
    assert k == max(n // 2, 1)
    u = expected_grey(IMGS / f"x_{k:05d}.jpg", cfg).astype(np.float32)
    assert np.allclose(out["flow"][2, 0, 5], np.clip(u * 50 / 255 - 25, -20, 20) / 20, atol=1e-5)
    naive = load_clip(row(), replace(cfg, flow_scaling="naive"))["flow"]
    assert np.allclose(naive[2, 0, 5], u / 255 * 2 - 1, atol=1e-5)


def test_tbn_frames_bgr_flow_audio(root):
    cfg = tbn(root)
    out = load_clip(row(), cfg)
    assert out["rgb"].shape == (25, 3, 224, 224) == input_shape(cfg, "rgb")
    assert out["flow"].shape == (25, 10, 224, 224) == input_shape(cfg, "flow")
    assert out["audio"].shape == (25, 1, 256, 256) == input_shape(cfg, "audio")
    assert all(a.dtype == np.float32 for a in out.values())
    assert out["rgb"].min() >= -128 and out["rgb"].max() <= 255 - 104
    frames = clip_frames(row(), cfg)
    s = 7
    img = expected_rgb(int(frames["rgb"][s]), cfg).astype(np.float32)
    # BGR order: channel 0 is blue minus 104, channel 2 is PIL's red channel minus 128
    assert np.array_equal(out["rgb"][s, 2] + 128, img[..., 0])
    assert np.array_equal(out["rgb"][s, 1] + 117, img[..., 1])
    assert np.array_equal(out["rgb"][s, 0] + 104, img[..., 2])
    # flow: x0, y0, x1, y1, ... minus 128
    k = int(frames["flow"][s, 0])
    assert np.array_equal(out["flow"][s, 0] + 128, expected_grey(IMGS / f"x_{k:05d}.jpg", cfg))
    assert np.array_equal(out["flow"][s, 1] + 128, expected_grey(IMGS / f"y_{k:05d}.jpg", cfg))
    assert np.isfinite(out["audio"]).all() and out["audio"].std() > 0.5
    # audio centres: frame n at (n - 1) / fps seconds
    from extract.audio import load_wav, tbn_spectrogram
    x, sr = load_wav(root / "P01" / "audio" / "P01_01.wav")
    n = int(frames["audio"][s])
    assert np.allclose(out["audio"][s, 0], tbn_spectrogram(x, sr, (n - 1) / 30.0), atol=1e-4)


def test_video_source_matches_decord(root):
    import decord

    cfg = i3d(root, rgb_source="video", modalities=("rgb",))
    r = row(start_frame=100, stop_frame=220)
    out = load_clip(r, cfg)["rgb"]
    assert out.shape == (5, 3, 16, 224, 224)
    frames = clip_frames(r, cfg)["rgb"]
    n = int(frames[3, 4])
    raw = decord.VideoReader(str(MEDIA / "test.mp4"))[n - 1].asnumpy()  # 1-based n -> index n - 1
    want = T.i3d_rgb(T.resize_crop(raw[None], 256, 224))[0]
    assert np.allclose(out[3, :, 4].transpose(1, 2, 0), want, atol=1e-6)


def test_tvl1_source_matches_flow_jpegs(tmp_path):
    """A texture moving 1 px per frame to the right: flow computed with TV-L1 from the RGB frames and flow JPEGs
    quantised from the true motion go through the same path to the backbone."""
    rng = np.random.default_rng(1)
    tex = cv2.resize(rng.uniform(0, 255, (20, 26)).astype(np.float32), (100, 60), interpolation=cv2.INTER_CUBIC)
    tex = np.clip(tex, 0, 255).astype(np.uint8)
    rgb = tmp_path / "P09" / "rgb_frames" / "P09_01"
    rgb.mkdir(parents=True)
    for n in range(1, 13):
        frame = tex[6:54, 20 - n:84 - n]  # content moves +1 px per frame
        Image.fromarray(np.stack([frame] * 3, -1)).save(rgb / f"frame_{n:010d}.jpg", quality=98)
    for uv, d in (("u", 2.0), ("v", 0.0)):  # stride 2: 2 px per flow frame
        folder = tmp_path / "P09" / "flow_frames" / "P09_01" / uv
        folder.mkdir(parents=True)
        for k in range(1, 6):
            Image.fromarray(F.quantise(np.full((48, 64), d), 25.0)).save(folder / f"frame_{k:010d}.jpg", quality=95)
    cfg = ExtractConfig(backbone="i3d", modalities=("flow",), data_root=tmp_path, frames_per_window=4,
                        test_windows=1, resize=48, crop=32)
    r = row(id="m1", participant_id="P09", video_id="P09_01", start_frame=2, stop_frame=9)
    jpeg = load_clip(r, cfg)["flow"]
    tv = load_clip(r, replace(cfg, flow_source="tvl1"))["flow"]
    assert jpeg.shape == tv.shape == (1, 2, 4, 32, 32)
    assert np.median(jpeg[0, 0]) == pytest.approx(2 / 20, abs=0.011)  # exact scaling: 2 px / 20
    inner = tv[0, :, :, 6:-6, 6:-6]
    assert np.median(inner[0]) == pytest.approx(2 / 20, abs=0.03)
    assert abs(np.median(inner[1])) < 0.02


def test_input_shapes_and_config_errors(root):
    cfg = i3d(root, split_kind="train", train_windows=3, frames_per_window=8, crop=96, resize=112)
    assert input_shape(cfg, "rgb") == (3, 3, 8, 96, 96)
    assert input_shape(replace(cfg, backbone="tbn", segments=5, flow_stack=5), "flow") == (5, 10, 96, 96)
    assert input_shape(replace(cfg, backbone="tbn"), "audio") == (25, 1, 256, 256)
    with pytest.raises(UserError):
        input_shape(cfg, "audio")  # I3D has no audio stream
    with pytest.raises(UserError):
        load_clip(row(), replace(cfg, modalities=("rgb", "audio")))
    with pytest.raises(UserError):
        load_clip(row(), replace(cfg, crop=300))


# ------------------------------------------------------------------------------------------------ bad inputs


def assert_clip_error(exc: pytest.ExceptionInfo, clip_id: str, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"clip {clip_id}: ")
    assert str(path) in msg, msg
    return msg


def copy_video_frames(root: Path, video: str) -> Path:
    """A real (non-symlinked) copy of the 10 frames and flow as another video of P01."""
    rgb = root / "P01" / "rgb_frames" / video
    shutil.copytree(root / "P01" / "rgb_frames" / "P01_01", rgb, symlinks=False)
    shutil.copytree(root / "P01" / "flow_frames" / "P01_01", root / "P01" / "flow_frames" / video, symlinks=False)
    return rgb


def test_missing_frame_folder(root):
    with pytest.raises(ClipError) as e:
        load_clip(row(id="x7", video_id="P01_77"), i3d(root))
    assert_clip_error(e, "x7", root / "P01" / "rgb_frames" / "P01_77")


def test_missing_frame_file(root):
    r, cfg = row(id="x8", start_frame=5, stop_frame=40), tbn(root, modalities=("rgb",))
    first_missing = int(clip_frames(r, cfg)["rgb"][clip_frames(r, cfg)["rgb"] > 10].min())  # only 1..10 exist
    with pytest.raises(ClipError) as e:
        load_clip(r, cfg)
    assert_clip_error(e, "x8", root / "P01" / "rgb_frames" / "P01_01" / f"frame_{first_missing:010d}.jpg")


def test_missing_flow_folder(root):
    copy_video_frames(root, "P01_05")
    shutil.rmtree(root / "P01" / "flow_frames" / "P01_05" / "v")
    with pytest.raises(ClipError) as e:
        load_clip(row(id="x9", video_id="P01_05"), i3d(root))
    assert_clip_error(e, "x9", root / "P01" / "flow_frames" / "P01_05" / "v")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_jpeg(root, kind):
    video = f"P01_0{2 if kind == 'garbage' else 3}"
    rgb = copy_video_frames(root, video)
    bad = rgb / "frame_0000000004.jpg"
    data = bad.read_bytes()
    bad.write_bytes(b"\x00garbage, not a JPEG" * 20 if kind == "garbage" else data[:len(data) // 2])
    with pytest.raises(ClipError) as e:
        load_clip(row(id="12917", video_id=video), i3d(root))
    msg = assert_clip_error(e, "12917", bad)
    assert "corrupt JPEG" in msg


def test_truncated_video(root):
    vid = root / "P01" / "videos" / "P01_04.MP4"
    data = (MEDIA / "test.mp4").read_bytes()
    vid.write_bytes(data[:len(data) // 2])
    with pytest.raises(ClipError) as e:
        load_clip(row(id="t1", video_id="P01_04"), i3d(root, rgb_source="video", modalities=("rgb",)))
    assert_clip_error(e, "t1", vid)


def test_missing_video(root):
    with pytest.raises(ClipError) as e:
        load_clip(row(id="t2", video_id="P01_66"), i3d(root, rgb_source="video", modalities=("rgb",)))
    assert_clip_error(e, "t2", root / "P01" / "videos" / "P01_66.MP4")


def test_frame_past_end_of_video(root):
    with pytest.raises(ClipError) as e:  # test.mp4 has 300 frames
        load_clip(row(id="t3", start_frame=280, stop_frame=330), i3d(root, rgb_source="video", modalities=("rgb",)))
    msg = assert_clip_error(e, "t3", root / "P01" / "videos" / "P01_01.MP4")
    assert "past the end" in msg and "300 frames" in msg


def test_missing_wav(root):
    copy_video_frames(root, "P01_06")
    with pytest.raises(ClipError) as e:
        load_clip(row(id="a1", video_id="P01_06"), tbn(root, modalities=("audio",)))
    assert_clip_error(e, "a1", root / "P01" / "audio" / "P01_06.wav")


def test_missing_fps_for_audio(root):
    with pytest.raises(ClipError) as e:
        load_clip(row(id="a2", fps=float("nan")), tbn(root, modalities=("audio",)))
    assert "fps" in assert_clip_error(e, "a2", root / "P01" / "audio" / "P01_01.wav")


def test_clip_error_is_one_line():
    e = ClipError("c", "/a/b.jpg", "corrupt JPEG (line one\nline two)")
    assert str(e) == "clip c: /a/b.jpg: corrupt JPEG (line one line two)"
    assert str(ClipError("clip 5: x: y")) == "clip 5: x: y"


# ------------------------------------------------------------------------------------------------ fast paths


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_read_image_matches_pil_on_real_frames(mode, tmp_path):
    """OpenCV's decode (complete JPEGs of the expected colour type) and PIL's (everything else: an RGB frame read
    as greyscale, a greyscale one read as RGB, a file with bytes after its EOI) give the same pixels."""
    from extract import decode

    for path in sorted(IMGS.glob("*.jpg")):
        want = np.asarray(Image.open(path).convert(mode))
        got = decode.read_image(path, "c", mode)
        assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, want), path.name
        padded = tmp_path / path.name
        padded.write_bytes(path.read_bytes() + b"\x00\x00")  # not ending with EOI: PIL decides
        assert np.array_equal(decode.read_image(padded, "c", mode), want), path.name
    fast = decode._decode_complete_jpeg((IMGS / "img_00001.jpg").read_bytes(), "RGB")
    assert fast is not None  # the real RGB frames take the OpenCV path
    assert decode._decode_complete_jpeg((IMGS / "img_00001.jpg").read_bytes(), "L") is None  # colour -> PIL's L
    data = (IMGS / "x_00001.jpg").read_bytes()
    assert decode._decode_complete_jpeg(data, "L") is not None
    assert decode._decode_complete_jpeg(data[:len(data) // 2], "L") is None  # cut: PIL refuses it


def test_byte_tables_equal_the_formulas():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(T.i3d_rgb(x), T.i3d_rgb(x.astype(np.float32)))
    assert np.array_equal(T.tbn_flow(x), T.tbn_flow(x.astype(np.float32)))
    for bound in (8.0, 20.0, 25.0):
        for scaling in F.FLOW_SCALINGS:
            assert np.array_equal(F.dequantise(x, bound, scaling), F.dequantise(x.astype(np.float32), bound, scaling))
    t = x.reshape(4, 4, 4, 4).transpose(0, 3, 1, 2)  # a transposed view comes back contiguous in its own shape
    y = T.i3d_rgb(t)
    assert y.shape == t.shape and y.flags.c_contiguous and np.array_equal(y, t.astype(np.float32) / 255 * 2 - 1)


def test_inputs_are_channels_last(root):
    """load_clip's arrays have the backbones' memory format, so the runner copies them without a transpose."""
    import torch

    out = load_clip(row(), i3d(root, crop=64, resize=72, test_windows=2, frames_per_window=4))
    for m in ("rgb", "flow"):
        assert torch.from_numpy(out[m]).is_contiguous(memory_format=torch.channels_last_3d), m
    out = load_clip(row(), tbn(root, crop=64, resize=72, segments=3))
    for m in ("rgb", "flow", "audio"):
        assert torch.from_numpy(out[m]).is_contiguous(memory_format=torch.channels_last), m


def test_pixels_tables_match_the_float_inputs(root):
    """load_clip_pixels' uint8 pixels and tables give load_clip's floats, through cv2 (CPU) and through the torch
    lookup the runner uses on a GPU (run here on CPU tensors)."""
    import torch

    from extract.inputs import load_clip_pixels

    for cfg in (i3d(root, crop=64, resize=72, test_windows=2, frames_per_window=4),
                tbn(root, crop=64, resize=72, segments=3)):
        floats, pixels = load_clip(row(), cfg), load_clip_pixels(row(), cfg)
        for m, want in floats.items():
            p = pixels[m]
            if m == "audio":
                assert isinstance(p, np.ndarray) and np.array_equal(p, want)
                continue
            assert isinstance(p, T.Pixels) and p.data.dtype == np.uint8 and p.shape == want.shape
            assert np.array_equal(p.to_float(), want), (cfg.backbone, m)
            got = T.lookup(torch.from_numpy(np.array(p.table)), torch.from_numpy(p.data)).permute(p.order)
            assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want))), (cfg.backbone, m)
    # TBN RGB's per-channel table is BGR minus the BGR means
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    rgb = np.stack([x, 255 - x, x // 2], axis=-1)
    p = T.Pixels(np.ascontiguousarray(rgb[..., ::-1]), T._TBN_RGB_TABLE, (0, 3, 1, 2))
    assert np.array_equal(p.to_float(), T.tbn_rgb(rgb).transpose(0, 3, 1, 2))
