"""The demo dataset: deterministic, valid manifests, loadable by both backbones, flow that shows the motion."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile

from extract import demo
from extract.config import DemoConfig, ExtractConfig
from extract.flow import dequantise, displacement
from extract.inputs import input_shape, load_clip
from featstore.manifests import COLUMNS, DEMO_DOMAINS, MANIFEST_DIR, read_manifest

SMALL = dict(clips_per_class=2, test_clips_per_class=1, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """All three kitchens, 2 train + 1 test clips per class."""
    base = tmp_path_factory.mktemp("demo")
    summary = demo.make_demo(base / "data", base / "manifests", workers=1, **SMALL)
    return base, summary


@pytest.fixture(scope="module")
def again(tmp_path_factory):
    """K1 once more, into another folder, with the MP4 videos as well."""
    base = tmp_path_factory.mktemp("demo_again")
    summary = demo.make_demo(base / "data", base / "manifests", kitchens=("K1",), video=True, workers=1, **SMALL)
    return base, summary


def test_summary_and_files(small):
    base, s = small
    assert s["kitchens"] == list(DEMO_DOMAINS) == ["K1", "K2", "K3"]
    assert s["verbs"] == ["move left", "move right", "move up", "move down"]
    assert s["clips"] == {f"{k}_{r}": n for k in DEMO_DOMAINS for r, n in (("train", 8), ("test", 4))}
    for k in DEMO_DOMAINS:
        for v in (f"{k}_01", f"{k}_02"):
            frames = sorted((base / "data" / k / "rgb_frames" / v).glob("frame_*.jpg"))
            assert frames[0].name == "frame_0000000001.jpg"
            assert len(frames) == int(frames[-1].name[6:16])  # contiguous, 1-based
            u = sorted((base / "data" / k / "flow_frames" / v / "u").glob("frame_*.jpg"))
            assert len(u) == (len(frames) - 1) // 2  # stride 2
            wav, sr = soundfile.read(base / "data" / k / "audio" / f"{v}.wav")
            assert sr == 24000 and wav.ndim == 1
            assert len(wav) == pytest.approx(len(frames) / 30 * 24000, abs=2)
    classes = json.loads((base / "manifests" / "classes.json").read_text())
    assert classes == {"verb_classes": 4, "verbs": ["move left", "move right", "move up", "move down"]}


def test_deterministic(small, again):
    (a, _), (b, _) = small, again
    for rel in ("data/K1/rgb_frames/K1_01/frame_0000000020.jpg", "data/K1/rgb_frames/K1_02/frame_0000000031.jpg",
                "data/K1/flow_frames/K1_01/u/frame_0000000010.jpg", "data/K1/flow_frames/K1_02/v/frame_0000000012.jpg",
                "data/K1/audio/K1_01.wav", "manifests/K1_train.csv", "manifests/K1_test.csv", "manifests/classes.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = demo.make_demo(b / "seed1", b / "seed1_manifests", kitchens=("K1",), workers=1,
                           **{**SMALL, "seed": 1})
    assert other["clips"]["K1_train"] == 8
    assert (a / "manifests/K1_train.csv").read_text() != (b / "seed1_manifests/K1_train.csv").read_text()


def test_manifests_validate(small):
    base, _ = small
    for k in DEMO_DOMAINS:
        for role, n in (("train", 8), ("test", 4)):
            path = base / "manifests" / f"{k}_{role}.csv"
            df = read_manifest(path, verb_classes=4, noun_classes=None)
            assert list(df.columns) == COLUMNS and len(df) == n
            assert (df["participant_id"] == k).all() and (df["video_id"] == f"{k}_0{1 if role == 'train' else 2}").all()
            assert sorted(df["verb_class"].value_counts().to_dict().items()) == [
                (c, n // 4) for c in range(4)]
            assert (df["verb"] == df["verb_class"].map(dict(enumerate(demo.VERBS)))).all()
            assert (df["fps"] == 30).all() and df["id"].is_unique
            length = df["stop_frame"] - df["start_frame"] + 1
            assert length.between(20, 40).all()
            # clips of a video follow each other with gaps
            assert (df["start_frame"].to_numpy()[1:] > df["stop_frame"].to_numpy()[:-1] + 1).all()


def test_registry_knows_demo_splits():
    assert DEMO_DOMAINS == ("K1", "K2", "K3")
    registry = MANIFEST_DIR / "registry.json"
    if not registry.is_file():
        pytest.skip("manifests not converted")
    reg = json.loads(registry.read_text())
    for k in DEMO_DOMAINS:
        assert reg["splits"][f"{k}_train"]["file"] == f"demo/{k}_train.csv"
        assert reg["domains"][k] == {"train": f"{k}_train", "test": f"{k}_test", "dataset": "demo"}


def _rows(base: Path, split: str) -> pd.DataFrame:
    return read_manifest(base / "manifests" / f"{split}.csv", verb_classes=4, noun_classes=None)


def test_load_clip_i3d_and_tbn(small, again):
    base, _ = small
    row = _rows(base, "K2_test").iloc[0].to_dict()
    cfg = replace(DemoConfig().extract, data_root=base / "data")
    out = load_clip(row, cfg)
    assert out["rgb"].shape == input_shape(cfg, "rgb") == (3, 3, 8, 96, 96)
    assert out["flow"].shape == input_shape(cfg, "flow") == (3, 2, 8, 96, 96)
    assert -1 <= out["rgb"].min() < out["rgb"].max() <= 1
    tcfg = ExtractConfig(backbone="tbn", modalities=("rgb", "flow", "audio"), data_root=base / "data", segments=5,
                         resize=112, crop=96)
    out = load_clip(row, tcfg)
    assert {k: v.shape for k, v in out.items()} == {"rgb": (5, 3, 96, 96), "flow": (5, 10, 96, 96),
                                                  "audio": (5, 1, 256, 256)}
    assert all(np.isfinite(v).all() for v in out.values())
    # the MP4 written with video=True decodes to the same clip (up to mp4v compression)
    b, _ = again
    row1 = _rows(b, "K1_train").iloc[0].to_dict()
    vcfg = replace(cfg, data_root=b / "data", modalities=("rgb",))
    frames = load_clip(row1, vcfg)["rgb"]
    video = load_clip(row1, replace(vcfg, rgb_source="video"))["rgb"]
    assert video.shape == frames.shape
    assert np.abs(video - frames).mean() < 0.1


def _flow_in_object(base: Path, row: dict) -> tuple[float, float]:
    """Mean de-quantised (u, v) over pixels that move (the object), over the clip's flow frames."""
    from PIL import Image

    folder = base / "data" / row["participant_id"] / "flow_frames" / row["video_id"]
    us, vs = [], []
    for k in range(row["start_frame"] // 2 + 1, row["stop_frame"] // 2 - 1):
        u = displacement(np.asarray(Image.open(folder / "u" / f"frame_{k:010d}.jpg")), 25.0)
        v = displacement(np.asarray(Image.open(folder / "v" / f"frame_{k:010d}.jpg")), 25.0)
        moving = np.hypot(u, v) > 0.8
        us.append(u[moving])
        vs.append(v[moving])
    return float(np.concatenate(us).mean()), float(np.concatenate(vs).mean())


def test_flow_shows_the_motion(small):
    base, _ = small
    df = _rows(base, "K1_train")
    for verb_class, sign_u, sign_v in ((0, -1, 0), (1, 1, 0), (2, 0, -1), (3, 0, 1)):
        row = df[df["verb_class"] == verb_class].iloc[0].to_dict()
        u, v = _flow_in_object(base, row)
        main, other = (u, v) if sign_u else (v, u)
        assert np.sign(main) == (sign_u or sign_v) and abs(main) > 1.0, (verb_class, u, v)
        assert abs(other) < 0.5 * abs(main)
    # as I3D sees it: positive mean u in the object region of a 'move right' clip
    row = df[df["verb"] == "move right"].iloc[0].to_dict()
    cfg = replace(DemoConfig().extract, data_root=base / "data", modalities=("flow",))
    flow = load_clip(row, cfg)["flow"]
    u = flow[:, 0]
    assert u[np.abs(u) > 0.04].mean() > 0.05
    assert dequantise(np.uint8(128), 25.0) == pytest.approx(0.0049, abs=1e-4)
