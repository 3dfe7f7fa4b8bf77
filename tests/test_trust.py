"""Every number traced to what made it and never silently wrong: a run's provenance (code, settings, stores) and
what compares it (a sweep's resume, the report), stores checked by what they hold (a copy of the source refused,
a split's class space), invalid runs marked wherever their number appears, verified caches, one place for a preset
value, a short run as a prefix of the full run."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from adapt import config as C
from adapt import metrics, provenance
from adapt import reports as R
from adapt import sweeps as S
from adapt import trainer as T
from cli import app
from featstore.errors import UserError
from featstore.identity import identity, overlap
from featstore.schema import StoreAttrs
from featstore.store import FeatureStore
from featstore.synthetic import make_pair, make_store

TINY = {"steps": 8, "stage1_steps": 4, "eval_every": 4, "last_eval_every": 4, "last_evals": 1, "batch_source": 8,
        "batch_target": 8, "embed_dim": 16, "validators": False}

METHOD = '''
from dataclasses import dataclass
from adapt.method import Method, MethodSettings, term


class Shrink(Method):
    name = "shrink"

    @dataclass
    class Settings(MethodSettings):
        w_shrink: float = 1.0

    @term("w_shrink")
    def shrink(self, out, ctx):
        return SCALE * sum(v.pow(2).mean() for v in out["video"].values())


SCALE = 0.01
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=False, n=24, channels=8)


def stores(root):
    b = Path(root) / "i3d"
    return {k: str(b / f"{n}.zarr") for k, n in (("source", "S_train"), ("target", "T_train"), ("eval", "T_test"))}


def run(method, root, out, overrides=None, **given):
    cfg = C.resolve(method, "mmsada", {**TINY, **(overrides or {})}, out=str(out), **{**stores(root), **given})
    return T.train([cfg], progress=False, overwrite=True)[0]


# ------------------------------------------------------------------------------------------------------------
# provenance


def test_a_run_records_its_code_settings_and_stores(root, tmp_path):
    final = run("dann", root, tmp_path)
    prov = final["provenance"]
    assert prov["code"]["method"] == "dann" and len(prov["code"]["method_sha256"]) == 64
    assert Path(next(iter(prov["code"]["method_files"]))).name == "dann.py"
    assert prov["code"]["package"]["sha256"] and prov["code"]["torch"] == torch.__version__
    for role, path in stores(root).items():
        assert prov["stores"][role]["path"] == path
        assert prov["stores"][role]["clips"] == identity(path)["clips"]
    saved = json.loads((tmp_path / T.run_name(C.resolve("dann", "mmsada", TINY, **stores(root))) /
                        "config.json").read_text())
    assert saved["provenance"] == prov


def test_store_identity_follows_content_not_place(root, tmp_path):
    src = stores(root)["source"]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(src, copy)
    assert identity(copy) == identity(src)
    assert identity(stores(root)["target"])["features"] != identity(src)["features"]
    assert overlap(src, copy) == 24 and overlap(src, stores(root)["target"]) == 0


def test_an_edited_method_file_retrains_in_a_sweep_and_a_mixed_cell_is_marked(root, tmp_path):
    m = tmp_path / "shrink.py"
    m.write_text(METHOD)
    spec = {"methods": [str(m)], "pairs": [list(stores(root).values())], "seeds": [0, 1], "out": str(tmp_path / "o"),
            "set": dict(TINY)}
    first = S.run_sweep(spec, None, progress=False)
    assert len(first.trained) == 2
    again = S.run_sweep(spec, None, progress=False)
    assert again.trained == [] and len(again.skipped) == 2        # unchanged: nothing to train
    old = {r["run"]: r["target_top1_per_eval"] for r in first.rows}
    m.write_text(METHOD.replace("SCALE = 0.01", "SCALE = 5.0"))    # one line of the loss
    runs = S.expand(spec)
    done, why = S.is_complete(runs[0])
    assert not done and "its method's code changed (shrink.py)" in why
    edited = S.run_sweep(spec, None, progress=False)
    assert len(edited.trained) == 2 and edited.skipped == []       # both retrained, none kept
    new_sha = {r["provenance"]["code"]["method_sha256"] for r in edited.rows}
    assert len(new_sha) == 1 and new_sha != {r["provenance"]["code"]["method_sha256"] for r in first.rows}
    assert old != {r["run"]: r["target_top1_per_eval"] for r in edited.rows}
    # a cell whose runs came from different code (a folder mixed by hand) says so
    mixed = [dict(first.rows[0]), dict(edited.rows[1])]
    cell = R.build_tables(mixed)[0].rows[0][1]
    assert cell[next(iter(cell))].codes == 2 and "(mixed code)" in cell[next(iter(cell))].text()
    assert any("shrink" in line and "method" in line for line in R.footer(mixed))


def test_a_changed_store_retrains(root, tmp_path):
    feats = tmp_path / "f"
    shutil.copytree(root, feats)
    s = {k: v.replace(str(root), str(feats)) for k, v in stores(root).items()}
    spec = {"methods": ["source_only"], "pairs": [list(s.values())], "seeds": [0], "out": str(tmp_path / "o"),
            "set": dict(TINY)}
    S.run_sweep(spec, None, progress=False)
    shutil.rmtree(s["target"])
    make_store(Path(s["target"]), 24, 4, 1, {"rgb": (8,), "flow": (8,)}, 1.0, 9)  # same ids, new features
    done, why = S.is_complete(S.expand(spec)[0])
    assert not done and "the target store's content changed" in why


# ------------------------------------------------------------------------------------------------------------
# one place for a preset value


def test_a_settings_default_is_applied_or_refused_never_silently_overridden(tmp_path):
    sub = tmp_path / "mydann.py"
    sub.write_text("from dataclasses import dataclass\nfrom adapt.methods.dann import DANN\n\n\n"
                   "class MyDANN(DANN):\n    name = 'mydann'\n\n    @dataclass\n    class Settings(DANN.Settings):\n"
                   "        w_adv: float = 2.5\n")
    assert C.resolve(str(sub), "mmsada").w_adv == 2.5          # its own default wins over DANN's fact (1.0)
    assert C.resolve("dann", "mmsada").w_adv == 1.0
    both = tmp_path / "both.py"
    both.write_text("from dataclasses import dataclass\nfrom adapt.method import Method, MethodSettings, facts\n\n\n"
                    "class Both(Method):\n    name = 'both'\n    facts = facts(('w_x', 1.0, 'eq. 3'))\n\n"
                    "    @dataclass\n    class Settings(MethodSettings):\n        w_x: float = 2.0\n")
    with pytest.raises(UserError, match=r"w_x has two preset values, its Settings default 2.0 and its fact 1.0"):
        C.resolve(str(both), "mmsada")


# ------------------------------------------------------------------------------------------------------------
# stores checked by what they hold


def test_a_copy_of_the_source_as_eval_or_target_is_refused_or_marked(root, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores(root)["source"], copy)
    for role in ("eval", "target"):
        with pytest.raises(UserError, match=r"shares 24 clips with the source store .*allow_overlap"):
            run("source_only", root, tmp_path / role, **{role: str(copy)})
    final = run("source_only", root, tmp_path / "allowed", {"allow_overlap": True}, eval=str(copy))
    assert final["overlap"] == {"eval": 24} and final["invalid"] == ["overlap"]
    cell = R.build_tables([{**final, "run_dir": ""}])[0].rows[0][1]
    assert "(1/1 invalid)" in next(iter(cell.values())).text()


def test_a_test_split_without_the_rarest_classes_is_evaluated_in_the_source_class_space(tmp_path):
    b = tmp_path / "i3d"
    b.mkdir()
    make_store(b / "S_train.zarr", 32, 4, 1, {"rgb": (8,), "flow": (8,)}, 0.0, 1)
    make_store(b / "T_train.zarr", 32, 4, 1, {"rgb": (8,), "flow": (8,)}, 1.0, 2)
    # a user's test split holding classes 0..2 only: counted from its labels, 3 classes
    n = 12
    manifest = pd.DataFrame({"id": [f"t{i}" for i in range(n)], "video_id": ["W"] * n,
                             "start_frame": np.arange(n) * 5 + 1, "stop_frame": np.arange(n) * 5 + 4,
                             "verb_class": np.arange(n) % 3, "noun_class": -np.ones(n, dtype=int)})
    st = FeatureStore.create(b / "T_test.zarr", manifest, {"rgb": (1, 8), "flow": (1, 8)},
                             StoreAttrs(backbone="i3d", manifest_sha256="t", dataset="custom",
                                        checkpoints={"rgb": None, "flow": None}, sampling={"windows": 1},
                                        verb_classes=3))
    st.write(np.arange(n), {m: np.random.default_rng(0).random((n, 1, 8)).astype(np.float32)
                            for m in ("rgb", "flow")})
    st.finalise()
    cfg = C.resolve("source_only", "mmsada", TINY, source=str(b / "S_train.zarr"), target=str(b / "T_train.zarr"),
                    eval=str(b / "T_test.zarr"), out=str(tmp_path / "o"))
    final = T.train([cfg], progress=False)[0]
    assert len(final["per_class_recall"]) == 4 and final["per_class_recall"][3] is None


# ------------------------------------------------------------------------------------------------------------
# invalid runs


def _scores(pred, classes):
    return torch.nn.functional.one_hot(torch.as_tensor(pred), classes).float()


def test_the_guard_catches_a_run_that_kept_two_classes_and_spares_an_honest_imbalanced_one():
    truth = np.repeat(np.arange(8), [19, 12, 12, 12, 13, 11, 11, 10])  # 100 clips
    # CDAN's case: class 0 for almost every clip, class 4 for some (recalls 100/0/0/0/9/0/0/0)
    cdan = np.zeros(100, dtype=int)                       # 84% of the clips predicted as class 0 ...
    cdan[np.flatnonzero(truth == 4)[:1]] = 4                # ... one clip of class 4 right (recall 8%) ...
    cdan[np.flatnonzero((truth != 0) & (truth != 4))[:15]] = 4  # ... and 15 others called class 4
    c = metrics.collapsed(_scores(cdan, 8), torch.as_tensor(truth))
    assert c is not None and c["kind"] == "few classes" and 0 in c["recognised"] and c["covered"] < 0.5
    # an honest model on imbalanced data: the frequent classes right, the rare ones lost
    d1 = np.repeat(np.arange(8), [27, 25, 15, 8, 14, 5, 3, 3])
    honest = np.where(d1 < 5, d1, np.where(d1 == 5, 0, 1))
    honest[::7] = (honest[::7] + 1) % 5
    assert metrics.collapsed(_scores(honest, 8), torch.as_tensor(d1)) is None
    # near chance but spread over the classes: not a collapse either
    rng = np.random.default_rng(0)
    assert metrics.collapsed(_scores(rng.integers(0, 8, 100), 8), torch.as_tensor(truth)) is None
    # one class (the old rule) still
    assert metrics.collapsed(_scores(np.zeros(100, dtype=int), 8), torch.as_tensor(truth))["kind"] == "one class"


def _collapsed_final(final, steps):
    return {**final, "collapse": {"kind": "one class", "class": 0, "share": 1.0, "steps": steps},
            "invalid": ["collapsed"], "collapsed_per_eval": [s in steps for s in final["eval_steps"]]}


def test_collapsed_runs_are_marked_in_every_output(root, tmp_path):
    spec = {"methods": ["source_only", "dann"], "pairs": [list(stores(root).values())], "seeds": [0, 1],
            "out": str(tmp_path / "o"), "set": {**TINY, "validators": True, "steps": 40, "stage1_steps": 10,
                                                 "eval_every": 10, "last_eval_every": 10}}
    res = S.run_sweep(spec, None, progress=False)
    assert not any(r["invalid"] for r in res.rows)  # they learned
    # mark the dann runs collapsed where they are written, as the trainer would
    for r in res.rows:
        if r["method"] == "dann":
            f = Path(r["run_dir"]) / "final.json"
            f.write_text(json.dumps(_collapsed_final(json.loads(f.read_text()), r["eval_steps"])))
    rows = S.collect_rows(res.runs)
    S.write_results(rows, tmp_path / "o")
    with open(tmp_path / "o" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["method"]: r["invalid"] for r in table} == {"source_only": "", "dann": "collapsed"}
    written = R.write_report([tmp_path / "o"], tmp_path / "rep", select="all")
    md = written["report.md"].read_text()
    assert "dann | " in md and "(2/2 invalid)" in md and "Invalid runs" in md and "collapsed to one class" in md
    with open(written["report.csv"]) as f:
        rep = {r["method"]: r for r in csv.DictReader(f)}
    col = next(k for k in rep["dann"] if k.endswith(" invalid"))
    assert rep["dann"][col] == "2" and rep["source_only"][col] == "0"
    sel = written["selection.md"].read_text()
    assert "collapsed checkpoints passed over" in sel
    # every dann checkpoint collapsed: chosen among them, and said so in its row
    (line,) = [line for line in sel.splitlines() if line.startswith("| entropy | dann")]
    assert "every checkpoint collapsed: chosen among them (invalid)" in line
    (line,) = [line for line in sel.splitlines() if line.startswith("| entropy | source_only")]
    assert line.rstrip(" |").endswith("| 0")
    from adapt import plots as P
    labels = P.accuracy_curves(rows)
    assert any(lab.endswith("(2/2 invalid)") for lab in next(iter(labels.values())))


def test_a_collapsed_run_is_told_at_its_end_even_with_few_evaluations(root, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "collapsed", lambda s, y: {"kind": "few classes", "class": 1, "share": 0.7,
                                                            "recognised": [1], "covered": 0.25})
    final = run("source_only", root, tmp_path, {"eval_every": 8, "last_eval_every": 8})  # one evaluation
    assert final["collapse"]["steps"] == [8] and final["invalid"] == ["collapsed"]


# ------------------------------------------------------------------------------------------------------------
# caches


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "record"])
def test_a_damaged_source_stage_is_trained_again_never_used(root, tmp_path, damage):
    kw = {"steps": 12, "stage1_steps": 6}
    fresh = run("shot", root, tmp_path / "a", kw)
    saved = next((tmp_path / "a" / "source_models").glob("*.pt"))
    data = bytearray(saved.read_bytes())
    if damage == "zeroed":
        data[len(data) // 3: len(data) // 3 + 256] = bytes(256)
        saved.write_bytes(bytes(data))
    elif damage == "truncated":
        saved.write_bytes(bytes(data[: len(data) // 2]))
    else:
        saved.with_name(saved.name + ".json").write_text("{")
    from rich.console import Console
    import io
    buf = io.StringIO()
    cfg = C.resolve("shot", "mmsada", {**TINY, **kw}, out=str(tmp_path / "a"), tag="again", **stores(root))
    again = T.train([cfg], Console(file=buf, width=200), progress=False)[0]
    assert "training it again" in buf.getvalue()
    assert again["target_top1_per_eval"] == fresh["target_top1_per_eval"]
    from adapt import cache
    assert cache.load(saved, json.loads(saved.with_name(saved.name + ".json").read_text())["fingerprint"])[0]


# ------------------------------------------------------------------------------------------------------------
# a short run: compressed or a prefix


def test_stop_after_is_a_prefix_of_the_full_run(root, tmp_path):
    full = C.resolve("contrastive", "mmsada", {**TINY, "steps": 40, "stage1_steps": 20, "lr_steps": [30],
                                               "eval_every": 5, "last_eval_every": 5, "last_evals": 2},
                     **stores(root), out=str(tmp_path / "full"))
    prefix = C.resolve("contrastive", "mmsada", {**TINY, "steps": 40, "stage1_steps": 20, "lr_steps": [30],
                                                 "eval_every": 5, "last_eval_every": 5, "last_evals": 2,
                                                 "stop_after": 25}, **stores(root), out=str(tmp_path / "pre"))
    from adapt.schedule import Schedule
    s = Schedule.of(prefix, 24, 24)
    assert (s.steps, s.stop, s.lr_milestones, s.final_steps) == (40, 25, [30], [20, 25])
    assert "the first 25 steps of a 40-step schedule" in C.schedule_line(prefix, s)
    compressed = C.resolve("contrastive", "mmsada", {"validators": False}, **stores(root), steps=600)
    line = C.schedule_line(compressed, Schedule.of(compressed, 24, 24))
    assert "(9000 steps) compressed into 600 steps" in line and "x 0.1 at steps [400]" in line
    a = T.train([full], progress=False)[0]
    b = T.train([prefix], progress=False)[0]
    assert b["steps"] == 25 and b["schedule_steps"] == 40
    assert b["target_top1_per_eval"] == a["target_top1_per_eval"][:5]  # the same run, stopped


def test_the_cli_says_which_schedule_runs(root, tmp_path):
    s = stores(root)
    r = CliRunner().invoke(app, ["train", "--method", "dann", "--source", s["source"], "--target", s["target"],
                                 "--eval", s["eval"], "--steps", "40", "--set", "stop_after=20", "--out",
                                 str(tmp_path), "--settings"])
    assert r.exit_code == 0, r.output
    assert "the first 20 steps of a 40-step schedule (stop_after" in r.output


def test_the_epic100_base_draws_ta3n_scripts_207_target_clips_whatever_the_stores():
    """TA3N's scripts compute the target batch from the full splits' sizes they write down: 207 on a subset too,
    where an epoch is then the shorter loader's pass (main.py:329)."""
    from adapt.schedule import Schedule
    cfg = C.resolve("source_only", "epic100")
    assert cfg.batch_target == 207 and cfg.batch_source == 128
    s = Schedule.of(cfg, 800, 800, load_method("source_only"))
    assert (s.batch_target, s.epoch_steps, s.steps) == (207, 4, 120)   # min(ceil(800/128), ceil(800/207)) x 30
    assert Schedule.of(cfg, 16115, 26115, load_method("source_only")).epoch_steps == 126  # the full splits


