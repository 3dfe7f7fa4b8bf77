"""The README's worked example, exactly as written there: a method of one's own in a file outside the package,
its facts, trained alone, then in a sweep beside built-in methods (seeds stacked), resumed, and reported with the
validators."""

import json
import os
import re
import shlex
import zlib
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


def demo_layout(folder: Path) -> None:
    """Demo-kitchen stores of synthetic features in the demo's layout: features/demo/i3d/{K1,K2}_{train,test}.zarr
    (the same features in every process)."""
    base = folder / "features" / "demo" / "i3d"
    shape = {"rgb": (16,), "flow": (16,)}
    for name, n, dom in (("K1_train", 24, 1), ("K1_test", 12, 1), ("K2_train", 24, 2), ("K2_test", 12, 2)):
        make_store(base / f"{name}.zarr", n, 4, 3, shape, 1.0, seed=zlib.crc32(name.encode()) % 97, domain=dom)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A temporary working folder with the example's files and demo-kitchen stores."""
    (tmp_path / "my_method.py").write_text(example("my_method.py"))
    (tmp_path / "my_sweep.toml").write_text(example("my_sweep.toml"))
    demo_layout(tmp_path)
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


# ------------------------------------------------------------------------------------------------------------
# the second example: a state of its own (ATDOC-NA's memory bank) and a term from stage 2


@pytest.fixture
def atdoc(folder):
    (folder / "my_atdoc.py").write_text(example("my_atdoc.py"))
    return folder


def test_the_second_readme_example_runs_as_written(atdoc):
    runner = CliRunner()
    outputs = []
    for line in example("atdoc commands").splitlines():
        cmd = shlex.split(line.split("#")[0])
        res = runner.invoke(app, cmd[1:])
        assert res.exit_code == 0, (line, res.output)
        outputs.append(res.output)
    methods, train = outputs
    assert "| na | w_na | no (from stage 2) |" in methods and "checked:" in methods
    final = json.loads((atdoc / "runs" / "atdoc_K1-K2_s0" / "final.json").read_text())
    assert final["method"] == "atdoc" and final["invalid"] == []


def test_the_second_example_writes_its_bank_and_its_term_is_the_hand_computed_one(atdoc):
    import torch
    import torch.nn.functional as F

    from adapt import config as C
    from adapt import trainer as T
    from adapt.data import DomainPair
    from adapt.method import Context, load
    cls = load(str(atdoc / "my_atdoc.py"))
    cfg = C.resolve(str(atdoc / "my_atdoc.py"), "demo", {"steps": 6, "stage1_steps": 2, "batch_source": 4,
                                                         "batch_target": 4, "validators": False},
                    source="K1", target="K2", features_root="features/demo", seed=3)
    cfg2 = C.resolve(str(atdoc / "my_atdoc.py"), "demo", {"steps": 6, "stage1_steps": 2, "batch_source": 4,
                                                          "batch_target": 4, "validators": False},
                     source="K1", target="K2", features_root="features/demo", seed=4)
    device = torch.device("cpu")
    t = T.Training([cfg, cfg2], DomainPair(cfg, device), device)
    before = {k: v.clone() for k, v in t.state.items()}
    for step in range(3):
        inputs = t.batch(step)
        t.step(step, inputs)
    t.close()
    idx = inputs["batch"]["idx_t"]                                   # (K, B_t): each run its own clips
    for k in range(2):
        rows = idx[k]
        assert not torch.equal(t.state["feat"][k][rows], before["feat"][k][rows])   # written
        assert torch.allclose(t.state["feat"][k][rows].norm(dim=-1), torch.ones(len(rows)), atol=1e-5)
    # the term on a small case against the paper's computation written out here
    from adapt.model import Inputs
    model = cls(cfg, Inputs(("rgb", "flow"), {"rgb": (16,), "flow": (16,)}, 4, 0, 1))
    g = torch.Generator().manual_seed(0)
    bank_f = F.normalize(torch.randn(10, 2 * model.video_dim, generator=g), dim=-1)
    bank_p = torch.rand(10, 4, generator=g)
    out = {"video": {s: torch.randn(5, model.video_dim, generator=g) for s in model.streams},
           "verb": torch.randn(5, 4, generator=g)}
    ctx = Context(torch.tensor(0), {}, 2, {"feat": bank_f, "pred": bank_p},
                  {"idx_t": torch.tensor([1, 7, 3])})
    got = model.na(out, ctx)
    f = F.normalize(torch.cat([out["video"][s][2:] for s in model.streams], -1), dim=-1)
    total, weights = 0.0, 0.0
    for i, row in enumerate([1, 7, 3]):
        sims = [(float(f[i] @ bank_f[j]), j) for j in range(10) if j != row]
        near = [j for _, j in sorted(sims, reverse=True)[:5]]
        mean = bank_p[near].mean(0)
        w, y = float(mean.max()), int(mean.argmax())
        total += w * float(F.cross_entropy(out["verb"][2 + i][None], torch.tensor([y])))
        weights += w
    assert abs(float(got) - total / weights) < 1e-5
