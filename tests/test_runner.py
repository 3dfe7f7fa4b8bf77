"""Extraction runner end to end on the demo dataset: stores, resume, sharding, checkpoints, fine-tuning.

Real data: the demo dataset generated into a temporary folder (EPIC layout JPEGs, flow JPEGs, WAVs), real Zarr
stores; tiny settings (8-frame windows, 32-64 pixel crops, 2 windows / segments) keep it to seconds on 2 cores.
"""

from __future__ import annotations

import dataclasses
import types
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from rich.console import Console
from typer.testing import CliRunner

from extract.config import ExtractConfig
from extract.runner import run_extraction
from featstore.errors import UserError
from featstore.manifests import manifest_sha256, read_manifest
from featstore.store import FeatureStore
from tests import reference

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------------
# helpers shared with test_faults_extract.py


def make_data(base: Path, video: bool = False) -> dict:
    """Demo kitchen K1 only, 2 train clips per class (8 clips in K1_01) and 1 test clip per class (4 in K1_02)."""
    from extract.demo import make_demo

    info = make_demo(root=base / "data", manifests_dir=base / "manifests", clips_per_class=2,
                     test_clips_per_class=1, kitchens=("K1",), workers=1, video=video)
    return {"root": base / "data", "train": base / "manifests" / "K1_train.csv",
            "test": base / "manifests" / "K1_test.csv", "info": info}


def subset(manifest: Path, rows, out: Path, extra: list[dict] | None = None) -> Path:
    """A manifest CSV with some rows of ``manifest`` (and extra rows), written to ``out``."""
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df = df.iloc[list(rows)]
    if extra:
        base = df.iloc[0].to_dict()
        df = pd.concat([df, pd.DataFrame([{**base, **e} for e in extra])], ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return out


def tiny(root: Path, backbone: str = "i3d", crop: int = 32, **kw) -> ExtractConfig:
    """8-frame windows, 2 windows / segments, a ``crop`` pixel centre crop."""
    mods = kw.pop("modalities", ("rgb", "flow") if backbone == "i3d" else ("rgb", "flow", "audio"))
    settings = {"frames_per_window": 8, "frame_stride": 2, "test_windows": 2, "train_windows": 2, "segments": 2,
                "resize": crop + 4, "crop": crop, **kw}
    return ExtractConfig(backbone=backbone, modalities=tuple(mods), data_root=Path(root), **settings)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=250, force_terminal=False)


def text_of(console: Console) -> str:
    return console.file.getvalue()


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][:]) for name in g.array_keys()}


def assert_same_store(a: Path, b: Path) -> None:
    """Same arrays bit for bit, and the same attributes except the creation time."""
    x, y = arrays(a), arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype, name
        if x[name].dtype == np.float16:
            assert np.array_equal(x[name].view(np.uint16), y[name].view(np.uint16)), name
        else:
            assert np.array_equal(x[name], y[name]), name
    ax = {k: v for k, v in FeatureStore.open(a).attrs.items() if k != "created"}
    ay = {k: v for k, v in FeatureStore.open(b).attrs.items() if k != "created"}
    assert ax == ay


SUBPROCESS_RUN = r"""
import json, sys
from pathlib import Path
from extract.config import ExtractConfig
from extract.runner import run_extraction
a = json.loads(sys.argv[1])
if a.get("announce"):  # print BATCH when a backbone batch starts (for tests that kill at such a moment)
    from extract import runner
    call = runner.Extractor.__call__
    def announced(self, clips):
        print("BATCH", flush=True)
        return call(self, clips)
    runner.Extractor.__call__ = announced
c = a["cfg"]
c["data_root"] = Path(c["data_root"]); c["modalities"] = tuple(c["modalities"])
run_extraction(a["split"], ExtractConfig(**c), a["out"], {}, device="cpu", progress=False, **a.get("kw", {}))
print("RUN-DONE", flush=True)
"""


def run_args(split: Path, cfg: ExtractConfig, out: Path, announce: bool = False, **kw) -> str:
    c = dataclasses.asdict(cfg)
    c["data_root"] = str(c["data_root"])
    c["modalities"] = list(c["modalities"])
    return json.dumps({"split": str(split), "cfg": c, "out": str(out), "kw": kw, "announce": announce})


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process extractions use one intra-op thread: with two cores shared with decoding workers and other
    processes, OpenMP threads waiting for each other make two threads slower and their timing erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------
# end to end


