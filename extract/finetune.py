"""Supervised fine-tuning of a stage-1 backbone on a labelled split (``adapt finetune``).

The recipe (MM-SADA fine-tunes I3D from Kinetics on the source domain before extracting; REFERENCE.md
"Method hyper-parameters"): a linear verb classifier on the backbone's last map averaged over time and space,

    logits = W * mean_{t,h,w} f(x) + b,       loss = CE(logits, verb_class),

trained with SGD (momentum 0.9, weight decay 1e-7, constant learning rate ``lr``) for ``steps`` steps of
``batch_size`` clips.  Clips are drawn in epochs over the labelled rows, each in a fresh seeded order, and per
clip one window
(I3D, MM-SADA's training protocol: one window per iteration) or one TSN segment (TBN) among those of
:func:`extract.inputs.load_clip` with ``split_kind="train"``.  BatchNorm layers keep their running statistics
(frozen, evaluation mode; their affine parameters train), since small batches of video clips make poor
statistics.  Clips whose data is faulty are skipped (counted).

The result is written with :func:`extract.backbones.save_checkpoint` (this project's format: the backbone's own
keys, backbone and modality recorded), so ``adapt extract --checkpoint <modality>=<out>`` loads it; the classifier
and the loss curve travel as meta entries (``head_weight``, ``head_bias``, ``losses``...).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from extract.config import ExtractConfig
from featstore.errors import UserError

__all__ = ["finetune"]


class _InfiniteSampler(torch.utils.data.Sampler):
    """Endless ``(row, window_seed)`` pairs: epochs of the rows in a fresh (seeded) random order, and a seed per
    draw for the window / segment choice."""

    def __init__(self, rows: np.ndarray, seed: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.seed = int(seed)

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            for r in rng.permutation(self.rows):
                yield int(r), int(rng.integers(2 ** 31))

    def __len__(self):  # pragma: no cover - endless
        return 2 ** 62


class _TrainClips(torch.utils.data.Dataset):
    """``dataset[(row, window_seed)]`` -> ``(input tensor of one window / segment, label, error or None)``."""

    def __init__(self, records: dict[int, dict], cfg: ExtractConfig):
        self.records, self.cfg = records, cfg
        self.modality = cfg.modalities[0]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        from extract.inputs import ClipError, load_clip

        row, wseed = key
        rec = self.records[row]
        try:
            x = load_clip(rec, self.cfg)[self.modality]
        except ClipError as e:
            return None, int(rec["verb_class"]), " ".join(str(e).split())
        except UserError as e:
            return None, -1, "USER:" + " ".join(str(e).split())
        k = int(np.random.default_rng(wseed).integers(x.shape[0]))
        return torch.from_numpy(np.ascontiguousarray(x[k], dtype=np.float32)), int(rec["verb_class"]), None


def _freeze_bn(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()


def finetune(split, cfg: ExtractConfig, out: str | Path, checkpoint: str | Path | None = None, steps: int = 1000,
             lr: float = 0.01, batch_size: int = 8, device: str = "auto", workers: int | None = None,
             seed: int = 0, momentum: float = 0.9, weight_decay: float = 1e-7, console=None,
             progress: bool = True, log_every: int = 0) -> dict:
    """Fine-tune ``cfg.backbone`` for ``cfg.modalities[0]`` on the labelled clips of ``split``; save to ``out``.

    Returns ``{"out", "sha256", "steps", "losses" (per step), "accuracy" (per step, on the batch),
    "skipped_clips", "seconds", "verb_classes"}``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from extract.backbones import build, check_destination, save_checkpoint
    from extract.inputs import check_config
    from featstore.manifests import Split, resolve_split
    from extract.pipeline import default_workers, keep_item, memory_format, start_workers
    from featstore.devices import resolve_device

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    if len(cfg.modalities) != 1:
        raise UserError(f"finetune trains one modality at a time, got {', '.join(cfg.modalities)}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise UserError("--steps and --batch-size must be >= 1 and --lr > 0")
    cfg = replace(cfg, split_kind="train", modalities=tuple(cfg.modalities))
    check_config(cfg)
    modality = cfg.modalities[0]
    if not Path(cfg.data_root).is_dir():
        raise UserError(f"data root {cfg.data_root}: no such folder; pass --data-root")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint}: no such file")
    out = Path(check_destination(out, make_parent=True))  # a folder or an unwritable one: before training

    sp = split if isinstance(split, Split) else resolve_split(split)
    df = sp.read()
    labelled = np.flatnonzero(df["verb_class"].to_numpy() >= 0)
    if len(labelled) == 0:
        raise UserError(f"{sp.name}: no labelled clips (verb_class is -1 everywhere); fine-tuning needs labels")
    classes, _ = sp.class_counts(df)
    classes = max(int(classes), int(df["verb_class"].max()) + 1)

    dev = resolve_device(device)
    model = build(cfg.backbone, modality, checkpoint=checkpoint, seed=cfg.seed)
    if model.checkpoint_info is None:
        console.print(f"[yellow]warning:[/yellow] no --checkpoint: fine-tuning {cfg.backbone}/{modality} from "
                      f"random weights", highlight=False)
    model = model.to(dev).to(memory_format=memory_format(cfg))
    model.train()
    _freeze_bn(model)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(1024, classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(1024)
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    head = head.to(dev)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    amp = dev.type == "cuda"

    records = {int(r): {k: (v.item() if hasattr(v, "item") else v) for k, v in df.iloc[int(r)].to_dict().items()}
               for r in labelled}
    dataset = _TrainClips(records, cfg)
    sampler = _InfiniteSampler(labelled, seed)
    nw = default_workers(dev) if workers is None else int(workers)
    if nw > 0:
        loader = start_workers(torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=sampler, num_workers=nw, collate_fn=keep_item,
            prefetch_factor=max(2, batch_size // nw + 1), pin_memory=dev.type == "cuda"))
    else:
        loader = (dataset[k] for k in sampler)

    losses, accs = [], []
    skipped, tries = 0, 0
    max_tries = 50 * batch_size * steps
    bar = Progress(TextColumn("finetune {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console,
                   disable=not progress)
    with bar:
        task = bar.add_task(f"{cfg.backbone}/{modality} on {sp.name}", total=steps, loss="-")
        for step in range(steps):
            xs, ys = [], []
            while len(xs) < batch_size:
                x, y, err = next(loader)
                tries += 1
                if err is not None:
                    if err.startswith("USER:"):
                        raise UserError(err[5:])
                    skipped += 1
                    if tries > max_tries or (skipped == tries and skipped >= 20):
                        raise UserError(f"{sp.name}: {skipped} of {tries} clips could not be read "
                                        f"(last: {err}); check --data-root")
                    continue
                xs.append(x)
                ys.append(y)
            x = torch.stack(xs).to(dev, non_blocking=True).contiguous(memory_format=memory_format(cfg))
            y = torch.tensor(ys, dtype=torch.long, device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                fmap = model(x)
                pooled = fmap.float().flatten(2).mean(-1)
                logits = head(pooled)
            loss = nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            accs.append(float((logits.argmax(1) == y).float().mean()))
            bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
            if log_every and (step + 1) % log_every == 0:
                console.print(f"step {step + 1}: loss {np.mean(losses[-log_every:]):.4f}", highlight=False)

    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_checkpoint(
        model.cpu().to(memory_format=torch.contiguous_format), out, step=steps, split=sp.name, lr=lr,
        batch_size=batch_size, seed=seed, verb_classes=classes, losses=losses,
        head_weight=head.weight.detach().cpu().clone(), head_bias=head.bias.detach().cpu().clone(),
        sampling=cfg.sampling(), preprocessing=cfg.preprocessing(),
        init_sha256=(model.checkpoint_info.sha256 if model.checkpoint_info else None))
    seconds = time.perf_counter() - t0
    k = max(1, min(10, steps // 4))
    console.print(f"fine-tuned {cfg.backbone}/{modality} on {sp.name} for {steps} steps in {seconds:.0f} s: loss "
                  f"{np.mean(losses[:k]):.4f} (first {k}) -> {np.mean(losses[-k:]):.4f} (last {k}); "
                  f"{skipped} clip reads skipped; saved {out} (sha256 {digest[:12]}); use it with "
                  f"`adapt extract --checkpoint {modality}={out}`", highlight=False, soft_wrap=True)
    return {"out": str(out), "sha256": digest, "steps": steps, "losses": losses, "accuracy": accs,
            "skipped_clips": skipped, "seconds": seconds, "verb_classes": classes}
