"""Sweeps: spec expansion (TOML / YAML, grid, per-method overrides), grouping into stacks, one-call sweeps over
methods x pairs x seeds, resume after an interruption, stacked = separate, the results files, rank partitions."""

import csv
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapt import sweeps as S
from adapt import trainer as T
from cli import app
from featstore.errors import UserError
from featstore.synthetic import make_pair

TINY = {"steps": 8, "stage1_steps": 4, "eval_every": 4, "batch_source": 8, "batch_target": 8, "embed_dim": 32,
        "sc_dim": 8}

SPEC_TOML = """
methods = ["source_only", "dann", "cia"]
pairs = [["D2", "D1"], {source = "D1", target = "D2"}]
seeds = [0, 1]
backbone = "i3d"
features_root = "feats"
out = "OUT"
set = {steps = 8, stage1_steps = 4, eval_every = 4}
grid = {w_cls = [1, 0.5]}

[per_method.source_only]
set = {w_cls = 1.0}            # a key set per method leaves the global grid

[per_method.cia]
set = {sc = false}
grid = {w_frame_adv = [0, 0.5]}
"""

SPEC_YAML = """
methods: [source_only, dann, cia]
pairs:
  - [D2, D1]
  - {source: D1, target: D2}
seeds: [0, 1]
backbone: i3d
features_root: feats
out: OUT
set: {steps: 8, stage1_steps: 4, eval_every: 4}
grid: {w_cls: [1, 0.5]}
per_method:
  source_only: {set: {w_cls: 1.0}}
  cia:
    set: {sc: false}
    grid: {w_frame_adv: [0, 0.5]}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=True, n=24, channels=16)


def store_spec(root, out, methods=("source_only", "dann", "cia"), seeds=(0, 1), **extra):
    """Two pairs from make_pair's stores: S->T and T->S (both evaluated on T_test)."""
    b = Path(root) / "i3d"
    s, t, e = (str(b / f"{n}.zarr") for n in ("S_train", "T_train", "T_test"))
    sets = {k: v for k, v in TINY.items() if k != "sc_dim" or "cia" in methods}  # sc_dim: CIA's own setting
    return {"methods": list(methods), "pairs": [[s, t, e], [t, s, e]], "seeds": list(seeds), "out": str(out),
            "set": sets, **extra}


# ------------------------------------------------------------------------------------------------------------
# expansion


@pytest.mark.parametrize("fmt, text", [("toml", SPEC_TOML), ("yaml", SPEC_YAML)])
def test_expand_counts_tags_and_overrides(tmp_path, fmt, text):
    spec = S.parse_spec(text.replace("OUT", str(tmp_path)), fmt)
    runs = S.expand(spec)
    # source_only: 1 point (its set pins w_cls); dann: 2 (w_cls); cia: 2 x 2 (w_cls x w_frame_adv); x 2 pairs x 2 seeds
    assert len(runs) == (1 + 2 + 4) * 2 * 2
    by_method = {}
    for r in runs:
        by_method.setdefault(r.cfg.method, []).append(r)
    assert {r.cfg.tag for r in by_method["source_only"]} == {""}
    assert {r.cfg.tag for r in by_method["dann"]} == {"w_cls=1", "w_cls=0.5"}
    assert {r.cfg.tag for r in by_method["cia"]} == {f"w_cls={a},w_frame_adv={b}" for a in ("1", "0.5")
                                                    for b in ("0", "0.5")}
    for r in runs:
        assert r.cfg.steps == 8 and r.cfg.eval_every == 4 and r.cfg.backbone == "i3d"
        assert r.cfg.features_root == "feats" and r.cfg.out == str(tmp_path)
        assert isinstance(r.cfg.w_cls, float)
    cia = [r for r in by_method["cia"] if r.cfg.tag == "w_cls=0.5,w_frame_adv=0"][0]
    assert cia.cfg.sc is False and cia.cfg.mc is True and cia.cfg.w_frame_adv == 0.0 and cia.cfg.w_cls == 0.5
    assert cia.cfg.optimizer == "adam"  # the preset stays under the overrides
    assert cia.grid == {"w_cls": 0.5, "w_frame_adv": 0.0}
    assert {r.pair for r in runs} == {"D2→D1", "D1→D2"}
    assert {r.cfg.seed for r in runs} == {0, 1}
    assert len({r.dir for r in runs}) == len(runs)  # every run its own folder
    assert sorted(r.name for r in by_method["dann"])[0] == "dann_D1-D2_s0_w_cls=0.5"


