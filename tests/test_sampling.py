"""Sampling positions (I3D windows, TSN segments, flow frame numbers), flow quantisation and TV-L1, transforms."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from extract import flow as F
from extract import sampling as S
from extract import transforms as T
from extract.config import ExtractConfig
from featstore.errors import UserError
from featstore.manifests import MANIFEST_DIR

D1_TRAIN = MANIFEST_DIR / "mmsada" / "D1_train.csv"


# ------------------------------------------------------------------------------------------------ I3D windows


def d1_row() -> tuple[int, int]:
    """The first row of MM-SADA's D1_train (uid 12915, P08_01, frames 245..350); the numbers if not converted."""
    if D1_TRAIN.is_file():
        row = pd.read_csv(D1_TRAIN).iloc[0]
        assert (str(row["id"]), row["video_id"]) == ("12915", "P08_01")
        return int(row["start_frame"]), int(row["stop_frame"])
    return 245, 350


def test_mmsada_test_windows_on_d1_row():
    start, stop = d1_row()
    assert (start, stop) == (245, 350)
    cfg = ExtractConfig()  # test split: 5 windows of 16 frames at stride 2
    frames = S.i3d_window_frames(start, stop, cfg)
    assert frames.shape == (5, 16) and frames.dtype == np.int64
    centres = np.linspace(start, stop, 7)[1:-1]  # 262.5, 280, 297.5, 315, 332.5
    assert np.array_equal(S.window_centres(start, stop, 5), centres.astype(int))
    assert S.window_centres(start, stop, 5).tolist() == [262, 280, 297, 315, 332]
    for w, c in enumerate([262, 280, 297, 315, 332]):
        # MM-SADA: range(c - 16, c + 16, 2)
        assert frames[w].tolist() == list(range(c - 16, c + 16, 2))
    assert frames.min() >= start and frames.max() <= stop


def test_window_clamping_and_short_clips():
    cfg = ExtractConfig()
    f = S.i3d_window_frames(100, 130, cfg)  # span 31 frames: the first and last windows are clamped
    assert f.min() == 100 and f.max() == 130
    assert np.all(np.diff(f, axis=1) >= 0)
    assert f[0, 0] == 100 and f[0, 1] == 100  # centre 105: 89, 91 -> clamped to 100
    short = S.i3d_window_frames(50, 53, cfg)  # shorter than a window: frames repeat
    assert short.shape == (5, 16) and set(np.unique(short)) <= {50, 51, 52, 53}
    one = S.i3d_window_frames(7, 7, cfg)
    assert np.all(one == 7)


def test_mmsada_code_centres():
    cfg = ExtractConfig(window_centres="mmsada_code")
    # released code: linspace(start + 16, stop + 1 - 16, 7, dtype=int32)[1:-1]
    expect = np.linspace(245 + 16, 350 + 1 - 16, 7)[1:-1].astype(int)
    f = S.i3d_window_frames(245, 350, cfg)
    assert np.array_equal(f[:, 8], expect)
    assert f.min() >= 245 and f.max() <= 350
    # near the start of a video the first centre is kept above frame 17
    assert S.window_centres(1, 200, 5, rule="mmsada_code")[0] > 17
    with pytest.raises(UserError):
        S.window_centres(1, 10, 5, rule="nope")


def test_train_windows_deterministic():
    cfg = ExtractConfig(split_kind="train", train_windows=3)
    a = S.i3d_window_frames(1000, 1400, cfg)
    b = S.i3d_window_frames(1000, 1400, replace(cfg, seed=123))
    assert a.shape == (3, 16) and cfg.num_windows() == 3
    assert np.array_equal(a, b)  # no randomness: a resumed run writes the same store
    assert np.array_equal(a[:, 8], np.linspace(1000, 1400, 5)[1:-1].astype(int))


def test_demo_config_windows():
    cfg = ExtractConfig(frames_per_window=8, frame_stride=2, test_windows=3)
    f = S.i3d_window_frames(14, 42, cfg)
    assert f.shape == (3, 8)
    assert f[1].tolist() == [20, 22, 24, 26, 28, 30, 32, 34]  # centre 28 = linspace(14, 42, 5)[2]


# ------------------------------------------------------------------------------------------------ TSN segments


