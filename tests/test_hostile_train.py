"""Mistakes caught before the work starts, each one line naming the setting or file with exit code 2, and nothing
of the user's deleted or half-made: the trainer's, the sweep's, the protocol's and the report's arguments."""

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapt.protocol import run_protocol
from cli import app
from featstore.synthetic import make_pair, make_store


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=False, n=24, channels=8)


def stores(root, **kw):
    b = Path(root) / "i3d"
    return {"source": str(b / "S_train.zarr"), "target": str(b / "T_train.zarr"), "eval": str(b / "T_test.zarr"),
            **kw}


def train(root, out, *extra, **kw):
    s = stores(root, **kw)
    args = ["train", "--method", "dann", "--out", str(out), "--quiet", "--set", "steps=8", "--set", "stage1_steps=4",
            "--set", "batch_source=4", "--set", "batch_target=4", "--set", "validators=false"]
    for k in ("source", "target", "eval"):
        if s[k] is not None:
            args += [f"--{k}", s[k]]
    return CliRunner().invoke(app, args + list(extra))


def one_line(res, *words):
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output and all(w in text for w in words), res.output


def nothing_in(out):
    return not Path(out).exists() or not [p for p in Path(out).iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("extra, words", [
    (["--set", "tag=x/../../../elsewhere"], ["tag='x/../../../elsewhere'", "no /"]),
    (["--set", "batch_source=100000"], ["batch_source=100000: more than ten times the 24 clips"]),
    (["--set", "lr_steps=6,2"], ["lr_steps=[6, 2]", "ascending"]),
    (["--set", "lr_steps=100"], ["lr_steps=[100]", "never acts"]),
    (["--modalities", ","], ["--modalities ','", "names no modality"]),
    (["--memory-budget", "-5G"], ["--memory-budget '-5G'", "positive size"]),
    (["--memory-budget", "inf"], ["--memory-budget 'inf'"]),
    (["--memory-budget", "1e999"], ["--memory-budget '1e999'"]),
    (["--seed", "-1"], ["seed=-1", "zero or positive"]),
    (["--challenge", "nope.zarr"], ["--challenge nope.zarr", "not a feature store"]),
])
def test_a_mistake_is_one_line_before_anything_is_written(root, tmp_path, extra, words):
    res = train(root, tmp_path / "runs", *extra)
    one_line(res, *words)
    assert nothing_in(tmp_path / "runs") and not (tmp_path / "elsewhere").exists()


def test_lr_epochs_unsorted_or_past_the_last_epoch(root, tmp_path):
    for value, words in (("20,10", ["ascending"]), ("10,40", ["epochs count from 1 to epochs=30"])):
        res = CliRunner().invoke(app, ["train", "--method", "ta3n", "--source", stores(root)["source"], "--target",
                                       stores(root)["target"], "--set", f"lr_epochs={value}", "--settings"])
        one_line(res, f"lr_epochs=", *words)


def test_source_target_and_evaluation_must_be_different_stores(root, tmp_path):
    s = stores(root)
    one_line(train(root, tmp_path / "a", target=s["source"]), "the source and the target are the same store")
    one_line(train(root, tmp_path / "b", eval=s["source"]), "the evaluation store is the source's own")
    assert nothing_in(tmp_path / "a") and nothing_in(tmp_path / "b")


def test_an_unlabelled_evaluation_store_is_refused_and_a_test_split_beside_the_target_is_found(tmp_path):
    b = tmp_path / "tbn"
    shape = {"rgb": (8,), "flow": (8,)}
    make_store(b / "S.zarr", 24, 4, 3, shape, 0.0, 1, "i3d")
    make_store(b / "T.zarr", 24, 4, 3, shape, 1.0, 2, "i3d", labelled=False)
    # the target given as a store path, no --eval: evaluated on its own unlabelled clips before, refused now
    res = train(tmp_path, tmp_path / "runs", source=str(b / "S.zarr"), target=str(b / "T.zarr"), eval=None)
    one_line(res, "the evaluation store has no labels", "--eval")
    assert nothing_in(tmp_path / "runs")


def test_a_file_or_an_unwritable_place_as_out_is_one_line(root, tmp_path):
    (tmp_path / "afile").write_text("mine")
    one_line(train(root, tmp_path / "afile"), "cannot write runs there")
    assert (tmp_path / "afile").read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        one_line(train(root, ro / "runs"), "cannot write runs there")


def test_sweep_seeds_and_selection_names_are_checked_first(root, tmp_path):
    s = stores(root)
    for seeds in ("[]", "[-1]", "[0, 0]"):
        (tmp_path / "spec.toml").write_text(f'methods = ["source_only"]\npairs = [["{s["source"]}", "{s["target"]}", '
                                            f'"{s["eval"]}"]]\nseeds = {seeds}\nout = "{tmp_path / "o"}"\n')
        one_line(CliRunner().invoke(app, ["sweep", str(tmp_path / "spec.toml")]), "seeds must be a non-empty list")
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--select", "foo"])
    one_line(res, "--select foo: not a validator")
    with pytest.raises(Exception, match="--select foo: not a validator"):
        run_protocol({"methods": ["source_only"]}, tmp_path / "p", "foo", progress=False)
    assert not (tmp_path / "p").exists()