def test_toml_and_yaml_give_the_same_runs(tmp_path):
    a = S.expand(S.parse_spec(SPEC_TOML.replace("OUT", str(tmp_path)), "toml"))
    b = S.expand(S.parse_spec(SPEC_YAML.replace("OUT", str(tmp_path)), "yaml"))
    assert [r.cfg.to_dict() for r in a] == [r.cfg.to_dict() for r in b]


def test_load_spec_by_extension(tmp_path):
    (tmp_path / "s.yaml").write_text(SPEC_YAML.replace("OUT", str(tmp_path)))
    (tmp_path / "s.toml").write_text(SPEC_TOML.replace("OUT", str(tmp_path)))
    assert S.load_spec(tmp_path / "s.yaml") == S.load_spec(tmp_path / "s.toml")


@pytest.mark.parametrize("text, match", [
    ('methods = ["nope"]\npairs = [["D1", "D2"]]', "unknown method"),
    ('methods = ["dann"]\npairs = [["D1", "D2"]]\nset = {nonsense = 1}', "'nonsense' is not a setting of any of the sweep's methods"),
    ('methods = ["dann"]\npairs = [["D1", "D2"]]\ngrid = {w_adv = 1}', "non-empty list"),
    ('methods = ["dann"]\npairs = [["D1"]]', "expected \\[source, target\\]"),
    ('methods = ["dann"]\npairs = [["D1", "D2"]]\nseeds = [0, 0]', "distinct integers"),
    ('methods = ["cia"]\npairs = [["D1", "D2"]]\nset = {sc = 3}', "expected a bool"),
    ('methods = ["dann"\n', "not valid TOML"),
])
def test_spec_errors_are_user_errors(text, match):
    with pytest.raises(UserError, match=match):
        S.expand(S.parse_spec(text, "toml"))


def test_grouping_stacks_seeds_and_weights_only(tmp_path):
    runs = S.expand(S.parse_spec(SPEC_TOML.replace("OUT", str(tmp_path)), "toml"))
    groups = S.group_runs(runs)
    # per pair: source_only 1, dann 1 (w_cls 1 and 0.5 stack), cia 2 (w_frame_adv 0 drops the frame heads)
    assert len(groups) == 2 * (1 + 1 + 2)
    for g in groups:
        assert len({(r.cfg.method, r.cfg.source, r.cfg.target) for r in g.runs}) == 1
        assert len({r.cfg.architecture_key() for r in g.runs}) == 1
    dann = [g for g in groups if g.runs[0].cfg.method == "dann"][0]
    assert len(dann.runs) == 4 and {r.cfg.w_cls for r in dann.runs} == {1.0, 0.5}
    cia = [g for g in groups if g.runs[0].cfg.method == "cia" and g.runs[0].cfg.w_frame_adv == 0.5][0]
    assert {r.cfg.seed for r in cia.runs} == {0, 1} and len(cia.runs) == 4
    assert [len(c) for c in S.chunks(list(range(5)), 2)] == [2, 2, 1]


# ------------------------------------------------------------------------------------------------------------
# running


@pytest.fixture
def calls(monkeypatch):
    """Record the stacks that reach adapt.trainer.train (names per call), training them for real."""
    seen = []
    real = T.train

    def counting(cfgs, *a, **kw):
        seen.append([T.run_name(c) for c in cfgs])
        return real(cfgs, *a, **kw)

    monkeypatch.setattr(T, "train", counting)
    return seen


