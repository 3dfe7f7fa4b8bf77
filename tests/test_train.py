"""The trainer end to end on small stores: every method, the protocol, determinism, stacking, bad inputs."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from adapt import config as C
from adapt.methods import REGISTRY as METHODS
from adapt import trainer as T
from adapt.trainer import TrainingError, train
from cli import app
from featstore.errors import UserError
from featstore.synthetic import make_pair, make_store

FAST = dict(steps=12, stage1_steps=4, eval_every=4, last_eval_every=4, batch_source=8, batch_target=8, embed_dim=32, sc_dim=8)


@pytest.fixture(scope="module")
def i3d_root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=True, n=24, channels=16)


@pytest.fixture(scope="module")
def tbn_root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "tbn", spatial=True, n=24, units=10, channels=16,
                     nouns=6, audio=True)


def cfg_for(root, method, out, backbone="i3d", dataset="demo", **kw):
    base = Path(root) / backbone
    s = {**FAST, "source": str(base / "S_train.zarr"), "target": str(base / "T_train.zarr"),
         "eval": str(base / "T_test.zarr"), **kw}
    return C.resolve(method, dataset, None, backbone=backbone, out=str(out), **s)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_end_to_end_i3d(i3d_root, tmp_path, method):
    cfg = cfg_for(i3d_root, method, tmp_path)
    final = train([cfg], progress=False)[0]
    run = tmp_path / f"{method}_S_train-T_train_s0"
    saved = json.loads((run / "final.json").read_text())
    assert saved == json.loads(json.dumps(final))
    for key in ("method", "source", "target", "seed", "target_top1", "target_top1_per_eval", "per_modality"):
        assert key in saved
    assert len(saved["target_top1_per_eval"]) == 3 and 0 <= saved["target_top1"] <= 100
    streams = {"ta3n": {"rgb+flow"}, "m3em": {"rgb+flow"}}.get(method, {"rgb", "flow"})
    assert set(saved["per_modality"]) == set(saved["streams"]) == streams
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "config.json").read_text())["method"] == method
    assert (run / "heads.pt").is_file()


@pytest.mark.parametrize("method", ["source_only", "ta3n", "cia", "m3em", "contrastive"])
def test_tbn_three_modalities_verb_noun(tbn_root, tmp_path, method):
    cfg = cfg_for(tbn_root, method, tmp_path, backbone="tbn")
    final = train([cfg], progress=False)[0]
    assert set(final["per_modality"]) == set(final["streams"])
    assert "".join(sorted("".join(final["streams"]).replace("+", ""))) == "".join(sorted("rgbflowaudio"))
    for k in ("verb_top1", "noun_top1", "action_top1", "verb_top5", "noun_top5", "action_top5"):
        assert 0 <= final[k] <= 100
    assert final["action_top1"] <= min(final["verb_top1"], final["noun_top1"]) + 1e-9
    assert final["verb_top5"] >= final["verb_top1"]


def test_challenge_json(tbn_root, tmp_path):
    cfg = cfg_for(tbn_root, "source_only", tmp_path, backbone="tbn",
                  challenge=str(Path(tbn_root) / "tbn" / "T_test.zarr"))
    train([cfg], progress=False)
    doc = json.loads((tmp_path / "source_only_S_train-T_train_s0" / "test.json").read_text())
    assert doc["challenge"] == "domain_adaptation" and len(doc["results"]) == 12
    first = next(iter(doc["results"].values()))
    assert len(first["verb"]) == 4 and len(first["noun"]) == 6
    assert abs(sum(first["verb"].values()) - 1) < 1e-4


def test_last_nine_protocol_and_learning(i3d_root, tmp_path):
    cfg = cfg_for(i3d_root, "source_only", tmp_path, steps=60, stage1_steps=60, eval_every=5, last_eval_every=5)
    final = train([cfg], progress=False)[0]
    per_eval = final["target_top1_per_eval"]
    assert len(per_eval) == 12 and final["eval_steps"][-1] == 60
    assert final["target_top1"] == pytest.approx(float(np.mean(per_eval[-9:])))
    assert final["target_top1"] > 50  # 4 classes: the heads learn the class structure


def test_same_seed_same_numbers(i3d_root, tmp_path):
    a = train([cfg_for(i3d_root, "mmsada", tmp_path / "a")], progress=False)[0]
    b = train([cfg_for(i3d_root, "mmsada", tmp_path / "b")], progress=False)[0]
    assert a["target_top1_per_eval"] == b["target_top1_per_eval"] and a["per_class_recall"] == b["per_class_recall"]
    wa = torch.load(tmp_path / "a" / "mmsada_S_train-T_train_s0" / "heads.pt")
    wb = torch.load(tmp_path / "b" / "mmsada_S_train-T_train_s0" / "heads.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", ["cia", "contrastive", "mcd"])
def test_stacked_runs_equal_separate_runs(i3d_root, tmp_path, method):
    cfgs = [cfg_for(i3d_root, method, tmp_path / "stacked", seed=s, steps=8) for s in (0, 1)]
    cfgs[1].w_cls = 0.5  # loss weights may differ inside a stack
    stacked = train(cfgs, progress=False)
    for c, st in zip(cfgs, stacked):
        c1 = cfg_for(i3d_root, method, tmp_path / "alone", seed=c.seed, steps=8)
        c1.w_cls = c.w_cls
        alone = train([c1], progress=False)[0]
        assert alone["target_top1_per_eval"] == st["target_top1_per_eval"]
        wa = torch.load(tmp_path / "alone" / f"{method}_S_train-T_train_s{c.seed}" / "heads.pt")
        ws = torch.load(tmp_path / "stacked" / f"{method}_S_train-T_train_s{c.seed}" / "heads.pt")
        for k in wa:
            torch.testing.assert_close(wa[k], ws[k], rtol=1e-4, atol=1e-5)


def test_gatherer_equals_plain_indexing_and_reuses_its_buffers(i3d_root):
    from adapt.data import Gatherer, load_domain, standardisation
    dom = load_domain(Path(i3d_root) / "i3d" / "S_train.zarr", "S", ["rgb", "flow"], torch.device("cpu"), True)
    stats = standardisation(dom)
    for m, (mean, std) in stats.items():   # the block-wise float64 statistics equal the direct ones
        x = dom.feats[m].float()
        torch.testing.assert_close(mean.flatten(), x.mean(dim=(0, 1, 3, 4)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std.flatten(), x.var(dim=(0, 1, 3, 4), unbiased=False).add(1e-5).sqrt(),
                                   rtol=1e-4, atol=1e-5)
    g = Gatherer(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    idx_a, idx_b = (torch.randint(0, dom.n, (2, b), generator=gen) for b in (5, 3))
    u_a, u_b = (torch.randint(0, dom.units, (2, b, 1), generator=gen) for b in (5, 3))
    out = g([(dom, (idx_a, u_a), stats), (dom, (idx_b, u_b), None)], ["rgb", "flow"])
    for m in ("rgb", "flow"):
        f = dom.feats[m]
        want_a = (f[idx_a.unsqueeze(-1), u_a].float() - stats[m][0]) / stats[m][1]
        want_b = f[idx_b.unsqueeze(-1), u_b].float()
        assert out[m].shape == (2, 8, 1, *f.shape[2:]) and out[m].dtype == torch.float32
        torch.testing.assert_close(out[m][:, :5], want_a, rtol=1e-6, atol=1e-6)
        assert torch.equal(out[m][:, 5:], want_b)
    first = out["rgb"].data_ptr()
    again = g([(dom, (idx_b, u_b), None), (dom, (idx_a, u_a), stats)], ["rgb", "flow"])
    assert again["rgb"].data_ptr() == first   # the same buffer, refilled


def test_refuses_store_of_another_backbone(i3d_root, tbn_root, tmp_path):
    cfg = cfg_for(i3d_root, "source_only", tmp_path, target=str(Path(tbn_root) / "tbn" / "T_train.zarr"))
    with pytest.raises(UserError, match="stores do not fit together: backbone"):
        train([cfg], progress=False)


def test_refuses_class_count_mismatch(i3d_root, tmp_path):
    shape = {"rgb": (16, 3, 3), "flow": (16, 3, 3)}
    ev = make_store(tmp_path / "E.zarr", 12, 6, 3, shape, 1.0, 5)
    cfg = cfg_for(i3d_root, "source_only", tmp_path, eval=str(ev))
    with pytest.raises(UserError, match="verb class 5 outside the 4 classes of the source store"):
        train([cfg], progress=False)  # its labels lie outside the source's class space


def test_refuses_nan_features(i3d_root, tmp_path):
    shape = {"rgb": (16, 3, 3), "flow": (16, 3, 3)}
    bad = make_store(tmp_path / "T_nan.zarr", 24, 4, 3, shape, 1.0, 2)
    arr = zarr.open_group(str(bad), mode="r+")["flow"]
    block = arr[5]
    block[0, 0, 0, 0] = np.nan
    arr[5] = block
    cfg = cfg_for(i3d_root, "source_only", tmp_path, target=str(bad))
    with pytest.raises(UserError, match="non-finite flow features in clip T_nan_5"):
        train([cfg], progress=False)


@pytest.mark.parametrize("damage,says", [("deleted", "chunk 0 missing"), ("truncated", "features of clips 0..23 .*do not decode")])
def test_refuses_store_with_a_damaged_chunk(i3d_root, tmp_path, damage, says):
    from featstore.store import FeatureStore
    shape = {"rgb": (16, 3, 3), "flow": (16, 3, 3)}
    bad = make_store(tmp_path / "T_cut.zarr", 24, 4, 3, shape, 1.0, 2)
    chunk = FeatureStore.open(bad).chunk_file("rgb", 0)
    if damage == "deleted":
        chunk.unlink()          # zarr would read the fill value (zeros) for it
    else:
        chunk.write_bytes(chunk.read_bytes()[:-7])
    cfg = cfg_for(i3d_root, "source_only", tmp_path, target=str(bad))
    with pytest.raises(UserError, match=rf"T_cut.zarr: rgb {says}.*re-run `adapt extract`"):
        train([cfg], progress=False)


def test_non_finite_loss_stops_naming_step_and_term(i3d_root, tmp_path):
    cfg = cfg_for(i3d_root, "source_only", tmp_path, lr=1e38, lr_stage2=1e38, momentum=0.0)
    with pytest.raises(TrainingError, match=r"loss term 'cls' is not finite at step \d+"):
        train([cfg], progress=False)


def test_full_disk_leaves_no_complete_looking_result(i3d_root, tmp_path, monkeypatch):
    import adapt.trainer as T

    real = T._write

    def full(path, text):
        if path.name == "final.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(T, "_write", full)
    cfg = cfg_for(i3d_root, "source_only", tmp_path)
    with pytest.raises(UserError, match="No space left on device.*nothing was put in its place"):
        train([cfg], progress=False)
    run = tmp_path / "source_only_S_train-T_train_s0"
    assert not run.exists()  # the run's folder appears only when complete


def test_failed_clips_are_left_out(tmp_path):
    shape = {"rgb": (8,), "flow": (8,)}
    root = tmp_path / "i3d"
    root.mkdir()
    s = make_store(root / "S_train.zarr", 20, 4, 2, shape, 0.0, 1, failed=3)
    t = make_store(root / "T_train.zarr", 20, 4, 2, shape, 1.0, 2)
    e = make_store(root / "T_test.zarr", 10, 4, 2, shape, 1.0, 3)
    cfg = C.resolve("source_only", "demo", None, source=str(s), target=str(t), eval=str(e), out=str(tmp_path),
                    spatial=False, **{k: v for k, v in FAST.items() if k != "sc_dim"})
    from adapt.data import DomainPair
    pair = DomainPair(cfg, torch.device("cpu"))
    assert pair.source.n == 17 and pair.target.verb.eq(-1).all()  # target labels are not loaded


def test_cli_train_and_errors(i3d_root, tmp_path):
    runner = CliRunner()
    base = Path(i3d_root) / "i3d"
    args = ["train", "--method", "cia", "--source", str(base / "S_train.zarr"), "--target",
            str(base / "T_train.zarr"), "--eval", str(base / "T_test.zarr"), "--out", str(tmp_path), "--quiet",
            "--set", "steps=8", "--set", "eval_every=4", "--set", "batch_source=8", "--set", "batch_target=8",
            "--set", "sc=false"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "target top-1" in result.output
    saved = json.loads((tmp_path / "cia_S_train-T_train_s0" / "config.json").read_text())
    assert saved["sc"] is False and saved["mc"] is True and saved["w_frame_adv"] == 0.5
    result = runner.invoke(app, args[:-2] + ["--set", "nonsense=1"])
    assert result.exit_code == 2 and "'nonsense' is not a setting of method cia" in result.output
    result = runner.invoke(app, ["train", "--method", "nope", "--source", "D1", "--target", "D2"])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = runner.invoke(app, ["train", "--source", str(tmp_path / "missing.zarr"), "--target", "D2"])
    assert result.exit_code == 2 and "not a feature store" in result.output


def test_runs_with_other_active_terms_do_not_stack(i3d_root, tmp_path):
    a = cfg_for(i3d_root, "mmsada", tmp_path, seed=0)
    b = cfg_for(i3d_root, "mmsada", tmp_path, seed=1, w_adv=0.0)  # no discriminators: another architecture
    with pytest.raises(ValueError, match="must share stores and architecture"):
        train([a, b], progress=False)


@pytest.mark.parametrize("method", ["mmsada", "cia"])
def test_stacked_linear_weights_take_their_gradients_contiguous_without_a_copy(i3d_root, tmp_path, method):
    # under vmap each linear weight's gradient arrives laid out as the transpose of a contiguous (K, in, out)
    # tensor; the trainer's leaf is that contiguous tensor (the model sees its transpose), so autograd hands the
    # gradient over as it is and the fused optimiser works on contiguous tensors
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    from adapt.data import DomainPair
    from adapt.method import Context, load
    from adapt.model import Inputs
    from adapt.step import gradient_layout

    cfg = cfg_for(i3d_root, method, tmp_path)
    pair = DomainPair(cfg, torch.device("cpu"))
    M = load(method)
    inputs = Inputs(tuple(pair.modalities), pair.feature_shapes, pair.verb_classes, 0, pair.heads_units)
    models = [M(cfg, inputs) for _ in range(2)]
    stacked, buffers = stack_module_state(models)
    leaves, params = gradient_layout({k: v.detach() for k, v in stacked.items()}, models[0], 2)
    for v in leaves.values():
        v.requires_grad_(True)
    linear = [f"{n}.weight" for n, m in models[0].named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) >= 4
    seen = {}
    for name in linear:
        assert leaves[name].is_contiguous()  # what the fused optimiser wants
        torch.testing.assert_close(params()[name], stacked[name], rtol=0, atol=0)  # what the model sees
        leaves[name].register_hook(lambda g, name=name: seen.__setitem__(name, g.stride()))
    template = copy.deepcopy(models[0]).to("meta")
    B = cfg.batch_source
    x = {m: torch.randn(2, 2 * B, pair.heads_units, *pair.feature_shapes[m]) for m in pair.modalities}
    y = torch.randint(0, pair.verb_classes, (2, B))
    idx = torch.arange(B).expand(2, B)
    state = models[0].initial_state(pair.source.n, pair.target.n, torch.device("cpu"))

    def one(p, b, x, y, idx, key):
        grl = {level: torch.tensor(0.5) for level in M.reversals}
        ctx = Context(key, grl, B, state, {"y_s": y, "idx_s": idx, "idx_t": idx})
        out = functional_call(template, (p, b), (x, ctx))
        return sum(getattr(template, t)(out, ctx) for t in cfg.active_terms(2))

    vmap(one, in_dims=(0, 0, 0, 0, 0, 0), randomness="error")(params(), buffers, x, y, idx, torch.tensor([3, 4])) \
        .sum().backward()
    got = {n: s for n, s in seen.items()}
    assert set(got) == {n for n in linear if leaves[n].grad is not None} and got
    for name, stride in got.items():  # strides of size-1 dimensions do not matter
        p = leaves[name]
        assert [s for s, n in zip(stride, p.shape) if n > 1] == [s for s, n in zip(p.stride(), p.shape) if n > 1], name


def test_run_folders_are_written_whole_and_never_replaced_unasked(i3d_root, tmp_path, monkeypatch):
    """A complete run survives a re-run (refused without --overwrite), a refused setting, a run that fails half way,
    and a second writer (its lock); with --overwrite the new run replaces it whole."""
    import fcntl
    import os

    from adapt.runs import RunFolder
    run = tmp_path / "source_only_S_train-T_train_s0"
    first = train([cfg_for(i3d_root, "source_only", tmp_path)], progress=False)[0]
    saved = (run / "final.json").read_text()
    with pytest.raises(UserError, match="a complete run is there; pass --overwrite") as e:
        train([cfg_for(i3d_root, "source_only", tmp_path)], progress=False)
    assert "\n" not in str(e.value) and (run / "final.json").read_text() == saved
    with pytest.raises(UserError, match="steps=0"):
        cfg_for(i3d_root, "source_only", tmp_path, steps=0)
    # a run that fails half way (here: an evaluation that raises) leaves the complete one in place
    monkeypatch.setattr(T.metrics, "accuracy", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train([cfg_for(i3d_root, "source_only", tmp_path, seed=0)], progress=False, overwrite=True)
    monkeypatch.undo()
    assert (run / "final.json").read_text() == saved  # and, stopped before its first evaluation, left nothing
    assert not (tmp_path / (run.name + ".partial")).exists()
    # a second writer: the lock is held (as by another process's training)
    fd = os.open(tmp_path / f".{run.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(UserError, match="another process is training this run now"):
            train([cfg_for(i3d_root, "source_only", tmp_path)], progress=False, overwrite=True)
    finally:
        os.close(fd)
    # asked: replaced whole (the partial folder of the failed run cleared)
    again = train([cfg_for(i3d_root, "source_only", tmp_path, steps=8, eval_every=4)], progress=False,
                  overwrite=True)[0]
    assert json.loads((run / "final.json").read_text())["steps"] == 8 != first["steps"]
    assert json.loads((run / "config.json").read_text())["steps"] == 8 == again["steps"]
    assert not (tmp_path / (run.name + ".partial")).exists()
    # a replacement cut between its two renames: the old run is found whole again
    run.rename(tmp_path / (run.name + ".replaced"))
    with pytest.raises(UserError, match="a complete run is there"):
        RunFolder(run).claim()  # restores it first, then refuses to replace it unasked
    assert json.loads((run / "final.json").read_text())["steps"] == 8


def test_two_sweeps_into_one_out(i3d_root, tmp_path):
    """The second sweep meets the first's lock on a run and stops in one line; nothing of the first is mixed."""
    import fcntl
    import os

    from adapt import sweeps as S
    b = Path(i3d_root) / "i3d"
    spec = {"methods": ["source_only"], "pairs": [[str(b / "S_train.zarr"), str(b / "T_train.zarr"),
                                                   str(b / "T_test.zarr")]], "seeds": [0], "out": str(tmp_path),
            "set": {"steps": 8, "stage1_steps": 4, "eval_every": 4, "batch_source": 8, "batch_target": 8,
                    "embed_dim": 32}}
    run = S.expand(spec)[0]
    fd = os.open(tmp_path / f".{run.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first sweep, training this run
    try:
        with pytest.raises(UserError, match="another process is training this run now"):
            S.run_sweep(spec, progress=False)
    finally:
        os.close(fd)
    assert not run.dir.exists()