def test_i3d_end_to_end_store_shapes_attrs(demo, tmp_path):
    split = subset(demo["train"], range(4), tmp_path / "four.csv")
    cfg = tiny(demo["root"], crop=64, split_kind="train")
    con = quiet()
    out = tmp_path / "i3d.zarr"
    s = run_extraction(split, cfg, out, {}, device="cpu", workers=1, batch_size=2, chunk_clips=2, console=con)
    assert s["extracted"] == 4 and s["failed"] == 0 and s["complete"] and s["created"]
    assert s["steady_clips_per_s"] > 0  # two batches of 2: the rate after the first
    log = text_of(con)
    assert "random" in log and "--checkpoint" in log  # the random-weights warning, one line
    assert len([ln for ln in log.splitlines() if "random" in ln]) == 1

    st = FeatureStore.open(out, require_complete=True)
    assert st.modalities == ["rgb", "flow"]
    for m in ("rgb", "flow"):
        a = reference.features(st, m)
        assert a.shape == (4, 2, 1024, 2, 2) and a.dtype == np.float16
        assert np.isfinite(a).all()
        assert not np.array_equal(a[0], a[1])  # clips differ
        assert np.unique(a).size > 10
    df = read_manifest(split, None, None)
    assert st.attrs["backbone"] == "i3d"
    assert st.attrs["checkpoints"] == {"rgb": None, "flow": None}
    assert st.attrs["sampling"] == json.loads(json.dumps(cfg.sampling()))
    assert st.attrs["preprocessing"] == json.loads(json.dumps(cfg.preprocessing()))
    assert st.attrs["manifest_sha256"] == manifest_sha256(df)
    assert st.attrs["manifest_name"] == "four"
    assert st.attrs["split_kind"] == "train" and st.attrs["sampling"]["windows"] == 2
    assert st.attrs["verb_classes"] == int(df["verb_class"].max()) + 1
    assert st.attrs["window_shapes"] == {"rgb": [2, 1024, 2, 2], "flow": [2, 1024, 2, 2]}
    assert "created" in st.attrs and st.attrs["num_done"] == 4
    assert list(st.meta("id")) == list(df["id"])
    assert list(st.meta("verb_class")) == list(df["verb_class"])


def test_tbn_end_to_end_rgb_flow_audio(demo, tmp_path):
    split = subset(demo["test"], range(3), tmp_path / "three.csv")
    cfg = tiny(demo["root"], backbone="tbn", crop=64)
    out = tmp_path / "tbn.zarr"
    s = run_extraction(split, cfg, out, {}, device="cpu", workers=1, batch_size=3, chunk_clips=2, console=quiet())
    assert s["extracted"] == 3 and s["complete"]
    st = FeatureStore.open(out, require_complete=True)
    shapes = {m: reference.features(st, m).shape for m in st.modalities}
    assert shapes == {"rgb": (3, 2, 1024, 2, 2), "flow": (3, 2, 1024, 2, 2), "audio": (3, 2, 1024)}
    for m in st.modalities:
        a = reference.features(st, m).astype(np.float32)
        assert np.isfinite(a).all() and a.std() > 0
        assert not np.array_equal(a[0], a[1])

    # decoded in this process or in a worker process (its uint8 pixels handed over through shared memory, the
    # tables applied when the batch is assembled): the same bits
    same = tmp_path / "tbn_inprocess.zarr"
    run_extraction(split, cfg, same, {}, device="cpu", workers=0, batch_size=3, chunk_clips=2, console=quiet())
    other = FeatureStore.open(same, require_complete=True)
    for m in st.modalities:
        assert np.array_equal(reference.features(other, m), reference.features(st, m)), m

    # the spatial audio map (1024 x 8 x 8 per segment)
    cfg2 = dataclasses.replace(cfg, modalities=("audio",), audio_map="spatial", segments=1)
    run_extraction(subset(demo["test"], [0], tmp_path / "one.csv"), cfg2, tmp_path / "spatial.zarr", {},
                   device="cpu", workers=0, batch_size=1, console=quiet())
    assert reference.features(FeatureStore.open(tmp_path / "spatial.zarr"), "audio").shape == (1, 1, 1024, 8, 8)


