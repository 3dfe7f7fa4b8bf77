"""Importing EPIC-100 UDA challenge pickles and HDF5 files, joined to the real annotation manifests."""

import json
import pickle

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from adapt import config as C
from adapt.importer import import_features
from adapt.train import train
from cli import app
from featstore import manifests as M
from featstore.errors import UserError
from featstore.store import FeatureStore
from tests import reference


def challenge_pickle(path, split, n, seed, spatial=False, shift=0.0):
    ids = M.resolve_split(split).read()["id"].tolist()[:n]
    rng = np.random.default_rng(seed)
    shape = (n, 25, 16, 2, 2) if spatial else (n, 25, 1024)
    feats = {k: (rng.standard_normal(shape) + shift).astype(np.float32) for k in ("RGB", "Flow", "Audio")}
    with open(path, "wb") as f:
        pickle.dump({"features": feats, "narration_ids": ids}, f)
    return ids, feats


def test_pickle_joined_on_narration_id(tmp_path):
    ids, feats = challenge_pickle(tmp_path / "source_train.pkl", "source_train", 40, 0)
    st = import_features(tmp_path / "source_train.pkl", "source_train", tmp_path / "s.zarr")
    st = FeatureStore.open(tmp_path / "s.zarr", require_complete=True)
    assert st.modalities == ["rgb", "flow", "audio"] and st.num_clips == 40
    assert st.meta("id").tolist() == ids
    np.testing.assert_array_equal(reference.features(st, "flow"), feats["Flow"].astype(np.float16))
    table = M.resolve_split("source_train").read().set_index("id")
    assert st.meta("verb_class").tolist() == table.loc[ids, "verb_class"].tolist()
    assert st.meta("noun_class").tolist() == table.loc[ids, "noun_class"].tolist()
    assert st.attrs["verb_classes"] == 97 and st.attrs["noun_classes"] == 300
    assert st.array("rgb").metadata.dimension_names == ("clip", "window", "channel")


def test_spatial_arrays_and_hdf5(tmp_path):
    ids, feats = challenge_pickle(tmp_path / "x.pkl", "target_val", 10, 1, spatial=True)
    st = import_features(tmp_path / "x.pkl", "target_val", tmp_path / "a.zarr")
    assert st.attrs["window_shapes"]["rgb"] == [25, 16, 2, 2]
    with h5py.File(tmp_path / "x.h5", "w") as f:
        for k, v in feats.items():
            f[k.lower()] = v
        f["narration_ids"] = np.array(ids, dtype="S")
    st2 = import_features(tmp_path / "x.h5", "target_val", tmp_path / "b.zarr")
    np.testing.assert_array_equal(reference.features(st2, "audio"), reference.features(st, "audio"))


def test_bad_files(tmp_path):
    with open(tmp_path / "nokey.pkl", "wb") as f:
        pickle.dump({"features": {"RGB": np.zeros((2, 25, 8))}}, f)
    with pytest.raises(UserError, match="missing key 'narration_ids'"):
        import_features(tmp_path / "nokey.pkl", "source_train", tmp_path / "o1.zarr")
    ids = M.resolve_split("source_train").read()["id"].tolist()[:3]
    with open(tmp_path / "shape.pkl", "wb") as f:
        pickle.dump({"features": {"RGB": np.zeros((2, 25, 8))}, "narration_ids": ids}, f)
    with pytest.raises(UserError, match=r"rgb features have shape \(2, 25, 8\); expected \(N=3"):
        import_features(tmp_path / "shape.pkl", "source_train", tmp_path / "o2.zarr")
    with open(tmp_path / "absent.pkl", "wb") as f:
        pickle.dump({"features": {"RGB": np.zeros((2, 25, 8))}, "narration_ids": [ids[0], "P99_99_9"]}, f)
    with pytest.raises(UserError, match="1 narration_ids absent from manifest .* P99_99_9"):
        import_features(tmp_path / "absent.pkl", "source_train", tmp_path / "o3.zarr")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    result = CliRunner().invoke(app, ["import-features", str(tmp_path / "junk.pkl"), "--manifest", "source_train",
                                      "--out", str(tmp_path / "o4.zarr")])
    assert result.exit_code == 2 and "cannot read as a pickle" in result.output


def test_train_on_imported_epic100_features(tmp_path):
    """The EPIC-100 path end to end: TBN-shaped imported stores, verb + noun heads, 5 of 25 segments."""
    challenge_pickle(tmp_path / "s.pkl", "source_train", 48, 0)
    challenge_pickle(tmp_path / "t.pkl", "target_train", 48, 1, shift=0.3)
    challenge_pickle(tmp_path / "v.pkl", "target_val", 24, 2, shift=0.3)
    for name, split in (("s", "source_train"), ("t", "target_train"), ("v", "target_val")):
        result = CliRunner().invoke(app, ["import-features", str(tmp_path / f"{name}.pkl"), "--manifest", split,
                                          "--out", str(tmp_path / f"{name}.zarr")])
        assert result.exit_code == 0, result.output
    cfg = C.resolve("ta3n", "epic100", None, backbone="tbn", source=str(tmp_path / "s.zarr"),
                    target=str(tmp_path / "t.zarr"), eval=str(tmp_path / "v.zarr"), out=str(tmp_path / "runs"),
                    steps=6, eval_every=3, batch_source=8, batch_target=8, embed_dim=32)
    final = train([cfg], progress=False)[0]
    assert {"verb_top1", "noun_top1", "action_top1"} <= set(final)
    saved = json.loads((tmp_path / "runs" / "ta3n_s-t_s0" / "config.json").read_text())
    assert saved["verb_classes"] == 97 and saved["noun_classes"] == 300 and saved["temporal"] == "trn"
