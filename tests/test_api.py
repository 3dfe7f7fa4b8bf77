"""The Python API (adapt.train, adapt.sweep, adapt.report): the README's notebook example run as written, and its
objects and errors."""

import contextlib
import io
import re
from pathlib import Path

import pytest

import adapt
from tests.test_user_method import demo_layout

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    m = re.search(rf"<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no example {name}"
    return m.group(1)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    demo_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_notebook_example_runs_as_written(folder):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example("notebook.py"), "notebook.py", "exec"), {})
    text = out.getvalue()
    assert "refused:" in text and "the source and the target are the same store" in text
    assert (folder / "runs" / "dann_K1-K2_s0" / "final.json").is_file()
    assert (folder / "runs" / "notebook" / "results.csv").is_file() and "target_top1" in text


def test_the_api_returns_objects_and_raises_one_class(folder):
    run = adapt.train("source_only", source="K1", target="K2", features_root="features/demo", steps=30,
                      out="runs/api", log="none")
    assert run.name == "source_only_K1-K2_s0" and run.dir == Path("runs/api/source_only_K1-K2_s0")
    assert 0 <= run.top1 <= 100 and run.final["method"] == "source_only" and isinstance(run.invalid, list)
    assert list(run.metrics["step"]) == run.final["eval_steps"] and "loss/cls" in run.metrics
    assert run.provenance["code"]["method"] == "source_only"
    res = adapt.sweep({"methods": ["source_only"], "pairs": [["K1", "K2"]], "seeds": [0, 1],
                       "features_root": "features/demo", "out": "runs/api_sweep", "set": {"steps": 30, "log": "none"}})
    assert len(res.runs) == 2 and sorted(res.table["seed"]) == [0, 1] and len(res.trained) == 2
    again = adapt.sweep({"methods": ["source_only"], "pairs": [["K1", "K2"]], "seeds": [0, 1],
                         "features_root": "features/demo", "out": "runs/api_sweep", "set": {"steps": 30, "log": "none"}})
    assert again.trained == [] and len(again.skipped) == 2
    rep = adapt.report("runs/api_sweep", plots=False)
    cell = rep.tables[0].loc["source_only"]
    assert cell.filter(like=" n").iloc[0] == 2 and "report.md" in rep.files
    with pytest.raises(adapt.AdaptError, match="'w_nope' is not a setting of method source_only"):
        adapt.train("source_only", source="K1", target="K2", features_root="features/demo", w_nope=1)
    with pytest.raises(adapt.AdaptError, match="unknown method"):
        adapt.train("no_such_method", source="K1", target="K2", features_root="features/demo")
