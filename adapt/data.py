"""Feature stores -> tensors on the training device, and the per-step index sampling.

The fast path: every store is read once into (host or GPU) memory as float16 and each step gathers its batch by
index on the device, so a step does no Python-side data loading.  ``DomainPair`` holds the labelled source
training store, the unlabelled target training store (its labels are not loaded unless the method is the
supervised-target upper bound) and the evaluation store (target test; labels used only for metrics).

Temporal units: an I3D store holds ``W`` windows per clip and the heads see one window (T = 1; training draws one
at random per clip and step, evaluation averages the softmax over all windows, as MM-SADA).  A TBN store holds
25 TSN segments; the heads see ``segments`` = 5 of them (training draws one at random from each of 5 equal
groups, evaluation takes the centre of each group: 2, 7, 12, 17, 22, as TA3N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapt.method import load as load_method
from featstore.errors import UserError
from featstore.paths import resolve_store
from featstore.store import FeatureStore, check_compatible, redo_hint


@dataclass
class Domain:
    """One store: ``feats[m]`` is (N, U, C[, H, W]) float16 on the device (in memory) or a :class:`StreamSource`
    read per batch (streamed); labels and ids in memory either way."""

    name: str
    path: Path
    feats: dict
    verb: torch.Tensor
    noun: torch.Tensor
    ids: np.ndarray
    units: int
    streamed: bool = False
    scales: dict | None = None       # int8 form: per-channel scales, feature = int8 value x scale

    @property
    def n(self) -> int:
        return len(self.ids)


def finite_rows(block: np.ndarray) -> np.ndarray:
    """(N,) whether each row of an (N, ...) block is finite everywhere; N may be 0 (a step that draws no clip of a
    domain, as MM-SADA's source-only draws no target clip)."""
    return np.isfinite(block).all(axis=tuple(range(1, block.ndim)))


class StreamSource:
    """A modality of a streamed store: ``read(clips, units)`` reads those (clip, unit) features from the store
    (tensorstore: only their inner chunks in a version-2 store), pooled over space like ``load_domain`` pools when
    the run uses pooled features.  ``shape`` is the in-memory tensor's shape it stands for."""

    def __init__(self, store: FeatureStore, modality: str, rows: np.ndarray, pool: bool, ids: np.ndarray):
        self.store, self.modality, self.rows, self.pool, self.ids = store, modality, rows, pool, ids
        self.reader = store.reader(modality)
        full = self.reader.shape
        self.shape = (len(rows), full[1], *(full[2:3] if pool else full[2:]))
        self.dtype = torch.float16

    def read(self, clips: np.ndarray, units: np.ndarray) -> torch.Tensor:
        """clips (N,) domain rows, units (N, T) -> (N, T, ...) float16 (CPU)."""
        block = self.reader.units(self.rows[clips], units)
        finite = finite_rows(block)
        if not finite.all():
            bad = self.ids[self.rows[clips][int(np.flatnonzero(~finite)[0])]]
            raise UserError(f"{self.store.path}: non-finite {self.modality} features in clip {bad}")
        x = torch.from_numpy(block)
        return x.float().mean(dim=(-2, -1)).half() if self.pool else x

    def rows_block(self, lo: int, hi: int) -> torch.Tensor:
        """Domain rows lo..hi-1 with all their units (for statistics), float16 (CPU)."""
        units = np.broadcast_to(np.arange(self.shape[1]), (hi - lo, self.shape[1]))
        return self.read(np.arange(lo, hi), units)


def _kept_rows(store: FeatureStore, path: Path) -> np.ndarray:
    keep = np.flatnonzero(store.done_mask())
    if len(keep) == 0:
        raise UserError(f"{path}: no extracted clips")
    return keep


def _done_clips(store: FeatureStore) -> int:
    return int(store.attrs.get("num_done") or store.done_mask().sum())


def memory_bytes(store: FeatureStore, modalities: list[str], spatial: bool, form: str = "float16") -> int:
    """The bytes a store takes in memory (float16, or int8; pooled over space unless the run keeps the maps)."""
    n = _done_clips(store)
    total = 0
    for m in modalities:
        shape = store.attrs["window_shapes"][m]
        per_unit = shape[1] if (not spatial and len(shape) == 4) else int(np.prod(shape[1:]))
        total += n * shape[0] * per_unit * (1 if form == "int8" else 2)
    return total


def load_domain(path: Path, name: str, modalities: list[str], device: torch.device, spatial: bool,
                labels: bool = True, streamed: bool = False, form: str = "float16") -> Domain:
    """A complete store (failed clips left out; otherwise every clip must be done), read into memory chunk by chunk
    (the peak is the result plus one chunk), or opened for streaming (``streamed``: read per batch).

    ``form="int8"`` keeps each value as ``round(x / s_c)`` in int8 with a per-channel scale ``s_c = max |x_c| /
    127`` (a first pass over the store finds the maxima): half of float16's memory."""
    store = FeatureStore.open(path, require_complete=True)
    keep = _kept_rows(store, path)
    feats = {}
    ids = store.meta("id")
    keep_mask = np.zeros(store.num_clips, dtype=bool)
    keep_mask[keep] = True
    scales = None
    redo = redo_hint(store.attrs, path, "it")  # an imported store is imported again, an extracted one resumed
    for m in modalities:
        pool = not spatial and len(store.attrs["window_shapes"][m]) == 4
        for chunk in np.unique(keep // store.chunk_clips):
            # a chunk file that is gone would read as zeros: refused (one that was cut fails to decode)
            if not store.chunk_file(m, int(chunk)).is_file():
                raise UserError(f"{path}: {m} chunk {chunk} missing, but clips in it are marked done; {redo}")
        if streamed:
            feats[m] = StreamSource(store, m, keep, pool, ids)
            continue
        reader = store.reader(m)
        shape = reader.shape[1:3] if pool else reader.shape[1:]
        int8 = form == "int8"
        if int8:
            scale = _channel_scales(reader, keep_mask, store.chunk_clips, pool)
            scales = dict(scales or {}, **{m: scale.to(device)})
        t = torch.empty((len(keep), *shape), dtype=torch.int8 if int8 else torch.float16, device=device)
        at = 0
        for lo in range(0, store.num_clips, store.chunk_clips):
            hi = min(lo + store.chunk_clips, store.num_clips)
            sel = keep_mask[lo:hi]
            if not sel.any():
                continue
            block = reader.rows(lo, hi)
            block = block if sel.all() else block[sel]
            finite = finite_rows(block)
            if not finite.all():
                bad = ids[lo:hi][sel][int(np.flatnonzero(~finite)[0])]
                raise UserError(f"{path}: non-finite {m} features in clip {bad}")
            block = torch.from_numpy(block)
            if pool:  # pooled at load: (N, U, C)
                block = block.float().mean(dim=(-2, -1)).half()
            if int8:
                view = (-1,) + (1,) * (block.dim() - 3)
                block = (block.float() / scale.view(view)).round_().clamp_(-127, 127).to(torch.int8)
            t[at:at + len(block)] = block.to(device)
            at += len(block)
        feats[m] = t
    n = len(keep)
    verb = torch.from_numpy(store.meta("verb_class")[keep].astype(np.int64)) if labels else torch.full((n,), -1)
    noun = torch.from_numpy(store.meta("noun_class")[keep].astype(np.int64)) if labels else torch.full((n,), -1)
    units = int(store.attrs["window_shapes"][modalities[0]][0])
    return Domain(name, Path(path), feats, verb.to(device), noun.to(device), ids[keep], units, streamed, scales)


def _channel_scales(reader, keep_mask: np.ndarray, chunk: int, pool: bool) -> torch.Tensor:
    """max |x| / 127 per channel over the kept clips (the int8 form's scales), (C,) float32; 1 for a channel that
    is zero everywhere."""
    top = None
    for lo in range(0, len(keep_mask), chunk):
        hi = min(lo + chunk, len(keep_mask))
        sel = keep_mask[lo:hi]
        if not sel.any():
            continue
        x = torch.from_numpy(reader.rows(lo, hi)[sel]).float()
        if pool:
            x = x.mean(dim=(-2, -1))
        dims = [0, 1] + list(range(3, x.dim()))
        m = x.abs().amax(dim=dims)
        top = m if top is None else torch.maximum(top, m)
    return torch.where(top > 0, top / 127.0, torch.ones_like(top))


PREFETCH = 4  # batches read ahead of the step by the streaming path


def parse_bytes(text: str) -> int:
    """'24G', '512M', '1.5GB', '2e9' -> bytes (powers of 1024 for K/M/G/T)."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    bad = UserError(f"--memory-budget {text!r}: expected a positive size such as 24G, 512M or a number of bytes")
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise bad from None
    if not math.isfinite(value) or value <= 0:
        raise bad
    return int(value)


def default_budget(device: torch.device) -> tuple[int, str]:
    """What the features may take: 90% of the GPU's free memory, or 80% of the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9), "90% of the GPU's free memory"
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import os
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return int(avail * 0.8), "80% of the host's available memory"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def plan_memory(sizes: dict, stream_need: dict, budget: int, why: str) -> tuple[set, str]:
    """Which stores are streamed: stores go into memory smallest first while they and the streaming buffers of
    the rest fit the budget (a store smaller than its buffers always).  Returns (streamed roles, the one line that
    says so); refuses in one line when even streaming every store cannot fit."""
    streamed, total = set(sizes), sum(stream_need.values())  # "work": the step's own memory, always needed
    for role in sorted(sizes, key=sizes.get):
        change = sizes[role] - stream_need[role]
        if total + change <= budget or change <= 0:
            streamed.discard(role)
            total += change
    if total > budget:
        raise UserError(f"memory budget {_gb(budget)} ({why}) cannot hold even the streaming buffers and the "
                        f"step ({_gb(total)}: {PREFETCH} batches read ahead per store; the stores take "
                        f"{', '.join(f'{r} {_gb(b)}' for r, b in sizes.items())}): raise --memory-budget or lower "
                        f"the batch sizes")
    line = (f"memory budget {_gb(budget)} ({why}): " +
            ", ".join(f"{r} {'streamed' if r in streamed else 'in memory'} ({_gb(sizes[r])})" for r in sizes))
    return streamed, line


def memory_needs(cfg, stores: dict, modalities: list[str]) -> tuple[dict, dict]:
    """(bytes each store takes in memory, bytes its streaming buffers take): ``PREFETCH`` batches read ahead
    plus the one in use, of the units the heads see (``eval_batch`` clips for the evaluation store)."""
    sizes = {r: memory_bytes(st, modalities, cfg.spatial, cfg.feature_form) for r, st in stores.items()}
    n = {r: _done_clips(st) for r, st in stores.items()}
    bt = cfg.batch_target if cfg.batch_target is not None else max(1, cfg.batch_source * n["target"] // max(1, n["source"]))
    batch = {"source": cfg.batch_source, "target": bt, "eval": cfg.eval_batch}
    batch = {r: min(b, max(1, n[r])) for r, b in batch.items()}
    units = 1 if cfg.backbone == "i3d" else cfg.segments
    per_clip = {r: memory_bytes(stores[r], modalities, cfg.spatial) / max(1, n[r])
                / stores[r].attrs["window_shapes"][modalities[0]][0] * units for r in stores}  # streamed: float16
    need = {r: int((PREFETCH + 1) * batch[r] * per_clip[r]) for r in stores}
    # the step's own memory, the same streamed or not: the float32 batch with what autograd and the allocator keep
    # of it (measured for cia on 7x7 maps: 24x; 8x for pooled features), the parameters with their gradients and
    # optimiser moments, and the readers' buffers (64 MB)
    step_f32 = (batch["source"] + batch["target"]) * per_clip["source"] * 2
    channels = sum(stores["source"].attrs["window_shapes"][m][1] for m in modalities)
    params = 16 * cfg.embed_dim * channels * (2 if getattr(cfg, "mc", False) else 1)  # MC doubles the channels
    need["work"] = int(step_f32 * (24 if cfg.spatial else 8) + params + (64 << 20))
    return sizes, need


def evaluation_store(cfg) -> Path:
    """The evaluation store: ``eval``, else the target domain's test split (a domain name by the registry; a store
    path by its manifest: the domain's test split beside it, when that store is there), else the target itself."""
    from featstore import manifests as M
    from featstore.paths import store_attrs
    ev, _ = resolve_store(cfg.eval or cfg.target, "test", cfg.backbone, cfg.features_root)
    if cfg.eval or not (str(cfg.target).endswith(".zarr") or Path(str(cfg.target)).is_dir()):
        return ev
    name = store_attrs(ev).get("manifest_name")
    registry = M.load_registry()
    for dom in registry["domains"].values():
        if dom["train"] == name and dom.get("test"):
            beside = Path(str(cfg.target)).parent / f"{dom['test']}.zarr"
            if beside.exists():
                return beside
    return ev


def shared_clips(source: Path, others: dict, allowed: bool) -> dict:
    """{role: clips it shares with the source} of the target and evaluation stores (the same id, video and frames:
    a copy of the source, or the source's own split); refused in one line unless ``allowed``, when every output
    of the run marks it."""
    from featstore.identity import overlap
    found = {}
    for role, path in others.items():
        n = overlap(source, path)
        if n and not allowed:
            raise UserError(f"{path}: the {role} store shares {n} clips with the source store {source} (the same "
                            f"ids, videos and frames: a copy of the source?); give the target's own split, or "
                            f"--set allow_overlap=true to train anyway (every output then marks the run)")
        if n:
            found[role] = n
    return found


class DomainPair:
    """Source (labelled), target (unlabelled) and evaluation stores, checked to fit together; each read into
    memory, or streamed when the stores do not fit the memory budget (``memory_budget``, :func:`plan_memory`)."""

    def __init__(self, cfg, device: torch.device):
        src, ds = resolve_store(cfg.source, "train", cfg.backbone, cfg.features_root)
        tgt, dt = resolve_store(cfg.target, "train", cfg.backbone, cfg.features_root)
        ev = evaluation_store(cfg)
        self.dataset = ds if ds == dt else "custom"
        same = lambda a, b: Path(a).resolve() == Path(b).resolve()  # noqa: E731
        if same(src, tgt):
            raise UserError(f"{src}: the source and the target are the same store; adaptation needs two domains")
        if same(src, ev):
            raise UserError(f"{ev}: the evaluation store is the source's own; give the target's test split (--eval)")
        for p in (src, tgt, ev):
            demo = Path(cfg.features_root) / "demo" / Path(p).relative_to(cfg.features_root) \
                if Path(p).is_relative_to(cfg.features_root) else None
            if not Path(p).exists() and demo is not None and demo.exists():
                raise UserError(f"{p}: no such store; the demo's stores are under {Path(cfg.features_root) / 'demo'}"
                                f" (--features-root {Path(cfg.features_root) / 'demo'})")
        stores = {"source": FeatureStore.open(src), "target": FeatureStore.open(tgt), "eval": FeatureStore.open(ev)}
        self.overlap = shared_clips(src, {"target": tgt, "eval": ev}, cfg.allow_overlap)
        shared = [m for m in stores["source"].modalities if all(m in s.modalities for s in stores.values())]
        modalities = list(cfg.modalities) or shared
        self.notes = []  # said in the run's first lines
        for m in sorted({m for s in stores.values() for m in s.modalities} - set(modalities)):
            if not cfg.modalities:
                lacking = [role for role, s in stores.items() if m not in s.modalities]
                self.notes.append(f"modality {m} left out: the {' and '.join(lacking)} store"
                                  f"{'s have' if len(lacking) > 1 else ' has'} none (the run trains on "
                                  f"{', '.join(modalities)})")
        check_compatible(stores, modalities)
        if stores["source"].attrs.get("backbone") != cfg.backbone:
            raise UserError(f"{src}: features of backbone {stores['source'].attrs.get('backbone')!r}, "
                            f"not {cfg.backbone!r} (--backbone)")
        self.modalities = modalities
        self.backbone = cfg.backbone
        self._segments(cfg, stores["source"])
        if cfg.temporal == "trn" and self.heads_units <= 1:  # e.g. the EPIC-100 base on I3D stores
            self.notes.append(f"temporal=trn: the heads see one {cfg.backbone} unit a clip here, so there is no TRN "
                              f"(the video feature is the clip's own); TRN needs TBN segments (--backbone tbn)")
        streamed, self.memory_line = self._memory_plan(cfg, device, stores)
        form = cfg.feature_form
        self.source = load_domain(src, cfg.source, modalities, device, cfg.spatial, labels=True,
                                  streamed="source" in streamed, form=form)
        method = load_method(cfg.method)
        self.target = load_domain(tgt, cfg.target, modalities, device, cfg.spatial,
                                  labels=method.uses_target_labels,  # the target's labels are not read otherwise
                                  streamed="target" in streamed, form=form)
        self.eval = load_domain(ev, cfg.eval or cfg.target, modalities, device, cfg.spatial, labels=True,
                                streamed="eval" in streamed, form=form)
        if (self.eval.verb < 0).all():
            raise UserError(f"{ev}: the evaluation store has no labels (an unlabelled split, such as a target's train "
                            f"split): give --eval a labelled split of the target (its test or val split)")
        if (self.source.verb < 0).any():
            raise UserError(f"{src}: the source store has unlabelled clips; the source must be labelled")
        if method.uses_target_labels and (self.target.verb < 0).any():
            raise UserError(f"{tgt}: supervised target training needs a labelled target store")
        # the class space: the source's (its dataset's, or what its manifest declares), not what the evaluation
        # split happens to contain (a test split may lack the rarest classes); labels outside it are refused
        attrs = stores["source"].attrs
        self.verb_classes = int(attrs.get("verb_classes") or int(self.source.verb.max()) + 1)
        self.noun_classes = int(attrs.get("noun_classes") or 0)
        for dom in (self.source, self.eval):
            if int(dom.verb.max()) >= self.verb_classes:
                raise UserError(f"{dom.path}: verb class {int(dom.verb.max())} outside the {self.verb_classes} "
                                f"classes of the source store {src} (declare the classes of your splits in a "
                                f"classes.json beside their manifests)")
        self.feature_shapes = {m: tuple(self.source.feats[m].shape[2:]) for m in modalities}
        self.units_per_clip = self.source.units
        self.feature_bytes = sum(t.numel() * t.element_size() for d in (self.source, self.target, self.eval)
                                 if not d.streamed for t in d.feats.values())

    def _segments(self, cfg, store: FeatureStore) -> None:
        """The units the heads see (``heads_units``) and, for a TBN store that keeps some of its segments
        (``stored_segments`` at extraction), which of the original segments each stored unit is."""
        sampling = store.attrs.get("sampling") or {}
        units = int(store.attrs["window_shapes"][self.modalities[0]][0])
        self.stored = list(sampling.get("stored_segments") or range(units))
        self.original_units = int(sampling.get("segments") or units) if sampling.get("stored_segments") else units
        self.heads_units = 1 if cfg.backbone == "i3d" else min(cfg.segments, self.original_units)
        if self.heads_units > 1:
            bounds = np.linspace(0, self.original_units, self.heads_units + 1).astype(int)
            pos = np.asarray(self.stored)
            self.groups = [np.flatnonzero((pos >= bounds[i]) & (pos < bounds[i + 1])) for i in range(self.heads_units)]
            empty = [i for i, g in enumerate(self.groups) if len(g) == 0]
            if empty:
                raise UserError(f"{store.path}: keeps segments {self.stored} of {self.original_units}, none in "
                                f"group {empty[0] + 1} of the {self.heads_units} the heads see: set segments="
                                f"{len(self.stored)} or extract more segments")

    def _memory_plan(self, cfg, device, stores: dict) -> tuple[set, str]:
        budget, why = ((parse_bytes(cfg.memory_budget), "--memory-budget") if cfg.memory_budget
                       else default_budget(device))
        return plan_memory(*memory_needs(cfg, stores, self.modalities), budget, why)

    # ------------------------------------------------------------------------------------------------------
    # the units a clip's heads see

    def sample_units(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """(batch, T) stored-unit indices: one random window (I3D), or one random segment from each of T equal
        groups of the original segments (TBN; a store that keeps some segments offers the kept ones)."""
        U, T = self.units_per_clip, self.heads_units
        if T == 1:
            return rng.integers(0, U, size=(batch, 1))
        return np.stack([g[0] + rng.integers(0, len(g), size=batch) for g in self.groups], axis=1)

    def fixed_units(self) -> np.ndarray:
        """(T,) the group centres: TBN's 2, 7, 12, 17, 22 of 25 (TA3N dataset.py:147-160), or the kept segment
        nearest each; I3D's middle window."""
        U, T = self.units_per_clip, self.heads_units
        if T == 1:
            return np.array([U // 2])
        bounds = np.linspace(0, self.original_units, T + 1)
        centres = ((bounds[:-1] + bounds[1:]) / 2).astype(int)
        pos = np.asarray(self.stored)
        return np.array([int(np.argmin(np.abs(pos - c))) for c in centres])

    def eval_views(self, dom: "Domain | None" = None) -> list[np.ndarray]:
        """The unit sets that evaluation averages over: each window (I3D) or the group centres (TBN)."""
        if self.heads_units == 1:
            return [np.array([w]) for w in range((dom or self.eval).units)]
        return [self.fixed_units()]


def averaged_over_views(rows: torch.Tensor, views: list[np.ndarray], batch: int, forward, dim: int) -> dict:
    """The evaluation protocol (MM-SADA's test: each stored window a view, the outputs averaged over the views):
    ``forward(clips, units)`` on every view's units of the clips ``rows``, ``batch`` clips at a time, concatenated
    along ``dim`` and averaged over the views.  The trainer's evaluation and the plots' features both use it."""
    total = None
    for view in views:
        units = torch.from_numpy(view).to(rows.device)
        parts = [rows[lo:lo + batch] for lo in range(0, len(rows), batch)]
        outs = [forward(part, units.expand(len(part), -1)) for part in parts]
        s = {k: torch.cat([o[k] for o in outs], dim=dim) for k in outs[0]}
        total = s if total is None else {k: total[k] + s[k] for k in s}
    return {k: v / len(views) for k, v in total.items()}


class EpochSampler:
    """Clip indices drawn epoch by epoch without replacement, as both reference codes do (MM-SADA
    batch_generator.py:87-100; TA3N's RandomSampler): a permutation is consumed in order, and when it runs out a new
    one tops the batch up, skipping clips already in it (unless the domain has fewer clips than a batch)."""

    def __init__(self, n: int, rng: np.random.Generator, rows: np.ndarray | None = None):
        """``rows``: the clips to draw from (default all ``n``; the source's training rows when some are held
        out for validation)."""
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.n = n if rows is None else len(self.rows)
        self.rng, self.pool = rng, np.empty(0, dtype=np.int64)

    def draw(self, batch: int) -> np.ndarray:
        take = list(self.pool[:batch])
        self.pool = self.pool[batch:]
        while len(take) < batch:
            fresh = self.rng.permutation(self.n)
            if self.n >= batch:
                used = np.isin(fresh, take)
                fresh = np.concatenate([fresh[~used], fresh[used]])
            need = batch - len(take)
            take += list(fresh[:need])
            self.pool = fresh[need:]
        take = np.asarray(take, dtype=np.int64)
        return take if self.rows is None else self.rows[take]


def draw_batch(pair: "DomainPair", cfg, rng: np.random.Generator, samplers: tuple, sizes: tuple,
               arrange=None) -> list[dict]:
    """One run's clips and units for one step: per domain (source, target) ``{m: (clip idx (B,), units (B, T))}``.

    Units: the fixed group centres (``units=fixed``, TA3N), else drawn per clip, independently for each modality
    (MM-SADA batch_generator.py:294-298; Kim et al. Table 5) or shared by them (``sync_windows``).  ``arrange``
    (the method's :meth:`adapt.method.Method.arrange`) may then pair them otherwise (MM-SADA's correspondence
    negatives)."""
    out = []
    for sampler, B in zip(samplers, sizes):
        idx = sampler.draw(B)
        if cfg.units == "fixed":
            fixed = np.broadcast_to(pair.fixed_units(), (B, pair.heads_units))
            units = {m: fixed for m in pair.modalities}
        elif cfg.sync_windows:
            shared = pair.sample_units(rng, B)
            units = {m: shared for m in pair.modalities}
        else:
            units = {m: pair.sample_units(rng, B) for m in pair.modalities}
        sel = {m: (idx, units[m]) for m in pair.modalities}
        out.append(arrange(sel, B) if arrange else sel)
    return out


class Gatherer:
    """Gathers each step's features into float32 buffers that are allocated once and reused every step.

    A batch is the concatenation (along the batch axis) of parts ``(domain, clip index (K, B), units (K, B, T),
    statistics)``; each part's float16 rows are picked with one ``index_select`` into a float16 scratch buffer,
    converted by copying into its slice of the float32 buffer and standardised in place.  Fresh tensors of this
    size every step would cost more than the copies themselves (page faults on every large allocation on CPU).
    The buffers returned are overwritten by the next call with the same ``key``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict = {}

    def _buffer(self, name, shape: tuple, dtype) -> torch.Tensor:
        """A buffer with at least ``shape[0]`` rows of ``shape[1:]``, its first rows returned."""
        b = self._buffers.get(name)
        if b is None or b.shape[1:] != shape[1:] or b.shape[0] < shape[0] or b.dtype != dtype:
            b = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return b[:shape[0]]

    def __call__(self, parts: list, modalities, key: str = "train", reads: dict | None = None) -> dict:
        """{m: (K, sum of B, T, ...) float32} for the modalities given; a part is ``(domain, sel, statistics)``
        with ``sel[m] = (clip index (K, B), units (K, B, T))`` per modality, or one such pair for all.  A streamed
        domain's rows come from ``reads[(part index, m)]`` (read ahead by :class:`Prefetcher`) or are read now."""
        out = {}
        for m in modalities:
            sels = [sel[m] if isinstance(sel, dict) else sel for _, sel, _ in parts]
            K, T = sels[0][1].shape[0], sels[0][1].shape[2]
            total = sum(idx.shape[1] for idx, _ in sels)
            feat = tuple(parts[0][0].feats[m].shape[2:])
            x = self._buffer((key, m), (K * total * T, *feat), torch.float32).view(K, total, T, *feat)
            at = 0
            for i, ((dom, _, stats), (idx, units)) in enumerate(zip(parts, sels)):
                f = dom.feats[m]
                B = idx.shape[1]
                if B == 0:  # a domain the step does not draw from (SHOT's stages)
                    continue
                part = x[:, at:at + B]
                if dom.streamed:
                    host = (reads or {}).get((i, m))
                    if host is None:
                        host = read_part(f, idx, units)
                    part.copy_(host.view(K, B, T, *feat), non_blocking=True)
                else:
                    rows = (idx.unsqueeze(-1) * f.shape[1] + units).reshape(-1).to(f.device)
                    scratch = self._buffer(("half" if f.dtype == torch.float16 else "int8", m), (len(rows), *feat),
                                           f.dtype)
                    torch.index_select(f.view(-1, *feat), 0, rows, out=scratch)
                    part.copy_(scratch.view(K, B, T, *feat))
                    if dom.scales is not None:  # the int8 form
                        part.mul_(dom.scales[m].view((-1,) + (1,) * (len(feat) - 1)))
                if stats:
                    mean, std = stats[m]
                    part.sub_(mean).mul_(std.reciprocal())
                at += B
            out[m] = x
        return out


def read_part(source: StreamSource, idx, units, pin: bool = False) -> torch.Tensor:
    """A streamed part's rows: idx (K, B), units (K, B, T) (numpy or tensors) -> (K * B * T, ...) float16 on
    the host (pinned when ``pin``, for an asynchronous copy to the GPU)."""
    idx = idx.cpu().numpy() if torch.is_tensor(idx) else np.asarray(idx)
    units = units.cpu().numpy() if torch.is_tensor(units) else np.asarray(units)
    K, B, T = units.shape
    x = source.read(idx.reshape(-1), units.reshape(K * B, T)).reshape(K * B * T, *source.shape[2:])
    return x.pin_memory() if pin else x


class Prefetcher:
    """Runs ``produce(step)`` in a background thread ``depth`` steps ahead of ``get(step)``, in step order: the
    next batches' plans are drawn and their streamed features read while the model trains on this one.  Plans are
    drawn by ``produce`` alone and in order, so a streamed run draws exactly what an in-memory run draws.  An
    exception in the thread is raised by the ``get`` of its step."""

    def __init__(self, produce, steps: int, depth: int = PREFETCH, start: int = 0):
        import queue
        import threading
        self.queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

        def work():
            for step in range(start, steps):
                if self.stop.is_set():
                    return
                try:
                    item = (step, produce(step), None)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer
                    item = (step, None, e)
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return
        self.thread = threading.Thread(target=work, daemon=True, name="prefetch")
        self.thread.start()

    def get(self, step: int):
        got, value, error = self.queue.get()
        if error is not None:
            raise error
        assert got == step, (got, step)
        return value

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def standardisation(dom: Domain, chunk_bytes: int = 64 << 20) -> dict:
    """Per-channel mean and std of a domain's features (AdaBN statistics), {m: (mean, std)} shaped (C, 1, 1).

    Accumulated over blocks of clips in float64 (sum and sum of squares), so that the float32 working copy is one
    block rather than the whole store."""
    out = {}
    for m, f in dom.feats.items():
        ndim = len(f.shape)
        dims = [0, 1] + list(range(3, ndim))
        per_clip = max(1, int(np.prod(f.shape[1:])) * 8)
        step = max(1, chunk_bytes // per_clip)
        device = dom.verb.device
        total = torch.zeros(f.shape[2], dtype=torch.float64, device=device)
        squares = torch.zeros_like(total)
        for lo in range(0, f.shape[0], step):
            block = f.rows_block(lo, min(lo + step, f.shape[0])) if dom.streamed else f[lo:lo + step]
            x = block.to(device).double()
            if dom.scales is not None:
                x = x * dom.scales[m].double().view((-1,) + (1,) * (ndim - 3))
            total += x.sum(dim=dims)
            squares += x.square().sum(dim=dims)
        count = int(np.prod(f.shape)) // f.shape[2]
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0)
        std = var.add(1e-5).sqrt()
        shape = (-1,) + (1,) * (ndim - 3)
        out[m] = (mean.float().reshape(shape), std.float().reshape(shape))
    return out
