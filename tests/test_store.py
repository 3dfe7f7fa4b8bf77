"""Feature store: write / read / resume round trips, concurrent writers, validation on open."""

import multiprocessing as mp
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from featstore.errors import UserError
from featstore.schema import StoreAttrs
from featstore.store import FeatureStore, check_compatible
from tests import reference

SHAPES = {"rgb": (3, 8, 7, 7), "flow": (3, 8, 7, 7), "audio": (3, 8)}


def manifest(n=23):
    return pd.DataFrame({
        "id": [f"c{i}" for i in range(n)], "video_id": [f"P01_0{i % 3}" for i in range(n)],
        "start_frame": np.arange(n) * 10 + 1, "stop_frame": np.arange(n) * 10 + 9,
        "verb_class": np.arange(n) % 4, "noun_class": -np.ones(n, dtype=int),
    })


def features(rows, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for m, s in SHAPES.items():
        base = rng.standard_normal((len(rows), *s)).astype(np.float16)
        out[m] = base + np.asarray(rows, dtype=np.float16).reshape(-1, *[1] * len(s))
    return out


def make(path, n=23, chunk=4, **attrs):
    return FeatureStore.create(path, manifest(n), SHAPES,
                               StoreAttrs(**{"backbone": "i3d", "manifest_sha256": "x", "verb_classes": 8, **attrs}),
                               chunk_clips=chunk)


def test_round_trip_any_order(tmp_path):
    st = make(tmp_path / "s.zarr")
    rows = np.random.default_rng(1).permutation(23)
    feats = features(np.arange(23))
    for part in np.array_split(rows, 5):
        st.write(part, {m: f[part] for m, f in feats.items()})
    r = FeatureStore.open(tmp_path / "s.zarr", require_complete=True)
    for m in SHAPES:
        np.testing.assert_array_equal(reference.features(r, m), feats[m])
        np.testing.assert_array_equal(reference.features(r, m, np.array([5, 2])), feats[m][[5, 2]])
    assert r.meta("id").tolist() == [f"c{i}" for i in range(23)]
    assert r.meta("verb_class").tolist() == (np.arange(23) % 4).tolist()
    assert r.array("rgb").metadata.dimension_names == ("clip", "window", "channel", "height", "width")
    assert r.array("audio").metadata.dimension_names == ("clip", "window", "channel")
    assert r.array("rgb").dtype == np.float16


def test_plain_zarr_reads_it_without_warnings(tmp_path):
    st = make(tmp_path / "s.zarr")
    st.write([0], {m: f for m, f in features([0]).items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
        assert sorted(g.array_keys()) == sorted([*SHAPES, "id", "video_id", "verb_class", "noun_class",
                                                 "start_frame", "stop_frame", "done", "error"])
        assert g.attrs["backbone"] == "i3d" and g["done"][0] and not g["done"][1]


def test_resume_and_failures(tmp_path):
    st = make(tmp_path / "s.zarr")
    feats = features(np.arange(23))
    st.write(np.arange(10), {m: f[:10] for m, f in feats.items()})
    st.mark_failed([12], ["P01_00: frame_0000000031.jpg is corrupt"])
    r = FeatureStore.open(tmp_path / "s.zarr", mode="r+")
    pending = r.pending_rows()
    assert pending.tolist() == [10, 11] + list(range(13, 23))
    with pytest.raises(UserError, match="12 of 23 clips not extracted yet"):
        r.check_complete()
    r.write(pending, {m: f[pending] for m, f in feats.items()})
    r.check_complete()
    assert r.failed() == {"c12": "P01_00: frame_0000000031.jpg is corrupt"}
    assert r.finalise() == r.failed() and FeatureStore.open(tmp_path / "s.zarr").attrs["failed"] == r.failed()
    assert r.reset_failed() == 1 and r.pending_rows().tolist() == [12]


def test_refuses_bad_writes(tmp_path):
    st = make(tmp_path / "s.zarr")
    f = features([0])
    f["rgb"][0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite rgb"):
        st.write([0], f)
    with pytest.raises(ValueError, match="shape"):
        st.write([0, 1], features([0]))
    assert not st.done_mask().any()


def _worker(path, rows):
    st = FeatureStore.open(path, mode="r+")
    feats = features(np.arange(23))
    for r in rows:  # one row at a time: many read-modify-writes of shared chunks
        st.write([r], {m: f[[r]] for m, f in feats.items()})


def test_two_processes_disjoint_interleaved_rows(tmp_path):
    path = tmp_path / "s.zarr"
    make(path, chunk=4)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(path), list(range(k, 23, 2)))) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    r = FeatureStore.open(path, require_complete=True)
    feats = features(np.arange(23))
    for m in SHAPES:
        np.testing.assert_array_equal(reference.features(r, m), feats[m])


def test_open_validates(tmp_path):
    with pytest.raises(UserError, match="not a feature store"):
        FeatureStore.open(tmp_path)
    st = make(tmp_path / "s.zarr")
    st.group.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        FeatureStore.open(tmp_path / "s.zarr")
    st = make(tmp_path / "t.zarr")
    del st.group["flow"]
    with pytest.raises(UserError, match="array 'flow' missing"):
        FeatureStore.open(tmp_path / "t.zarr")
    with pytest.raises(UserError, match="already exists"):
        make(tmp_path / "t.zarr")


def test_compatibility(tmp_path):
    a = make(tmp_path / "a.zarr", checkpoints={"rgb": "1"})
    b = make(tmp_path / "b.zarr", checkpoints={"rgb": "1"})
    check_compatible({"source": a, "target": b}, ["rgb"])
    c = FeatureStore.create(tmp_path / "c.zarr", manifest(), SHAPES,
                            StoreAttrs(backbone="tbn", manifest_sha256="x", verb_classes=8))
    with pytest.raises(UserError, match="backbone of target store .* is 'tbn'"):
        check_compatible({"source": a, "target": c})
    d = make(tmp_path / "d.zarr", checkpoints={"rgb": "2"})
    with pytest.raises(UserError, match="checkpoints"):
        check_compatible({"source": a, "target": d}, ["rgb"])


def test_inspect_command(tmp_path):
    st = make(tmp_path / "s.zarr")
    st.write([0, 1], {m: f for m, f in features([0, 1]).items()})
    st.mark_failed([2], ["missing video"])
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    assert "23 clips, 2 done, 1 failed, 20 pending" in result.output and "missing video" in result.output
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2
