"""Manifest conversion on the real pickles, the real counts, and every bad-input case."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from featstore import manifests as M
from featstore.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "manifests"
REAL_COUNTS = {
    "D1_train": 1543, "D1_test": 435, "D2_train": 2495, "D2_test": 750, "D3_train": 3897, "D3_test": 974,
    "source_train": 16115, "target_train": 26115, "target_test": 5909, "source_test": 4298,
    "source_val": 5002, "target_val": 7906,
}
runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    return out, M.convert_originals(SHARED, out)


def test_conversion_counts_and_domains(converted):
    out, registry = converted
    for name, n in REAL_COUNTS.items():
        entry = registry["splits"][name]
        assert entry["clips"] == n, name
        assert len(pd.read_csv(out / entry["file"])) == n
    assert registry["splits"]["D1_train"]["participants"] == ["P08"]
    assert registry["splits"]["D2_train"]["participants"] == ["P01"]
    assert registry["splits"]["D3_train"]["participants"] == ["P22"]
    assert registry["splits"]["target_train"]["labelled"] is False
    assert registry["splits"]["source_train"]["labelled"] is True
    assert registry["domains"]["D2"] == {"train": "D2_train", "test": "D2_test", "dataset": "mmsada"}


def test_shipped_manifests_equal_a_fresh_conversion(converted):
    """The CSVs in manifests/ are exactly what the command makes from the originals."""
    out, registry = converted
    shipped = json.loads(M.REGISTRY_FILE.read_text())
    assert shipped == registry
    for entry in registry["splits"].values():
        if entry["dataset"] != "demo":
            assert (M.MANIFEST_DIR / entry["file"]).read_bytes() == (out / entry["file"]).read_bytes()


def test_values_carried_over_exactly(converted):
    out, _ = converted
    orig = pd.read_pickle(SHARED / "mmsada" / "D1_train.pkl")
    ours = pd.read_csv(out / "mmsada" / "D1_train.csv", dtype={"id": str})
    assert (ours["id"] == orig["uid"].astype(str)).all()
    for col in ("start_frame", "stop_frame", "verb_class", "video_id", "narration"):
        assert (ours[col].to_numpy() == orig[col].to_numpy()).all(), col
    assert (ours["fps"].round(2) == 59.94).all()
    assert (ours["noun_class"] == -1).all()
    e = pd.read_pickle(SHARED / "epic100" / "UDA_annotations" / "EPIC_100_uda_source_train.pkl")
    ours = pd.read_csv(out / "epic100" / "source_train.csv")
    assert list(ours["id"][:2]) == ["P01_01_0", "P01_01_1"]
    assert (ours["noun_class"].to_numpy() == e["noun_class"].to_numpy()).all()
    t = pd.read_csv(out / "epic100" / "target_train.csv")
    assert (t["verb_class"] == -1).all()
    assert t["video_id"].str.match(r"P\d\d_1\d\d").all()  # the target domain: EPIC-100 extension videos
    assert (t["fps"] == 50).all()  # which are 50 fps


def test_class_imbalance_of_d1_train():
    df = M.resolve_split("D1_train").read()
    assert df["verb_class"].value_counts().sort_index().tolist() == [421, 383, 231, 128, 223, 71, 42, 44]


def test_cli_lists_real_counts_as_json():
    result = runner.invoke(app, ["manifests", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    for name, n in REAL_COUNTS.items():
        assert rows[name]["clips"] == n
    assert rows["D1_train"]["verb_classes"] == 8 and rows["source_train"]["noun_classes"] == 300


def test_cli_table_and_validate_path():
    result = runner.invoke(app, ["manifests"])
    assert result.exit_code == 0 and "D3_train" in result.output and "3897" in result.output
    result = runner.invoke(app, ["manifests", str(SHARED / "mmsada" / "D2_test.pkl"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["clips"] == 750


def test_user_pickle_and_csv_work_as_splits(tmp_path):
    split = M.resolve_split(SHARED / "epic100" / "UDA_annotations" / "EPIC_100_uda_target_val.pkl")
    assert len(split.read()) == 7906
    csv = tmp_path / "mine.csv"
    csv.write_text("id,video_id,start_frame,stop_frame\na,P01_01,1,10\nb,P01_01,5,30\n")
    df = M.resolve_split(csv).read()
    assert list(df.columns) == M.COLUMNS
    assert df["participant_id"].tolist() == ["P01", "P01"] and (df["verb_class"] == -1).all()
    assert df["fps"].round(2).tolist() == [59.94, 59.94]


BAD = {
    "missing column": ("id,video_id,start_frame\na,P01_01,1\n", "missing column 'stop_frame'"),
    "stop before start": ("id,video_id,start_frame,stop_frame\na,P01_01,1,10\nb,P01_01,50,30\n",
                          "row 3 (id b): stop_frame 30 is before start_frame 50"),
    "class out of range": ("id,video_id,start_frame,stop_frame,verb_class\na,P01_01,1,10,97\n",
                           "row 2 (id a): verb_class 97 out of range -1..96"),
    "negative class": ("id,video_id,start_frame,stop_frame,noun_class\na,P01_01,1,10,-5\n",
                       "row 2 (id a): noun_class -5 out of range"),
    "duplicate id": ("id,video_id,start_frame,stop_frame\na,P01_01,1,10\nb,P01_01,1,10\na,P01_01,3,9\n",
                     "row 4 (id a): duplicate id (first seen in row 2)"),
    "not an integer": ("id,video_id,start_frame,stop_frame\na,P01_01,x,10\n", "start_frame 'x' is not an integer"),
    "fractional": ("id,video_id,start_frame,stop_frame\na,P01_01,12.5,30\n", "start_frame 12.5 is not an integer"),
    "zero start": ("id,video_id,start_frame,stop_frame\na,P01_01,0,10\n", "start_frame 0 < 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_one_line_naming_file_and_row(tmp_path, case):
    text, message = BAD[case]
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        M.read_manifest(path)
    assert message in str(info.value) and str(path) in str(info.value)
    result = runner.invoke(app, ["manifests", str(path), "--verb-classes", "97", "--noun-classes", "300"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split())


def test_class_bounds_are_the_class_space_where_known_and_header_only_is_refused(tmp_path):
    """A registered or demo manifest is checked against its class space, upper and lower bound alike; a manifest
    of unknown class space only against -1 (unlabelled), its class count then read from its largest id."""
    demo = M.MANIFEST_DIR / "demo"
    if not (demo / "classes.json").is_file():
        pytest.skip("no demo manifests (run `adapt demo-data`)")
    verbs = json.loads((demo / "classes.json").read_text())["verb_classes"]
    rows = (demo / "K1_train.csv").read_text().splitlines()
    header, first = rows[0], rows[1].split(",")
    col = header.split(",").index("verb_class")
    for name, value in (("high", verbs + 34), ("low", -5)):
        copy = tmp_path / name / "K1_train.csv"
        copy.parent.mkdir()
        (copy.parent / "classes.json").write_bytes((demo / "classes.json").read_bytes())
        copy.write_text("\n".join([header, ",".join(first[:col] + [str(value)] + first[col + 1:])]) + "\n")
        result = runner.invoke(app, ["manifests", str(copy)])
        assert result.exit_code == 2, result.output
        assert f"verb_class {value} out of range -1..{verbs - 1}" in " ".join(result.output.split())
    loose = tmp_path / "loose.csv"
    loose.write_text("id,video_id,start_frame,stop_frame,verb_class\na,P01_01,1,10,42\nb,P01_01,1,10,3\n")
    assert M.summarise(M.resolve_split(loose))["verb_classes"] == 43
    loose.write_text("id,video_id,start_frame,stop_frame,verb_class\na,P01_01,1,10,-5\n")
    with pytest.raises(UserError, match=r"verb_class -5 out of range >= -1"):
        M.resolve_split(loose).read()
    assert M.resolve_split(demo / "K1_train.csv").name == "K1_train"  # the registered split, by its path
    empty = tmp_path / "empty.csv"
    empty.write_text("id,video_id,start_frame,stop_frame\n")
    result = runner.invoke(app, ["manifests", str(empty)])
    assert result.exit_code == 2 and "no clips (the manifest has a header and no rows)" in result.output


def test_bad_class_for_mmsada_class_space(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,video_id,start_frame,stop_frame,verb_class\na,P08_01,1,10,8\n")
    result = runner.invoke(app, ["manifests", str(path), "--verb-classes", "8"])
    assert result.exit_code == 2 and "verb_class 8 out of range -1..7" in result.output


def test_unknown_split_and_missing_file():
    with pytest.raises(UserError, match="unknown split 'D9_train'"):
        M.resolve_split("D9_train")
    with pytest.raises(UserError, match="no such manifest file"):
        M.resolve_split("nowhere/x.csv")


def test_console_script_exit_code_two_without_traceback(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,video_id,start_frame,stop_frame\na,P01_01,9,3\n")
    exe = Path(sys.executable).parent / "adapt"
    proc = subprocess.run([str(exe), "manifests", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "stop_frame 3 is before start_frame 9" in proc.stderr
