"""Backbones: output shapes, exact checkpoint layouts, strict checkpoint loading and its error messages."""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from extract.backbones import (CheckpointError, build, load_checkpoint, save_checkpoint, sha256_file,
                               tf_same_pad)

LAYOUTS = Path("/work/shared/data/layouts")
LAYOUT_FILES = {
    ("i3d", "rgb"): "pytorch_i3d_rgb.json",
    ("i3d", "flow"): "pytorch_i3d_flow.json",
    ("tbn", "rgb"): "tbn_bninception_rgb.json",
    ("tbn", "flow"): "tbn_bninception_flow.json",
    ("tbn", "audio"): "tbn_bninception_spec.json",
}
FULL_TBN = "tbn_epic_full_checkpoint.json"

needs_layouts = pytest.mark.skipif(not LAYOUTS.is_dir(), reason="shared layouts not available")


def layout(file: str) -> dict[str, list[int]]:
    return json.loads((LAYOUTS / file).read_text())["keys"]


def random_state(shapes: dict[str, list[int]], seed: int = 1) -> dict[str, torch.Tensor]:
    """A random state dict in a layout: floats for parameters/buffers, int64 counters."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def models():
    """One model per backbone/modality (building is the slow part; tests must not mutate them)."""
    return {pair: build(*pair) for pair in LAYOUT_FILES}


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 7, 2, (2, 3)),   # even size: pad = k - s = 5
    (16, 7, 2, (2, 3)),
    (9, 7, 2, (3, 3)),     # odd size: pad = k - size % s = 6
    (9, 3, 2, (1, 1)),     # pad = 3 - 1 = 2
    (56, 3, 2, (0, 1)),    # pad = 3 - 2 = 1: the extra goes to the back
    (8, 1, 1, (0, 0)),
    (5, 3, 1, (1, 1)),
    (3, 2, 2, (0, 1)),     # pad = 2 - 1
    (4, 2, 2, (0, 0)),     # pad = max(2 - 2, 0)
    (2, 3, 2, (0, 1)),
])
def test_tf_same_pad(size, kernel, stride, expected):
    assert tf_same_pad(size, kernel, stride) == expected
    front, back = expected
    assert (size + front + back - kernel) // stride + 1 == -(-size // stride)  # ceil(size / stride)


def test_symmetric_same_padding_inside_the_op_equals_explicit_padding():
    from extract.backbones.i3d import MaxPool3dSame, Unit3D, _pad_same
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 4, 5, 9, 8))   # odd and even sizes; post-ReLU like every I3D pool input
    unit = Unit3D(4, 6, 3, batch_norm=False, relu=False)
    assert unit.symmetric and unit.conv3d.padding == (1, 1, 1)
    explicit = F.conv3d(_pad_same(x, unit.kernel, unit.stride), unit.conv3d.weight)
    torch.testing.assert_close(unit(x), explicit, rtol=1e-5, atol=1e-5)
    pool = MaxPool3dSame(3, 1)
    assert torch.equal(pool(x), F.max_pool3d(_pad_same(x, (3, 3, 3), (1, 1, 1)), 3, 1))
    strided = Unit3D(4, 6, 3, stride=2, batch_norm=False, relu=False)   # asymmetric: padded at run time
    assert not strided.symmetric and strided(x).shape == (2, 6, 3, 5, 4)


def test_strided_pools_pad_inside_the_op_as_same():
    """I3D's strided max-pools use the pool's own padding with ceil_mode in place of a padded copy: the same
    windows and values as zero "SAME" padding on post-ReLU input, for odd and even sizes."""
    import itertools

    from extract.backbones.i3d import MaxPool3dSame, _pad_same
    torch.manual_seed(0)
    for kernel, stride in (((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (2, 2, 2)), ((2, 2, 2), (2, 2, 2))):
        pool = MaxPool3dSame(kernel, stride)
        for t, h in itertools.product((1, 2, 3, 4, 5, 8), (1, 2, 6, 7, 12, 13)):
            x = torch.relu(torch.randn(1, 2, t, h, h + 1))
            assert pool._in_op_padding(tuple(x.shape[2:])) is not None
            want = F.max_pool3d(_pad_same(x, pool.kernel, pool.stride), pool.kernel, pool.stride)
            assert torch.equal(pool(x), want), (kernel, t, h)


@pytest.mark.parametrize("pair,shape", [(("i3d", "flow"), (2, 2, 8, 32, 32)), (("tbn", "audio"), (2, 1, 64, 64))])
def test_fold_batch_norm_keeps_the_outputs(pair, shape):
    from extract.backbones import fold_batch_norm
    model = build(*pair, seed=3)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():   # non-trivial running statistics and affine parameters
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        before = model(x)
        after = fold_batch_norm(model)(x)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-4 * float(before.abs().max()))


def test_i3d_rgb_224(models):
    model = models["i3d", "rgb"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 224, 224))
    assert out.shape == (1, 1024, 2, 7, 7)
    assert model.input_channels == 3 and model.out_channels == 1024
    assert (model.name, model.modality, model.endpoint) == ("i3d", "rgb", "Mixed_5c")
    assert not model.training and model.checkpoint_info is None


@pytest.mark.parametrize("modality,channels,t,hw,expected", [
    ("rgb", 3, 9, 64, (2, 2, 2)),    # ceil(9/8) = 2
    ("flow", 2, 16, 64, (2, 2, 2)),
    ("flow", 2, 17, 32, (3, 1, 1)),  # ceil(17/8) = 3
])
def test_i3d_small_shapes(models, modality, channels, t, hw, expected):
    model = models["i3d", modality]
    assert model.input_channels == channels
    with torch.no_grad():
        out = model(torch.randn(2, channels, t, hw, hw))
    assert out.shape == (2, 1024, *expected)


def test_bninception_224(models):
    model = models["tbn", "rgb"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1024, 7, 7)
    assert (model.name, model.endpoint, model.out_channels) == ("tbn", "inception_5b_output", 1024)


@pytest.mark.parametrize("modality,channels,size,expected", [
    ("audio", 1, 256, 8),   # the 256x256 spectrogram
    ("flow", 10, 128, 4),
    ("rgb", 3, 96, 3),
])
def test_bninception_shapes(models, modality, channels, size, expected):
    model = models["tbn", modality]
    assert model.input_channels == channels
    with torch.no_grad():
        out = model(torch.randn(1, channels, size, size))
    assert out.shape == (1, 1024, expected, expected)


def test_wrong_input_channels(models):
    with pytest.raises(ValueError, match=r"\(B, 2, T, H, W\)"):
        models["i3d", "flow"](torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        models["tbn", "audio"](torch.randn(1, 3, 64, 64))


def test_build_rejects_unknown():
    with pytest.raises(ValueError, match="does not support modality 'audio'"):
        build("i3d", "audio")
    with pytest.raises(ValueError, match="unknown backbone"):
        build("resnet", "rgb")


def test_seeded_init_is_deterministic():
    a, b = build("tbn", "audio", seed=3), build("tbn", "audio", seed=3)
    c = build("tbn", "audio", seed=4)
    assert torch.equal(a.conv1_7x7_s2.weight, b.conv1_7x7_s2.weight)
    assert not torch.equal(a.conv1_7x7_s2.weight, c.conv1_7x7_s2.weight)


# ------------------------------------------------------------------------------------------ layouts


@needs_layouts
@pytest.mark.parametrize("pair", list(LAYOUT_FILES))
def test_state_dict_matches_layout(models, pair):
    expected = layout(LAYOUT_FILES[pair])
    got = {k: list(v.shape) for k, v in models[pair].state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order as the public checkpoints


@needs_layouts
def test_full_tbn_layout_is_three_bninceptions():
    full = layout(FULL_TBN)
    for modality, sub in (("rgb", "rgb"), ("flow", "flow"), ("audio", "spec")):
        part = {k[len(f"module.{sub}."):]: v for k, v in full.items() if k.startswith(f"module.{sub}.")}
        assert part == layout(LAYOUT_FILES["tbn", modality])
    assert all(k.startswith(("module.rgb.", "module.flow.", "module.spec.", "module.fusion_classification_net."))
               for k in full)


# ---------------------------------------------------------------------------------------- loading


@needs_layouts
@pytest.mark.parametrize("pair", list(LAYOUT_FILES))
def test_load_real_layouts_strict(pair, tmp_path):
    state = random_state(layout(LAYOUT_FILES[pair]))
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    model = build(*pair, checkpoint=path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    info = model.checkpoint_info
    assert info.source == str(path) and info.sha256 == sha256_file(path)
    assert info.filled_num_batches_tracked == 0 and not model.training


@needs_layouts
def test_wrapped_and_dataparallel_state_dicts():
    state = random_state(layout(LAYOUT_FILES["i3d", "flow"]))
    wrapped = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 4}
    model = build("i3d", "flow", checkpoint=wrapped)
    assert torch.equal(model.Mixed_5c.b1b.conv3d.weight, state["Mixed_5c.b1b.conv3d.weight"])
    assert model.checkpoint_info.meta == {"epoch": 4} and model.checkpoint_info.sha256 is None


@needs_layouts
def test_missing_num_batches_tracked_is_tolerated():
    state = random_state(layout(LAYOUT_FILES["tbn", "rgb"]))
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = build("tbn", "rgb", checkpoint=old)
    assert model.checkpoint_info.filled_num_batches_tracked == len(state) - len(old) == 69
    assert torch.equal(model.inception_4e_3x3.weight, state["inception_4e_3x3.weight"])


@pytest.fixture(scope="module")
def full_tbn_checkpoint(tmp_path_factory):
    """The whole TBN checkpoint layout, random, saved as TBN does (PyTorch 0.4: no num_batches_tracked)."""
    if not LAYOUTS.is_dir():
        pytest.skip("shared layouts not available")
    state = random_state(layout(FULL_TBN), seed=5)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("tbn") / "tbn_full.pth.tar"
    torch.save({"epoch": 1, "arch": "BNInception", "state_dict": state}, path)
    return path, state


@pytest.mark.parametrize("modality,sub", [("rgb", "rgb"), ("flow", "flow"), ("audio", "spec")])
def test_full_tbn_checkpoint_picks_modality(full_tbn_checkpoint, modality, sub):
    path, state = full_tbn_checkpoint
    model = build("tbn", modality, checkpoint=path)
    prefix = f"module.{sub}."
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[prefix + key]), key
    assert model.checkpoint_info.submodule == prefix
    assert model.checkpoint_info.meta["epoch"] == 1


def test_full_tbn_checkpoint_missing_modality():
    model = build("tbn", "audio")
    state = {"module.rgb." + k: v for k, v in build("tbn", "rgb").state_dict().items()}
    with pytest.raises(CheckpointError, match=r"no 'spec' submodule \(it has: rgb\)"):
        load_checkpoint(model, {"state_dict": state})


def test_nan_weights_are_refused_at_load(tmp_path):
    """Damaged weights stop at the checkpoint, before any clip is decoded."""
    state = build("tbn", "audio").state_dict()
    state["conv1_7x7_s2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"diverged.pt: 1 tensors of the checkpoint hold NaN or Inf "
                                              r"\(conv1_7x7_s2.weight\)"):
        build("tbn", "audio", checkpoint=path)


def _error(pair, state, tmp_path) -> str:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        build(*pair, checkpoint=path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"{pair[0]}/{pair[1]}" in message
    return message


@needs_layouts
def test_missing_key(tmp_path):
    state = random_state(layout(LAYOUT_FILES["i3d", "rgb"]))
    del state["Mixed_4d.b2b.bn.running_mean"]
    message = _error(("i3d", "rgb"), state, tmp_path)
    assert "1 missing keys: Mixed_4d.b2b.bn.running_mean" in message


@needs_layouts
def test_unexpected_keys_listed_with_count(tmp_path):
    state = random_state(layout(LAYOUT_FILES["tbn", "audio"]))
    state["fc.weight"] = torch.zeros(10, 1024)
    for i in range(6):
        state[f"extra_{i}"] = torch.zeros(1)
    message = _error(("tbn", "audio"), state, tmp_path)
    assert "7 unexpected keys: fc.weight, extra_0" in message and "(+2 more)" in message


@needs_layouts
def test_misshaped_key(tmp_path):
    state = random_state(layout(LAYOUT_FILES["tbn", "flow"]))
    state["inception_5a_3x3.weight"] = torch.zeros(320, 192, 1, 1)
    message = _error(("tbn", "flow"), state, tmp_path)
    assert "1 mis-shaped keys: inception_5a_3x3.weight [320, 192, 1, 1] vs model [320, 192, 3, 3]" in message


@needs_layouts
def test_flow_checkpoint_for_rgb_i3d(tmp_path):
    state = random_state(layout(LAYOUT_FILES["i3d", "flow"]))
    message = _error(("i3d", "rgb"), state, tmp_path)
    assert "looks like a flow checkpoint" in message and "Conv3d_1a_7x7.conv3d.weight" in message


@needs_layouts
@pytest.mark.parametrize("given,wanted,looks", [("flow", "rgb", "flow"), ("rgb", "audio", "rgb")])
def test_other_modality_for_tbn(tmp_path, given, wanted, looks):
    state = random_state(layout(LAYOUT_FILES["tbn", given]))
    message = _error(("tbn", wanted), state, tmp_path)
    assert f"looks like a {looks} checkpoint" in message


@needs_layouts
def test_other_backbone_is_named(tmp_path):
    state = random_state(layout(LAYOUT_FILES["tbn", "rgb"]))
    message = _error(("i3d", "rgb"), state, tmp_path)
    assert "looks like a tbn checkpoint" in message and "483 unexpected keys" in message


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a PyTorch checkpoint"):
        build("tbn", "rgb", checkpoint=path)
    cut = tmp_path / "cut.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    cut.write_bytes(buf.getvalue()[:200])
    with pytest.raises(CheckpointError, match="cut.pt: a damaged PyTorch checkpoint"):
        build("tbn", "rgb", checkpoint=cut)
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.ones(3), "opts": Fraction(1, 3)}, pickled)  # a Python object beside the tensors
    with pytest.raises(CheckpointError, match=r"pickles Python objects besides tensors \(fractions.Fraction\).*"
                                              r"re-save its weights alone") as e:
        build("tbn", "rgb", checkpoint=pickled)
    assert "weights_only" not in str(e.value)
    with pytest.raises(CheckpointError, match="nope.pt: cannot read checkpoint"):
        build("tbn", "rgb", checkpoint=tmp_path / "nope.pt")


def test_save_checkpoint_round_trip(models, tmp_path):
    source = models["i3d", "flow"]
    path = tmp_path / "finetuned.pt"
    digest = save_checkpoint(source, path, epoch=3, step=6000)
    assert digest == sha256_file(path)
    saved = torch.load(path, weights_only=True)
    assert (saved["backbone"], saved["modality"], saved["input_channels"], saved["epoch"]) == ("i3d", "flow", 2, 3)
    assert set(saved["state_dict"]) == set(source.state_dict())
    model = build("i3d", "flow", checkpoint=path, seed=99)
    assert torch.equal(model.logits.conv3d.weight, source.logits.conv3d.weight)
    assert model.checkpoint_info.meta["step"] == 6000
    with pytest.raises(CheckpointError, match="saved for i3d/flow"):
        build("i3d", "rgb", checkpoint=path)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(source, tmp_path / "x.pt", modality="rgb")


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
