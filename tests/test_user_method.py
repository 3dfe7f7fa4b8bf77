"""The README's worked example, exactly as written there: a method of one's own in a file outside the package,
its facts, trained alone, then in a sweep beside built-in methods (seeds stacked), resumed, and reported with the
validators."""

import json
import os
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from featstore.synthetic import make_store

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    """The fenced block after ``<!-- example: NAME -->`` in the README."""
    text = README.read_text()
    m = re.search(rf"<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"README has no example {name}"
    return m.group(1)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A temporary working folder with the example's files and demo-kitchen stores (synthetic features in the
    demo's layout: features/demo/i3d/{K1,K2}_{train,test}.zarr)."""
    (tmp_path / "my_method.py").write_text(example("my_method.py"))
    (tmp_path / "my_sweep.toml").write_text(example("my_sweep.toml"))
    base = tmp_path / "features" / "demo" / "i3d"
    shape = {"rgb": (16,), "flow": (16,)}
    for name, n, dom in (("K1_train", 24, 1), ("K1_test", 12, 1), ("K2_train", 24, 2), ("K2_test", 12, 2)):
        make_store(base / f"{name}.zarr", n, 4, 3, shape, 1.0, seed=hash(name) % 97, domain=dom)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_example_runs_as_written(folder):
    runner = CliRunner()
    outputs = []
    for line in example("commands").splitlines():
        cmd = shlex.split(line.split("#")[0])
        assert cmd[0] == "adapt"
        res = runner.invoke(app, cmd[1:])
        assert res.exit_code == 0, (line, res.output)
        outputs.append(res.output)
    methods, train, sweep, report = outputs
    assert "w_coral" in methods and "| coral | w_coral | no (from stage 2) |" in methods
    assert "dataset base: demo" in train and "target top-1" in train
    run = folder / "runs" / "coral_K1-K2_s0"
    assert json.loads((run / "final.json").read_text())["method"] == "coral"
    assert json.loads((run / "config.json").read_text())["method"] == "my_method.py"
    # the sweep: the user's method beside two built-in ones; its seeds and weights stacked as one model
    rows = [json.loads(r) for r in (folder / "runs" / "my_sweep" / "results.jsonl").read_text().splitlines()]
    assert sorted({r["method"] for r in rows}) == ["coral", "dann", "source_only"] and len(rows) == 8
    coral = [r for r in rows if r["method"] == "coral"]
    assert {r["tag"] for r in coral} == {"w_coral=1", "w_coral=10"} and all(r["runs_stacked"] == 4 for r in coral)
    assert all(set(r["validators_per_eval"]) == {"source_val", "entropy", "im", "snd", "dev"} for r in coral)
    assert "coral [w_coral=1]" in report and "model selection: validators" in " ".join(report.split())
    # the term acts: a larger weight trains other heads than the smaller one
    import torch
    a = torch.load(folder / "runs" / "my_sweep" / "coral_K1-K2_s0_w_coral=1" / "heads.pt")
    b = torch.load(folder / "runs" / "my_sweep" / "coral_K1-K2_s0_w_coral=10" / "heads.pt")
    assert not torch.equal(a["embed.rgb.fc.weight"], b["embed.rgb.fc.weight"])
    # resumed: a second sweep finds every run complete
    res = runner.invoke(app, ["sweep", "my_sweep.toml"])
    assert res.exit_code == 0 and "8 complete, 0 to train" in " ".join(res.output.split())


def test_a_users_method_that_does_not_load_is_one_line(folder):
    (folder / "broken.py").write_text("from adapt.method import Method\nclass A(Method):\n    pass\nraise ValueError('x')\n")
    res = CliRunner().invoke(app, ["train", "--method", "broken.py", "--source", "K1", "--target", "K2",
                                   "--features-root", "features/demo"])
    assert res.exit_code == 2 and "broken.py does not load: ValueError: x" in res.output
    (folder / "two.py").write_text("from adapt.method import Method\nclass A(Method):\n    pass\n"
                                   "class B(Method):\n    pass\n")
    res = CliRunner().invoke(app, ["methods", "two.py"])
    assert res.exit_code == 2 and "expected one subclass of adapt.method.Method in the file (found A, B)" in res.output
    res = CliRunner().invoke(app, ["methods", "two.py:B"])
    assert res.exit_code == 0 and "method b (two.py:B)" in res.output
    (folder / "clash.py").write_text("from adapt.methods.dann import DANN\nclass X(DANN):\n    name = 'dann'\n")
    res = CliRunner().invoke(app, ["methods", "clash.py"])
    assert res.exit_code == 2 and "its name 'dann' is a built-in method's" in res.output
