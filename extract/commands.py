"""Stage-1 commands of the ``adapt`` CLI: ``extract``, ``demo-data`` and ``finetune`` (``demo``, which runs both
stages, is composed in ``cli.py``).

:func:`register` is called by ``cli.py`` with its ``command`` decorator (a UserError becomes one line on stderr and
its exit code: 2 for a mistake, 1 for :class:`extract.runner.ExtractionFailed`).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import List, Optional

import typer

from extract.config import DemoConfig, ExtractConfig
from featstore.errors import UserError
from featstore.manifests import split_kind_of
from featstore.paths import FEATURES_ROOT, split_store
from featstore.settings import coerce, kind_of, split_items

DEMO_SPLITS = ("K1_train", "K1_test", "K2_train", "K2_test")
DEFAULT_MODALITIES = {"i3d": ("rgb", "flow"), "tbn": ("rgb", "flow", "audio")}


# ------------------------------------------------------------------------------------------------------------
# helpers (also used by tests and the bench)


def parse_checkpoints(items: list[str] | None) -> dict[str, Path]:
    """``["rgb=PATH", "flow=PATH"]`` -> ``{"rgb": Path, "flow": Path}``; a malformed item is a UserError."""
    out: dict[str, Path] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip().lower()
        if not sep or not key or not value.strip():
            raise UserError(f"--checkpoint {item!r}: expected MODALITY=PATH, e.g. --checkpoint rgb=rgb_imagenet.pt")
        if key == "spec":
            key = "audio"
        if key in out:
            raise UserError(f"--checkpoint {key}: given twice")
        out[key] = Path(value.strip()).expanduser()
    return out


def apply_settings(cfg: ExtractConfig, items: list[str] | None) -> ExtractConfig:
    """Apply ``--set key=value`` items to a config (each value read as its field's annotated type)."""
    hints = typing.get_type_hints(ExtractConfig)
    changes = {}
    for key, value in split_items(items).items():
        if key not in hints:
            raise UserError(f"--set {key}={value}: unknown setting; one of {', '.join(sorted(hints))}")
        kind, optional = kind_of(hints[key])
        changes[key] = coerce(key, value, kind, optional)
    return dataclasses.replace(cfg, **changes)


def expand_split(name: str) -> list[str]:
    """A split (name or manifest path) -> ``[name]``; a domain (``D1``, ``K2``, ``epic100_source``) -> its train and
    test splits."""
    from featstore import manifests as M

    registry = M.load_registry()
    if name in registry["splits"]:
        return [name]
    if name in registry["domains"]:
        dom = registry["domains"][name]
        return [dom["train"], dom["test"]]
    path = Path(name)
    if path.suffix in (".csv", ".pkl", ".pickle") or path.exists():
        return [name]
    raise UserError(f"unknown split or domain {name!r}: give a manifest file's path, a split "
                    f"({', '.join(sorted(registry['splits'])[:6])}, ...) or a domain "
                    f"({', '.join(sorted(registry['domains']))})")


def is_demo_split(name: str) -> bool:
    from featstore import manifests as M
    try:
        entry = M.load_registry()["splits"].get(name)
    except UserError:
        return False
    return bool(entry) and entry.get("dataset") == "demo"


def demo_data_present(root: Path = DemoConfig.root) -> bool:
    from featstore.manifests import DEMO_DOMAINS, MANIFEST_DIR
    manifests = all((MANIFEST_DIR / "demo" / f"{d}_{r}.csv").is_file() for d in DEMO_DOMAINS
                    for r in ("train", "test"))
    return manifests and Path(root).is_dir() and any(Path(root).iterdir())


def ensure_demo_data(console, root: Path = DemoConfig.root) -> bool:
    """Generate the demo dataset when it is missing; True when it was generated now."""
    if demo_data_present(root):
        return False
    from extract.demo import make_demo
    console.print(f"generating the demo dataset in {root} (first use) ...")
    make_demo(root=Path(root))
    return True


def build_config(backbone: str, split: str, *, demo: bool, data_root: Path | None, modalities: str | None,
                 split_kind: str | None, settings: list[str] | None) -> ExtractConfig:
    """The ExtractConfig of one split: defaults (or the demo settings), then the options, then ``--set``."""
    backbone = backbone.lower()
    if backbone not in DEFAULT_MODALITIES:
        raise UserError(f"--backbone {backbone!r}: choose one of {', '.join(DEFAULT_MODALITIES)}")
    base = DemoConfig().extract if demo else ExtractConfig()
    mods = tuple(m.strip().lower() for m in modalities.split(",") if m.strip()) if modalities \
        else DEFAULT_MODALITIES[backbone]
    kind = split_kind or split_kind_of(split)
    if kind not in ("train", "test"):
        raise UserError(f"--split-kind {kind!r}: choose train or test")
    root = data_root if data_root is not None else (DemoConfig.root if demo else base.data_root)
    cfg = dataclasses.replace(base, backbone=backbone, modalities=mods, split_kind=kind, data_root=Path(root))
    cfg = apply_settings(cfg, settings)
    if split_kind:  # the explicit option wins over --set split_kind
        cfg = dataclasses.replace(cfg, split_kind=split_kind)
    return cfg


def default_out(backbone: str, split: str, root: Path = FEATURES_ROOT) -> Path:
    return split_store(root, backbone, split)


def extract_demo_stores(features: Path, checkpoints: dict, console, **kw) -> None:
    """Stage 1 of the demo: generate the demo data if missing, then extract I3D rgb+flow features of K1 and K2
    (train and test) with the demo settings into ``<features>/i3d/`` (a store made otherwise is replaced)."""
    from extract.runner import StoreMismatch, run_extraction
    root = DemoConfig.root
    if ensure_demo_data(console, root):
        console.print(f"[1/3] generated the demo dataset in {root}")
    else:
        console.print(f"[1/3] demo dataset present in {root}")
    console.print(f"[2/3] extracting i3d rgb+flow features of {', '.join(DEMO_SPLITS)} into {features}/i3d/")
    for name in DEMO_SPLITS:
        cfg = build_config("i3d", name, demo=True, data_root=root, modalities=None, split_kind=None, settings=None)
        target = split_store(features, "i3d", name)
        try:
            run_extraction(name, cfg, target, checkpoints, console=console, **kw)
        except StoreMismatch as e:  # a demo store from other settings (or weights): replace it
            console.print(f"replacing {target}: {e}", highlight=False, soft_wrap=True)
            run_extraction(name, cfg, target, checkpoints, overwrite=True, console=console, **kw)


# ------------------------------------------------------------------------------------------------------------
# the commands


def register(command, console) -> None:
    """Register the stage-1 commands with ``cli.py``'s ``command`` decorator."""

    @command("extract")
    def extract_cmd(
        split: str = typer.Option(..., "--split", help="Split name (D1_train, target_val, K1_test), manifest path, "
                                                       "or domain (D1, K1: its train and test splits)."),
        backbone: str = typer.Option("i3d", help="i3d | tbn"),
        data_root: Optional[Path] = typer.Option(None, help="Root of the EPIC layout (default: data; demo/data "
                                                            "for the demo kitchens)."),
        out: Optional[Path] = typer.Option(None, help="Store path (default features/<backbone>/<split>.zarr); "
                                                      "for a domain, the folder of its stores."),
        checkpoint: List[str] = typer.Option([], "--checkpoint", help="MODALITY=PATH (repeat); without one the "
                                                                      "weights are random."),
        modalities: Optional[str] = typer.Option(None, help="Comma list (default rgb,flow for i3d; "
                                                            "rgb,flow,audio for tbn)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        batch_size: Optional[int] = typer.Option(None, help="Clips per backbone batch (default 2 on CPU, "
                                                            "~64 windows on GPU)."),
        workers: Optional[int] = typer.Option(None, help="Decoding worker processes (0: in process; default 1 "
                                                         "on CPU, cores-1 up to 12 on GPU)."),
        split_kind: Optional[str] = typer.Option(None, help="train | test (default: *_train -> train, else test)."),
        settings: List[str] = typer.Option([], "--set", help="KEY=VALUE of any ExtractConfig field (repeat), "
                                                             "e.g. --set crop=224 --set test_windows=5."),
        precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32"),
        chunk_clips: Optional[int] = typer.Option(None, help="Clips per store chunk for a new store "
                                                             "(default ~8 MiB chunks)."),
        shard: Optional[str] = typer.Option(None, help="INDEX/COUNT: extract only the store chunks c with "
                                                       "c % COUNT == INDEX (independent processes sharing the store; "
                                                       "torchrun shards by rank without it)."),
        allow_failures: bool = typer.Option(False, help="Exit 0 even when clips failed."),
        retry_failed: bool = typer.Option(False, help="Clear the failure records of the store and retry them."),
        overwrite: bool = typer.Option(False, help="Replace an existing store."),
        demo: bool = typer.Option(False, help="Demo settings (small frames and windows) and data root demo/data."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="On resume, check the store's chunk files "
                                                                       "and redo clips in damaged ones."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ):
        """Extract backbone features of a split into a feature store (resumes an existing store)."""
        from extract.runner import ExtractionFailed, run_extraction

        names = expand_split(split)
        demo_any = demo or any(is_demo_split(n) for n in names)
        if demo_any and data_root is None:
            ensure_demo_data(console)
        ckpts = parse_checkpoints(checkpoint)
        failed: list[ExtractionFailed] = []
        for name in names:
            cfg = build_config(backbone, name, demo=demo or is_demo_split(name), data_root=data_root,
                               modalities=modalities, split_kind=split_kind, settings=settings)
            if out is None:
                target = default_out(cfg.backbone, name)
            elif len(names) > 1:
                target = Path(out) / f"{name}.zarr"
            else:
                target = Path(out)
            try:
                run_extraction(name, cfg, target, ckpts, device=device, batch_size=batch_size, workers=workers,
                               allow_failures=allow_failures, progress=progress, retry_failed=retry_failed,
                               overwrite=overwrite, precision=precision, chunk_clips=chunk_clips, console=console,
                               shard=shard, verify=verify)
            except ExtractionFailed as e:
                if len(names) == 1:
                    raise
                failed.append(e)
        if failed:
            raise failed[0]

    @command("demo-data")
    def demo_data_cmd(
        root: Path = typer.Option(DemoConfig.root, help="Where to write the demo dataset."),
        seed: int = typer.Option(0, help="Seed of the generated data."),
    ):
        """Generate the demo dataset (kitchens K1, K2, K3 in the EPIC layout) and its manifests."""
        from extract.demo import make_demo
        info = make_demo(root=Path(root), seed=seed)
        console.print(f"demo dataset written to {root}", highlight=False)
        if isinstance(info, dict):
            for k, v in info.items():
                console.print(f"  {k}: {v}", highlight=False, soft_wrap=True)

    @command("finetune")
    def finetune_cmd(
        split: str = typer.Option(..., "--split", help="A labelled split (name or manifest path)."),
        backbone: str = typer.Option("i3d", help="i3d | tbn"),
        modality: str = typer.Option("rgb", help="rgb | flow | audio"),
        data_root: Optional[Path] = typer.Option(None, help="Root of the EPIC layout (default data; demo/data "
                                                            "for the demo kitchens)."),
        checkpoint: Optional[Path] = typer.Option(None, help="Starting weights (e.g. Kinetics rgb_imagenet.pt)."),
        out: Path = typer.Option(..., help="Where to save the fine-tuned backbone checkpoint."),
        steps: int = typer.Option(1000, help="SGD steps."),
        lr: float = typer.Option(0.01, help="Learning rate (SGD, momentum 0.9)."),
        batch_size: int = typer.Option(8, help="Clips per step."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        workers: Optional[int] = typer.Option(None, help="Decoding worker processes."),
        settings: List[str] = typer.Option([], "--set", help="KEY=VALUE of any ExtractConfig field (repeat)."),
        seed: int = typer.Option(0, help="Seed of the classifier, the clip order and the window choice."),
        demo: bool = typer.Option(False, help="Demo settings and data root demo/data."),
    ):
        """Supervised fine-tuning of a backbone (linear verb classifier on its pooled last map, cross-entropy,
        SGD); the result loads with `adapt extract --checkpoint MODALITY=OUT`."""
        from extract.finetune import finetune

        demo_any = demo or is_demo_split(split)
        if demo_any and data_root is None:
            ensure_demo_data(console)
        cfg = build_config(backbone, split, demo=demo_any, data_root=data_root, modalities=modality,
                           split_kind="train", settings=settings)
        finetune(split, cfg, out, checkpoint=checkpoint, steps=steps, lr=lr, batch_size=batch_size,
                 device=device, workers=workers, seed=seed, console=console)
