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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapt import parts
from extract import manifests as M
from extract.errors import UserError
from extract.store import FeatureStore, check_compatible


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use auto or cpu)")
    return torch.device(device)


def store_path(name: str, role: str, backbone: str, features_root: str | Path) -> tuple[Path, str]:
    """A domain (``D1``), split (``D1_train``) or store path (``x.zarr``) -> (store path, dataset name).

    ``role`` is 'train' or 'test' and picks the split of a domain.
    """
    text = str(name)
    registry = M.load_registry()
    if text.endswith(".zarr") or Path(text).is_dir():
        return Path(text), _dataset_of_store(Path(text), registry)
    if text in registry["domains"]:
        dom = registry["domains"][text]
        return Path(features_root) / backbone / f"{dom[role]}.zarr", dom["dataset"]
    if text in registry["splits"]:
        return Path(features_root) / backbone / f"{text}.zarr", registry["splits"][text]["dataset"]
    raise UserError(f"unknown domain, split or store {text!r}: one of {', '.join(registry['domains'])}, "
                    f"a split name, or a path to a .zarr store")


def _dataset_of_store(path: Path, registry: dict) -> str:
    """The dataset of a store's manifest (its ``manifest_name`` attribute, a registered split), else "custom"."""
    try:
        import zarr
        name = zarr.open_group(str(path), mode="r").attrs.get("manifest_name")
    except Exception:  # noqa: BLE001 - not readable here: the trainer's own checks will name the problem
        return "custom"
    entry = registry["splits"].get(str(name)) if name else None
    return entry["dataset"] if entry else "custom"


@dataclass
class Domain:
    """One store in memory: ``feats[m]`` (N, U, C[, H, W]) float16 on the device, labels, ids."""

    name: str
    path: Path
    feats: dict
    verb: torch.Tensor
    noun: torch.Tensor
    ids: np.ndarray
    units: int

    @property
    def n(self) -> int:
        return len(self.ids)


def load_domain(path: Path, name: str, modalities: list[str], device: torch.device, spatial: bool,
                labels: bool = True) -> Domain:
    """Read a complete store into memory (failed clips are left out; the store must be otherwise complete)."""
    store = FeatureStore.open(path, require_complete=True)
    keep = np.flatnonzero(store.done_mask())
    if len(keep) == 0:
        raise UserError(f"{path}: no extracted clips")
    feats = {}
    ids = store.meta("id")
    keep_mask = np.zeros(store.num_clips, dtype=bool)
    keep_mask[keep] = True
    for m in modalities:
        # chunk by chunk into one preallocated tensor: the peak is the result plus one chunk
        arr = store.array(m)
        pool = not spatial and arr.ndim == 5
        shape = arr.shape[1:3] if pool else arr.shape[1:]
        t = torch.empty((len(keep), *shape), dtype=torch.float16, device=device)
        at = 0
        for lo in range(0, store.num_clips, store.chunk_clips):
            hi = min(lo + store.chunk_clips, store.num_clips)
            sel = keep_mask[lo:hi]
            if not sel.any():
                continue
            # a chunk file that is gone would read as zeros, one that was cut fails to decode: both are refused
            chunk = lo // store.chunk_clips
            redo = "re-run `adapt extract` with this store as --out to redo it"
            if not store.chunk_file(m, chunk).is_file():
                raise UserError(f"{path}: {m} chunk {chunk} missing, but clips in it are marked done; {redo}")
            try:
                block = arr[lo:hi]
            except Exception as e:  # noqa: BLE001
                raise UserError(f"{path}: {m} chunk {chunk} does not decode ({type(e).__name__}); {redo}") from None
            block = block if sel.all() else block[sel]
            finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if not finite.all():
                bad = ids[lo:hi][sel][int(np.flatnonzero(~finite)[0])]
                raise UserError(f"{path}: non-finite {m} features in clip {bad}")
            block = torch.from_numpy(block)
            if pool:  # pooled at load: (N, U, C)
                block = block.float().mean(dim=(-2, -1)).half()
            t[at:at + len(block)] = block.to(device)
            at += len(block)
        feats[m] = t
    n = len(keep)
    verb = torch.from_numpy(store.meta("verb_class")[keep].astype(np.int64)) if labels else torch.full((n,), -1)
    noun = torch.from_numpy(store.meta("noun_class")[keep].astype(np.int64)) if labels else torch.full((n,), -1)
    units = feats[modalities[0]].shape[1]
    return Domain(name, Path(path), feats, verb.to(device), noun.to(device), ids[keep], units)


