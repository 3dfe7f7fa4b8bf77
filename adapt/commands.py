"""The adaptation stage's commands (methods, train, import-features, sweep, report): the CLI layer over
:mod:`adapt.trainer`, :mod:`adapt.sweeps`, :mod:`adapt.reports` and :mod:`adapt.importer`, registered by ``cli.py``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from adapt.sweeps import MAX_STACK
from featstore.errors import UserError


def _store_backbone(source: str) -> str | None:
    """The backbone a source given as a store path was extracted with."""
    from featstore.paths import store_attrs
    if not (str(source).endswith(".zarr") or Path(source).is_dir()):
        return None
    return store_attrs(source).get("backbone")


def _method_names() -> list[str]:
    from adapt.methods import REGISTRY
    return list(REGISTRY)


def register(command, console):
    @command("methods")
    def methods_cmd(
        name: Optional[str] = typer.Argument(None, help="A method (a built-in name or path/to/method.py): its paper, "
                                                        "facts, settings and loss terms."),
        markdown: bool = typer.Option(False, "--markdown", help="Print the README's method table."),
    ):
        """The methods: their papers and presets; with a name, its facts (with their references), its own settings,
        its loss terms and where a frozen-feature run differs."""
        from adapt.method import describe, is_builtin, load
        from adapt.methods import REGISTRY, markdown_table
        if name is None:
            if markdown:
                print(markdown_table())
                return
            table = Table("method", "paper", "composition")
            for m in REGISTRY.values():
                table.add_row(m.name, m.title, m.composition)
            console.print(table)
            return
        cls = load(name)
        print(describe(cls))
        if not is_builtin(cls):
            from adapt.method_check import check
            check(cls)  # one line and exit 2 when it cannot train
            print("\nchecked: its terms' weights are its settings, and a forward and backward of 2 stacked runs on "
                  "random inputs (torch.func.vmap, as a sweep stacks them) give a finite number per term (here RGB "
                  "and flow inputs; `adapt train` checks it again with its stores' modalities and shapes)")

    @command("train")
    def train_cmd(
        method: str = typer.Option("source_only", help="Method (`adapt methods` lists them): "
                                                       + ", ".join(_method_names()) + "; or a method of your own: "
                                                       "path/to/my_method.py or package.module:ClassName."),
        backbone: Optional[str] = typer.Option(None, help="Backbone of the feature stores: i3d or tbn (default: "
                                                          "the source store's, else i3d)."),
        source: str = typer.Option(..., help="Labelled source: a domain (D1), split (D1_train) or store path."),
        target: str = typer.Option(..., help="Unlabelled target: a domain (D2), split or store path."),
        eval: Optional[str] = typer.Option(None, "--eval", help="Evaluation store (default: the target's test split)."),
        seed: int = typer.Option(0, help="Random seed (same seed, same device: same numbers)."),
        steps: Optional[int] = typer.Option(None, help="Training steps (default: the dataset's schedule)."),
        features_root: str = typer.Option("features", help="Root of the feature stores."),
        out: str = typer.Option("runs", help="Folder of the run folders."),
        device: str = typer.Option("auto", help="auto, cpu or cuda."),
        memory_budget: Optional[str] = typer.Option(
            None, "--memory-budget", help="Memory the features may take, e.g. 24G; stores that do not fit are "
                                          "streamed from disk (default: 90% of the GPU's free memory, or 80% of "
                                          "the host's available memory)."),
        modalities: Optional[str] = typer.Option(None, help="Comma-separated subset, e.g. rgb,flow."),
        challenge: Optional[str] = typer.Option(None, help="EPIC-100: store to predict for the challenge test.json."),
        set_: List[str] = typer.Option([], "--set", help="Change any setting: --set w_adv=0 --set sc=false."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Whose base to start from: epic100 (the TA3N "
                                                                       "baseline's code) or mmsada (MM-SADA's code; "
                                                                       "default: the source store's dataset)."),
        settings: bool = typer.Option(False, "--settings", help="Print every setting with its resolved value, by "
                                                                "owner, and the schedule that will run."),
        quiet: bool = typer.Option(False, help="No progress bar."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a complete run in the same folder."),
        log: Optional[str] = typer.Option(None, "--log", help="Live trackers: tensorboard, mlflow, wandb (comma-"
                                                              "separated), auto (TensorBoard when installed: the "
                                                              "default) or none."),
    ):
        """Train adaptation heads on cached features and report target accuracy as the papers do."""
        from adapt import config as C
        from adapt.data import parse_bytes
        from adapt.trainer import train
        from featstore.paths import locate
        if memory_budget is not None:
            parse_bytes(memory_budget)
        backbone = backbone or _store_backbone(source) or "i3d"
        _, found, why = locate(source, "train", backbone, features_root)
        base, why = (dataset, "--dataset") if dataset else (found, f"the source: {why}")
        mods = [m.strip() for m in (modalities or "").split(",") if m.strip()]
        if modalities is not None and not mods:
            raise UserError(f"--modalities {modalities!r}: names no modality (e.g. rgb,flow)")
        given = dict(backbone=backbone, seed=seed, steps=steps, features_root=features_root, out=out, device=device,
                     eval=eval, challenge=challenge, memory_budget=memory_budget, modalities=mods or None)
        sets = C.parse_sets(set_)
        if log is not None:
            sets["log"] = log
        cfg = C.resolve(method, base, sets, source=source, target=target, **given)
        console.print(f"dataset base: {C.base_name(base)} ({why})", highlight=False, soft_wrap=True)
        if settings:
            print(C.settings_text(cfg))
            print(C.schedule_text(cfg))
            return
        final = train([cfg], console, progress=not quiet, overwrite=overwrite)[0]
        table = Table(title=f"{method}: {source} -> {target} (seed {seed})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        at = final["final_steps"]
        table.add_row(f"target top-1 (mean at steps {at[0]}..{at[-1]})" if len(at) > 1 else
                      f"target top-1 (step {at[0]})", f"{final['target_top1']:.2f}")
        table.add_row("final evaluation top-1", f"{final['final_top1']:.2f}")
        for m, v in final["per_modality"].items():
            table.add_row(f"  {m} stream top-1", f"{v:.2f}")
        for k in ("verb_top1", "noun_top1", "action_top1", "verb_top5", "noun_top5", "action_top5"):
            if k in final:
                table.add_row(k, f"{final[k]:.2f}")
        if final.get("collapse"):
            c = final["collapse"]
            table.add_row(f"INVALID: collapsed to {c.get('kind', 'one class')}",
                          f"class {c['class']} from step {c['steps'][0]}")
        for role, n in (final.get("overlap") or {}).items():
            table.add_row(f"INVALID: {role} shares clips with the source", str(n))
        table.add_row("seconds", f"{final['train_seconds']:.1f}")
        console.print(table)
        console.print(f"results in {Path(out)}")

    @command("import-features")
    def import_cmd(
        path: Path = typer.Argument(..., help="EPIC-100 UDA features pickle or HDF5 file."),
        manifest: str = typer.Option(..., help="Annotation split (name or file) to join on narration_id."),
        out: Path = typer.Option(..., help="The feature store to write (.zarr)."),
        backbone: str = typer.Option("tbn", help="Backbone the features came from (the trainer checks it)."),
        features_name: str = typer.Option("", help="A name for how the features were made; stores to be used "
                                                   "together must carry the same name."),
        overwrite: bool = typer.Option(False, help="Replace a store of this tool's at --out (the new one is built "
                                                   "beside it and swapped in when complete; a folder that is not "
                                                   "such a store is never replaced)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="The store's dataset, whose base training "
                                                                       "takes (default: the manifest's; EPIC-100 "
                                                                       "for the challenge's pickles)."),
    ):
        """Import features you already have (EPIC-100 UDA challenge pickles, HDF5) into a feature store."""
        from adapt.importer import import_features
        store = import_features(path, manifest, out, backbone, features_name, overwrite, dataset)
        console.print(f"wrote {store.num_clips} clips ({', '.join(store.modalities)}) to {out}")

    @command("sweep")
    def sweep_cmd(
        spec: Path = typer.Argument(..., help="Sweep spec (TOML or YAML): methods, pairs, seeds, set, grid, "
                                              "per_method, backbone, features_root, out."),
        max_stack: Optional[int] = typer.Option(None, "--max-stack", help="Runs trained stacked in one call (default: "
                                                                          "a short probe of each group decides, up "
                                                                          f"to {MAX_STACK})."),
        out: Optional[str] = typer.Option(None, help="Folder of the run folders and results (default: the spec's)."),
        set_: List[str] = typer.Option([], "--set", help="Change a base setting of every run: --set steps=100."),
        redo: bool = typer.Option(False, help="Retrain complete runs too."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the groups and what would be trained."),
        metric: str = typer.Option("target_top1", help="Metric of the final table."),
        quiet: bool = typer.Option(False, help="No progress bars."),
        log: Optional[str] = typer.Option(None, "--log", help="Live trackers of every run: tensorboard, mlflow, "
                                                              "wandb, auto or none (default: the spec's log, else "
                                                              "auto)."),
        slurm: Optional[str] = typer.Option(None, "--slurm", help="Submit the groups to train as a Slurm job array: "
                                                                  "partition=P,time=MIN,gpus_per_node=N,cpus_per_task"
                                                                  "=N,mem_gb=N (or local); run again to resubmit what "
                                                                  "is missing."),
        status: bool = typer.Option(False, "--status", help="Per group: queued, running, done or failed; merges the "
                                                            "results when every run is complete."),
    ):
        """Train a grid of methods x pairs x settings x seeds, stacked; resumable; one results table."""
        from adapt import config as C
        from adapt import reports as R
        from adapt.sweeps import run_sweep
        sets = C.parse_sets(set_)
        if log is not None:
            sets["log"] = log
        if slurm is not None or status:
            from adapt import slurm as SL
            from adapt.sweeps import load_spec
            loaded = load_spec(spec)
            if status:
                SL.status(loaded, str(spec), out, sets, console)
            else:
                SL.submit(loaded, str(spec), out, sets, SL.parse(slurm), console, max_stack)
            return
        res = run_sweep(spec, console, max_stack=max_stack, progress=not quiet, out=out,
                        extra_set=sets, redo=redo, dry_run=dry_run)
        if res.files:
            console.print(f"results: {', '.join(str(f) for f in res.files)}")
            if res.rows:
                for table in R.build_tables(res.rows, metric=metric):
                    R.print_table(table, console)
            from adapt.results import invalid_marks
            bad = [r["run"] for r in res.rows if invalid_marks(r)]
            if bad:
                console.print(f"[yellow]{len(bad)} of the {len(res.rows)} runs are invalid[/yellow] (collapsed, or "
                              f"sharing clips with the source): marked in the table and in results.csv's invalid "
                              f"column: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}", highlight=False)
            missing = len(res.runs) - len(res.rows)
            if missing:
                console.print(f"[yellow]{missing} run(s) have no results (no final.json)[/yellow]")
        if res.failed:
            from adapt.trainer import TrainingError
            names = [n for stack, _ in res.failed for n in stack]
            raise TrainingError(f"{len(names)} run(s) stopped: {', '.join(names)} (see above); the others are "
                                f"complete")

    @command("protocol")
    def protocol_cmd(
        spec: Path = typer.Argument(..., help="A sweep spec without pairs: methods, grid, seeds, set (EPIC-100 "
                                              "stores under features_root)."),
        out: Optional[Path] = typer.Option(None, help="Folder of tune/, train/ and protocol.json (default: the "
                                                      "spec's out)."),
        select: str = typer.Option("oracle", "--select", help="How a method's grid point is chosen on the "
                                                              "validation splits: oracle (target_val accuracy, "
                                                              "the protocol's) or a validator."),
        quiet: bool = typer.Option(False, help="No progress bars."),
    ):
        """EPIC-100 UDA's protocol: tune on source_val -> target_val, train the chosen settings on the train
        splits, write test.json for target_test."""
        from adapt.protocol import run_protocol
        run_protocol(spec, out, select, console, progress=not quiet)

    @command("report")
    def report_cmd(
        runs: List[Path] = typer.Argument(None, help="Run folders, folders of run folders, or results.jsonl files."),
        out: Optional[Path] = typer.Option(None, help="Where report.md, report.csv and the plots go "
                                                      "(default: the first RUNS folder)."),
        metric: str = typer.Option("target_top1", help="final.json key of the cells, e.g. target_top1, final_top1, "
                                                       "per_modality.rgb; EPIC-100: top1 or top5."),
        std: str = typer.Option("sample", help="Std over seeds: sample (n-1) or population (n)."),
        tsne: Optional[Path] = typer.Option(None, "--tsne", help="A run folder: write its t-SNE plot (before / after "
                                                                 "adaptation, per modality)."),
        max_points: int = typer.Option(500, help="t-SNE: most points per domain."),
        no_plots: bool = typer.Option(False, "--no-plots", help="Tables only."),
        select: Optional[str] = typer.Option(None, "--select", help="A validator (source_val, entropy, im, snd, "
                                                                    "dev) or all: the checkpoint and grid point "
                                                                    "it selects per method and pair, against the "
                                                                    "oracle's."),
    ):
        """Result tables (mean ± std over seeds per domain pair), accuracy curves and t-SNE plots."""
        from adapt.reports import write_report
        if not runs and tsne is None:
            raise UserError("give run folders (or results.jsonl files), or --tsne RUN")
        if runs:
            write_report(list(runs), out, metric, std, console, plots=not no_plots, select=select)
        if tsne is not None:
            from adapt import plots as P
            target = (Path(out) if out else Path(tsne)) / "tsne.png"
            P.plot_tsne(tsne, target, max_points=max_points)
            console.print(f"wrote {target}")