def load_method(name):
    from adapt.method import load
    return load(name)


def test_compositions_follow_their_references():
    """CDAN 1:1 (thuml/CDAN), DANN's paper form without the EPIC-100 base's schedule on top of Ganin's annealing,
    SHOT's 90/10 source split, its last source model and its zero classifier bias."""
    cdan = C.resolve("cdan", "mmsada")
    assert (cdan.w_cls, cdan.w_cdan, cdan.beta_cdan) == (1.0, 1.0, 1.0)
    paper = C.resolve("dann", "epic100", {"form": "paper"})
    assert (paper.lr_epochs, paper.lr_steps, paper.grl_p0, paper.clip_grad_norm, paper.nesterov) == \
        ([], [], 0.0, None, False)
    assert (paper.lr_anneal, paper.stage1_steps, paper.w_video_adv, paper.beta_video) == (10.0, 0, 1.0, 1.0)
    shot = C.resolve("shot", "mmsada")
    assert (shot.source_holdout, shot.source_pick) == (0.1, "last")
    from adapt.method import load
    from adapt.model import Inputs
    model = load("shot")(shot, Inputs(("rgb", "flow"), {"rgb": (8,), "flow": (8,)}, 4, 0, 1))
    for s in model.streams:
        assert torch.count_nonzero(model.classifier[s].verb.bias) == 0
        assert type(model.classifier[s].verb).__name__ == "WeightNormLinear"


