"""The methods train as their reference code does: which loss terms act at which steps with which weights, the
gradient-reversal coefficients, learning rates, clipping, sampling, TA3N's model shapes, and the registry's facts."""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adapt import config as C
from adapt import methods, objectives
from adapt import step
from adapt import train as T
from adapt.data import EpochSampler, draw_batch
from adapt.methods.mmsada import EPIC55_BASE
from adapt.methods.ta3n import EPIC100_BASE
from adapt.schedule import LEVELS, Schedule
from featstore.synthetic import make_pair

TINY = dict(batch_source=8, batch_target=8, embed_dim=32, sc_dim=8, trn_dim=16, eval_every=4, last_eval_every=4)


@pytest.fixture(scope="module")
def i3d_root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=False, n=24, channels=16)


@pytest.fixture(scope="module")
def tbn_root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "tbn", spatial=False, n=24, units=25, channels=16, nouns=6,
                     audio=True)


def resolve(root, method, dataset, backbone="i3d", out="runs", overrides=None, **kw):
    b = Path(root) / backbone
    paths = dict(source=str(b / "S_train.zarr"), target=str(b / "T_train.zarr"), eval=str(b / "T_test.zarr"))
    return C.resolve(method, dataset, overrides, backbone=backbone, out=str(out), **{**paths, **TINY, **kw})


def trace(monkeypatch, cfg):
    """Train ``cfg`` alone and record, per step, the terms that act with their weights, the GRL coefficients, the
    learning rate and whether gradients were clipped."""
    steps, grl, lrs, clipped = [], [], [], []
    real_total, real_grl, real_lr, real_clip = step.phase_total, Schedule.grl, Schedule.lr, step.clip_per_run

    def total(phase, now, terms, w, cfg_):
        steps.append((phase, {t: round(float(w[t]), 6) for t in sorted(now)}))
        return real_total(phase, now, terms, w, cfg_)

    def clip(leaves, max_norm, K):
        clipped.append(max_norm)
        return real_clip(leaves, max_norm, K)

    monkeypatch.setattr(step, "phase_total", total)
    monkeypatch.setattr(step, "clip_per_run", clip)
    monkeypatch.setattr(Schedule, "grl", lambda self, c, s: grl.append(real_grl(self, c, s)) or grl[-1])
    monkeypatch.setattr(Schedule, "lr", lambda self, c, s: lrs.append(real_lr(self, c, s)) or lrs[-1])
    final = T.train([cfg], progress=False)[0]
    return final, steps, np.array(grl), lrs, clipped


def warm(p, gamma):
    return 2 / (1 + math.exp(-gamma * p)) - 1


# ------------------------------------------------------------------------------------------------------------
# the registry


def test_every_fact_is_a_setting_and_the_defaults_are_the_mmsada_codes():
    names = {f.name for f in dataclasses.fields(C.TrainConfig)}
    for m in methods.REGISTRY.values():
        for f in (*m.base, *m.facts):
            assert f.setting is None or f.setting in names, (m.name, f.setting)
            assert f.source, (m.name, f.setting)
            if f.setting in names and f.value is not None and f.form == "code" and not f.when:
                C.typed_value(f.setting, f.value)  # a value of the setting's type
    defaults = C.TrainConfig()
    for f in EPIC55_BASE:
        if f.setting:
            assert getattr(defaults, f.setting) == f.value, f.setting
    # the EPIC-55 base names every setting the EPIC-100 base changes, so a method built on MM-SADA's code is that
    # code on EPIC-100 too
    assert {f.setting for f in EPIC100_BASE if f.setting} <= {f.setting for f in EPIC55_BASE if f.setting}
    assert C.DATASETS["epic100"] == {f.setting: f.value for f in EPIC100_BASE if f.setting}


def test_readme_method_table_is_the_registrys():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert methods.markdown_table() in readme


