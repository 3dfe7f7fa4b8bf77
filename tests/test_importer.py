"""Importing EPIC-100 UDA challenge pickles and HDF5 files, joined to the real annotation manifests."""

import json
import pickle
from pathlib import Path

import h5py
import torch
import numpy as np
import pytest
from typer.testing import CliRunner

from adapt import config as C
from adapt.importer import import_features
from adapt.trainer import train
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


ANNOTATIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "manifests" / "epic100" / "UDA_annotations"


def test_the_real_epic100_annotation_files_by_path_import_as_epic100(tmp_path):
    """The challenge's own annotation files given by path: EPIC-100's class space (97 verbs, 300 nouns), the split's
    kind and the EPIC-100 base; then TA3N with verb and noun heads and the challenge's test.json, from the command
    line, whose first line says which base it took and why."""
    from pathlib import Path as P
    files = {"source_train": "EPIC_100_uda_source_train.pkl", "target_train": "EPIC_100_uda_target_train_timestamps.pkl",
             "target_val": "EPIC_100_uda_target_val.pkl", "target_test": "EPIC_100_uda_target_test_timestamps.pkl"}
    runner = CliRunner()
    for i, (split, original) in enumerate(files.items()):
        challenge_pickle(tmp_path / f"{split}.pkl", split, 40 if split != "target_test" else 16, i,
                         shift=0.3 * (split != "source_train"))
        res = runner.invoke(app, ["import-features", str(tmp_path / f"{split}.pkl"), "--manifest",
                                  str(ANNOTATIONS / original), "--out", str(tmp_path / f"{split}.zarr")])
        assert res.exit_code == 0, res.output
        st = FeatureStore.open(tmp_path / f"{split}.zarr")
        assert (st.attrs["verb_classes"], st.attrs["noun_classes"]) == (97, 300), split
        assert st.attrs["split_kind"] == ("train" if split.endswith("_train") else "test")
        assert st.attrs["manifest_name"] == split and P(st.attrs.get("dataset", "")).name == "epic100"
    args = ["train", "--method", "ta3n", "--source", str(tmp_path / "source_train.zarr"), "--target",
            str(tmp_path / "target_train.zarr"), "--eval", str(tmp_path / "target_val.zarr"), "--challenge",
            str(tmp_path / "target_test.zarr"), "--out", str(tmp_path / "runs"), "--quiet", "--steps", "6",
            "--set", "batch_source=8", "--set", "embed_dim=32", "--set", "validators=false"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith("dataset base: epic100 (the TA3N baseline's code) (the source: its "
                                                 "clips are the epic100 split source_train)")
    run = tmp_path / "runs" / "ta3n_source_train-target_train_s0"
    saved = json.loads((run / "config.json").read_text())
    assert (saved["verb_classes"], saved["noun_classes"], saved["dataset"]) == (97, 300, "epic100")
    heads = torch.load(run / "heads.pt")
    assert heads["classifier.rgb+flow+audio.noun.weight"].shape[0] == 300
    doc = json.loads((run / "test.json").read_text())
    assert len(doc["results"]) == 16 and len(next(iter(doc["results"].values()))["noun"]) == 300


def test_noun_classes_of_a_users_manifest_are_kept_and_the_base_can_be_chosen(tmp_path):
    """A manifest of the user's own (not a registered split) with a noun column: the store counts its nouns as it
    counts its verbs and the model gets noun heads; an import of challenge pickles takes EPIC-100's base unless told
    otherwise, and `--dataset` chooses."""
    table = M.resolve_split("source_train").read().head(40).copy()
    table.to_csv(tmp_path / "mine.csv", index=False)
    challenge_pickle(tmp_path / "s.pkl", "source_train", 40, 0)
    st = import_features(tmp_path / "s.pkl", tmp_path / "mine.csv", tmp_path / "s.zarr")
    assert st.attrs["verb_classes"] == int(table["verb_class"].max()) + 1
    assert st.attrs["noun_classes"] == int(table["noun_class"].max()) + 1 > 0
    assert st.attrs["dataset"] == "epic100"
    from featstore.paths import locate
    assert locate(str(tmp_path / "s.zarr"), "train", "tbn", "features")[1:] == ("epic100", "recorded by its "
                                                                                "producer (epic100)")
    st = import_features(tmp_path / "s.pkl", tmp_path / "mine.csv", tmp_path / "m.zarr", dataset="mmsada")
    assert locate(str(tmp_path / "m.zarr"), "train", "tbn", "features")[1] == "mmsada"
    res = CliRunner().invoke(app, ["train", "--method", "source_only", "--source", str(tmp_path / "m.zarr"),
                                   "--target", str(tmp_path / "s.zarr"), "--eval", str(tmp_path / "s.zarr"),
                                   "--dataset", "epic100", "--settings"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "dataset base: epic100 (the TA3N baseline's code) (--dataset)"
    assert "epochs = 30" in res.output and "[schedule, from the stores' sizes: 40 source and 40 target clips]" in \
        res.output and "steps = 30 = 30 epochs x 1" in res.output
    assert "  steps = 9000  (not used: epochs is set; the schedule below says what runs)" in res.output


def test_the_epic100_base_evaluates_once_an_epoch_whatever_the_stores_sizes():
    """TA3N's code validates after every epoch (main.py:226): 126 steps on EPIC-100's splits, 25 on 800 clips in
    batches of 32; an explicit ``eval_every`` is taken as given."""
    from adapt.schedule import Schedule
    cfg = C.resolve("ta3n", "epic100", {"batch_source": "32", "batch_target": "32"})
    assert cfg.eval_every is None
    s = Schedule.of(cfg, 800, 800)
    assert (s.steps, s.epoch_steps, s.eval_steps[:3], s.eval_steps[-1]) == (750, 25, [25, 50, 75], 750)
    assert Schedule.of(C.resolve("ta3n", "epic100", None), 16115, 26115).eval_steps[:2] == [126, 252]
    cfg = C.resolve("ta3n", "epic100", {"batch_source": "32", "batch_target": "32", "eval_every": "100"})
    assert Schedule.of(cfg, 800, 800).eval_steps[:2] == [100, 200]


def test_an_explicit_steps_is_the_presets_schedule_in_that_many_steps(tmp_path):
    cfg = C.resolve("ta3n", "epic100", None, steps=600)                  # 30 epochs -> 600 steps
    assert (cfg.steps, cfg.epochs, cfg.lr_epochs, cfg.lr_steps, cfg.eval_every) == (600, None, [], [180, 380], 20)
    cfg = C.resolve("mmsada", "mmsada", {"steps": "900"})                # 3K + 6K -> 300 + 600, the last 9 at 5 apart
    assert (cfg.steps, cfg.stage1_steps, cfg.last_eval_every) == (900, 300, 5)
    cfg = C.resolve("mmsada", "mmsada", {"steps": "900", "stage1_steps": "100"})  # what is given is taken as given
    assert cfg.stage1_steps == 100
    with pytest.raises(UserError, match="steps=600 and epochs=3 both given"):
        C.resolve("ta3n", "epic100", {"epochs": "3"}, steps=600)
