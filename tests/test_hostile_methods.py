"""A user's method mistakes, each one line naming the method's file, the part and the rule, exit code 2, before
any store is read where it can be known then (adapt/method_check.py), and nothing left behind."""

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapt import config as C
from adapt import trainer as T
from adapt.method import load
from adapt.method_check import MethodError, check
from cli import app
from featstore.errors import UserError
from featstore.synthetic import make_pair

HEAD = """
from dataclasses import dataclass
import torch
from adapt.method import Method, MethodSettings, term


class Bad(Method):
    name = "bad"

    @dataclass
    class Settings(MethodSettings):
        w_bad: float = 1.0
"""

CASES = {
    "vector": ("""
    @term("w_bad")
    def bad(self, out, ctx):
        return out["verb"].pow(2).mean(-1)
""", r"term 'bad' raised ValueError: returned a tensor of shape \(8,\): a term returns one number"),
    "float": ("""
    @term("w_bad")
    def bad(self, out, ctx):
        return 1.5
""", r"term 'bad' raised TypeError: returned a float, not a tensor"),
    "stage1": ("""
    @term("w_bad", stage1=1.0)
    def bad(self, out, ctx):
        return out["verb"].mean()
""", r"term 'bad' has stage1=1.0: give None"),
    "weight": ("""
    @term("w_missing")
    def bad(self, out, ctx):
        return out["verb"].mean()
""", r"term 'bad' is weighed by 'w_missing', which is not one of its settings"),
    "raises": ("""
    @term("w_bad")
    def bad(self, out, ctx):
        return out["no such output"].mean()
""", r"term 'bad' raised KeyError: 'no such output'"),
    "build": ("""
    def build(self, inputs):
        raise RuntimeError("my head is wrong")
""", r"building its heads \(build / __init__\) raised RuntimeError: my head is wrong"),
    "item": ("""
    @term("w_bad")
    def bad(self, out, ctx):
        return out["verb"].mean() * float(out["verb"].max().item() > 0)
""", r"raised .*vmap.*no .item\(\)"),
    "mask": ("""
    @term("w_bad")
    def bad(self, out, ctx):
        v = out["verb"]
        return v[v > 0].sum()
""", r"no boolean-mask indexing"),
    "nan": ("""
    @term("w_bad")
    def bad(self, out, ctx):
        return torch.log(out["verb"].mean() * 0 - 1)
""", r"term 'bad' is not finite on random inputs"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=False, n=24, channels=8)


def write(tmp_path, body, name="bad.py"):
    f = tmp_path / name
    f.write_text(HEAD + textwrap.dedent(body).replace("\n", "\n    ").rstrip() + "\n")
    return f


@pytest.mark.parametrize("case", list(CASES))
def test_a_method_mistake_is_one_line_before_any_store_is_read(case, tmp_path, root):
    body, pattern = CASES[case]
    f = write(tmp_path, body)
    b = root / "i3d"
    r = CliRunner().invoke(app, ["train", "--method", str(f), "--source", str(b / "S_train.zarr"), "--target",
                                 str(b / "T_train.zarr"), "--eval", str(b / "T_test.zarr"), "--out",
                                 str(tmp_path / "o"), "--steps", "4", "--quiet"])
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert "Traceback" not in r.output and str(f) in line, r.output
    import re
    assert re.search(pattern, r.output.replace("\n", " ")), r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written
    r = CliRunner().invoke(app, ["methods", str(f)])              # `adapt methods FILE` says the same
    assert r.exit_code == 2 and re.search(pattern, r.output.replace("\n", " ")), r.output


def test_a_method_that_passes_its_check_trains_and_says_so(tmp_path):
    f = write(tmp_path, """
    @term("w_bad")
    def bad(self, out, ctx):
        return out["verb"].pow(2).mean()
""")
    r = CliRunner().invoke(app, ["methods", str(f)])
    assert r.exit_code == 0 and "checked: its terms' weights are its settings" in r.output, r.output


def test_a_term_that_raises_only_on_real_data_names_the_step(tmp_path, root):
    # passes its check (4 source clips a run there), raises on the run's batch of 8
    f = write(tmp_path, """
    @term("w_bad")
    def bad(self, out, ctx):
        if ctx.y_s.shape[0] == 8:
            raise ValueError("eight source clips")
        return out["verb"].pow(2).mean()
""")
    b = root / "i3d"
    cfg = C.resolve(str(f), "mmsada", {"steps": 4, "stage1_steps": 0, "batch_source": 8, "batch_target": 8,
                                       "validators": False}, source=str(b / "S_train.zarr"),
                    target=str(b / "T_train.zarr"), eval=str(b / "T_test.zarr"), out=str(tmp_path / "o"))
    with pytest.raises(MethodError, match=r"term 'bad' at step 0 raised ValueError: eight source clips"):
        T.train([cfg], progress=False)
    assert not list((tmp_path / "o").glob("*.partial"))


@pytest.mark.parametrize("name", ["../../evil", "coral/v2", "a b", ".hidden", "x.partial"])
def test_a_method_name_that_would_leave_out_is_refused(tmp_path, name):
    f = tmp_path / "named.py"
    f.write_text(HEAD.replace('name = "bad"', f"name = {name!r}"))
    with pytest.raises(UserError, match="names its runs' folders"):
        load(str(f))


def test_a_file_that_is_not_python_is_one_line(tmp_path):
    f = tmp_path / "coral.txt"
    f.write_text(HEAD)
    with pytest.raises(UserError, match=r"coral.txt is not a Python file"):
        load(str(f))


def test_an_unknown_setting_of_a_file_method_hints_at_the_file(tmp_path):
    f = write(tmp_path, """
    @term("w_bad")
    def bad(self, out, ctx):
        return out["verb"].pow(2).mean()
""")
    with pytest.raises(UserError, match=rf"`adapt methods {f}` lists them"):
        C.resolve(str(f), "mmsada", {"w_nope": "1"})


def test_every_builtin_passes_the_check():
    from adapt.methods import REGISTRY
    for m in REGISTRY.values():
        for ds in ("mmsada", "epic100"):
            check(m, C.resolve(m, ds))