def test_the_paper_form_is_a_setting(i3d_root):
    code = resolve(i3d_root, "mmsada", "mmsada")
    paper = resolve(i3d_root, "mmsada", "mmsada", overrides={"form": "paper"})
    assert (code.optimizer, code.lr_stage2, code.w_cls, code.w_corr, code.beta_adv) == ("sgd", None, 0.2, 1.0, 0.2)
    assert (paper.optimizer, paper.lr_stage2, paper.w_cls, paper.w_corr, paper.beta_adv) == ("adam", 2e-4, 1.0, 5.0,
                                                                                            1.0)
    assert resolve(i3d_root, "mcd", "mmsada", overrides={"form": "paper"}).mcd_form == "three_step"
    assert resolve(i3d_root, "mmd", "mmsada", overrides={"form": "paper"}).mmd_kernels == "dan"


# ------------------------------------------------------------------------------------------------------------
# schedules


def test_ta3n_schedule_on_epic100_sizes():
    cfg = C.resolve("ta3n", "epic100", None, backbone="tbn")
    s = Schedule.of(cfg, 16115, 26115)
    assert (s.batch_source, s.batch_target) == (128, 207)            # script_test_ta3n.sh:79-80
    assert (s.epoch_steps, s.steps) == (126, 3780)                   # main.py:329; 30 epochs
    assert s.lr_milestones == [9 * 126, 19 * 126]                    # lr / 10 at the start of epochs 10 and 20
    assert [s.lr(cfg, k) for k in (0, 1133, 1134, 2393, 2394)] == pytest.approx([3e-3, 3e-3, 3e-4, 3e-4, 3e-5])
    g = s.grl(cfg, 0)
    p0 = 1 / 30
    expect = {"relation": 0.75 * warm(p0, 1.0), "video": 0.75 * warm(p0, 1.0), "frame": 0.5 * warm(p0, 1.0)}
    for lvl, v in expect.items():
        assert g[LEVELS.index(lvl)] == pytest.approx(v, rel=1e-6)
    assert s.grl(cfg, 3779)[LEVELS.index("video")] == pytest.approx(0.75 * warm(p0 + 3779 / 3780, 1.0), rel=1e-6)
    assert s.final_steps == [3780]                                    # the last epoch's model (script :147)


def test_mmsada_schedule_restarts_the_reversal_and_averages_nine_checkpoints():
    cfg = C.resolve("mmsada", "mmsada", None)
    s = Schedule.of(cfg, 1543, 2495)
    adv = LEVELS.index("adv")
    assert s.grl(cfg, 2999)[adv] == 0.0 and s.grl(cfg, 3000)[adv] == 0.0   # p restarts at stage 2
    assert s.grl(cfg, 6000)[adv] == pytest.approx(0.2 * warm(0.5, 10.0), rel=1e-6)
    assert all(s.lr(cfg, k) == 0.01 for k in (0, 2999, 3000, 8999))      # the code's --lr is never read
    assert s.final_steps == list(range(8600, 9001, 50))                  # stage-2 steps 5600..6000 every 50


# ------------------------------------------------------------------------------------------------------------
# what acts when, with which weights


def test_mmsada_terms_weights_and_reversal_per_stage(i3d_root, tmp_path, monkeypatch):
    cfg = resolve(i3d_root, "mmsada", "mmsada", out=tmp_path, steps=12, stage1_steps=4)
    final, steps, grl, lrs, clipped = trace(monkeypatch, cfg)
    assert len(steps) == 12 and not clipped
    for k in range(4):  # stage 1: 1.0 CE + 5.0 L_c (train.py:347)
        assert steps[k] == ("all", {"cls": 1.0, "corr": 5.0})
        assert grl[k][LEVELS.index("adv")] == 0.0
    for k in range(4, 12):  # stage 2: 0.2 CE + sum_m L_d + 1.0 L_c (submit_mmsada.sh:24, model.py:642)
        assert steps[k] == ("all", {"adv": 1.0, "cls": 0.2, "corr": 1.0})
        assert grl[k][LEVELS.index("adv")] == pytest.approx(0.2 * warm((k - 4) / 8, 10.0), rel=1e-6)
    assert grl[4][LEVELS.index("adv")] == 0.0  # the first stage-2 step
    assert lrs == [0.01] * 12
    assert final["final_steps"] == [4, 8, 12]


