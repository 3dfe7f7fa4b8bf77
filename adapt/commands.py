"""The adaptation stage's commands: train, import-features, sweep, report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table


def _store_backbone(source: str) -> str | None:
    """The backbone a source given as a store path was extracted with."""
    from adapt.data import store_attrs
    if not (str(source).endswith(".zarr") or Path(source).is_dir()):
        return None
    return store_attrs(source).get("backbone")


def _method_names() -> list[str]:
    from adapt.methods import REGISTRY
    return list(REGISTRY)


def register(command, console):
    @command("methods")
    def methods_cmd(
        name: Optional[str] = typer.Argument(None, help="A method: print its facts (setting, value, reference)."),
        markdown: bool = typer.Option(False, "--markdown", help="Print the README's method table."),
    ):
        """The methods: their papers and presets; with a name, every fact of its preset and where it comes from."""
        from adapt.methods import REGISTRY, markdown_table
        from extract.errors import UserError
        if name is None:
            if markdown:
                print(markdown_table())
                return
            table = Table("method", "paper", "composition")
            for m in REGISTRY.values():
                table.add_row(m.name, m.title, m.composition)
            console.print(table)
            return
        if name not in REGISTRY:
            raise UserError(f"unknown method {name!r}: one of {', '.join(REGISTRY)}")
        m = REGISTRY[name]
        print(f"# {m.title}\n\n{m.citation}\n\n{m.table()}")
        for d in m.differences:
            print(f"\n- {d}")

    @command("train")
    def train_cmd(
        method: str = typer.Option("source_only", help="Method preset (`adapt methods` lists them): "
                                                       + ", ".join(_method_names()) + "."),
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
        settings: bool = typer.Option(False, "--settings", help="Print every setting with its resolved value."),
        quiet: bool = typer.Option(False, help="No progress bar."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a complete run in the same folder."),
    ):
        """Train adaptation heads on cached features and report target accuracy as the papers do."""
        from adapt import config as C
        from adapt.data import store_path
        from adapt.train import train
        backbone = backbone or _store_backbone(source) or "i3d"
        _, dataset = store_path(source, "train", backbone, features_root)
        given = dict(backbone=backbone, seed=seed, steps=steps, features_root=features_root, out=out, device=device,
                     eval=eval, challenge=challenge, memory_budget=memory_budget,
                     modalities=[m for m in (modalities or "").split(",") if m] or None)
        cfg = C.resolve(method, dataset, C.parse_sets(set_), source=source, target=target, **given)
        if settings:
            for k, v in cfg.to_dict().items():
                console.print(f"{k} = {v!r}")
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
        table.add_row("seconds", f"{final['train_seconds']:.1f}")
        console.print(table)
        console.print(f"results in {Path(out)}")

    from adapt.importer import register_import
    from adapt.report import register_report
    from adapt.sweep import register_sweep
    for register_more in (register_import, register_sweep, register_report):
        register_more(command, console)
