"""Live trackers: a run and a sweep logged to TensorBoard, MLflow and Weights & Biases (offline), read back with each
library's own reader; the sweep's runs grouped as each tracker groups them; a tracker that is not installed is one
line and the run goes on."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from adapt import config as C
from adapt import sweeps as S
from adapt import tracking
from adapt import trainer as T
from featstore.synthetic import make_pair

SHORT = {"steps": 8, "stage1_steps": 4, "eval_every": 4, "last_eval_every": 4, "last_evals": 1, "batch_source": 4,
         "batch_target": 4, "embed_dim": 16}

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=False, n=24, channels=8)


def stores(root):
    b = Path(root) / "i3d"
    return [str(b / f"{n}.zarr") for n in ("S_train", "T_train", "T_test")]


def scalars(run_dir: Path) -> dict:
    """{tag: [(step, value)]} from the run's TensorBoard event files, with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list:
    """The records of the run's offline W&B file (``run-*.wandb``: W&B's record log, a 7-byte header then 32 KiB
    blocks of length-prefixed chunks, each record one of W&B's protobuf ``Record`` messages), parsed with W&B's own
    protobuf definitions."""
    import struct

    from wandb.proto import wandb_internal_pb2
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, part = 7, 32768, [], b""
    while pos < len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            out.append(rec)
    return out


def _key(item) -> str:
    return "/".join(item.nested_key) or item.key


def test_a_run_logs_its_settings_curves_and_final_numbers_to_each_tracker(root, tmp_path):
    s, t, e = stores(root)
    cfg = C.resolve("dann", "mmsada", {**SHORT, "log": "tensorboard,mlflow,wandb"}, source=s, target=t, eval=e,
                    out=str(tmp_path))
    final = T.train([cfg], progress=False)[0]
    run = tmp_path / T.run_name(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8] and set(rows[0]["loss"]) == {"cls", "adv", "video_adv"}
    # TensorBoard
    tb = scalars(run)
    assert [v for _, v in tb["target_top1"]] == pytest.approx([r["target_top1"] for r in rows])
    assert {"per_modality/rgb", "loss/adv", "validators/entropy"} <= set(tb)
    assert [st for st, _ in tb["loss/cls"]] == [4, 8]
    # MLflow: the local store beside the runs
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (exp,) = [x for x in client.search_experiments() if x.name == "adapt"]
    (mr,) = client.search_runs([exp.experiment_id])
    assert mr.info.run_name == T.run_name(cfg) and mr.data.tags["seed"] == "0" and mr.data.tags["invalid"] == "none"
    assert mr.data.params["w_adv"] == "1.0" and mr.data.params["method"] == "dann"
    assert [m.value for m in client.get_metric_history(mr.info.run_id, "target_top1")] == \
        pytest.approx([r["target_top1"] for r in rows])
    assert mr.data.metrics["final/target_top1"] == pytest.approx(final["target_top1"])
    assert {a.path for a in client.list_artifacts(mr.info.run_id)} >= {"final.json", "metrics.jsonl"}
    # W&B, offline: its run file
    recs = wandb_records(run)
    history = [json.loads(i.value_json) for r in recs if r.WhichOneof("record_type") == "history"
               for i in r.history.item if _key(i) == "target_top1"]
    assert history == pytest.approx([r["target_top1"] for r in rows])
    (info,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert info.display_name == T.run_name(cfg) and "seed=0" in info.tags
    config = {_key(i): json.loads(i.value_json) for i in info.config.update}
    assert config["w_adv"] == "1.0" and config["method"] == "dann"


def test_a_sweep_is_one_experiment_its_grid_point_and_seed_tags(root, tmp_path):
    s, t, e = stores(root)
    spec = {"name": "grid of dann", "methods": ["dann"], "pairs": [[s, t, e]], "seeds": [0, 1], "out": str(tmp_path),
            "set": SHORT, "grid": {"w_adv": [0.5, 1.0]}, "log": ["mlflow"]}
    res = S.run_sweep(spec, None, progress=False, max_stack=4)
    assert len(res.trained) == 4 and {r["runs_stacked"] for r in res.rows} == {4}  # stacked, each its own run
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (exp,) = [x for x in client.search_experiments() if x.name == "grid of dann"]
    found = client.search_runs([exp.experiment_id])
    assert sorted((r.data.tags["grid"], r.data.tags["seed"]) for r in found) == \
        [("w_adv=0.5", "0"), ("w_adv=0.5", "1"), ("w_adv=1", "0"), ("w_adv=1", "1")]
    by_name = {r.info.run_name: r for r in found}
    for row in res.rows:  # each stacked run's curve is its own
        hist = client.get_metric_history(by_name[row["run"]].info.run_id, "target_top1")
        assert [m.value for m in hist] == pytest.approx(row["target_top1_per_eval"])
    assert not list(tmp_path.glob("*/tb"))  # only what was asked


def test_without_the_package_a_run_says_what_it_would_log_and_goes_on(root, tmp_path, monkeypatch):
    s, t, e = stores(root)
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    buf = io.StringIO()
    cfg = C.resolve("source_only", "mmsada", {**SHORT, "log": "mlflow"}, source=s, target=t, eval=e,
                    out=str(tmp_path))
    T.train([cfg], Console(file=buf, width=300), progress=False)
    text = buf.getvalue()
    assert "mlflow not installed: this run's settings and curves go to metrics.jsonl only" in text
    assert "pip install mlflow" in text and (tmp_path / T.run_name(cfg) / "final.json").is_file()
    assert tracking.chosen(["auto"]) == []  # auto: nothing when TensorBoard is not there


def test_an_unknown_tracker_is_refused_before_training(root, tmp_path):
    from featstore.errors import UserError
    s, t, e = stores(root)
    with pytest.raises(UserError, match="'tensorbored' is not a tracker"):
        C.resolve("source_only", "mmsada", {**SHORT, "log": "tensorbored"}, source=s, target=t, eval=e,
                  out=str(tmp_path))  # refused with the settings, before anything is read
    assert not any(tmp_path.iterdir())