def test_ta3n_terms_weights_reversal_lr_and_clipping(tbn_root, tmp_path, monkeypatch):
    cfg = resolve(tbn_root, "ta3n", "epic100", "tbn", out=tmp_path, epochs=4, lr_epochs=[2, 3])
    final, steps, grl, lrs, clipped = trace(monkeypatch, cfg)
    assert len(steps) == 12  # 24 clips / 8 a batch = 3 steps an epoch, 4 epochs
    want = {"attn_entropy": 0.003, "cls": 1.0, "frame_adv": 1.0, "relation_adv": 1.0, "video_adv": 1.0}
    assert all(s == ("all", want) for s in steps)
    for k in range(12):
        w = warm(1 / 30 + k / 12, 1.0)  # gamma 1, p from 1/30
        assert grl[k][LEVELS.index("relation")] == pytest.approx(0.75 * w, rel=1e-5)
        assert grl[k][LEVELS.index("video")] == pytest.approx(0.75 * w, rel=1e-5)
        assert grl[k][LEVELS.index("frame")] == pytest.approx(0.5 * w, rel=1e-5)
    assert lrs == pytest.approx([3e-3] * 3 + [3e-4] * 3 + [3e-5] * 6)
    assert clipped == [20.0] * 12
    assert final["streams"] == ["rgb+flow+audio"] and final["final_steps"] == [12]


def test_contrastive_terms_and_lr_step(i3d_root, tmp_path, monkeypatch):
    cfg = resolve(i3d_root, "contrastive", "mmsada", out=tmp_path, steps=8, lr_steps=[4])
    _, steps, _, lrs, _ = trace(monkeypatch, cfg)
    assert all(s == ("all", {"cls": 1.0, "xdomain": 1.25, "xmodal": 1.25}) for s in steps)  # eq. 7, one stage
    assert lrs == pytest.approx([0.01] * 4 + [0.001] * 4)
    assert cfg.fusion_mean and not cfg.sync_windows


@pytest.mark.parametrize("method, stage1, stage2", [
    ("source_only", {"cls": 1.0}, {"cls": 0.2}),
    ("target_only", {"target_cls": 1.0}, {"target_cls": 0.2}),
    ("mmd", {"cls": 1.0}, {"cls": 0.2, "mmd": 0.2}),
    ("mcd", {"cls": 1.0}, {"cls": 0.2, "mcd": 0.2}),
    ("dann", {"cls": 1.0}, {"cls": 0.2, "video_adv": 1.0}),
])
def test_mmsada_table_baselines_terms(i3d_root, tmp_path, monkeypatch, method, stage1, stage2):
    cfg = resolve(i3d_root, method, "mmsada", out=tmp_path, steps=8, stage1_steps=4)
    _, steps, _, _, _ = trace(monkeypatch, cfg)
    assert steps[:4] == [("all", stage1)] * 4 and steps[4:] == [("all", stage2)] * 4


def test_mcd_forms():
    terms = {"cls": torch.tensor(2.0), "mcd": torch.tensor(0.3)}
    w = {"cls": torch.tensor(0.2), "mcd": torch.tensor(0.2)}
    grl = C.TrainConfig(mcd_form="grl")
    # GRL form: the classifiers maximise the discrepancy (minus sign), the reversal makes the features minimise it
    assert float(step.phase_total("all", {"cls", "mcd"}, terms, w, grl)) == pytest.approx(0.2 * 2.0 - 0.2 * 0.3)
    three = C.TrainConfig(mcd_form="three_step")
    assert float(step.phase_total("all", {"cls", "mcd"}, terms, w, three)) == pytest.approx(0.4)  # step A
    assert float(step.phase_total("classifiers", {"cls", "mcd"}, terms, w, three)) == pytest.approx(0.4 - 0.06)
    assert float(step.phase_total("generator", {"cls", "mcd"}, terms, w, three)) == pytest.approx(0.06)