def test_tbn_stored_segments_keep_the_group_centres(demo, tmp_path):
    """--set stored_segments=N keeps N of the segments (their groups' centres), records them, and the trainer's
    sampler takes the kept segment of each group (TA3N's 2, 7, 12, 17, 22 for 5 of 25)."""
    assert ExtractConfig(backbone="tbn", stored_segments=5).stored_segment_indices() == [2, 7, 12, 17, 22]
    split = subset(demo["test"], range(2), tmp_path / "two.csv")
    full_cfg = tiny(demo["root"], backbone="tbn", crop=64, segments=4)
    kept_cfg = dataclasses.replace(full_cfg, stored_segments=2)
    assert kept_cfg.stored_segment_indices() == [1, 3]
    full, kept = tmp_path / "full.zarr", tmp_path / "kept.zarr"
    for cfg, out in ((full_cfg, full), (kept_cfg, kept)):
        run_extraction(split, cfg, out, {}, device="cpu", workers=0, batch_size=2, chunk_clips=2, console=quiet())
    a, b = FeatureStore.open(full), FeatureStore.open(kept)
    assert b.attrs["sampling"]["stored_segments"] == [1, 3] and b.attrs["sampling"]["segments"] == 4
    assert b.attrs["window_shapes"]["rgb"][0] == 2
    for m in a.modalities:  # the same segments' features (the backbone batch differs: float rounding)
        np.testing.assert_allclose(reference.features(b, m).astype(np.float32), reference.features(a, m)[:, [1, 3]].astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
    from adapt.data import DomainPair
    pair = DomainPair.__new__(DomainPair)
    pair.modalities = ["rgb"]
    pair._segments(types.SimpleNamespace(backbone="tbn", segments=2), b)
    pair.units_per_clip = 2
    assert pair.fixed_units().tolist() == [0, 1] and [g.tolist() for g in pair.groups] == [[0], [1]]


# ------------------------------------------------------------------------------------------------------------
# resume, re-run, refusing other settings


def test_resume_after_interrupt_is_bit_identical_and_rerun_skips(demo, tmp_path, monkeypatch):
    split = demo["train"]  # 8 clips
    cfg = tiny(demo["root"])
    ref = tmp_path / "ref.zarr"
    run_extraction(split, cfg, ref, {}, device="cpu", workers=1, batch_size=2, chunk_clips=2, console=quiet())

    from extract import runner
    calls = {"n": 0}
    real_call = runner.Extractor.__call__

    def dying(self, clips):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_call(self, clips)

    out = tmp_path / "resumed.zarr"
    monkeypatch.setattr(runner.Extractor, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(split, cfg, out, {}, device="cpu", workers=1, batch_size=2, chunk_clips=2, console=quiet())
    monkeypatch.setattr(runner.Extractor, "__call__", real_call)
    partial = FeatureStore.open(out)
    assert partial.done_mask().sum() == 4  # two whole chunks written before the interruption, nothing else
    with pytest.raises(UserError, match="not extracted yet"):
        FeatureStore.open(out, require_complete=True)

    s = run_extraction(split, cfg, out, {}, device="cpu", workers=1, batch_size=2, console=quiet())
    assert s["extracted"] == 4 and s["skipped"] == 4 and not s["created"]
    assert_same_store(ref, out)

    # a re-run of a complete store does nothing and changes nothing
    before = arrays(out)
    s = run_extraction(split, cfg, out, {}, device="cpu", workers=1, batch_size=2, console=quiet())
    assert s["extracted"] == 0 and s["skipped"] == 8 and s["complete"]
    after = arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_refuses_resume_with_other_settings(demo, tmp_path):
    split = subset(demo["train"], range(2), tmp_path / "two.csv")
    cfg = tiny(demo["root"])
    out = tmp_path / "s.zarr"
    run_extraction(split, cfg, out, {}, device="cpu", workers=0, limit=0, console=quiet())
    with pytest.raises(UserError) as e:
        run_extraction(split, dataclasses.replace(cfg, crop=48, resize=52), out, {}, device="cpu", workers=0,
                       limit=0, console=quiet())
    msg = str(e.value)
    assert "\n" not in msg and "preprocessing.crop 48 here vs 32 in the store" in msg
    assert "--out" in msg and "--overwrite" in msg
    with pytest.raises(UserError, match="sampling.frames_per_window"):
        run_extraction(split, dataclasses.replace(cfg, frames_per_window=16), out, {}, device="cpu", workers=0,
                       limit=0, console=quiet())
    other = subset(demo["train"], range(1, 3), tmp_path / "two.csv")  # same name, other clips
    with pytest.raises(UserError, match="manifest_sha256"):
        run_extraction(other, cfg, out, {}, device="cpu", workers=0, limit=0, console=quiet())
    # --overwrite replaces the store
    s = run_extraction(other, dataclasses.replace(cfg, crop=48, resize=52), out, {}, device="cpu", workers=0,
                       limit=0, overwrite=True, console=quiet())
    assert s["created"] and FeatureStore.open(out).attrs["preprocessing"]["crop"] == 48
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.zarr")]  # no temporaries left


# ------------------------------------------------------------------------------------------------------------
# torchrun-style sharding


def test_torch_distributed_two_ranks_match_single_process(demo, tmp_path):
    split = subset(demo["train"], range(5), tmp_path / "five.csv")
    cfg = tiny(demo["root"])
    # reference: one process with the ranks' thread count (CPU results depend on it in the last bits): one
    assert torch.get_num_threads() == 1
    run_extraction(split, cfg, tmp_path / "single.zarr", {}, device="cpu", workers=0, batch_size=2,
                   chunk_clips=1, console=quiet())

    out = tmp_path / "ranks.zarr"
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS_RUN, run_args(split, cfg, out, workers=0, batch_size=2, chunk_clips=1)],
        cwd=ROOT, env=subprocess_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                     OMP_NUM_THREADS=1),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert all("RUN-DONE" in log for log in logs)
    assert "5 clips extracted" in logs[0]  # rank 0 prints the summary of all ranks
    st = FeatureStore.open(out, require_complete=True)
    assert st.attrs["num_done"] == 5  # finalised by rank 0 after all ranks finished
    assert_same_store(tmp_path / "single.zarr", out)