def test_tsn_segments_formula():
    start, stop, segs = 245, 350, 25
    n = stop - start + 1
    tick = n / segs
    expect = [start + int(tick / 2 + tick * i) for i in range(segs)]
    assert S.tsn_segment_frames(start, stop, segs).tolist() == expect
    # stacks of 5: the last stack still fits in the clip
    f = S.tsn_segment_frames(1, 60, 25, new_length=5)
    tick = (60 - 5 + 1) / 25
    assert f.tolist() == [1 + int(tick / 2 + tick * i) for i in range(25)]
    assert f.max() + 4 <= 60
    # TA3N's 5 of 25 segments are 2, 7, 12, 17, 22 of the same list
    assert len(S.tsn_segment_frames(1, 1000, 25)[[2, 7, 12, 17, 22]]) == 5
    # a clip shorter than the stack: every segment starts at the clip's start
    assert S.tsn_segment_frames(10, 12, 4, new_length=5).tolist() == [10, 10, 10, 10]
    assert S.tsn_segment_frames(10, 10, 3).tolist() == [10, 10, 10]


# ------------------------------------------------------------------------------------------------ flow frames


def test_flow_index_rules_differ_by_one():
    n = np.arange(1, 11)
    mm = S.flow_frame(n, "mmsada")
    ce = S.flow_frame(n, "ceil")
    tb = S.flow_frame(n, "tbn")
    assert mm.tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5]  # int(n/2), at least 1
    assert ce.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # ceil(n/2)
    assert tb.tolist() == [(k - 1) // 2 + 1 for k in range(1, 11)]
    assert np.array_equal(tb, ce)  # TBN's floor((n-1)/2)+1 is ceil(n/2) in 1-based numbers
    assert set((ce - mm).tolist()) <= {0, 1} and (ce - mm)[2::2].tolist() == [1, 1, 1, 1]  # odd n >= 3
    assert S.flow_frame(437, "mmsada") == 218 and S.flow_frame(437, "ceil") == 219
    assert isinstance(S.flow_frame(5), int)
    with pytest.raises(UserError):
        S.flow_frame(3, "floor")


def test_flow_frames_stride_one_is_identity():
    assert S.flow_frames_for(np.array([5, 6, 7]), 1).tolist() == [5, 6, 7]
    assert S.flow_frames_for(np.array([5, 6, 7]), 2).tolist() == [2, 3, 3]
    # I3D window at stride 2 -> consecutive flow frames ("flow stride 1 on the half-rate flow")
    window = np.arange(246, 278, 2)
    assert np.array_equal(np.diff(S.flow_frames_for(window, 2)), np.ones(15))


def test_flow_params_auto_and_manual():
    cfg = ExtractConfig()
    assert S.flow_params("P01_01", cfg) == (2, 25.0)
    assert S.flow_params("P01_101", cfg) == (1, 8.0)
    assert S.flow_params("P37_103", cfg) == (1, 8.0)
    assert S.flow_params("K1_01", cfg) == (2, 25.0)  # the demo kitchens are EPIC-55-like
    assert S.flow_params("P01_101", replace(cfg, flow_stride="2", flow_bound="20")) == (2, 20.0)
    for bad in (replace(cfg, flow_stride="3"), replace(cfg, flow_bound="-1"), replace(cfg, flow_bound="x")):
        with pytest.raises(UserError):
            S.flow_params("P01_01", bad)


# ------------------------------------------------------------------------------------------------ quantisation


def test_dequantise_exact_and_naive_known_values():
    j = np.array([0, 128, 255], dtype=np.uint8)
    exact = F.dequantise(j, 25.0, "exact")
    assert exact.dtype == np.float32
    assert exact[0] == pytest.approx(-1.0)            # -25 px, clipped to -20
    assert exact[2] == pytest.approx(1.0)             # +25 -> +20
    assert exact[1] == pytest.approx((128 * 50 / 255 - 25) / 20, abs=1e-6)  # 0.098 px / 20
    assert exact[1] == pytest.approx(0.0049, abs=1e-4)
    naive = F.dequantise(j, 25.0, "naive")
    assert naive.tolist() == pytest.approx([-1.0, 128 / 255 * 2 - 1, 1.0], abs=1e-6)
    # EPIC-100 bound 8: never reaches the +-20 clip
    assert F.dequantise(np.array([0, 255], np.uint8), 8.0).tolist() == pytest.approx([-0.4, 0.4], abs=1e-6)
    # the exact mapping is linear in jpeg inside the clip range
    mid = F.dequantise(np.arange(30, 220, dtype=np.uint8), 25.0)
    assert np.allclose(np.diff(mid), 50 / 255 / 20, atol=1e-6)
    with pytest.raises(UserError):
        F.dequantise(j, 25.0, "other")


@pytest.mark.parametrize("bound", [25.0, 8.0])
def test_quantise_round_trip(bound):
    rng = np.random.default_rng(0)
    d = rng.uniform(-bound, bound, 10000)
    q = F.quantise(d, bound)
    assert q.dtype == np.uint8
    assert np.abs(F.displacement(q, bound) - d).max() <= bound / 255 + 1e-5
    assert F.quantise([-1e3, 0.0, 1e3], bound).tolist() == [0, 128, 255]  # 127.5 rounds to even 128
    assert F.quantise(0.0, 25.0) == round(255 * 25 / 50)


def _texture(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (h // 4 + 2, w // 4 + 2)).astype(np.float32)
    import cv2
    big = cv2.resize(noise, (w + 8 * 4, h + 8 * 4), interpolation=cv2.INTER_CUBIC)
    return np.clip(big, 0, 255).astype(np.uint8)


def test_tvl1_recovers_shift():
    tex = _texture()
    prev = tex[8:56, 8:72]
    nxt = tex[8:56, 6:70]  # content moves 2 px to the right
    field = F.tvl1_field(np.stack([prev] * 3, -1), np.stack([nxt] * 3, -1))
    u, v = field[10:-10, 10:-10, 0], field[10:-10, 10:-10, 1]
    assert 1.5 < float(np.median(u)) < 2.5
    assert abs(float(np.median(v))) < 0.3
    uq, vq = F.tvl1(prev, nxt, 25.0)
    assert uq.dtype == np.uint8 and uq.shape == prev.shape
    assert F.displacement(np.median(uq[10:-10, 10:-10]), 25.0) == pytest.approx(2.0, abs=0.5)
    # downwards
    down = tex[6:54, 8:72]
    uq, vq = F.tvl1(prev, down, 25.0)
    assert F.displacement(np.median(vq[10:-10, 10:-10]), 25.0) == pytest.approx(2.0, abs=0.5)


def test_tvl1_pairing():
    a, b = F.tvl1_pair(np.array([1, 2, 218]), 2)
    assert a.tolist() == [1, 3, 435] and b.tolist() == [3, 5, 437]
    a, b = F.tvl1_pair(np.array([7]), 1)
    assert (a.tolist(), b.tolist()) == ([7], [8])


# ------------------------------------------------------------------------------------------------ transforms


def test_resize_and_crop_geometry():
    assert T.resized_size(256, 456, 256) == (256, 456)
    assert T.resized_size(1080, 1920, 256) == (256, 455)
    assert T.resized_size(240, 320, 256) == (256, 341)
    assert T.resized_size(456, 256, 256) == (456, 256)
    assert T.resized_size(1920, 1080, 256) == (455, 256)
    x = np.zeros((2, 256, 456, 3), np.uint8)
    assert T.resize_shorter(x, 256) is x
    x[:, 16:240, 116:340] = 255
    c = T.centre_crop(x, 224)
    assert c.shape == (2, 224, 224, 3) and c.min() == 255
    with pytest.raises(UserError):
        T.centre_crop(np.zeros((1, 100, 100), np.uint8), 224)


def test_scalings():
    px = np.array([[[0, 128, 255]]], dtype=np.uint8)  # R=0, G=128, B=255
    assert T.i3d_rgb(px).ravel().tolist() == pytest.approx([-1.0, 128 / 255 * 2 - 1, 1.0], abs=1e-6)
    assert T.tbn_rgb(px).ravel().tolist() == [255 - 104, 128 - 117, 0 - 128]  # BGR minus (104, 117, 128)
    assert T.tbn_flow(np.array([0, 128, 255], np.uint8)).tolist() == [-128, 0, 127]
    assert math.isclose(float(T.i3d_rgb(np.array([255], np.uint8))[0]), 1.0)
