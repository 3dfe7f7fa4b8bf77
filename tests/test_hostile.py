"""A hostile user's cases on both stages: concurrent sweeps into one folder, full disks, Ctrl-C, flipped bits in an
extracted store, old stores without checksums, and inputs whose error messages used to be wrong.

The other cases of the same list live beside the code they test: a re-run that would replace a complete run and the
lock of one run folder (test_train.test_run_folders_are_written_whole_and_never_replaced_unasked), cut final.json
files (test_report, test_sweep), settings out of range (test_methods.test_settings_are_checked_before_anything),
a flipped bit under the trainer's reader (test_stream), cut and deleted chunks (test_faults_extract).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featstore.store import FeatureStore
from featstore.synthetic import make_pair
from tests.test_runner import ROOT, _cli, assert_same_store, make_data, subprocess_env, subset, tiny

TINY_SETTINGS = ("frames_per_window", "frame_stride", "test_windows", "train_windows", "segments", "resize", "crop")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("hostile"))


def extract_args(split, root, out, *extra):
    cfg = tiny(root)
    sets = sum((["--set", f"{k}={getattr(cfg, k)}"] for k in TINY_SETTINGS), [])
    return ["extract", "--split", split, "--data-root", root, "--out", out, "--device", "cpu", "--workers", "0",
            "--no-progress", "--chunk-clips", "2", *sets, *extra]


def one_line_error(result, code=2) -> str:
    """The one ``error:`` line of a command that stopped (warnings may come before it), without a traceback."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    return errors[0]


# ------------------------------------------------------------------------------------------------------------
# two sweeps into one --out


