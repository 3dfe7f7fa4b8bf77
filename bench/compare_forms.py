"""float16 against int8 (per-channel scales) in memory: target accuracy over seeds on the demo kitchens (K1 -> K2,
source-only and CIA; `make demo` first) and on an imported EPIC-100-layout store (TA3N), the same runs in each form.

`python -m bench.compare_forms [--seeds 3]` prints mean +- std per method and form; the int8 form is worth keeping
only where the difference stays within the seed spread."""

from __future__ import annotations

import argparse
import pickle
import tempfile
from pathlib import Path

import numpy as np


def epic100_layout(root: Path) -> dict:
    """EPIC-100 challenge pickles (N, 25, 1024) for source_train / target_train / target_val, features a class
    prototype (the real verb label of each narration) + a domain shift + noise, imported into stores."""
    from adapt.importer import import_features
    from featstore import manifests as M
    rng = np.random.default_rng(0)
    protos = rng.standard_normal((97, 1024)).astype(np.float32)
    out, out_labels = {}, None
    for split, n, shift in (("source_train", 640, 0.0), ("target_train", 640, 0.7), ("target_val", 320, 0.7)):
        df = M.resolve_split(split).read()
        df = df[df["verb_class"] >= 0].head(n) if split != "target_train" else df.head(n)
        y = np.asarray(df["verb_class"])
        if split == "target_train":  # unlabelled: its clips get classes drawn like the source's
            y = rng.choice(np.asarray(out_labels), len(df))
        else:
            out_labels = y if split == "source_train" else out_labels
        feats = {}
        for k, mod in enumerate(("RGB", "Flow", "Audio")):
            base = protos[y][:, None] * (1.0 - 0.3 * k) + shift * rng.standard_normal(1024).astype(np.float32)
            feats[mod] = np.maximum(base + 1.5 * rng.standard_normal((len(df), 25, 1024)).astype(np.float32), 0)
        with open(root / f"{split}.pkl", "wb") as f:
            pickle.dump({"features": feats, "narration_ids": df["id"].tolist()}, f)
        out[split] = str(import_features(root / f"{split}.pkl", split, root / f"{split}.zarr").path)
    return out


def main() -> None:
    from adapt import config as C
    from adapt.trainer import train, train_one
    ap = argparse.ArgumentParser(prog="python -m bench.compare_forms")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in ("source_only", "cia"):
            for form in ("float16", "int8"):
                acc = [train_one(method, "K1", "K2", overrides={"feature_form": form}, progress=False,
                                 overwrite=True, features_root="features/demo", out=str(tmp / "demo"), backbone="i3d",
                                 seed=s)["target_top1"] for s in range(args.seeds)]
                rows.append((f"demo K1->K2 {method}", form, acc))
        paths = epic100_layout(tmp)
        for form in ("float16", "int8"):
            acc = []
            for s in range(args.seeds):
                cfg = C.resolve("ta3n", "epic100", {"feature_form": form}, backbone="tbn", seed=s,
                                source=paths["source_train"], target=paths["target_train"], eval=paths["target_val"],
                                out=str(tmp / "epic"))
                cfg.epochs = 10
                cfg.lr_epochs = [4, 7]
                acc.append(train([cfg], progress=False, overwrite=True)[0]["verb_top1"])
            rows.append(("EPIC-100 layout (imported) ta3n, verb", form, acc))
    for name, form, acc in rows:
        print(f"{name:40s} {form:8s} {np.mean(acc):6.1f} +- {np.std(acc, ddof=1) if len(acc) > 1 else 0:4.1f}  "
              f"{[round(a, 1) for a in acc]}")


if __name__ == "__main__":
    main()
