"""Training on stores larger than the memory budget: streamed = in memory (same seed, same numbers), the memory
plan and its refusal, version-1 stores, the converter (in place, to a new path, resumed after SIGKILL)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adapt import config as C
from adapt import data as D
from adapt.trainer import train
from featstore.errors import UserError
from featstore.convert import convert_store
from featstore.store import FeatureStore
from featstore.synthetic import make_pair
from tests import reference

SMALL = dict(steps=8, stage1_steps=4, eval_every=4, last_eval_every=4, batch_source=8, batch_target=8,
             embed_dim=32, sc_dim=8, trn_dim=16)


@pytest.fixture(scope="module")
def i3d_root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=True, n=24, channels=16, chunk_clips=5)


@pytest.fixture(scope="module")
def tbn_root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "tbn", spatial=True, n=24, units=25, channels=8, nouns=6,
                     audio=True, chunk_clips=4)


def cfg_for(root, method, out, backbone="i3d", dataset="mmsada", **kw):
    b = Path(root) / backbone
    return C.resolve(method, dataset, None, backbone=backbone, out=str(out), source=str(b / "S_train.zarr"),
                     target=str(b / "T_train.zarr"), eval=str(b / "T_test.zarr"), **{**SMALL, **kw})


def streamed_budget(cfg) -> str:
    """A budget that holds the evaluation store and the others' streaming buffers, not more (the planner's sums)."""
    stores = {r: FeatureStore.open(p) for r, p in (("source", cfg.source), ("target", cfg.target),
                                                  ("eval", cfg.eval))}
    sizes, need = D.memory_needs(cfg, stores, stores["source"].modalities)
    assert sizes["source"] > need["source"] and sizes["target"] > need["target"]
    return str(sizes["eval"] + need["source"] + need["target"] + need["work"])


def heads(out, method, name="S_train-T_train"):
    return torch.load(Path(out) / f"{method}_{name}_s0" / "heads.pt")


@pytest.mark.parametrize("method, backbone, kw", [
    ("mmsada", "i3d", {}),                               # pooled on read from 3x3 maps, correspondence negatives
    ("cia", "i3d", {}),                                  # the maps themselves
    ("ta3n", "tbn", {"epochs": 2, "lr_epochs": [2], "steps": None, "dataset": "epic100"}),  # three modalities
    ("source_only", "tbn", {"standardise": True}),       # statistics computed from the streamed store
    ("source_only", "i3d", {"batch_target": 0}),         # MM-SADA's source-only: no target clip read a step
])
def test_streamed_run_equals_the_in_memory_run(i3d_root, tbn_root, tmp_path, method, backbone, kw):
    root = i3d_root if backbone == "i3d" else tbn_root
    kw = dict(kw)
    dataset = kw.pop("dataset", "mmsada")
    memory = cfg_for(root, method, tmp_path / "memory", backbone, dataset, **kw)
    streamed = cfg_for(root, method, tmp_path / "streamed", backbone, dataset, **kw)
    streamed.memory_budget = streamed_budget(streamed)
    pair = D.DomainPair(streamed, torch.device("cpu"))
    assert pair.source.streamed and pair.target.streamed and not pair.eval.streamed, pair.memory_line
    assert "source streamed" in pair.memory_line and "eval in memory" in pair.memory_line
    a = train([memory], progress=False)[0]
    b = train([streamed], progress=False, pair=pair)[0]
    assert a["target_top1_per_eval"] == b["target_top1_per_eval"] and a["per_class_recall"] == b["per_class_recall"]
    ha, hb = heads(tmp_path / "memory", method), heads(tmp_path / "streamed", method)
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_streamed_evaluation_store(i3d_root, tmp_path):
    memory = cfg_for(i3d_root, "source_only", tmp_path / "memory")
    streamed = cfg_for(i3d_root, "source_only", tmp_path / "streamed", memory_budget="1")
    sizes = D.plan_memory({"source": 100, "target": 100, "eval": 100}, {"source": 1, "target": 1, "eval": 1}, 3,
                          "test")
    assert sizes[0] == {"source", "target", "eval"}
    pair = D.DomainPair(memory, torch.device("cpu"))
    pair.eval = D.load_domain(Path(streamed.eval), "T", pair.modalities, torch.device("cpu"), False, streamed=True)
    a = train([memory], progress=False)[0]
    b = train([streamed], progress=False, pair=pair)[0]
    assert a["target_top1_per_eval"] == b["target_top1_per_eval"]


def test_memory_plan_and_one_line_refusal_before_reading(i3d_root, tmp_path, monkeypatch):
    streamed, line = D.plan_memory({"source": 50, "target": 80, "eval": 10}, {"source": 5, "target": 5, "eval": 5},
                                   70, "--memory-budget")
    assert streamed == {"target"}  # eval and source fit with target's buffers, target does not
    assert line == ("memory budget 0.1 kB (--memory-budget): source in memory (0.1 kB), target streamed (0.1 kB), "
                    "eval in memory (0.0 kB)")
    called = []
    monkeypatch.setattr(D, "load_domain", lambda *a, **k: called.append(a))
    cfg = cfg_for(i3d_root, "source_only", tmp_path, memory_budget="2K")
    with pytest.raises(UserError, match=r"memory budget .* cannot hold even the streaming buffers") as e:
        D.DomainPair(cfg, torch.device("cpu"))
    assert "\n" not in str(e.value) and not called
    assert D.parse_bytes("24G") == 24 << 30 and D.parse_bytes("1.5GB") == int(1.5 * (1 << 30))
    with pytest.raises(UserError, match="expected a positive size"):
        D.parse_bytes("lots")


def test_version1_store_trains_to_the_same_numbers(tmp_path):
    v1 = make_pair(tmp_path / "v1", "i3d", spatial=True, n=24, channels=16, version=1, chunk_clips=5)
    v2 = make_pair(tmp_path / "v2", "i3d", spatial=True, n=24, channels=16, version=2, chunk_clips=5)
    assert FeatureStore.open(v1 / "i3d" / "S_train.zarr").version == 1
    a = train([cfg_for(v1, "mmsada", tmp_path / "a")], progress=False)[0]
    cfg = cfg_for(v1, "mmsada", tmp_path / "c")
    cfg.memory_budget = streamed_budget(cfg)  # streamed from a version-1 store: whole chunks read
    c = train([cfg], progress=False)[0]
    b = train([cfg_for(v2, "mmsada", tmp_path / "b")], progress=False)[0]
    assert a["target_top1_per_eval"] == b["target_top1_per_eval"] == c["target_top1_per_eval"]


def _same_store(a: Path, b: Path) -> None:
    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    assert sb.version == 2
    done = sa.done_mask()
    for m in sa.modalities:
        assert np.array_equal(reference.features(sa, m)[done], reference.features(sb, m)[done]), m  # features of the clips that have them
    for k in ("id", "verb_class", "noun_class", "start_frame", "stop_frame", "done", "error"):
        assert np.array_equal(sa.meta(k), sb.meta(k)), k
    keep = ("backbone", "sampling", "preprocessing", "manifest_sha256", "checkpoints", "window_shapes", "failed")
    assert {k: sa.attrs.get(k) for k in keep} == {k: sb.attrs.get(k) for k in keep}


def test_convert_to_a_new_path_and_in_place(tmp_path):
    root = make_pair(tmp_path / "f", "i3d", spatial=True, n=24, channels=16, version=1, chunk_clips=5)
    src = root / "i3d" / "S_train.zarr"
    st = FeatureStore.open(src, mode="r+")
    st.mark_failed([3], ["synthetic failure"])
    st.group["done"][3] = False
    st.finalise()
    out = convert_store(src, tmp_path / "new.zarr")
    _same_store(src, out)
    copy = tmp_path / "copy.zarr"
    subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
    assert convert_store(copy) == copy
    _same_store(src, copy)
    assert not Path(str(copy) + ".converting").exists() and not Path(str(copy) + ".old").exists()


def test_converter_resumes_after_sigkill_and_between_its_renames(tmp_path):
    root = make_pair(tmp_path / "f", "i3d", spatial=True, n=24, channels=16, version=1, chunk_clips=3)
    src = root / "i3d" / "S_train.zarr"
    ref = tmp_path / "ref.zarr"
    subprocess.run(["cp", "-r", str(src), str(ref)], check=True)
    code = ("import os, signal, sys\nfrom featstore.convert import convert_store\n"
            "def progress(done, total):\n    if done == 3:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"convert_store({str(src)!r}, progress=progress)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    partial = FeatureStore.open(str(src) + ".converting")
    assert 0 < partial.done_mask().sum() < 24  # killed part-way: 3 of 8 chunks written
    assert convert_store(src) == src  # resumed
    _same_store(ref, src)
    # killed between the renames: the old store renamed aside, the new one beside it
    src2 = root / "i3d" / "T_train.zarr"
    ref2 = tmp_path / "ref2.zarr"
    subprocess.run(["cp", "-r", str(src2), str(ref2)], check=True)
    convert_store(src2, Path(str(src2) + ".converting"))
    src2.rename(str(src2) + ".old")
    assert convert_store(src2) == src2
    _same_store(ref2, src2)
    assert not Path(str(src2) + ".old").exists()


def test_a_flipped_bit_fails_its_checksum(tmp_path):
    root = make_pair(tmp_path / "f", "i3d", spatial=True, n=24, channels=16, chunk_clips=5)
    src = root / "i3d" / "T_train.zarr"
    chunk = FeatureStore.open(src).chunk_file("rgb", 0)
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1 << 5
    chunk.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"rgb features of clips 0..4 do not decode \(.*chunk: rgb/c/0/0/0/0/0\)"):
        FeatureStore.open(src).reader("rgb").rows(0, 5)


def test_int8_form_is_within_half_a_step_of_float16_and_trains(i3d_root, tmp_path):
    """feature_form=int8: round(x / s_c) with s_c = max |x_c| / 127 per channel; the batches the heads see are
    the float16 features to within s_c / 2, and the run trains."""
    from adapt.data import Gatherer
    cfg16 = cfg_for(i3d_root, "cia", tmp_path / "a")
    cfg8 = cfg_for(i3d_root, "cia", tmp_path / "b", feature_form="int8")
    p16, p8 = D.DomainPair(cfg16, torch.device("cpu")), D.DomainPair(cfg8, torch.device("cpu"))
    assert p8.source.feats["rgb"].dtype == torch.int8 and p8.feature_bytes * 2 == p16.feature_bytes
    idx = torch.arange(10)[None]
    units = torch.zeros(1, 10, 1, dtype=torch.int64)
    a = Gatherer(torch.device("cpu"))([(p16.source, (idx, units), None)], ["rgb", "flow"])
    b = Gatherer(torch.device("cpu"))([(p8.source, (idx, units), None)], ["rgb", "flow"])
    for m in ("rgb", "flow"):
        half_step = p8.source.scales[m].view(-1, 1, 1) / 2
        assert ((a[m] - b[m]).abs() <= half_step * 1.001 + 1e-3).all()
    final = train([cfg8], progress=False, pair=p8)[0]
    assert 0 <= final["target_top1"] <= 100


def test_a_corrupt_done_chunk_is_one_line_for_the_trainer(tmp_path):
    root = make_pair(tmp_path / "f", "i3d", spatial=True, n=24, channels=16, chunk_clips=5)
    target = root / "i3d" / "T_train.zarr"
    chunk = FeatureStore.open(target).chunk_file("done", 1)
    chunk.write_bytes(b"\x00" + chunk.read_bytes()[1:])
    cfg = cfg_for(root, "source_only", tmp_path / "runs")
    with pytest.raises(UserError, match=r"T_train.zarr: its 'done' array does not decode .*adapt extract") as e:
        train([cfg], progress=False)
    assert "\n" not in str(e.value)