# ------------------------------------------------------------------------------------------------------------
# checkpoints and the command line


def _cli(*args):
    from cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def test_wrong_modality_checkpoint_exits_2_with_clear_message(demo, tmp_path):
    from extract.backbones import build
    flow = build("i3d", "flow")
    path = tmp_path / "flow_imagenet.pt"
    torch.save(flow.state_dict(), path)  # a pytorch-i3d style plain state dict of the flow model
    split = subset(demo["train"], range(1), tmp_path / "one.csv")
    res = _cli("extract", "--split", split, "--backbone", "i3d", "--data-root", demo["root"], "--out",
               tmp_path / "x.zarr", "--checkpoint", f"rgb={path}", "--device", "cpu", "--no-progress")
    assert res.exit_code == 2, res.output
    err = res.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert "flow" in err[0] and "rgb" in err[0] and str(path) in err[0]
    assert "Traceback" not in res.output
    assert not (tmp_path / "x.zarr").exists()

    res = _cli("extract", "--split", split, "--data-root", demo["root"], "--checkpoint", "rgb", "--device", "cpu")
    assert res.exit_code == 2 and "MODALITY=PATH" in res.output
    res = _cli("extract", "--split", split, "--data-root", demo["root"], "--checkpoint", f"audio={path}",
               "--device", "cpu", "--out", tmp_path / "y.zarr")
    assert res.exit_code == 2 and "audio" in res.output