def test_a_second_sweep_into_the_same_out_stops_before_it_trains(tmp_path):
    """Sweep A trains (a subprocess); sweep B, started meanwhile with other settings into the same --out, stops in
    one line; A's run ends with one training's config.json, metrics.jsonl and final.json; A run again skips it."""
    root = make_pair(tmp_path / "feat", "i3d", spatial=False, n=24, channels=16)
    b = root / "i3d"
    spec = tmp_path / "s.toml"
    spec.write_text(f'methods = ["source_only"]\npairs = [["{b}/S_train.zarr", "{b}/T_train.zarr", '
                    f'"{b}/T_test.zarr"]]\nout = "{tmp_path}/out"\n'
                    'set = { steps = 600, stage1_steps = 4, eval_every = 100, batch_source = 8, batch_target = 8 }\n')
    a = subprocess.Popen([sys.executable, "cli.py", "sweep", str(spec), "--quiet"], cwd=ROOT, env=subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "out" / ".sweep.lock"
    deadline = time.time() + 600
    while not any((tmp_path / "out").glob("*.partial")) and a.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # A holds its lock and is training
    try:
        assert a.poll() is None, a.stdout.read()
        result = _cli("sweep", spec, "--quiet", "--set", "steps=40")
        msg = one_line_error(result)
        assert f"{tmp_path}/out: another sweep is writing into this folder now" in msg
    finally:
        a.wait(timeout=900)
    assert a.returncode == 0, a.stdout.read()
    (run,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((run / "config.json").read_text())["steps"] == 600
    assert json.loads((run / "final.json").read_text())["steps"] == 600 and rows[-1]["step"] == 600
    assert not lock.exists() and not list((tmp_path / "out").glob(".*.lock"))  # released locks leave no file
    result = _cli("sweep", spec, "--quiet")  # the lock is free again; the run is complete
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------------------------
# full disks


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_extracting_is_one_line_and_resumes(demo, tmp_path, monkeypatch):
    split = subset(demo["train"], range(6), tmp_path / "six.csv")
    out = tmp_path / "s.zarr"
    ref = tmp_path / "ref.zarr"
    assert _cli(*extract_args(split, demo["root"], ref)).exit_code == 0
    # at the store's creation: nothing is left behind
    monkeypatch.setattr(FeatureStore, "create", classmethod(lambda cls, path, *a, **k: (
        Path(path).mkdir(parents=True), _enospc())))
    msg = one_line_error(_cli(*extract_args(split, demo["root"], out)))
    assert msg.startswith(f"error: {out}: No space left on device") and "run the same command again" in msg
    assert list(tmp_path.glob(".s.zarr*")) == [] and not out.exists()
    monkeypatch.undo()
    # while writing the features of the second chunk
    calls = {"n": 0}
    put = FeatureStore._put_features

    def fills_up(self, rows, data):
        calls["n"] += 1
        if calls["n"] == 2:
            _enospc()
        put(self, rows, data)

    monkeypatch.setattr(FeatureStore, "_put_features", fills_up)
    msg = one_line_error(_cli(*extract_args(split, demo["root"], out)))
    assert msg.startswith(f"error: {out}: No space left on device; the clips already in the store are kept")
    monkeypatch.undo()
    assert 0 < FeatureStore.open(out).done_mask().sum() < 6
    assert _cli(*extract_args(split, demo["root"], out)).exit_code == 0  # resumes
    assert_same_store(ref, out)


def test_a_really_full_filesystem(demo, tmp_path):
    """The same on a 200 KiB tmpfs (where the test may mount one)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        split = subset(demo["train"], range(8), tmp_path / "eight.csv")
        msg = one_line_error(_cli(*extract_args(split, demo["root"], mount / "s.zarr")))
        assert "No space left on device" in msg and str(mount / "s.zarr") in msg
        assert [p.name for p in mount.iterdir() if p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("full", ["config.json", "metrics.jsonl", "heads.pt"])
def test_full_disk_while_training_is_one_line_and_keeps_the_complete_run(tmp_path, monkeypatch, full):
    from adapt import trainer as T
    root = make_pair(tmp_path / "feat", "i3d", spatial=False, n=24, channels=16)
    b = root / "i3d"
    args = ["train", "--method", "source_only", "--source", b / "S_train.zarr", "--target", b / "T_train.zarr",
            "--eval", b / "T_test.zarr", "--out", tmp_path / "runs", "--quiet", "--steps", "8",
            "--set", "eval_every=4", "--set", "batch_source=8", "--set", "batch_target=8"]
    assert _cli(*args).exit_code == 0
    (run,) = (tmp_path / "runs").glob("source_only_*")
    before = (run / "final.json").read_text()
    append = T._append
    monkeypatch.setattr(T, "_write", lambda path, data: (
        T.metrics.write_atomic(path, data) if path.name != full else _enospc()))
    monkeypatch.setattr(T, "_append", lambda path, line: append(path, line) if path.name != full else (
        _ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(path))))
    msg = one_line_error(_cli(*args, "--overwrite"))
    assert "No space left on device" in msg
    assert (run / "final.json").read_text() == before  # the complete run is still the one in place


# ------------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_says_what_was_kept(demo, tmp_path, monkeypatch):
    from extract import runner
    split = subset(demo["train"], range(2), tmp_path / "two.csv")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_extraction", interrupted)
    result = _cli(*extract_args(split, demo["root"], tmp_path / "s.zarr"))
    assert result.exit_code == 130
    assert "interrupted; the clips already in the store are kept; run the same command again" in result.output


# ------------------------------------------------------------------------------------------------------------
# bit rot


def test_a_flipped_bit_in_an_extracted_store_is_found_named_and_redone(demo, tmp_path):
    """`extract --verify` (on by default when resuming) finds it and re-extracts the chunk; the trainer's reader
    names the chunk file."""
    from featstore.errors import UserError
    from featstore.integrity import check_store
    split = subset(demo["train"], range(6), tmp_path / "six.csv")
    ref, out = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    assert _cli(*extract_args(split, demo["root"], ref)).exit_code == 0
    shutil.copytree(ref, out)
    chunk = FeatureStore.open(out).chunk_file("rgb", 1)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 1 << 5
    chunk.write_bytes(bytes(data))
    assert [(m, c) for m, c, _ in check_store(FeatureStore.open(out))] == [("rgb", 1)]
    with pytest.raises(UserError, match=r"rgb features of clips 0..5 do not decode .*chunk: rgb/c/1/0/0/0/0"):
        FeatureStore.open(out).reader("rgb").rows(0, 6)
    result = _cli(*extract_args(split, demo["root"], out))
    assert result.exit_code == 0 and "2 clips extracted" in result.output, result.output
    assert_same_store(ref, out)


def test_verify_says_a_version_1_store_has_no_checksums(demo, tmp_path, monkeypatch):
    import functools
    split = subset(demo["train"], range(2), tmp_path / "two.csv")
    out = tmp_path / "old.zarr"
    monkeypatch.setattr(FeatureStore, "create", classmethod(functools.partial(FeatureStore.create.__func__,
                                                                              version=1)))
    assert _cli(*extract_args(split, demo["root"], out)).exit_code == 0
    assert FeatureStore.open(out).version == 1
    result = _cli(*extract_args(split, demo["root"], out))
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "schema-version-1 store: its chunks carry no checksums" in text
    assert "adapt convert-store" in text


# ------------------------------------------------------------------------------------------------------------
# words


def test_messages_name_lines_and_files_not_python_objects(tmp_path):
    from adapt.results import read_jsonl
    from extract.decode import ClipError, read_image
    from featstore.errors import UserError
    lines = [json.dumps({"step": i, "target_top1": 50.0}) for i in range(6)]
    lines[4] = lines[4][:20]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl: line 5 is not JSON"):
        read_jsonl(path)
    junk = tmp_path / "frame_0000000001.jpg"
    junk.write_bytes(b"not a jpeg at all")
    with pytest.raises(ClipError) as e:
        read_image(junk, "c1")
    assert "BytesIO" not in str(e.value) and "object at 0x" not in str(e.value) and str(junk) in str(e.value)


def test_every_clip_failed_says_so(demo, tmp_path):
    split = subset(demo["train"], range(2), tmp_path / "two.csv")
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = _cli(*extract_args(split, empty, tmp_path / "s.zarr"))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "2 of 2 clips of two failed" in text
    assert "no clip was extracted" in text and "the other" not in text


def test_extract_settings_are_typed(demo, tmp_path):
    split = subset(demo["train"], range(2), tmp_path / "two.csv")
    msg = one_line_error(_cli(*extract_args(split, demo["root"], tmp_path / "s.zarr", "--set", "crop=big")))
    assert "--set crop=big: expected an integer" in msg
    assert not (tmp_path / "s.zarr").exists()


def test_without_the_decoding_packages_extract_says_what_to_install_and_train_runs(tmp_path):
    """The `extract` extra (decord, OpenCV, soundfile) is stage 1's alone: `train` runs without it, `extract` says
    in one line what to install."""
    root = make_pair(tmp_path / "feat", "i3d", spatial=False, n=24, channels=16)
    b = root / "i3d"
    hide = "import sys\nfor m in ('cv2', 'decord', 'soundfile'): sys.modules[m] = None\nimport cli\n"
    train = [sys.executable, "-c", hide + "cli.app()", "train", "--method", "source_only", "--source",
             str(b / "S_train.zarr"), "--target", str(b / "T_train.zarr"), "--eval", str(b / "T_test.zarr"),
             "--out", str(tmp_path / "runs"), "--quiet", "--steps", "8", "--set", "eval_every=4",
             "--set", "batch_source=8", "--set", "batch_target=8"]
    done = subprocess.run(train, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    extract = [sys.executable, "-c", hide + "cli.app()", "extract", "--split", "K1_test", "--out",
               str(tmp_path / "s.zarr"), "--no-progress"]
    done = subprocess.run(extract, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "pip install 'adapt-epic[extract]'" in done.stderr