def test_domain_losses_are_summed_over_streams():
    g = torch.Generator().manual_seed(0)
    d_rgb, d_flow = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    out = {"verb": torch.randn(6, 4, generator=g), "noun": None, "video": {}, "disc": {"rgb": d_rgb, "flow": d_flow}}
    cfg = C.TrainConfig(w_adv=1.0)
    terms, _ = objectives.compute_terms(out, cfg, 3, {"y_s": torch.tensor([0, 1, 2])}, {}, {"adv"})
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    expect = (torch.nn.functional.cross_entropy(d_rgb, labels) + torch.nn.functional.cross_entropy(d_flow, labels))
    assert float(terms["adv"]) == pytest.approx(float(expect), rel=1e-6)


def test_clip_per_run_is_torchs_clip_for_each_run():
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(3, 4, 5), torch.zeros(3, 7)
    a.grad, b.grad = torch.randn(3, 4, 5, generator=g) * 10, torch.randn(3, 7, generator=g)
    a.grad[1] *= 1e-3
    b.grad[1] *= 1e-3  # run 1 is under the bound: unchanged
    want = []
    for k in range(3):
        pa, pb = torch.zeros(4, 5, requires_grad=True), torch.zeros(7, requires_grad=True)
        pa.grad, pb.grad = a.grad[k].clone(), b.grad[k].clone()
        torch.nn.utils.clip_grad_norm_([pa, pb], 20.0)
        want.append((pa.grad, pb.grad))
    step.clip_per_run([a, b], 20.0, 3)
    for k in range(3):
        torch.testing.assert_close(a.grad[k], want[k][0])
        torch.testing.assert_close(b.grad[k], want[k][1])


# ------------------------------------------------------------------------------------------------------------
# sampling


class _Pair:
    modalities = ["rgb", "flow"]
    units_per_clip, heads_units = 5, 1

    def sample_units(self, rng, batch):
        return rng.integers(0, 5, size=(batch, 1))

    def fixed_units(self):
        return np.array([2])


def test_windows_independent_or_shared_and_correspondence_negatives():
    pair = _Pair()
    cfg = C.TrainConfig()
    rng = np.random.default_rng(0)
    smp = (EpochSampler(40, rng), EpochSampler(40, rng))
    src, _ = draw_batch(pair, cfg, rng, smp, (16, 16), correspondence=False)
    assert np.array_equal(src["rgb"][0], src["flow"][0])                 # the same clips
    assert not np.array_equal(src["rgb"][1], src["flow"][1])             # windows drawn per modality
    cfg.sync_windows = True
    src, _ = draw_batch(pair, cfg, rng, smp, (16, 16), correspondence=False)
    assert np.array_equal(src["rgb"][1], src["flow"][1])
    cfg.sync_windows = False
    src, tgt = draw_batch(pair, cfg, rng, smp, (16, 16), correspondence=True)
    for dom in (src, tgt):
        idx, (fidx, _) = dom["rgb"][0], dom["flow"]
        assert np.array_equal(fidx[:8], np.roll(idx[:8], -1))            # negatives: the next clip's flow
        assert np.array_equal(fidx[8:], idx[8:]) and (fidx[:8] != idx[:8]).all()
    cfg.units = "fixed"
    src, _ = draw_batch(pair, cfg, rng, smp, (16, 16), correspondence=False)
    assert (src["rgb"][1] == 2).all() and (src["flow"][1] == 2).all()


def test_epoch_sampler_draws_each_clip_once_per_epoch():
    s = EpochSampler(24, np.random.default_rng(1))
    epoch = np.concatenate([s.draw(8) for _ in range(3)])
    assert sorted(epoch) == list(range(24))
    s = EpochSampler(20, np.random.default_rng(2))
    batches = [s.draw(8) for _ in range(5)]
    assert all(len(set(b)) == 8 for b in batches)                       # no repeats inside a batch
    small = EpochSampler(5, np.random.default_rng(3)).draw(8)
    assert set(small) == set(range(5))                                  # fewer clips than a batch: all, repeated


def test_tbn_fixed_segments_are_ta3ns():
    from adapt.data import DomainPair
    p = DomainPair.__new__(DomainPair)
    p.units_per_clip, p.heads_units, p.stored, p.original_units = 25, 5, list(range(25)), 25
    assert p.fixed_units().tolist() == [2, 7, 12, 17, 22]                # TA3N dataset.py:147-160


