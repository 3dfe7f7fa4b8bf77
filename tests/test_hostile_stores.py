"""Hostile outputs and inputs around stores: nothing a user owns is deleted, a store is replaced only by a complete
one, an import is complete or absent, and every refusal is one line naming the file."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from featstore.convert import convert_store
from featstore.errors import UserError
from featstore.store import FeatureStore
from featstore.synthetic import make_pair, make_store
from tests.test_importer import challenge_pickle


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, code=2) -> str:
    """The one ``error:`` line of a command that stopped, without a traceback."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    return errors[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to check that nothing was deleted or changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".creating" in p.name or ".old-" in p.name)


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my thesis")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\0\1\2")
    return path


# ------------------------------------------------------------------------------------------------------------
# 1. convert-store --out


def test_convert_store_refuses_an_out_that_is_not_its_store_and_still_resumes(tmp_path):
    root = make_pair(tmp_path / "f", "i3d", spatial=False, n=12, channels=8, version=1, chunk_clips=4)
    src = root / "i3d" / "S_train.zarr"
    mine = user_folder(tmp_path / "mine")
    (tmp_path / "plain.txt").write_text("a file of mine")
    before = tree(tmp_path)
    for out, said in ((mine, "not a feature store"), (root / "i3d", "holding the source store"),
                      (root, "holding the source store"), (tmp_path / "plain.txt", "is a file"),
                      (src, "the source store itself"), (src / "inner.zarr", "inside the source store")):
        line = one_line_error(cli("convert-store", src, "--out", out))
        assert str(out) in line and said in line, line
        assert tree(tmp_path) == before  # nothing deleted, nothing added
    # a partially converted store of ours is resumed
    out = tmp_path / "new.zarr"

    def cut(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_store(src, out, progress=cut)
    assert 0 < FeatureStore.open(out).done_mask().sum() < 12
    result = cli("convert-store", src, "--out", out)
    assert result.exit_code == 0, result.output
    new = FeatureStore.open(out, require_complete=True)
    assert new.version == 2 and new.done_mask().all() and not leftovers(tmp_path)
    np.testing.assert_array_equal(new.reader("rgb").rows(0, 12), FeatureStore.open(src).reader("rgb").rows(0, 12))


# ------------------------------------------------------------------------------------------------------------
# 2. import-features --overwrite


def test_import_checks_everything_before_it_replaces_a_store_and_refuses_a_users_folder(tmp_path):
    ids, _ = challenge_pickle(tmp_path / "good.pkl", "source_train", 12, 0)
    out = tmp_path / "s.zarr"
    assert cli("import-features", tmp_path / "good.pkl", "--manifest", "source_train", "--out", out).exit_code == 0
    good = tree(out)
    rng = np.random.default_rng(1)
    for name, value, said in (("nan.pkl", np.nan, "non-finite rgb features"),
                              ("big.pkl", 1e5, "beyond float16's range")):
        feats = {k: rng.standard_normal((12, 25, 1024)).astype(np.float32) for k in ("RGB", "Flow", "Audio")}
        feats["RGB"][7, 3, 5] = value
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"features": feats, "narration_ids": ids}, f)
        line = one_line_error(cli("import-features", tmp_path / name, "--manifest", "source_train", "--out", out,
                                  "--overwrite"))
        assert str(tmp_path / name) in line and said in line and ids[7] in line, line
        assert tree(out) == good and not leftovers(tmp_path)  # the good store is untouched
    mine = user_folder(tmp_path / "mine")
    before = tree(mine)
    line = one_line_error(cli("import-features", tmp_path / "good.pkl", "--manifest", "source_train", "--out", mine,
                              "--overwrite"))
    assert str(mine) in line and "not a feature store" in line and tree(mine) == before
    # an HDF5 file whose rgb entry is a group, and an upper-case suffix
    with h5py.File(tmp_path / "grp.h5", "w") as f:
        f.create_group("rgb")["x"] = np.zeros((12, 25, 8), np.float32)
        f["narration_ids"] = np.array(ids, dtype="S")
    line = one_line_error(cli("import-features", tmp_path / "grp.h5", "--manifest", "source_train", "--out",
                              tmp_path / "g.zarr"))
    assert str(tmp_path / "grp.h5") in line and "'rgb' is an HDF5 group" in line
    with h5py.File(tmp_path / "x.H5", "w") as f:
        f["rgb"] = np.ones((12, 25, 8), np.float32)
        f["narration_ids"] = np.array(ids, dtype="S")
    result = cli("import-features", tmp_path / "x.H5", "--manifest", "source_train", "--out", tmp_path / "h.zarr")
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(tmp_path / "h.zarr", require_complete=True).modalities == ["rgb"]
    # the good input replaces the store (--overwrite), whole
    result = cli("import-features", tmp_path / "x.H5", "--manifest", "source_train", "--out", out, "--overwrite")
    assert result.exit_code == 0 and FeatureStore.open(out, require_complete=True).modalities == ["rgb"]
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# 3. extract --overwrite on a folder that is not a store