def test_shot_source_pick_best_puts_back_its_best_held_out_source_model(root, tmp_path, monkeypatch):
    from adapt.data import DomainPair
    from adapt.method import RunView
    cfg = C.resolve("shot", "mmsada", {**TINY, "steps": 14, "stage1_steps": 10, "source_pick": "best"},
                    out=str(tmp_path), **stores(root))
    device = torch.device("cpu")
    t = T.Training([cfg], DomainPair(cfg, device), device)
    labels = t.val_labels
    accuracy = {1: 0.2, 2: 0.5, 3: 0.9, 4: 0.4, 5: 0.9, 6: 0.1, 7: 0.3, 8: 0.3, 9: 0.2, 10: 0.6}  # best: step 5
    seen = {}
    real = RunView.predict

    def predict(self, domain="target"):
        if domain != "held_out":
            return real(self, domain)
        right = int(round(accuracy[self.step] * len(labels)))
        pred = np.where(np.arange(len(labels)) < right, labels, (labels + 1) % 4)
        seen[self.step] = self.weights(0)
        return {"verb": torch.nn.functional.one_hot(torch.as_tensor(pred), 4).float()[None]}
    monkeypatch.setattr(RunView, "predict", predict)
    for step in range(11):
        t.template.before_step(RunView(t, step))
        if step < 10:
            t.step(step, t.batch(step))
    t.close()
    assert sorted(seen) == list(range(1, 11))             # a check every tenth of the source stage
    now = t._heads(0)
    assert all(torch.equal(now[k], seen[5][k]) for k in now)  # the best (ties: the later) put back
    assert not all(torch.equal(now[k], seen[10][k]) for k in now)


def test_a_sweep_refuses_a_pair_evaluated_on_a_copy_of_its_source_before_training_anything(root, tmp_path):
    s, t, e = stores(root).values()
    copy = tmp_path / "copy.zarr"
    shutil.copytree(t, copy)  # the second pair (T -> S) evaluated on a copy of its own source
    spec = {"methods": ["source_only"], "pairs": [[s, t, e], [t, s, str(copy)]], "seeds": [0],
            "out": str(tmp_path / "o"), "set": dict(TINY)}
    with pytest.raises(UserError, match=r"the eval store shares 24 clips with the source store"):
        S.run_sweep(spec, None, progress=False)
    assert not list((tmp_path / "o").glob("source_only_*")) if (tmp_path / "o").exists() else True
