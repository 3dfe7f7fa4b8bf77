"""Small feature stores for trainer tests: class-dependent features with a domain shift, in the store format."""

from pathlib import Path

import numpy as np
import pandas as pd

from extract.store import FeatureStore


def make_store(path: Path, n: int, classes: int, units: int, shape: dict, shift: float, seed: int,
               backbone: str = "i3d", nouns: int = 0, labelled: bool = True, failed: int = 0,
               version: int = 2, chunk_clips: int = 64) -> Path:
    """A complete store: feature = class prototype + domain shift + noise (ReLU'd like real activations)."""
    rng = np.random.default_rng(seed)
    proto_rng = np.random.default_rng(1234)  # class prototypes shared by every domain
    y = np.arange(n) % classes
    noun = (np.arange(n) * 7) % nouns if nouns else -np.ones(n, dtype=int)
    manifest = pd.DataFrame({"id": [f"{path.stem}_{i}" for i in range(n)], "video_id": ["V_01"] * n,
                             "start_frame": np.arange(n) * 10 + 1, "stop_frame": np.arange(n) * 10 + 9,
                             "verb_class": y if labelled else -np.ones(n, dtype=int), "noun_class": noun})
    shapes = {m: (units, *s) for m, s in shape.items()}
    attrs = {"backbone": backbone, "manifest_sha256": path.stem, "checkpoints": {m: None for m in shape},
             "sampling": {"windows": units}, "preprocessing": {}, "verb_classes": classes, "noun_classes": nouns}
    st = FeatureStore.create(path, manifest, shapes, attrs, chunk_clips=chunk_clips, version=version)
    feats = {}
    for j, (m, s) in enumerate(shape.items()):
        protos = proto_rng.standard_normal((classes, *s)).astype(np.float32)
        nprotos = proto_rng.standard_normal((max(nouns, 1), *s)).astype(np.float32) * 0.5
        dom = np.random.default_rng(seed * 31 + j).standard_normal(s).astype(np.float32) * shift
        x = protos[y][:, None] + nprotos[np.maximum(noun, 0)][:, None] + dom
        x = x + rng.standard_normal((n, units, *s)).astype(np.float32) * 1.5
        feats[m] = np.maximum(x, 0)
    rows = np.arange(n)
    st.write(rows[failed:], {m: f[failed:] for m, f in feats.items()})
    if failed:
        st.mark_failed(rows[:failed], ["synthetic failure"] * failed)
    st.finalise()
    return path


def make_pair(root: Path, backbone="i3d", spatial=True, classes=4, n=48, units=3, nouns=0, channels=32,
              audio=False, version: int = 2, chunk_clips: int = 64) -> Path:
    """features/<backbone>/{S_train,T_train,T_test}.zarr under root; returns the features root."""
    hw = (3, 3) if spatial else ()
    shape = {"rgb": (channels, *hw), "flow": (channels, *hw)}
    if audio:
        shape["audio"] = (channels,)
    base = root / backbone
    base.mkdir(parents=True, exist_ok=True)
    kw = dict(version=version, chunk_clips=chunk_clips)
    make_store(base / "S_train.zarr", n, classes, units, shape, 0.0, 1, backbone, nouns, **kw)
    make_store(base / "T_train.zarr", n, classes, units, shape, 1.0, 2, backbone, nouns, labelled=True, **kw)
    make_store(base / "T_test.zarr", n // 2, classes, units, shape, 1.0, 3, backbone, nouns, **kw)
    return root