def test_sweep_methods_pairs_seeds_in_one_call_then_resume(root, tmp_path, calls):
    spec = store_spec(root, tmp_path / "sweep")
    res = S.run_sweep(spec, progress=False)
    assert len(res.runs) == 3 * 2 * 2 and len(res.trained) == 12 and not res.skipped
    assert len(calls) == 6 and all(len(c) == 2 for c in calls)  # one stacked call per method and pair
    out = tmp_path / "sweep"
    for r in res.runs:
        assert (r.dir / "final.json").is_file()

    # results files: one row per run
    jsonl = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run"] for r in jsonl) == sorted(r.name for r in res.runs)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12
    row = [r for r in rows if r["run"] == "dann_T_train-S_train_s1"][0]
    final = json.loads((out / "dann_T_train-S_train_s1" / "final.json").read_text())
    assert row["method"] == "dann" and row["pair"] == "T→S" and row["seed"] == "1"
    assert float(row["target_top1"]) == final["target_top1"] and float(row["top1_rgb"]) == final["per_modality"]["rgb"]

    # an interrupted sweep: one run lost its final.json (killed mid-way) -> only that run is trained again
    victim = out / "cia_S_train-T_train_s1"
    (victim / "final.json").unlink()
    mtimes = {r.name: (r.dir / "final.json").stat().st_mtime_ns for r in res.runs if r.name != victim.name}
    calls.clear()
    again = S.run_sweep(spec, progress=False)
    assert calls == [["cia_S_train-T_train_s1"]]
    assert again.trained == ["cia_S_train-T_train_s1"] and len(again.skipped) == 11
    assert (victim / "final.json").is_file()
    assert all((out / n / "final.json").stat().st_mtime_ns == t for n, t in mtimes.items())
    assert len((out / "results.jsonl").read_text().splitlines()) == 12
    # trained alone now, the run still gives the numbers it gave stacked with seed 0 (same seed, same numbers)
    before = [r for r in jsonl if r["run"] == victim.name][0]
    after = json.loads((victim / "final.json").read_text())
    assert after["target_top1_per_eval"] == before["target_top1_per_eval"]
    assert before["runs_stacked"] == 2 and after["runs_stacked"] == 1

    # nothing left: no training at all
    calls.clear()
    assert S.run_sweep(spec, progress=False).trained == [] and calls == []


def test_stacked_sweep_run_equals_a_separate_run(root, tmp_path):
    spec = store_spec(root, tmp_path / "sweep", methods=("mmsada",), grid={"w_cls": [1.0, 0.5]})
    spec["pairs"] = spec["pairs"][:1]
    res = S.run_sweep(spec, progress=False)
    assert len(res.trained) == 4  # 2 weights x 2 seeds, one stack
    stacked = {r["run"]: r for r in res.rows}
    assert {r["runs_stacked"] for r in res.rows} == {4}
    run = [r for r in res.runs if r.cfg.seed == 1 and r.cfg.w_cls == 0.5][0]
    run.cfg.out = str(tmp_path / "alone")
    alone = T.train([run.cfg], progress=False)[0]
    assert alone["target_top1_per_eval"] == stacked[run.name]["target_top1_per_eval"]
    assert alone["per_modality"] == stacked[run.name]["per_modality"]


def test_changed_settings_are_not_taken_for_complete(root, tmp_path):
    spec = store_spec(root, tmp_path / "sweep", methods=("source_only",), seeds=(0,))
    spec["pairs"] = spec["pairs"][:1]
    S.run_sweep(spec, progress=False)
    run = S.expand(spec)[0]
    assert S.is_complete(run) == (True, "")
    spec["set"] = {**spec["set"], "lr": 0.05}
    changed = S.expand(spec)[0]
    assert changed.name == run.name
    done, why = S.is_complete(changed)
    assert not done and "lr changed" in why


