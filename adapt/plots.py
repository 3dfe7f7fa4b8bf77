"""Figures of the papers from run folders (matplotlib, Agg backend, PNG).

* :func:`plot_accuracy` - target accuracy over training steps, one panel per domain pair, one line per method or
  ablation setting (mean over seeds, band = ± std over seeds, the report's convention), source-only drawn dashed
  black as the reference (MM-SADA Fig. 5).  Read from each run's ``metrics.jsonl``.
* :func:`plot_tsne` - t-SNE of source and target features per modality, before and after adaptation (MM-SADA
  Fig. 7).  Before: the stores' features pooled over space and windows.  After: the trained run's video-level
  features ``v[m]`` (the embedding and temporal aggregation of :class:`adapt.model.VideoModel` with the run's
  ``heads.pt``, evaluation mode, averaged over the evaluation views as the trainer's evaluation does).
  At most ``max_points`` clips per domain, drawn with a fixed seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from adapt.results import invalid_marks, mean_std, pair_of, pair_order, read_jsonl, row_label, row_order
from featstore.errors import UserError

SOURCE_COLOUR, TARGET_COLOUR = "#1f77b4", "#ff7f0e"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------------------------------------------
# accuracy over steps


def curve(row: dict, metric: str = "target_top1") -> dict:
    """{step: value} of one run, from its metrics.jsonl (or, without one, final.json's per-evaluation top-1)."""
    run_dir = Path(row["run_dir"]) if row.get("run_dir") else None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        out = {int(r["step"]): float(r[metric]) for r in read_jsonl(run_dir / "metrics.jsonl") if metric in r}
        if out:
            return out
    if metric == "target_top1" and row.get("eval_steps"):
        return {int(s): float(v) for s, v in zip(row["eval_steps"], row["target_top1_per_eval"])}
    return {}


def accuracy_curves(rows: list[dict], metric: str = "target_top1", std: str = "sample") -> dict:
    """{pair: {label: (steps, mean, std or None)}} over the seeds of each label (steps every seed has)."""
    backbones = len({r.get("backbone") for r in rows})
    grouped: dict = {}
    for r in rows:
        c = curve(r, metric)
        if c:
            grouped.setdefault(pair_of(r), {}).setdefault(row_label(r, backbones), []).append((c, r))
    order = row_order(rows, backbones)
    out = {}
    for pair, labels in grouped.items():
        out[pair] = {}
        for label in sorted(labels, key=order.index):
            curves = [c for c, _ in labels[label]]
            bad = sum(bool(invalid_marks(r)) for _, r in labels[label])
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            stats = [mean_std([c[s] for c in curves], std) for s in steps]
            sd = [s[1] for s in stats]
            shown = label + (f" ({bad}/{len(curves)} invalid)" if bad else "")  # collapsed runs say so
            out[pair][shown] = (np.array(steps), np.array([s[0] for s in stats]),
                                None if any(v is None for v in sd) else np.array(sd))
    return out


def plot_accuracy(rows: list[dict], path: str | Path, metric: str = "target_top1", std: str = "sample"):
    """One panel per pair; returns the PNG path, or None when no run has evaluations."""
    data = accuracy_curves(rows, metric, std)
    if not data:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    pairs = sorted(data, key=pair_order)
    cols = min(3, len(pairs))
    rows_n = math.ceil(len(pairs) / cols)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(lab for p in pairs for lab in data[p]))
    legend_rows = math.ceil(len(labels) / 3)
    height = 3.6 * rows_n + 0.3 * legend_rows + 0.4
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, height), squeeze=False)
    style = {}
    ci, refs, greys = 0, 0, ["black", "dimgray", "gray", "darkgray"]
    for lab in labels:
        if lab.split(" ")[0] == "source_only":  # the reference: dashed, black / grey
            style[lab] = dict(color=greys[refs % len(greys)], linestyle="--", zorder=5)
            refs += 1
        else:
            style[lab] = dict(color=colours[ci % len(colours)], linestyle="-")
            ci += 1
        if lab.endswith("invalid)"):  # a curve with invalid (collapsed) runs in it: dotted, with crosses
            style[lab].update(linestyle=":", marker="x", markersize=4)
    for ax, pair in zip(axes.flat, pairs):
        for lab, (steps, mean, sd) in data[pair].items():
            ax.plot(steps, mean, label=lab, linewidth=1.6, **style[lab])
            if sd is not None:
                ax.fill_between(steps, np.clip(mean - sd, 0, 100), np.clip(mean + sd, 0, 100),
                                color=style[lab]["color"], alpha=0.15, linewidth=0)  # accuracies stay in [0, 100]
        ax.set_title(pair)
        ax.set_ylim(top=min(101.0, ax.get_ylim()[1]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), frameon=False)
    title = f"target accuracy during training (mean over seeds, band ± {std} std)"
    fig.suptitle(title if cols > 1 else "target accuracy during training\n" + f"(mean over seeds, band ± {std} std)",
                 fontsize=11 if cols > 1 else 10)
    fig.tight_layout(rect=(0, (0.3 * legend_rows + 0.15) / height, 1, 1 - (0.35 if cols > 1 else 0.5) / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection(rows: list[dict], names: list[str], path: str | Path):
    """One panel per validator: its value against the target top-1 at every (run, evaluation) of the runs, with
    Spearman's rho in the title; returns the PNG path, or None when there is nothing to plot."""
    from adapt import selection as S
    panels = [(n, *S.points(rows, n)) for n in names]
    panels = [p for p in panels if len(p[1])]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4.2 * cols, 3.4 *
                                                                           math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (name, xs, ys) in zip(axes.flat, panels):
        rho = S.spearman(xs, ys)
        ax.scatter(xs, ys, s=9, alpha=0.6)
        ax.set_xlabel(name)
        ax.set_ylabel("target top-1 (%)")
        ax.set_title(f"{name}: rho {rho:.2f}" if rho is not None else name, fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------
# t-SNE before / after adaptation


def load_run(run_dir: str | Path, device: str = "cpu"):
    """(cfg, DomainPair, model, params) of a trained run: its config.json, stores and heads.pt."""
    import torch

    from adapt.config import from_saved
    from adapt.data import DomainPair
    from adapt.method import load
    from adapt.model import Inputs
    run_dir = Path(run_dir)
    for f in ("config.json", "heads.pt"):
        if not (run_dir / f).is_file():
            raise UserError(f"{run_dir}: no {f} (not a trained run folder)")
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = from_saved(saved)
    stores = saved.get("stores", {})
    for role in ("source", "target", "eval"):  # the resolved store paths, when they are still there
        if stores.get(role) and Path(stores[role]).exists():
            setattr(cfg, role, stores[role])
    cfg.device = device
    pair = DomainPair(cfg, torch.device(device))
    torch.manual_seed(cfg.seed)
    model = load(cfg.method)(cfg, Inputs(tuple(pair.modalities), pair.feature_shapes, pair.verb_classes,
                                         pair.noun_classes, pair.heads_units))
    params = torch.load(run_dir / "heads.pt", map_location=device)
    own = dict(model.named_parameters())
    missing, extra = set(own) - set(params), set(params) - set(own)
    if missing or extra:
        raise UserError(f"{run_dir}/heads.pt does not fit the run's model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(extra)[:3]})")
    model.train(False)
    return cfg, pair, model, params


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def pooled_features(dom, idx: np.ndarray) -> dict:
    """'Before': each clip's stored features averaged over space and windows -> {m: (n, C)}."""
    import torch
    out = {}
    for m, f in dom.feats.items():
        x = f[torch.from_numpy(idx)].float()
        if x.dim() == 5:
            x = x.mean(dim=(-2, -1))
        out[m] = x.mean(dim=1).numpy()
    return out


def adapted_features(cfg, pair, model, params, dom, idx: np.ndarray, batch: int = 256) -> dict:
    """'After': the run's video-level features v[m] (evaluation mode), averaged over the evaluation views."""
    import torch
    from torch.func import functional_call

    from adapt.data import Gatherer, averaged_over_views, standardisation
    from adapt.method import Context
    # the inputs as the run saw them: AdaBN with each domain's own statistics, otherwise the source store's
    per_domain = type(model).per_domain_statistics
    stats = standardisation(dom) if per_domain else standardisation(pair.source) if cfg.standardise else None
    gatherer = Gatherer(next(iter(dom.feats.values())).device)
    key = torch.tensor(cfg.seed, dtype=torch.int64)

    def forward(rows, units):
        x = {m: v[0] for m, v in gatherer([(dom, (rows[None], units[None]), stats)], list(dom.feats)).items()}
        out = functional_call(model, params, (x, Context(key, {lv: torch.zeros(()) for lv in model.reversals})))
        return {m: v.float() for m, v in out["video"].items()}

    with torch.no_grad():
        v = averaged_over_views(torch.from_numpy(idx), pair.eval_views(dom), batch, forward, dim=0)
    return {m: s.numpy() for m, s in v.items()}


def tsne_embeddings(run_dir: str | Path, max_points: int = 500, seed: int = 0) -> dict:
    """{(stage, modality): (xy (n_s + n_t, 2), n_s)} for stage in ('before', 'after')."""
    from sklearn.manifold import TSNE
    cfg, pair, model, params = load_run(run_dir)
    idx_s = _subsample(pair.source.n, max_points, seed)
    idx_t = _subsample(pair.target.n, max_points, seed + 1)
    feats = {
        "before": (pooled_features(pair.source, idx_s), pooled_features(pair.target, idx_t)),
        "after": (adapted_features(cfg, pair, model, params, pair.source, idx_s),
                  adapted_features(cfg, pair, model, params, pair.target, idx_t)),
    }
    out = {}
    for stage, (fs, ft) in feats.items():
        for m in pair.modalities:
            x = np.concatenate([fs[m], ft[m]]).astype(np.float64)
            x = (x - x.mean(0)) / (x.std(0) + 1e-6)
            perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
            xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
            out[(stage, m)] = (xy, len(idx_s))
    return out


def plot_tsne(run_dir: str | Path, path: str | Path | None = None, max_points: int = 500, seed: int = 0) -> Path:
    """Rows = modalities, columns = before / after adaptation; source and target in two colours."""
    run_dir = Path(run_dir)
    emb = tsne_embeddings(run_dir, max_points, seed)
    mods = list(dict.fromkeys(m for _, m in emb))
    plt = _pyplot()
    fig, axes = plt.subplots(len(mods), 2, figsize=(8, 3.8 * len(mods)), squeeze=False)
    for i, m in enumerate(mods):
        for j, stage in enumerate(("before", "after")):
            xy, n_s = emb[(stage, m)]
            ax = axes[i, j]
            ax.scatter(xy[:n_s, 0], xy[:n_s, 1], s=6, c=SOURCE_COLOUR, alpha=0.7, label="source")
            ax.scatter(xy[n_s:, 0], xy[n_s:, 1], s=6, c=TARGET_COLOUR, alpha=0.7, label="target")
            ax.set_title(f"{m}: {stage} adaptation")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].legend(loc="best", markerscale=2)
    fig.suptitle(f"t-SNE of {run_dir.name}")
    fig.tight_layout()
    path = Path(path) if path else run_dir / "tsne.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
