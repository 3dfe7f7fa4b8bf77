"""Stores of synthetic features in the real format, for the tests and the benchmarks (one maker for both).

A clip's features are its class prototype (shared by every domain) + its noun prototype x 0.5 + the domain's shift
+ Gaussian noise x ``noise``, ReLU'd like real activations, so a classifier can learn the classes and a domain
shift is there to adapt to.  Small stores are drawn whole (per modality, the tests' exact values); ``by_chunk``
draws and writes one chunk of clips at a time, for stores larger than memory (the benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from featstore.schema import StoreAttrs
from featstore.store import FeatureStore


def make_store(path: Path, n: int, classes: int, units: int, shape: dict, shift, seed: int,
               backbone: str = "i3d", nouns: int = 0, labelled: bool = True, failed: int = 0,
               version: int = 2, chunk_clips: int | None = 64, noise: float = 1.5, by_chunk: bool = False,
               domain: int | None = None, signal: dict | None = None) -> Path:
    """A complete store of ``n`` clips with ``units`` windows of ``shape[m]`` per modality; the first ``failed``
    clips are recorded as failed instead.  Returns ``path``.

    ``shift``: the scale of the domain's style vector (a number, or one per modality: a kitchen's style in RGB,
    little in flow); ``domain`` seeds that vector (default ``seed``: stores of one domain pass the same value);
    ``signal``: per modality, the scale of the class prototypes (default 1)."""
    rng = np.random.default_rng(seed)
    proto_rng = np.random.default_rng(1234)  # class prototypes shared by every domain
    y = np.arange(n) % classes
    noun = (np.arange(n) * 7) % nouns if nouns else -np.ones(n, dtype=int)
    manifest = pd.DataFrame({"id": [f"{Path(path).stem}_{i}" for i in range(n)], "video_id": ["V_01"] * n,
                             "start_frame": np.arange(n) * 10 + 1, "stop_frame": np.arange(n) * 10 + 9,
                             "verb_class": y if labelled else -np.ones(n, dtype=int), "noun_class": noun})
    attrs = StoreAttrs(backbone=backbone, manifest_sha256=Path(path).stem, checkpoints={m: None for m in shape},
                       sampling={"windows": units}, preprocessing={}, verb_classes=classes, noun_classes=nouns)
    st = FeatureStore.create(path, manifest, {m: (units, *s) for m, s in shape.items()}, attrs,
                             chunk_clips=chunk_clips, version=version)
    means = {}
    for j, (m, s) in enumerate(shape.items()):
        protos = proto_rng.standard_normal((classes, *s)).astype(np.float32)
        nprotos = proto_rng.standard_normal((max(nouns, 1), *s)).astype(np.float32) * 0.5
        scale = shift[m] if isinstance(shift, dict) else shift
        dom = np.random.default_rng((seed if domain is None else domain) * 31 + j).standard_normal(s) \
            .astype(np.float32) * scale
        protos = protos * (signal or {}).get(m, 1.0)
        means[m] = lambda rows, p=protos, q=nprotos, d=dom: p[y[rows]][:, None] + q[np.maximum(noun[rows], 0)][
            :, None] + d

    def draw(m, rows):
        return np.maximum(means[m](rows) + rng.standard_normal((len(rows), units, *shape[m])).astype(np.float32)
                          * noise, 0)

    rows = np.arange(failed, n)
    if by_chunk:
        for lo in range(0, len(rows), st.chunk_clips):
            part = rows[lo:lo + st.chunk_clips]
            st.write(part, {m: draw(m, part) for m in shape})
    else:
        feats = {m: draw(m, np.arange(n)) for m in shape}
        st.write(rows, {m: f[failed:] for m, f in feats.items()})
    if failed:
        st.mark_failed(np.arange(failed), ["synthetic failure"] * failed)
    st.finalise()
    return Path(path)


def make_pair(root: Path, backbone="i3d", spatial=True, classes=4, n=48, units=3, nouns=0, channels=32,
              audio=False, version: int = 2, chunk_clips: int = 64) -> Path:
    """``<root>/<backbone>/{S_train,T_train,T_test}.zarr`` (a source, and a shifted target with its test split);
    returns ``root``, a features root."""
    hw = (3, 3) if spatial else ()
    shape = {"rgb": (channels, *hw), "flow": (channels, *hw)}
    if audio:
        shape["audio"] = (channels,)
    base = Path(root) / backbone
    base.mkdir(parents=True, exist_ok=True)
    kw = dict(version=version, chunk_clips=chunk_clips)
    make_store(base / "S_train.zarr", n, classes, units, shape, 0.0, 1, backbone, nouns, **kw)
    make_store(base / "T_train.zarr", n, classes, units, shape, 1.0, 2, backbone, nouns, labelled=True, **kw)
    make_store(base / "T_test.zarr", n // 2, classes, units, shape, 1.0, 3, backbone, nouns, **kw)
    return Path(root)
