"""Kim et al.'s preset in a short run (600 steps: a 200-step source stage), on a set where the source's RGB carries
a class-tied kitchen style and the classes are as imbalanced as D1's: without its guard L_do, anchored on the one or
two classes the young source model is confident about, drags every target clip to them (one class); with it, the
run keeps learning like source-only."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adapt import config as C
from adapt import trainer as T
from featstore.schema import StoreAttrs
from featstore.store import FeatureStore

D1 = np.array([421, 383, 231, 128, 223, 71, 42, 44], float)  # D1_train's class counts


def styled_pair(root: Path) -> Path:
    """8 classes, rgb / flow / audio (64-d, 5 windows); each class's source RGB has a style of its own that the
    target lacks; the target kitchen shifts RGB most."""
    classes, units, dim = 8, 5, 64
    prng = np.random.default_rng(1234)
    mods = ("rgb", "flow", "audio")
    signal, shift, tie = {"rgb": 1.0, "flow": 1.0, "audio": 0.4}, {"rgb": 2.0, "flow": 0.3, "audio": 1.0}, \
        {"rgb": 2.0, "flow": 0.0, "audio": 0.0}
    protos = {m: prng.standard_normal((classes, dim)).astype(np.float32) * signal[m] for m in mods}
    ties = {m: prng.standard_normal((classes, dim)).astype(np.float32) * tie[m] for m in mods}
    styles = {(dom, m): np.random.default_rng(dom * 31 + j).standard_normal(dim).astype(np.float32) * shift[m]
              for dom in (1, 2) for j, m in enumerate(mods)}
    base = root / "i3d"
    base.mkdir(parents=True)
    for name, n, dom, seed in (("S_train", 1000, 1, 1), ("T_train", 1000, 2, 2), ("T_test", 400, 2, 3)):
        rng = np.random.default_rng(seed)
        y = np.repeat(np.arange(classes), np.round(D1 / D1.sum() * n).astype(int))[:n]
        y = np.concatenate([y, np.zeros(n - len(y), int)])
        rng.shuffle(y)
        feats = {m: np.maximum((protos[m][y] + styles[dom, m] + (ties[m][y] if dom == 1 else 0))[:, None]
                               + rng.standard_normal((n, units, dim)).astype(np.float32) * 3.0, 0) for m in mods}
        manifest = pd.DataFrame({"id": [f"{name}_{i}" for i in range(n)], "video_id": [f"{name}_V"] * n,
                                 "start_frame": np.arange(n) * 10 + 1, "stop_frame": np.arange(n) * 10 + 9,
                                 "verb_class": y, "noun_class": -np.ones(n, dtype=int)})
        st = FeatureStore.create(base / f"{name}.zarr", manifest, {m: (units, dim) for m in mods},
                                 StoreAttrs(backbone="i3d", manifest_sha256=name, checkpoints={m: None for m in mods},
                                            sampling={"windows": units}, verb_classes=classes), chunk_clips=256)
        st.write(np.arange(n), feats)
        st.finalise()
    return base


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    return styled_pair(tmp_path_factory.mktemp("styled"))


def run(base, method, out, **sets):
    cfg = C.resolve(method, "mmsada", {"validators": False, "embed_dim": 64, "eval_every": 50, **sets}, steps=600,
                    source=str(base / "S_train.zarr"), target=str(base / "T_train.zarr"),
                    eval=str(base / "T_test.zarr"), out=str(out))
    return T.train([cfg], progress=False)[0]


def test_a_short_run_of_kim_et_al_does_not_collapse_where_source_only_learns(styled, tmp_path):
    source_only = run(styled, "source_only", tmp_path)
    guarded = run(styled, "contrastive", tmp_path)
    unguarded = run(styled, "contrastive", tmp_path, xdomain_min_classes=0.0, tag="unguarded")
    assert source_only["collapse"] is None and source_only["target_top1"] > 60
    assert unguarded["collapse"] is not None and unguarded["target_top1"] < 35     # what the guard prevents
    assert guarded["collapse"] is None and guarded["invalid"] == []
    assert guarded["target_top1"] > source_only["target_top1"] - 5
    assert min(guarded["per_modality"].values()) > 0  # every stream still predicts
