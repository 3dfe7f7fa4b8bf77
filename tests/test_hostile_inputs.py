"""A hostile user's arguments to convert-checkpoint and check-checkpoint, and hostile manifest rows: each is one
`error:` line naming the file or setting, exit code 2, no traceback, and nothing left behind.

The checkpoint is a pytorch-i3d RGB state dict in the real key layout (``shared/data/layouts``; the model's own keys
when the layouts are not there), zeros: what is tested is the command around it, not the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

LAYOUT = Path("/work/shared/data/layouts/pytorch_i3d_rgb.json")


def _cli(*args):
    from cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The one ``error:`` line of a command that stopped with exit code 2, without a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(result.output.strip().splitlines()) == 1, result.output
    return errors[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if LAYOUT.is_file():
        keys = json.loads(LAYOUT.read_text())["keys"]
        state = {k: torch.zeros(shape, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
                 for k, shape in keys.items()}
    else:
        from extract.backbones import build
        state = build("i3d", "rgb").state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "rgb_imagenet.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    from PIL import Image
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"frame_{i:010d}.jpg")
    return folder


# ------------------------------------------------------------------------------------------------------------
# convert-checkpoint


def test_convert_checkpoint_into_an_existing_folder_names_it_and_leaves_no_temporary_file(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = listing(tmp_path)
    line = one_line_error(_cli("convert-checkpoint", checkpoint, out))
    assert line.startswith(f"error: {out}: a folder") and "checkpoint file" in line
    assert listing(tmp_path) == before  # no out.tmp (it was 50 MB)


@pytest.mark.parametrize("option,value,names", [
    ("--backbone", "resnet", "--backbone 'resnet': unknown backbone; choose one of i3d, tbn"),
    ("--modality", "depth", "--modality 'depth': backbone 'i3d' does not support modality 'depth'; "
                            "choose one of rgb, flow"),
])
def test_convert_checkpoint_unknown_backbone_or_modality_names_the_setting(checkpoint, tmp_path, option, value,
                                                                             names):
    line = one_line_error(_cli("convert-checkpoint", checkpoint, tmp_path / "x.pt", option, value))
    assert line == f"error: {names}"
    assert listing(tmp_path) == []


def test_convert_checkpoint_into_a_read_only_folder_names_the_destination(checkpoint, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: the kernel's refusal, as a read-only folder gives it
            import builtins

            from extract.backbones import checkpoints

            def refuse(file, mode="r", *a, **kw):
                if "w" in mode and Path(file).parent == ro:
                    raise PermissionError(13, "Permission denied", str(file))
                return builtins.open(file, mode, *a, **kw)
            monkeypatch.setattr(checkpoints, "open", refuse, raising=False)
        dst = ro / "i3d_rgb.pt"
        line = one_line_error(_cli("convert-checkpoint", checkpoint, dst))
        assert line.startswith(f"error: {dst}: cannot write") and "permission denied" in line.lower()
        assert listing(ro) == []
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------------------------
# check-checkpoint


def test_check_checkpoint_length_0_names_the_setting(checkpoint, frames):
    line = one_line_error(_cli("check-checkpoint", checkpoint, "--frames", frames, "--length", "0"))
    assert line == "error: --length 0: must be a whole number >= 1"


def test_check_checkpoint_frames_given_a_file_names_it(checkpoint, frames):
    jpeg = next(frames.iterdir())
    line = one_line_error(_cli("check-checkpoint", checkpoint, "--frames", jpeg))
    assert line.startswith(f"error: --frames {jpeg}: a file, not a folder of frames")


# ------------------------------------------------------------------------------------------------------------
# manifests


def test_manifest_row_with_an_extra_field_names_the_row_not_an_invented_id(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("id,video_id,start_frame,stop_frame\nclip_a,P01_01,1,10,7\nclip_b,P01_01,5,20\n")
    line = one_line_error(_cli("manifests", path))
    assert line == (f"error: {path}: row 2: 5 fields, more than the header's 4 columns; remove the extra values, or "
                    f"quote a value that holds a comma")
    assert "P01_01" not in line and "stop_frame" not in line  # pandas used to shift the columns by one
    path.write_text("id,video_id,start_frame,stop_frame\nclip_a,P01_01,1,10\nclip_b,P01_01,5,20,7\n")
    assert one_line_error(_cli("manifests", path)).startswith(f"error: {path}: row 3: 5 fields, more than")


def test_manifest_20_digit_frame_number_is_out_of_range_as_written(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("id,video_id,start_frame,stop_frame\nclip_a,P01_01,99999999999999999999,10\n")
    line = one_line_error(_cli("manifests", path))
    assert line.startswith(f"error: {path}: row 2 (id clip_a): start_frame 99999999999999999999 is out of range")
    assert "-9223372036854775808" not in line