# ------------------------------------------------------------------------------------------------------------
# TA3N's model


def test_ta3n_model_is_one_concatenated_stream(tbn_root, tmp_path):
    from adapt.data import DomainPair
    from adapt.model import AdaptModel
    cfg = resolve(tbn_root, "ta3n", "epic100", "tbn", out=tmp_path)
    pair = DomainPair(cfg, torch.device("cpu"))
    model = AdaptModel(cfg, pair.modalities, pair.feature_shapes, pair.verb_classes, pair.noun_classes,
                       pair.heads_units)
    assert model.streams == ["rgb+flow+audio"]
    s = model.streams[0]
    assert model.embed[s].fc.in_features == 3 * 16 and model.embed[s].fc.out_features == cfg.embed_dim
    assert model.classifier[s].verb.in_features == cfg.trn_dim and model.classifier[s].noun.out_features == 6
    assert model.disc_frame[s].fc1.out_features == cfg.embed_dim          # 512-512-2 at full size
    assert model.disc_video.fc1.in_features == model.disc_video.fc1.out_features == cfg.trn_dim
    assert len(model.disc_relation[s]) == 4 and model.disc_relation[s][0].fc1.out_features == cfg.trn_dim
    assert float(model.classifier[s].verb.weight.detach().std()) == pytest.approx(0.001, rel=0.3)  # models.py:132-147
    B = 4
    x = {m: torch.randn(B, 5, *pair.feature_shapes[m]) for m in pair.modalities}
    model.train(False)
    out = model(x, torch.tensor(0), torch.zeros(5), 2)
    assert out["frame"][s].shape == (B, 5, cfg.embed_dim)
    assert out["disc_relation"][s].shape == (B, 4, 2) and out["disc_frame"][s].shape == (B, 5, 2)
    assert out["video"][s].shape == (B, cfg.trn_dim) and out["verb"].shape == (B, 4) and out["noun"].shape == (B, 6)
    # domain attention: the video feature is the sum of the relation features weighted by 2 - H(d)
    rel = model.trn[s](out["frame"][s])
    h = torch.distributions.Categorical(logits=out["disc_relation"][s]).entropy()
    torch.testing.assert_close(out["video"][s], (rel * (2 - h)[..., None]).sum(1), rtol=1e-5, atol=1e-6)


def test_m3em_on_tbn_is_ta3n_with_audio_late_fused(tbn_root, tmp_path):
    from adapt.data import DomainPair
    from adapt.model import AdaptModel
    cfg = resolve(tbn_root, "m3em", "epic100", "tbn", out=tmp_path, spatial=False, mc=True, sc=False)
    assert (cfg.temporal, cfg.beta_relation, cfg.w_attn_entropy) == ("trn", 0.75, 0.003)
    pair = DomainPair(cfg, torch.device("cpu"))
    model = AdaptModel(cfg, pair.modalities, pair.feature_shapes, pair.verb_classes, pair.noun_classes,
                       pair.heads_units)
    assert model.streams == ["rgb+flow", "audio"] and model.fusion_weights == {"rgb+flow": 1.0, "audio": 0.5}
    logits = {"rgb+flow": torch.ones(2, 3), "audio": torch.full((2, 3), 2.0)}
    torch.testing.assert_close(model.fused(logits), torch.full((2, 3), 2.0))


def test_settings_that_cannot_train_are_refused_in_one_line(i3d_root):
    for bad, msg in [({"steps": "0"}, "steps=0"), ({"dropout": "1.5"}, "dropout=1.5"),
                     ({"embed_dim": "0"}, "embed_dim=0"), ({"w_adv": "-1"}, "w_adv=-1"),
                     ({"eval_every": "0"}, "eval_every=0"), ({"form": "nope"}, "form='nope'"),
                     ({"steps": "100"}, "leaves no stage 2")]:
        with pytest.raises(C.UserError, match=re.escape(msg)):
            resolve(i3d_root, "mmsada", "mmsada", overrides=bad)