class DomainPair:
    """Source (labelled), target (unlabelled) and evaluation stores, checked to fit together."""

    def __init__(self, cfg, device: torch.device):
        src, ds = store_path(cfg.source, "train", cfg.backbone, cfg.features_root)
        tgt, dt = store_path(cfg.target, "train", cfg.backbone, cfg.features_root)
        ev, _ = store_path(cfg.eval or cfg.target, "test", cfg.backbone, cfg.features_root)
        self.dataset = ds if ds == dt else "custom"
        stores = {"source": FeatureStore.open(src), "target": FeatureStore.open(tgt), "eval": FeatureStore.open(ev)}
        shared = [m for m in stores["source"].modalities if all(m in s.modalities for s in stores.values())]
        modalities = list(cfg.modalities) or shared
        check_compatible(stores, modalities)
        if stores["source"].attrs.get("backbone") != cfg.backbone:
            raise UserError(f"{src}: features of backbone {stores['source'].attrs.get('backbone')!r}, "
                            f"not {cfg.backbone!r} (--backbone)")
        self.modalities = modalities
        self.backbone = cfg.backbone
        self.source = load_domain(src, cfg.source, modalities, device, cfg.spatial, labels=True)
        self.target = load_domain(tgt, cfg.target, modalities, device, cfg.spatial,
                                  labels=cfg.w_target_cls > 0)  # the target's labels are not read otherwise
        self.eval = load_domain(ev, cfg.eval or cfg.target, modalities, device, cfg.spatial, labels=True)
        if (self.source.verb < 0).any():
            raise UserError(f"{src}: the source store has unlabelled clips; the source must be labelled")
        if cfg.w_target_cls > 0 and (self.target.verb < 0).any():
            raise UserError(f"{tgt}: supervised target training needs a labelled target store")
        attrs = stores["source"].attrs
        self.verb_classes = int(attrs.get("verb_classes") or int(self.source.verb.max()) + 1)
        self.noun_classes = int(attrs.get("noun_classes") or 0)
        for role, dom in (("source", self.source), ("eval", self.eval)):
            if int(dom.verb.max()) >= self.verb_classes:
                raise UserError(f"{dom.path}: verb class {int(dom.verb.max())} outside the {self.verb_classes} "
                                f"classes of the source store")
        self.feature_shapes = {m: tuple(self.source.feats[m].shape[2:]) for m in modalities}
        self.units_per_clip = self.source.units
        self.heads_units = 1 if cfg.backbone == "i3d" else min(cfg.segments, self.source.units)
        self.feature_bytes = sum(t.numel() * t.element_size() for d in (self.source, self.target, self.eval)
                                 for t in d.feats.values())

    # ------------------------------------------------------------------------------------------------------
    # the units a clip's heads see

    def sample_units(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """(batch, T) stored-unit indices: one random window (I3D), or one random segment per group (TBN)."""
        U, T = self.units_per_clip, self.heads_units
        if T == 1:
            return rng.integers(0, U, size=(batch, 1))
        bounds = np.linspace(0, U, T + 1).astype(int)
        return np.stack([rng.integers(bounds[i], bounds[i + 1], size=batch) for i in range(T)], axis=1)

    def fixed_units(self) -> np.ndarray:
        """(T,) the group centres: TBN's 2, 7, 12, 17, 22 of 25 (TA3N dataset.py:147-160); I3D's middle window."""
        U, T = self.units_per_clip, self.heads_units
        bounds = np.linspace(0, U, T + 1)
        return ((bounds[:-1] + bounds[1:]) / 2).astype(int)

    def eval_views(self) -> list[np.ndarray]:
        """The unit sets that evaluation averages over: each window (I3D) or the group centres (TBN)."""
        if self.heads_units == 1:
            return [np.array([w]) for w in range(self.eval.units)]
        return [self.fixed_units()]


class EpochSampler:
    """Clip indices drawn epoch by epoch without replacement, as both reference codes do (MM-SADA
    batch_generator.py:87-100; TA3N's RandomSampler): a permutation is consumed in order, and when it runs out a new
    one tops the batch up, skipping clips already in it (unless the domain has fewer clips than a batch)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng, self.pool = n, rng, np.empty(0, dtype=np.int64)

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
        return np.asarray(take, dtype=np.int64)


def draw_batch(pair: "DomainPair", cfg, rng: np.random.Generator, samplers: tuple, sizes: tuple,
               correspondence: bool) -> list[dict]:
    """One run's clips and units for one step: per domain (source, target) ``{m: (clip idx (B,), units (B, T))}``.

    Units: the fixed group centres (``units=fixed``, TA3N), else drawn per clip, independently for each modality
    (MM-SADA batch_generator.py:294-298; Kim et al. Table 5) or shared by them (``sync_windows``).  With the
    correspondence head, the first half of each domain's clips take their flow (clip and window) from the next
    clip of that half: MM-SADA's negatives (batch_generator.py:110-119)."""
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
        if correspondence and "flow" in sel:
            n = parts.correspondence_negatives(B)
            order = np.concatenate([np.roll(np.arange(n), -1), np.arange(n, B)])
            sel["flow"] = (idx[order], units["flow"][order])
        out.append(sel)
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

    def __call__(self, parts: list, modalities, key: str = "train") -> dict:
        """{m: (K, sum of B, T, ...) float32} for the modalities given; a part is ``(domain, sel, statistics)``
        with ``sel[m] = (clip index (K, B), units (K, B, T))`` per modality, or one such pair for all."""
        out = {}
        for m in modalities:
            sels = [sel[m] if isinstance(sel, dict) else sel for _, sel, _ in parts]
            K, T = sels[0][1].shape[0], sels[0][1].shape[2]
            total = sum(idx.shape[1] for idx, _ in sels)
            feat = tuple(parts[0][0].feats[m].shape[2:])
            x = self._buffer((key, m), (K * total * T, *feat), torch.float32).view(K, total, T, *feat)
            at = 0
            for (dom, _, stats), (idx, units) in zip(parts, sels):
                f = dom.feats[m]
                B = idx.shape[1]
                rows = (idx.unsqueeze(-1) * f.shape[1] + units).reshape(-1).to(f.device)
                scratch = self._buffer(("half", m), (len(rows), *feat), f.dtype)
                torch.index_select(f.view(-1, *feat), 0, rows, out=scratch)
                part = x[:, at:at + B]
                part.copy_(scratch.view(K, B, T, *feat))
                if stats:
                    mean, std = stats[m]
                    part.sub_(mean).mul_(std.reciprocal())
                at += B
            out[m] = x
        return out


def standardisation(dom: Domain, chunk_bytes: int = 64 << 20) -> dict:
    """Per-channel mean and std of a domain's features (AdaBN statistics), {m: (mean, std)} shaped (C, 1, 1).

    Accumulated over blocks of clips in float64 (sum and sum of squares), so that the float32 working copy is one
    block rather than the whole store."""
    out = {}
    for m, f in dom.feats.items():
        dims = [0, 1] + list(range(3, f.dim()))
        per_clip = max(1, f[0].numel() * 8)
        step = max(1, chunk_bytes // per_clip)
        total = torch.zeros(f.shape[2], dtype=torch.float64, device=f.device)
        squares = torch.zeros_like(total)
        for lo in range(0, f.shape[0], step):
            x = f[lo:lo + step].double()
            total += x.sum(dim=dims)
            squares += x.square().sum(dim=dims)
        count = f.numel() // f.shape[2]
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0)
        std = var.add(1e-5).sqrt()
        shape = (-1,) + (1,) * (f.dim() - 3)
        out[m] = (mean.float().reshape(shape), std.float().reshape(shape))
    return out
