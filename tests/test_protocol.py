"""EPIC-100 UDA's protocol end to end on small imported stores of the real split layout, and model selection over
a sweep on them (adapt/protocol.py, adapt report --select)."""

import json

import pytest
from typer.testing import CliRunner

from adapt import selection as S
from adapt.importer import import_features
from adapt.protocol import run_protocol
from cli import app
from featstore import manifests as M
from tests.test_importer import challenge_pickle

SPLITS = [("source_train", 60, 0.0), ("source_val", 40, 0.0), ("target_train", 60, 1.0), ("target_val", 40, 1.0),
          ("target_test", 20, 1.0)]
SET = {"epochs": None, "lr_epochs": [], "steps": 8, "stage1_steps": 4, "eval_every": 4, "last_evals": 1,
       "batch_source": 8, "batch_target": 8}


@pytest.fixture(scope="module")
def epic100(tmp_path_factory):
    """features/tbn/<split>.zarr of the five EPIC-100 UDA splits: challenge-format pickles (25 x 1024 per clip)
    over the first clips of the real manifests, imported."""
    tmp = tmp_path_factory.mktemp("epic100")
    for i, (split, n, shift) in enumerate(SPLITS):
        challenge_pickle(tmp / f"{split}.pkl", split, n, i, shift=shift)
        import_features(tmp / f"{split}.pkl", split, tmp / "features" / "tbn" / f"{split}.zarr")
    return tmp


def test_the_protocol_tunes_on_the_validation_splits_trains_on_the_train_splits_and_writes_test_json(epic100):
    spec = {"methods": ["source_only", "dann"], "seeds": [0], "backbone": "tbn",
            "features_root": str(epic100 / "features"), "set": SET,
            "per_method": {"dann": {"grid": {"w_adv": [0.5, 1.0]}}}}
    out = epic100 / "protocol"
    record = run_protocol(spec, out, "oracle", progress=False)
    assert json.loads((out / "protocol.json").read_text()) == record
    tune = [json.loads(line) for line in (out / "tune" / "results.jsonl").read_text().splitlines()]
    assert {(r["source"], r["target"], r["eval"]) for r in tune} == {("source_val", "target_val", "target_val")}
    dann = [r for r in tune if r["method"] == "dann"]
    best = max(dann, key=lambda r: (max(r["target_top1_per_eval"]), r["tag"] == ""))  # the oracle on target_val
    assert record["methods"]["dann"]["grid_point"] == best["tag"]
    assert record["methods"]["dann"]["settings"] == best["grid"]
    train = [json.loads(line) for line in (out / "train" / "results.jsonl").read_text().splitlines()]
    assert {(r["source"], r["target"]) for r in train} == {("epic100_source", "epic100_target")}
    chosen = json.loads((out / "train" / "dann_epic100_source-epic100_target_s0" / "config.json").read_text())
    assert chosen["w_adv"] == best["grid"]["w_adv"] and chosen["challenge"] == "target_test"
    for method, r in record["methods"].items():
        assert set(r["target_val"]) >= {"verb_top1", "noun_top1", "action_top1"}
        doc = json.loads(open(r["test_json"][0]).read())
        ids = M.resolve_split("target_test").read()["id"].tolist()[:20]
        assert doc["challenge"] == "domain_adaptation" and sorted(doc["results"]) == sorted(ids)
        assert len(doc["results"][ids[0]]["verb"]) == 97 and len(doc["results"][ids[0]]["noun"]) == 300

    # the same from the command line, choosing by a validator that needs no target labels
    (epic100 / "spec.toml").write_text(_toml(spec, epic100 / "by_im"))
    res = CliRunner().invoke(app, ["protocol", str(epic100 / "spec.toml"), "--select", "im", "--quiet"])
    assert res.exit_code == 0, res.output
    by_im = json.loads((epic100 / "by_im" / "protocol.json").read_text())
    assert by_im["select"] == "im" and set(by_im["methods"]) == {"source_only", "dann"}


def test_report_select_on_the_epic100_sweep_prints_every_validator(epic100):
    spec = epic100 / "sweep.toml"
    spec.write_text(_toml({"methods": ["dann"], "seeds": [0, 1], "backbone": "tbn",
                           "features_root": str(epic100 / "features"),
                           "set": {**SET, "source_val": "source_val"},
                           "pairs": [["epic100_source", "epic100_target", "target_val"]],
                           "grid": {"w_adv": [0.5, 1.0]}}, epic100 / "sweep"))
    runner = CliRunner()
    assert runner.invoke(app, ["sweep", str(spec), "--quiet"]).exit_code == 0
    res = runner.invoke(app, ["report", str(epic100 / "sweep"), "--select", "all", "--no-plots"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for name in ("source_val", "entropy", "im", "snd", "dev"):
        assert name in text
    assert "selected" in text and "oracle" in text and "gap" in text and "rho" in text
    rows = [json.loads(line) for line in (epic100 / "sweep" / "results.jsonl").read_text().splitlines()]
    assert S.available(rows) == ["source_val", "entropy", "im", "snd", "dev"]
    csv = (epic100 / "sweep" / "selection.csv").read_text().splitlines()
    assert csv[0].startswith("validator,method,pair,grid point,steps,selected,oracle,gap,last-9,rho")
    assert len(csv) == 1 + 5  # one method and pair, five validators


def _toml(spec: dict, out) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return '"none"' if v is None else str(v)
    lines = [f"out = {json.dumps(str(out))}"]
    tables = []
    for k, v in spec.items():
        if k == "per_method":
            for m, t in v.items():
                tables.append(f"[per_method.{m}]")
                tables += [f"{tk} = {value(tv)}" for tk, tv in t.items()]
        else:
            lines.append(f"{k} = {value(v)}")
    return "\n".join(lines + tables) + "\n"
