"""Report tables (exact arithmetic on hand-made final.json files), Markdown / CSV, EPIC-100 columns, plots."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapt import config as C
from adapt import plots as P
from adapt import reports as R
from adapt import results
from adapt.trainer import train
from cli import app
from featstore.errors import UserError
from featstore.synthetic import make_pair

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, method, source, target, seed, value, tag="", curve=None, **extra):
    name = f"{method}_{source}-{target}_s{seed}" + (f"_{tag}" if tag else "")
    d = root / name
    d.mkdir(parents=True)
    steps = [10, 20, 30]
    curve = curve or [value - 2, value - 1, value]
    final = {"method": method, "source": source, "target": target, "seed": seed, "tag": tag, "backbone": "i3d",
             "target_top1": value, "target_top1_per_eval": curve, "eval_steps": steps,
             "per_modality": {"rgb": value - 5, "flow": value - 6}, **extra}
    (d / "final.json").write_text(json.dumps(final))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "target_top1": v}) + "\n"
                                             for s, v in zip(steps, curve)))
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, v in enumerate([40.0, 44.0]):
        write_run(root, "source_only", "D2", "D1", seed, v)
    for seed, v in enumerate([50.0, 51.0, 55.0]):
        write_run(root, "source_only", "D1", "D2", seed, v)
    write_run(root, "cia", "D2", "D1", 0, 45.0)                    # one seed, one pair: no std, no mean
    for seed, (a, b) in enumerate([(60.0, 70.0), (62.0, 74.0)]):   # an ablation row
        write_run(root, "cia", "D2", "D1", seed, a, tag="sc=false")
        write_run(root, "cia", "D1", "D2", seed, b, tag="sc=false")
    return root


def test_mean_std_conventions():
    assert results.mean_std([40.0, 44.0]) == (42.0, math.sqrt(8.0))                 # sample: / (n - 1)
    assert results.mean_std([40.0, 44.0], "population") == (42.0, 2.0)              # population: / n
    m, s = results.mean_std([50.0, 51.0, 55.0])
    assert m == 52.0 and s == pytest.approx(math.sqrt(7.0), abs=1e-15)
    assert results.mean_std([45.0]) == (45.0, None) and results.mean_std([45.0], "population") == (45.0, 0.0)
    with pytest.raises(UserError):
        results.mean_std([1.0], "other")


def test_pair_table_arithmetic(runs):
    rows = results.collect([runs])
    assert len(rows) == 10
    (t,) = R.build_tables(rows)
    assert t.columns == ["D2→D1", "D1→D2"]  # ordered by target, then source (MM-SADA Table 1)
    assert [r[0] for r in t.rows] == ["source_only", "cia", "cia [sc=false]"]  # METHODS order, then tags
    _, cells, mean = t.row("source_only")
    assert cells["D2→D1"].mean == 42.0 and cells["D2→D1"].std == math.sqrt(8.0) and cells["D2→D1"].n == 2
    assert cells["D1→D2"].mean == 52.0 and cells["D1→D2"].std == pytest.approx(math.sqrt(7.0), abs=1e-15)
    assert mean == 47.0  # mean over pairs of the per-pair means (not over the 5 runs: 48.0)
    _, cells, mean = t.row("cia")
    assert cells["D2→D1"].std is None and mean is None and "D1→D2" not in cells
    _, cells, mean = t.row("cia [sc=false]")
    assert (cells["D2→D1"].mean, cells["D1→D2"].mean, mean) == (61.0, 72.0, 66.5)
    assert cells["D1→D2"].std == math.sqrt(8.0)
    (tp,) = R.build_tables(rows, std="population")
    assert tp.row("source_only")[1]["D2→D1"].std == 2.0
    assert tp.row("source_only")[1]["D1→D2"].std == pytest.approx(math.sqrt(14.0 / 3.0), abs=1e-15)
    (tm,) = R.build_tables(rows, metric="per_modality.rgb")
    assert tm.row("source_only")[1]["D2→D1"].mean == 37.0


def test_markdown_and_csv_written(runs, tmp_path):
    out = tmp_path / "report"
    written = R.write_report([runs], out, plots=False)
    md = (out / "report.md").read_text()
    assert "| method | D2→D1 | D1→D2 | mean |" in md
    assert "| source_only | 42.00 ± 2.83 | 52.00 ± 2.65 | 47.00 |" in md
    assert "| cia | 45.00 | – | – |" in md
    assert "| cia [sc=false] | 61.00 ± 1.41 | 72.00 ± 2.83 | 66.50 |" in md
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    so = rows[0]
    assert so["row"] == "source_only" and float(so["D2→D1 mean"]) == 42.0
    assert float(so["D2→D1 std"]) == math.sqrt(8.0) and so["D1→D2 n"] == "3" and float(so["mean"]) == 47.0
    assert rows[1]["D2→D1 std"] == "" and rows[1]["mean"] == ""
    assert (rows[2]["row"], rows[2]["method"], rows[2]["tag"]) == ("cia [sc=false]", "cia", "sc=false")
    assert set(written) == {"report.md", "report.csv"}


def test_default_out_is_the_first_folder_and_results_jsonl_input(runs, tmp_path):
    R.write_report([runs], plots=False)
    assert (runs / "report.md").is_file()
    # a sweep's results.jsonl (rows carry "run") gives the same table
    lines = [json.dumps({"run": d.name, **json.loads((d / "final.json").read_text())}) + "\n"
             for d in sorted(runs.iterdir()) if d.is_dir()]
    (runs / "results.jsonl").write_text("".join(lines))
    a = R.build_tables(results.collect([runs]))[0]
    b = R.build_tables(results.collect([runs / "results.jsonl"]))[0]
    assert [(r[0], {k: c.values for k, c in r[1].items()}, r[2]) for r in a.rows] == \
           [(r[0], {k: c.values for k, c in r[1].items()}, r[2]) for r in b.rows]
    with pytest.raises(UserError, match="no such run folder"):
        results.collect([tmp_path / "nothing"])


def test_epic100_columns(tmp_path):
    root = tmp_path / "epic"
    vals = [(46.0, 27.0, 18.0), (48.0, 29.0, 20.0)]
    for seed, (v, n, a) in enumerate(vals):
        write_run(root, "ta3n", "epic100_source", "epic100_target", seed, v, verb_top1=v, noun_top1=n,
                  action_top1=a, verb_top5=v + 30, noun_top5=n + 30, action_top5=a + 20)
    write_run(root, "source_only", "epic100_source", "epic100_target", 0, 40.0, verb_top1=40.0, noun_top1=20.0,
              action_top1=10.0, verb_top5=70.0, noun_top5=50.0, action_top5=30.0)
    (t,) = R.build_tables(results.collect([root]))
    assert t.columns == ["verb", "noun", "action"] and not t.mean_column
    _, cells, _ = t.row("ta3n")
    assert (cells["verb"].mean, cells["noun"].mean, cells["action"].mean) == (47.0, 28.0, 19.0)
    assert cells["action"].std == math.sqrt(2.0)
    (t5,) = R.build_tables(results.collect([root]), metric="top5")
    assert t5.row("ta3n")[1]["verb"].mean == 77.0
    R.write_report([root], plots=False)
    md = (root / "report.md").read_text()
    assert "| method | verb | noun | action |" in md
    assert "| ta3n | 47.00 ± 1.41 | 28.00 ± 1.41 | 19.00 ± 1.41 |" in md


def test_accuracy_curves_and_plot(runs, tmp_path):
    rows = results.collect([runs])
    curves = P.accuracy_curves(rows)
    steps, mean, sd = curves["D2→D1"]["source_only"]
    assert list(steps) == [10, 20, 30] and list(mean) == [40.0, 41.0, 42.0]
    assert sd[0] == math.sqrt(8.0)
    assert curves["D2→D1"]["cia"][2] is None  # one seed: no band
    path = P.plot_accuracy(rows, tmp_path / "acc.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_cli_report_and_tsne_on_a_trained_run(tmp_path):
    root = make_pair(tmp_path / "feat", "i3d", spatial=True, n=24, channels=16)
    b = root / "i3d"
    cfg = C.resolve("cia", "custom", None, source=str(b / "S_train.zarr"), target=str(b / "T_train.zarr"),
                    eval=str(b / "T_test.zarr"), out=str(tmp_path / "runs"), steps=8, stage1_steps=4,
                    eval_every=4, batch_source=8, batch_target=8, embed_dim=32, sc_dim=8)
    train([cfg], progress=False)
    run = tmp_path / "runs" / "cia_S_train-T_train_s0"
    cfg, pair, model, params = P.load_run(run)
    idx = P._subsample(pair.source.n, 20, 0)
    assert len(idx) == 20 and len(set(idx)) == 20  # at most max_points clips per domain
    before = P.pooled_features(pair.source, idx)
    after = P.adapted_features(cfg, pair, model, params, pair.source, idx)
    assert before["rgb"].shape == (20, 16) and after["flow"].shape == (20, 32)  # stores' C; embed_dim
    # heads.pt loaded into a fresh model reproduces the run's last evaluation
    import torch
    from torch.func import functional_call

    from adapt.method import Context
    ctx = Context(torch.tensor(0), {level: torch.tensor(0.0) for level in model.reversals})
    with torch.no_grad():
        scores = sum(functional_call(model, params, ({m: f[:, view].float() for m, f in pair.eval.feats.items()},
                                                     ctx))["verb"].softmax(-1)
                     for view in pair.eval_views())
    top1 = 100.0 * float((scores.argmax(-1) == pair.eval.verb).float().mean())
    assert top1 == pytest.approx(json.loads((run / "final.json").read_text())["final_top1"])
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--tsne", str(run), "--max-points", "20"])
    assert result.exit_code == 0, result.output
    assert "S→T" in result.output and "cia" in result.output
    for png in (tmp_path / "runs" / "accuracy.png", run / "tsne.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert (tmp_path / "runs" / "report.md").is_file() and (tmp_path / "runs" / "report.csv").is_file()
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no such run folder" in result.output


def test_a_cut_final_json_is_left_out_and_not_taken_for_complete(tmp_path):
    good, cut = tmp_path / "a_run", tmp_path / "b_run"
    good.mkdir()
    cut.mkdir()
    (good / "final.json").write_text(json.dumps({"method": "source_only", "source": "S", "target": "T",
                                                 "target_top1": 50.0, "seed": 0}))
    (cut / "final.json").write_text('{"method": "source_only", "target_to')
    stopped = tmp_path / "c_run.partial"
    stopped.mkdir()
    (stopped / "config.json").write_text("{}")
    skipped = []
    rows = results.collect([tmp_path], skipped)
    assert [r["target_top1"] for r in rows] == [50.0]
    assert skipped == [(str(cut), "final.json cut or unreadable"),
                       (str(stopped), "not complete (training now, or stopped before its end)")]
    assert results.read_final(cut / "final.json") is None
