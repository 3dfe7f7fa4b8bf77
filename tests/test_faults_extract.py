"""Fault tests of the extraction: SIGKILL at random moments, concurrent shard writers, faulty clip data, stores
whose writes were cut short or whose chunk files were damaged.

All on the demo dataset generated into a temporary folder (real JPEGs, WAVs, MP4s) with tiny settings.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from extract.inputs import clip_frames
from extract.runner import ExtractionFailed, run_extraction
from featstore.errors import UserError
from featstore.integrity import check_store
from featstore.store import FeatureStore
from tests import reference
from tests.test_runner import (ROOT, SUBPROCESS_RUN, _cli, assert_same_store, make_data, one_thread,  # noqa: F401
                               quiet, run_args, subprocess_env, subset, tiny)

KW = {"workers": 1, "batch_size": 2, "chunk_clips": 3, "flush_seconds": 0.2}
# every extraction subprocess of this file runs with one intra-op thread: CPU results depend on the thread count
# in the last bits, and two processes at once (the shard test) then share two cores without oversubscription
ONE_THREAD = {"OMP_NUM_THREADS": 1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("faults"), video=True)


@pytest.fixture(scope="module")
def twelve(demo, tmp_path_factory):
    """12 clips (K1_01 and K1_02) and the store of an uninterrupted run in a subprocess (the reference)."""
    import pandas as pd

    base = tmp_path_factory.mktemp("twelve")
    a = pd.read_csv(demo["train"], dtype=str, keep_default_na=False)
    b = pd.read_csv(demo["test"], dtype=str, keep_default_na=False)
    split = base / "all.csv"
    pd.concat([a, b]).to_csv(split, index=False)
    cfg = tiny(demo["root"], crop=48)
    ref = base / "ref.zarr"
    done = subprocess.run([sys.executable, "-c", SUBPROCESS_RUN, run_args(split, cfg, ref, **KW)], cwd=ROOT,
                          env=subprocess_env(**ONE_THREAD), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"split": split, "cfg": cfg, "ref": ref}


def _features_match_reference_where_done(out: Path, ref: Path) -> int:
    st, rf = FeatureStore.open(out), FeatureStore.open(ref)
    done = st.done_mask()
    for m in st.modalities:
        a, b = reference.features(st, m), reference.features(rf, m)
        assert np.array_equal(a[done].view(np.uint16), b[done].view(np.uint16)), m
    return int(done.sum())


# ------------------------------------------------------------------------------------------------------------
# SIGKILL and concurrent writers


def test_sigkill_at_random_moments_then_resume_is_bit_identical(twelve, tmp_path):
    out = tmp_path / "killed.zarr"
    args = run_args(twelve["split"], twelve["cfg"], out, announce=True, **KW)
    rng = random.Random(20240521)
    interrupted = []
    for attempt in range(3):
        pending = 12 - (int(FeatureStore.open(out).done_mask().sum()) if (out / "zarr.json").exists() else 0)
        p = subprocess.Popen([sys.executable, "-c", SUBPROCESS_RUN, args], cwd=ROOT, env=subprocess_env(**ONE_THREAD),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if attempt == 0:
            time.sleep(rng.uniform(0.3, 3.0))  # anywhere: start-up, store creation or extraction
        else:
            # during the k-th backbone batch of this run (k at random among the batches still to do), at a
            # random moment of it: inference, writing a chunk, flushing the buffer
            last = max(1, (pending + 1) // 2 - 1)
            k = rng.randint(min(2, last), last)
            for _ in range(k):
                line = p.stdout.readline()
                if "BATCH" not in line:
                    break
            time.sleep(rng.uniform(0.0, 0.15))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        p.stdout.close()
        if p.returncode == -signal.SIGKILL:
            # whatever was written before the kill is whole and correct
            interrupted.append(_features_match_reference_where_done(out, twelve["ref"])
                               if (out / "zarr.json").exists() else None)
    assert len(interrupted) >= 2, f"runs were not killed: {interrupted}"
    progress = [n for n in interrupted if n is not None]
    assert progress and min(progress) < 12, interrupted  # a kill cut an extraction short

    final = subprocess.run([sys.executable, "-c", SUBPROCESS_RUN, args], cwd=ROOT, env=subprocess_env(**ONE_THREAD),
                           capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout + final.stderr
    st = FeatureStore.open(out, require_complete=True)
    ids = [str(i) for i in st.meta("id")]
    ref_ids = [str(i) for i in FeatureStore.open(twelve["ref"]).meta("id")]
    assert ids == ref_ids and len(set(ids)) == 12  # no clip missing, none duplicated
    assert st.done_mask().all() and not st.failed()
    assert_same_store(twelve["ref"], out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".killed.zarr")]  # no temporaries left


def test_two_shard_processes_at_once_fill_one_store(twelve, tmp_path):
    out = tmp_path / "shards.zarr"
    cfg = twelve["cfg"]
    common = ["-m", "cli", "extract", "--split", str(twelve["split"]), "--backbone", "i3d", "--data-root",
              str(cfg.data_root), "--out", str(out), "--device", "cpu", "--workers", "1", "--batch-size", "2",
              "--chunk-clips", "3", "--no-progress"]
    for key in ("frames_per_window", "frame_stride", "test_windows", "train_windows", "segments", "resize", "crop"):
        common += ["--set", f"{key}={getattr(cfg, key)}"]
    procs = [subprocess.Popen([sys.executable, *common, "--shard", f"{i}/2"], cwd=ROOT,
                              env=subprocess_env(**ONE_THREAD),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    extracted = [int(log.split(" clips extracted")[0].split()[-1]) for log in logs]
    assert sum(extracted) == 12 and all(e > 0 for e in extracted)  # disjoint shards, both did work
    st = FeatureStore.open(out, require_complete=True)
    assert st.attrs["num_done"] == 12  # finalised by whichever finished last
    assert not check_store(st)
    assert_same_store(twelve["ref"], out)


# ------------------------------------------------------------------------------------------------------------
# faulty clip data


def _copy_video_frames(root: Path, src: str, dst: str) -> None:
    for kind in ("rgb_frames", "flow_frames"):
        shutil.copytree(root / "K1" / kind / src, root / "K1" / kind / dst)


def test_faulty_frames_are_recorded_and_the_rest_extracted(demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo["root"] / "K1" / "audio", root / "K1" / "audio")
    for kind in ("rgb_frames", "flow_frames"):
        (root / "K1" / kind).mkdir(parents=True, exist_ok=True)
        shutil.copytree(demo["root"] / "K1" / kind / "K1_01", root / "K1" / kind / "K1_01")
    _copy_video_frames(root, "K1_01", "K1_11")                     # K1_11: a copy with one corrupt JPEG
    (root / "K1" / "rgb_frames" / "K1_12").mkdir()                  # K1_12: an empty frame folder
    import pandas as pd
    rows = pd.read_csv(demo["train"], dtype=str, keep_default_na=False)
    r0 = rows.iloc[0].to_dict()
    split = subset(demo["train"], range(3), tmp_path / "faulty.csv", extra=[
        {"id": "corrupt", "video_id": "K1_11"},
        {"id": "empty", "video_id": "K1_12"},
        {"id": "past_end", "start_frame": "5000", "stop_frame": "5040"},
    ])
    cfg = tiny(root)
    frame = int(clip_frames({**r0, "video_id": "K1_11"}, cfg)["rgb"][0][0])
    jpeg = root / "K1" / "rgb_frames" / "K1_11" / f"frame_{frame:010d}.jpg"
    original = jpeg.read_bytes()
    jpeg.write_bytes(original[: len(original) // 3])               # truncated JPEG

    out = tmp_path / "faulty.zarr"
    res = _cli("extract", "--split", split, "--data-root", root, "--out", out, "--device", "cpu", "--workers", "1",
               "--no-progress", *sum((["--set", f"{k}={getattr(cfg, k)}"] for k in
                                      ("frames_per_window", "test_windows", "segments", "resize", "crop")), []))
    assert res.exit_code == 1, res.output
    assert "3 of 6 clips of faulty failed" in res.output and "--allow-failures" in res.output
    assert "Traceback" not in res.output
    st = FeatureStore.open(out)
    failed = st.failed()
    assert sorted(failed) == ["corrupt", "empty", "past_end"]
    assert "corrupt JPEG" in failed["corrupt"] and str(jpeg) in failed["corrupt"]
    assert "K1_12" in failed["empty"] and "not found" in failed["empty"]
    assert "K1_01/frame_00000050" in failed["past_end"] and "not found" in failed["past_end"]
    assert all(reason.startswith(f"clip {cid}:") for cid, reason in failed.items())
    assert st.done_mask().tolist() == [True, True, True, False, False, False]  # the rest extracted
    assert st.attrs["failed"] == failed  # finalise copied the failures into the attributes
    assert st.info().failed == 3

    # --allow-failures: exit 0; nothing is retried without --retry-failed
    res = _cli("extract", "--split", split, "--data-root", root, "--out", out, "--device", "cpu", "--workers", "0",
               "--no-progress", "--allow-failures", *sum((["--set", f"{k}={getattr(cfg, k)}"] for k in
                                                         ("frames_per_window", "test_windows", "segments", "resize",
                                                          "crop")), []))
    assert res.exit_code == 0, res.output
    assert "0 clips extracted" in res.output
    # fix the JPEG and retry the failed clips
    jpeg.write_bytes(original)
    s = run_extraction(split, cfg, out, {}, device="cpu", workers=0, retry_failed=True, allow_failures=True,
                       console=quiet())
    assert s["reset_failed"] == 3 and s["extracted"] == 1 and s["failed"] == 2
    st = FeatureStore.open(out)
    assert sorted(st.failed()) == ["empty", "past_end"]
    assert st.done_mask().tolist() == [True, True, True, True, False, False]
    with pytest.raises(ExtractionFailed) as e:
        run_extraction(split, cfg, out, {}, device="cpu", workers=0, console=quiet())
    assert e.value.exit_code == 1 and "2 of 6 clips of faulty failed" in str(e.value)


def test_truncated_video_and_frame_past_its_end(demo, tmp_path):
    root = tmp_path / "data"
    (root / "K1" / "videos").mkdir(parents=True)
    good = demo["root"] / "K1" / "videos" / "K1_01.MP4"
    shutil.copy(good, root / "K1" / "videos" / "K1_01.MP4")
    data = good.read_bytes()
    (root / "K1" / "videos" / "K1_13.MP4").write_bytes(data[: len(data) // 2])  # truncated video
    split = subset(demo["train"], range(2), tmp_path / "video.csv", extra=[
        {"id": "truncated", "video_id": "K1_13"},
        {"id": "past_end", "start_frame": "2000", "stop_frame": "2030"},
    ])
    cfg = tiny(root, modalities=("rgb",), rgb_source="video")
    out = tmp_path / "video.zarr"
    with pytest.raises(ExtractionFailed) as e:
        run_extraction(split, cfg, out, {}, device="cpu", workers=1, console=quiet())
    assert e.value.exit_code == 1 and "2 clips" in str(e.value)
    st = FeatureStore.open(out)
    failed = st.failed()
    assert sorted(failed) == ["past_end", "truncated"]
    assert "K1_13.MP4" in failed["truncated"]
    assert "past the end of the video" in failed["past_end"] and "K1_01.MP4" in failed["past_end"]
    assert st.done_mask().tolist() == [True, True, False, False]
    assert e.value.summary["failed"] == 2 and e.value.summary["extracted"] == 2


def test_missing_audio_is_recorded(demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo["root"] / "K1" / "audio", root / "K1" / "audio")
    split = subset(demo["test"], range(2), tmp_path / "audio.csv", extra=[{"id": "no_audio", "video_id": "K1_14"}])
    cfg = tiny(root, backbone="tbn", modalities=("audio",), segments=1)
    out = tmp_path / "audio.zarr"
    with pytest.raises(ExtractionFailed):
        run_extraction(split, cfg, out, {}, device="cpu", workers=0, console=quiet())
    st = FeatureStore.open(out)
    assert list(st.failed()) == ["no_audio"]
    assert "K1_14.wav" in st.failed()["no_audio"] and "audio file not found" in st.failed()["no_audio"]
    assert st.done_mask().tolist() == [True, True, False]
    s = run_extraction(split, cfg, out, {}, device="cpu", workers=0, allow_failures=True, console=quiet())
    assert s["failed"] == 1 and s["extracted"] == 0


# ------------------------------------------------------------------------------------------------------------
# writes cut short, damaged chunk files


def test_cut_writes_and_damaged_chunks_are_detected_and_redone(demo, tmp_path):
    split = subset(demo["train"], range(6), tmp_path / "six.csv")  # chunks of 2 -> 3 chunks
    cfg = tiny(demo["root"])
    kw = {"workers": 0, "batch_size": 2, "chunk_clips": 2}
    ref = tmp_path / "ref.zarr"
    run_extraction(split, cfg, ref, {}, device="cpu", console=quiet(), **kw)
    out = tmp_path / "damaged.zarr"
    shutil.copytree(ref, out)

    g = zarr.open_group(str(out), mode="r+")
    # (a) chunk 0: features of row 1 rewritten but the write cut before `done` was set
    g["done"][1] = False
    g["rgb"][1] = np.full(g["rgb"].shape[1:], 7, dtype=np.float16)
    with pytest.raises(UserError, match="not extracted yet"):
        FeatureStore.open(out, require_complete=True)  # the reader sees it in the done mask
    # (b) chunk 1: the rgb chunk file deleted
    (out / "rgb" / "c" / "1" / "0" / "0" / "0" / "0").unlink()
    # (c) chunk 2: the flow chunk file truncated, the done chunk truncated, the id chunk deleted
    for f, keep in ((out / "flow" / "c" / "2" / "0" / "0" / "0" / "0", 100), (out / "done" / "c" / "2", 5)):
        f.write_bytes(f.read_bytes()[:keep])
    (out / "id" / "c" / "2").unlink()

    st = FeatureStore.open(out)  # opens (shapes and attributes are fine) ...
    problems = {(name, c) for name, c, _ in check_store(st)}
    assert problems == {("rgb", 1), ("flow", 2), ("done", 2)}  # ... the chunk check finds the damage

    s = run_extraction(split, cfg, out, {}, device="cpu", console=quiet(), **kw)
    assert s["extracted"] == 5  # row 1, chunks 1 and 2 (two clips each)
    repaired = " ".join(s["repaired"])
    assert "rgb chunk 1 missing" in repaired and "flow chunk 2 does not decode" in repaired  # checksummed shard
    assert "done chunk 2" in repaired and "id chunk 2" in repaired
    assert not check_store(FeatureStore.open(out))
    assert_same_store(ref, out)


def test_check_store_on_a_healthy_store_and_a_store_being_written(demo, tmp_path):
    split = subset(demo["train"], range(3), tmp_path / "three.csv")
    cfg = tiny(demo["root"])
    out = tmp_path / "s.zarr"
    run_extraction(split, cfg, out, {}, device="cpu", workers=0, chunk_clips=2, limit=1, console=quiet())
    st = FeatureStore.open(out)
    assert st.done_mask().tolist() == [True, False, False]
    assert check_store(st) == []  # a partly written store is not damaged
    s = run_extraction(split, cfg, out, {}, device="cpu", workers=0, console=quiet())
    assert s["extracted"] == 2 and s["repaired"] == [] and s["complete"]