def test_extract_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path):
    from extract.writer import prepare_store
    from featstore.schema import StoreAttrs
    (tmp_path / "data").mkdir()
    mine = user_folder(tmp_path / "mine")
    before = tree(mine)
    result = cli("extract", "--split", "K1_train", "--data-root", tmp_path / "data", "--out", mine, "--overwrite",
                 "--device", "cpu", "--workers", "0", "--no-progress")
    line = one_line_error(result)
    assert str(mine) in line and "not a feature store" in line and "warning" not in result.output
    assert tree(mine) == before
    # the writer itself refuses too (whoever calls it)
    import pandas as pd
    df = pd.DataFrame({"id": ["a", "b"], "video_id": ["V"] * 2, "verb_class": [0, 1], "noun_class": [-1, -1],
                       "start_frame": [1, 2], "stop_frame": [3, 4]})
    with pytest.raises(UserError, match="not a feature store"):
        prepare_store(mine, df, {"rgb": (2, 4)}, StoreAttrs(backbone="i3d", manifest_sha256="x", verb_classes=2), None,
                      overwrite=True, retry_failed=False)
    assert tree(mine) == before and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# 4. inspect names damaged chunks


def test_inspect_names_a_missing_and_a_corrupt_chunk_and_says_their_clips_are_not_done(tmp_path):
    path = make_store(tmp_path / "s.zarr", 24, 3, 2, {"rgb": (8,), "flow": (8,)}, 0.0, 1, chunk_clips=8)
    st = FeatureStore.open(path)
    st.chunk_file("rgb", 1).unlink()
    corrupt = st.chunk_file("flow", 2)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 3] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    result = cli("inspect", path)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output  # damaged: not 0
    out = result.output
    assert "24 done (16 of them in damaged chunks: not really done)" in out
    assert "rgb/c/1/0" in out and "missing, but clips in it are marked done" in out
    assert "flow/c/2/0" in out and "does not decode" in out
    assert "16 clips marked done are not really done" in out and "adapt extract" in out
    doc = json.loads(cli("inspect", path, "--json").output)
    assert doc["really_done"] == 8 and {(d["array"], d["chunk"]) for d in doc["damaged"]} == {("rgb", 1),
                                                                                            ("flow", 2)}
    quick = cli("inspect", path, "--no-verify").output  # finds the missing chunk without decoding
    assert "rgb/c/1/0" in quick and "flow/c/2" not in quick


# ------------------------------------------------------------------------------------------------------------
# 5. a half store says how to redo it, by who made it


def test_a_cut_imported_store_says_import_again_and_an_extracted_one_extract(tmp_path):
    from adapt.data import load_domain
    import torch
    challenge_pickle(tmp_path / "t.pkl", "source_train", 10, 0)
    out = tmp_path / "imp.zarr"
    cli("import-features", tmp_path / "t.pkl", "--manifest", "source_train", "--out", out, "--backbone", "i3d")
    st = FeatureStore.open(out, mode="r+")
    st.group["done"][3:6] = np.zeros(3, dtype=bool)  # what an import cut by an earlier version left
    with pytest.raises(UserError) as e:
        load_domain(out, "source", ["rgb"], torch.device("cpu"), spatial=False)
    msg = str(e.value)
    assert "adapt extract" not in msg and "import was cut short" in msg
    assert f"adapt import-features {tmp_path / 't.pkl'} --manifest source_train --out {out} --backbone i3d" \
           f" --overwrite" in msg
    st.group["done"][3:6] = np.ones(3, dtype=bool)
    st.chunk_file("rgb", 0).unlink()
    with pytest.raises(UserError, match="rgb chunk 0 missing.*re-run `adapt import-features .* --overwrite`"):
        load_domain(out, "source", ["rgb"], torch.device("cpu"), spatial=False)
    ext = make_store(tmp_path / "ext.zarr", 8, 2, 2, {"rgb": (4,)}, 0.0, 1, chunk_clips=4)
    FeatureStore.open(ext, mode="r+").group["done"][0] = False
    with pytest.raises(UserError, match="not extracted yet .*re-run `adapt extract`"):
        FeatureStore.open(ext, require_complete=True)


# ------------------------------------------------------------------------------------------------------------
# 6. Ctrl-C during an import


def test_ctrl_c_during_an_import_writes_nothing_says_so_in_one_line_and_a_rerun_works(tmp_path, monkeypatch):
    challenge_pickle(tmp_path / "old.pkl", "source_train", 8, 0)
    challenge_pickle(tmp_path / "new.pkl", "source_train", 8, 5)
    out = tmp_path / "s.zarr"
    assert cli("import-features", tmp_path / "old.pkl", "--manifest", "source_train", "--out", out).exit_code == 0
    old = tree(out)
    write = FeatureStore.write

    def interrupted(self, rows, features):
        write(self, rows, features)  # part of the new store is written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "write", interrupted)
    for target, args in ((out, ["--overwrite"]), (tmp_path / "fresh.zarr", [])):
        result = cli("import-features", tmp_path / "new.pkl", "--manifest", "source_train", "--out", target, *args)
        assert result.exit_code == 130 and "Traceback" not in result.output, result.output
        lines = result.output.strip().splitlines()
        assert lines == ["interrupted; nothing was written (a store already at --out is as it was)"], lines
        assert not leftovers(tmp_path) and tree(out) == old and not (tmp_path / "fresh.zarr").exists()
    monkeypatch.setattr(FeatureStore, "write", write)
    result = cli("import-features", tmp_path / "new.pkl", "--manifest", "source_train", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(out, require_complete=True).attrs["imported_from"]["file"] == str(tmp_path / "new.pkl")
    shutil.rmtree(out)