def _fake_train(cfgs, console=None, progress=True, pair=None):
    """Writes a final.json per run without training (for the bookkeeping tests)."""
    finals = []
    for c in cfgs:
        d = Path(c.out) / T.run_name(c)
        d.mkdir(parents=True, exist_ok=True)
        final = {"method": c.method, "source": c.source, "target": c.target, "eval": c.eval, "seed": c.seed,
                 "tag": c.tag, "backbone": c.backbone, "target_top1": 10.0 + c.seed, "runs_stacked": len(cfgs),
                 "per_modality": {"rgb": 1.0}, "target_top1_per_eval": [10.0], "eval_steps": [8]}
        (d / "final.json").write_text(json.dumps(final))
        finals.append(final)
    return finals


def test_max_stack_splits_groups(root, tmp_path, monkeypatch):
    stacks = []
    monkeypatch.setattr(T, "train", lambda cfgs, *a, **k: stacks.append(len(cfgs)) or _fake_train(cfgs))
    spec = store_spec(root, tmp_path / "sweep", methods=("dann",), seeds=(0, 1, 2, 3, 4))
    res = S.run_sweep(spec, progress=False, max_stack=2)
    assert stacks == [2, 2, 1, 2, 2, 1] and len(res.rows) == 10


def test_ranks_partition_the_groups_and_rank0_merges(root, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "train", lambda cfgs, *a, **k: _fake_train(cfgs))
    spec = store_spec(root, tmp_path / "sweep")
    r1 = S.run_sweep(spec, progress=False, rank=1, world=2)
    assert r1.rows == [] and r1.files == []
    r0 = S.run_sweep(spec, progress=False, rank=0, world=2)
    assert set(r0.trained).isdisjoint(r1.trained)
    assert sorted(r0.trained + r1.trained) == sorted(r.name for r in r0.runs)
    groups = S.group_runs(r0.runs)
    assert set(r1.trained) == {r.name for g in groups[1::2] for r in g.runs}
    assert len(r0.rows) == 12 and len((tmp_path / "sweep" / "results.jsonl").read_text().splitlines()) == 12