def test_cli_extract_with_settings(demo, tmp_path):
    split = subset(demo["test"], range(2), tmp_path / "K1_test.csv")
    out = tmp_path / "cli.zarr"
    res = _cli("extract", "--split", split, "--backbone", "i3d", "--data-root", demo["root"], "--out", out,
               "--modalities", "rgb", "--device", "cpu", "--workers", "0", "--set", "crop=32", "--set", "resize=36",
               "--set", "frames_per_window=8", "--set", "test_windows=2", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "2 clips extracted" in res.output and "random" in res.output
    st = FeatureStore.open(out, require_complete=True)
    assert st.modalities == ["rgb"] and reference.features(st, "rgb").shape == (2, 2, 1024, 1, 1)
    assert st.attrs["split_kind"] == "test"  # from the name: not *_train
    res = _cli("extract", "--split", split, "--data-root", demo["root"], "--set", "nonsense=1")
    assert res.exit_code == 2 and "nonsense" in res.output


def test_demo_splits_and_domains_resolve_to_demo_settings():
    from extract.commands import build_config, default_out, expand_split, is_demo_split
    from featstore.manifests import split_kind_of
    from extract.config import DemoConfig

    assert expand_split("K1") == ["K1_train", "K1_test"]
    assert expand_split("D1") == ["D1_train", "D1_test"]
    assert expand_split("D2_test") == ["D2_test"]
    assert is_demo_split("K1_train") and not is_demo_split("D1_train")
    assert split_kind_of("K1_train") == "train" and split_kind_of("target_val") == "test"
    cfg = build_config("i3d", "K1_train", demo=True, data_root=None, modalities=None, split_kind=None,
                       settings=["seed=3"])
    demo = DemoConfig().extract
    assert (cfg.crop, cfg.frames_per_window, cfg.train_windows) == (demo.crop, demo.frames_per_window,
                                                                     demo.train_windows)
    assert cfg.data_root == DemoConfig.root and cfg.split_kind == "train" and cfg.seed == 3
    assert cfg.modalities == ("rgb", "flow")
    assert build_config("tbn", "D1_test", demo=False, data_root=None, modalities=None, split_kind=None,
                        settings=None).modalities == ("rgb", "flow", "audio")
    assert default_out("i3d", "K1_train") == Path("features/i3d/K1_train.zarr")
    with pytest.raises(UserError, match="unknown split or domain"):
        expand_split("Q9")


# ------------------------------------------------------------------------------------------------------------
# fine-tuning


def test_finetune_smoke_loss_decreases_and_checkpoint_loads_in_extract(demo, tmp_path):
    from torch import nn

    from extract.backbones import build, save_checkpoint, sha256_file
    from extract.finetune import finetune

    # a starting checkpoint with healthy activations (like a Kinetics one; the seeded random init is tiny)
    start = build("i3d", "rgb")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in start.modules():
            if isinstance(mod, nn.Conv3d):
                fan_in = mod.weight[0].numel()
                mod.weight.normal_(0, (2.0 / fan_in) ** 0.5, generator=gen)
    init = tmp_path / "init.pt"
    save_checkpoint(start, init)

    split = subset(demo["train"], range(4), tmp_path / "ft.csv")
    cfg = tiny(demo["root"], modalities=("rgb",), split_kind="train")
    out = tmp_path / "ft_rgb.pt"
    # one decoding worker: the forked loader path (start_workers) of fine-tuning
    res = finetune(split, cfg, out, checkpoint=init, steps=4, lr=0.01, batch_size=4, device="cpu", workers=1,
                   console=quiet(), progress=False)
    losses = res["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert res["sha256"] == sha256_file(out)

    model = build("i3d", "rgb", checkpoint=out)  # loads strictly
    assert model.checkpoint_info.meta["step"] == 4 and model.checkpoint_info.meta["verb_classes"] == res["verb_classes"]
    s = run_extraction(subset(demo["test"], range(1), tmp_path / "t.csv"), tiny(demo["root"], modalities=("rgb",)),
                       tmp_path / "ft.zarr", {"rgb": out}, device="cpu", workers=0, console=(con := quiet()))
    assert s["random_weights"] == [] and "random" not in text_of(con)
    assert FeatureStore.open(tmp_path / "ft.zarr").attrs["checkpoints"] == {"rgb": res["sha256"]}

    # the fine-tuned rgb checkpoint given for flow is refused with a one-line message
    with pytest.raises(UserError, match="rgb"):
        run_extraction(subset(demo["test"], range(1), tmp_path / "t.csv"), tiny(demo["root"]), tmp_path / "f.zarr",
                       {"flow": out}, device="cpu", workers=0, console=quiet())


# ------------------------------------------------------------------------------------------------------------
# decoding workers


class _OpenCVThreads(torch.utils.data.Dataset):
    """Each item: OpenCV's thread count inside the worker that made it, after a parallel OpenCV call there."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import cv2

        cv2.resize(np.zeros((512, 512, 3), np.uint8), (1024, 1024))
        return cv2.getNumThreads()


def test_workers_fork_with_opencv_single_threaded_and_the_parent_keeps_its_pool():
    """The parent's OpenCV pool is busy before the fork (as after decoding in the main process); the forked
    workers must run OpenCV on one thread without reconfiguring the copied pool (which deadlocks) and the parent
    gets its thread count back."""
    import cv2

    from extract.pipeline import keep_item, start_workers

    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        cv2.resize(np.zeros((512, 512, 3), np.uint8), (1024, 1024))  # the pool's threads exist now
        loader = torch.utils.data.DataLoader(_OpenCVThreads(), batch_size=None, num_workers=2, collate_fn=keep_item,
                                             timeout=120)
        assert list(start_workers(loader)) == [1, 1, 1, 1]
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