def test_cli_sweep_prints_the_table(root, tmp_path):
    b = Path(root) / "i3d"
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
methods = ["source_only"]
pairs = [["{b / 'S_train.zarr'}", "{b / 'T_train.zarr'}", "{b / 'T_test.zarr'}"]]
seeds = [0, 1]
out = "{tmp_path / 'out'}"
set = {{ {', '.join(f'{k} = {v}' for k, v in TINY.items() if k != 'sc_dim')} }}
""")
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(spec), "--quiet", "--max-stack", "4"])
    assert result.exit_code == 0, result.output
    assert "source_only" in result.output and "S→T" in result.output and "±" in result.output
    assert (tmp_path / "out" / "results.csv").is_file()
    result = runner.invoke(app, ["sweep", str(spec), "--dry-run"])
    assert result.exit_code == 0 and "2 complete, 0 to train" in result.output
    result = runner.invoke(app, ["sweep", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "no such sweep spec" in result.output


def test_missing_stores_are_refused_before_training(root, tmp_path, monkeypatch):
    stacks = []
    monkeypatch.setattr(T, "train", lambda cfgs, *a, **k: stacks.append(len(cfgs)) or _fake_train(cfgs))
    spec = store_spec(root, tmp_path / "sweep", methods=("dann",))
    spec["pairs"].append([str(tmp_path / "X_train.zarr"), spec["pairs"][0][1], spec["pairs"][0][2]])
    with pytest.raises(UserError, match=r"1 feature store\(s\) of the sweep are missing: .*X_train.zarr"):
        S.run_sweep(spec, progress=False)
    assert stacks == []


def test_bench_batched_smoke():
    from bench.bench_batched import bench_batched
    r = bench_batched(k=2, steps=4, repeats=1, channels=8, n=16, embed_dim=16, batch_source=4, batch_target=4,
                      threads=1)
    assert r["k"] == 2 and r["batched_s"] > 0 and r["sequential_s"] > 0 and r["ratio"] > 0
    assert r["pooled"] and r["threads"] == 1


def test_a_cut_final_json_is_not_complete(tmp_path):
    import types

    from adapt.config import resolve
    (tmp_path / "final.json").write_text('{"target_top1": 5')
    run = types.SimpleNamespace(dir=tmp_path, cfg=resolve("source_only", "mmsada"))
    assert S.is_complete(run) == (False, "final.json cut or unreadable")


def test_report_select_on_a_sweep_with_held_out_source_clips(root, tmp_path):
    """A sweep like the demo's (source clips held out): `report --select all` prints each validator's choice, the
    oracle's and the gap; runs trained without validators are refused in one line."""
    b = Path(root) / "i3d"
    spec = {"methods": ["dann"], "pairs": [[str(b / "S_train.zarr"), str(b / "T_train.zarr"),
                                            str(b / "T_test.zarr")]], "seeds": [0, 1], "out": str(tmp_path / "a"),
            "set": {"steps": 12, "stage1_steps": 4, "eval_every": 4, "last_eval_every": 4, "batch_source": 8,
                    "batch_target": 8, "source_holdout": 0.25}, "grid": {"w_adv": [0.5, 1.0]}}
    S.run_sweep(spec, progress=False)
    final = json.loads(next((tmp_path / "a").glob("dann_*_s0_*/final.json")).read_text())
    assert set(final["validators_per_eval"]) == {"source_val", "entropy", "im", "snd", "dev"}
    assert all(len(v) == 3 for v in final["validators_per_eval"].values())  # one per evaluation
    best = next((tmp_path / "a").glob("dann_*_s0_*/best"))
    assert sorted(p.stem for p in best.glob("*.pt")) == ["dev", "entropy", "im", "snd", "source_val"]
    res = CliRunner().invoke(app, ["report", str(tmp_path / "a"), "--select", "all", "--no-plots"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "model selection: validators" in text and all(n in text for n in ("source_val", "dev", "snd"))
    assert (tmp_path / "a" / "selection.csv").read_text().count("\n") == 1 + 5
    spec_off = {**spec, "out": str(tmp_path / "b"), "set": {**spec["set"], "validators": False}}
    S.run_sweep(spec_off, progress=False)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "b"), "--select", "im", "--no-plots"])
    assert res.exit_code == 2 and "the runs carry the validators none" in " ".join(res.output.split())


@pytest.mark.parametrize("cost, want", [(lambda k: 0.004 * k, 1),        # stacking costs each run as much: alone
                                        (lambda k: 0.004 + 0.0005 * k, 3)])  # a shared overhead: stacked
def test_the_sweep_stacks_only_where_a_probe_finds_it_faster(monkeypatch, cost, want):
    """The stack size comes from a short probe of the group on this machine: K runs stacked against one alone."""
    import types
    from adapt import trainer as T

    clock = [0.0]  # the probe's steps advance a clock of their own: no timing race on a busy machine

    class Probe:
        def __init__(self, cfgs, pair, device):
            self.k, self.device = len(cfgs), types.SimpleNamespace(type="cpu")

        def batch(self, step):
            return None

        def step(self, step, inputs):
            clock[0] += cost(self.k)

        def close(self):
            pass
    monkeypatch.setattr(T, "Training", Probe)
    monkeypatch.setattr(S, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], time=time.time))
    runs = [types.SimpleNamespace(cfg=types.SimpleNamespace(steps=1000, device="cpu")) for _ in range(3)]
    k, why = S.stack_size(runs, None, 16, "cpu")
    assert k == want and ("one by one: a probe step" if want == 1 else "stacked: a probe step") in why
    assert S.stack_size(runs[:1], None, 16, "cpu") == (1, "one run")
    short = [types.SimpleNamespace(cfg=types.SimpleNamespace(steps=10, device="cpu")) for _ in range(3)]
    assert S.stack_size(short, None, 16, "cpu") == (3, "a short group (not probed)")
