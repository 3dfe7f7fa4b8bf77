"""A method checked when it loads, before any data is read: its loss terms' declarations (each weight and stage-1
weight names one of its settings), then one forward and backward of two stacked runs on random inputs through the
same ``torch.func.vmap`` path a sweep's stacking uses, so a method that cannot stack is told at once.

Every mistake is one line naming the method's file, the part (``build``, ``forward``, a term) and the rule it
broke (:class:`MethodError`, exit code 2): a term that returns a vector or a Python number, a term that reads
``.item()`` or indexes with a boolean mask (vmap cannot batch data-dependent shapes), an exception in ``build``, a
non-finite term.  ``adapt methods FILE`` runs the same check; ``adapt train`` and ``adapt sweep`` run it on a
method of your own before they touch a store.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.func import functional_call, stack_module_state, vmap

from featstore.errors import UserError

# without stores (adapt methods FILE): the common case, RGB and flow (maps when kept), verb classes, five units
CHECK_INPUTS = dict(modalities=("rgb", "flow"), shapes={"rgb": (8, 3, 3), "flow": (8, 3, 3)}, verbs=4, nouns=0,
                    units=5)
SMALL = dict(embed_dim=16, trn_dim=8, sc_dim=8, disc_hidden=8, cdan_hidden=8, random_dim=16, proj_dim=8)
VMAP_RULE = ("a method's parts must work under torch.func.vmap, which stacks runs: no .item() / float(tensor) / "
             "bool(tensor), no boolean-mask indexing, no shapes that depend on values (use torch.where and "
             "weights instead)")


class MethodError(UserError):
    """A mistake in a method's code, found by its check or during training: one line, exit code 2."""


def where(cls) -> str:
    from adapt.method import reference_of
    return f"method {cls.name} ({reference_of(cls)})"


def check_declarations(cls) -> None:
    """Each term's weight (and stage-1 weight) names a number setting of the method; its name is no head's."""
    from adapt.config import config_class
    names = {f.name for f in dataclasses.fields(config_class(cls))}
    for t in cls.terms():
        if not isinstance(t.weight, str) or t.weight not in names:
            raise MethodError(f"{where(cls)}: term {t.name!r} is weighed by {t.weight!r}, which is not one of its "
                              f"settings; declare it in its Settings (e.g. {t.weight if isinstance(t.weight, str) else 'w_x'}: "
                              f"float = 1.0) or name an existing one")
        if not (t.stage1 is None or t.stage1 is True or (isinstance(t.stage1, str) and t.stage1 in names)):
            raise MethodError(f"{where(cls)}: term {t.name!r} has stage1={t.stage1!r}: give None (from stage 2), "
                              f"True (from the start, its weight) or the name of a setting holding its stage-1 "
                              f"weight")


def _inputs(cfg):
    """What the run's stores will give the heads, read from their attributes only (modalities shared by source and
    target, each unit's shape, the class counts, the units a clip), with random values in the check; without stores
    (``adapt methods FILE``) CHECK_INPUTS: RGB and flow, verb classes, five units.  Maps are kept when the run keeps
    them (``spatial``), else pooled as the loader pools them."""
    from adapt.model import Inputs
    from featstore.paths import resolve_store, store_attrs
    try:
        attrs = [store_attrs(resolve_store(name, "train", cfg.backbone, cfg.features_root)[0])
                 for name in (cfg.source, cfg.target)]
    except UserError:
        attrs = []
    if len(attrs) == 2 and all(attrs):
        src, tgt = attrs
        mods = [m for m in (cfg.modalities or src["modalities"]) if m in src["modalities"] and m in tgt["modalities"]]
        shapes = {m: tuple(src["window_shapes"][m][1:]) for m in mods}
        units = 1 if cfg.backbone == "i3d" else min(cfg.segments, int(src["window_shapes"][mods[0]][0]))
        verbs, nouns = int(src.get("verb_classes") or 4), int(src.get("noun_classes") or 0)
    else:
        mods, shapes = list(CHECK_INPUTS["modalities"]), dict(CHECK_INPUTS["shapes"])
        units, verbs, nouns = CHECK_INPUTS["units"], CHECK_INPUTS["verbs"], CHECK_INPUTS["nouns"]
    shapes = {m: (s if cfg.spatial else s[:1]) for m, s in shapes.items()}
    return Inputs(tuple(mods), shapes, verbs, nouns, units)


def _small(cfg):
    """The run's configuration with the heads made small (the check is about the code, not the sizes)."""
    c = dataclasses.replace(cfg)
    for k, v in SMALL.items():
        if hasattr(c, k) and getattr(c, k) is not None:
            setattr(c, k, v)
    return c


def check(cls, cfg=None) -> None:
    """Refuse, in one line, a method whose declarations or code cannot train (see the module docstring).  ``cfg``:
    the run's configuration (default: the method's preset on the MM-SADA base)."""
    from adapt.config import resolve
    check_declarations(cls)
    if cfg is None:
        cfg = resolve(cls, "mmsada")
    key = (cls, cfg.architecture_key())
    if key in _CHECKED:
        return
    _run(cls, _small(cfg))
    _CHECKED.add(key)


_CHECKED: set = set()


def fail(cls, part: str, e: BaseException) -> MethodError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    vmap_like = any(s in text for s in ("vmap", "data-dependent", "item()", "boolean", "Boolean", "nonzero"))
    rule = f"; {VMAP_RULE}" if vmap_like else ""
    return MethodError(f"{where(cls)}: {part} raised {type(e).__name__}: {text[:300]}{rule}")


def _run(cls, cfg) -> None:
    from adapt import rng
    from adapt.method import Context
    inputs = _inputs(cfg)
    K, B = 2, 4
    try:
        models = []
        for seed in range(K):
            torch.manual_seed(seed)
            models.append(cls(cfg, inputs))
    except MethodError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's build: say where, in one line
        raise fail(cls, "building its heads (build / __init__)", e) from None
    template = copy.deepcopy(models[0]).to("meta")
    params, buffers = stack_module_state(models)
    g = torch.Generator().manual_seed(0)
    x = {m: torch.randn(K, 2 * B, inputs.units, *inputs.shapes[m], generator=g) for m in inputs.modalities}
    batch = {"y_s": torch.randint(0, inputs.verbs, (K, B), generator=g),
             "y_t": torch.randint(0, inputs.verbs, (K, B), generator=g),
             "idx_s": torch.arange(B).repeat(K, 1), "idx_t": torch.arange(B).repeat(K, 1)}
    if inputs.nouns:
        batch.update(n_s=torch.randint(0, inputs.nouns, (K, B), generator=g),
                     n_t=torch.randint(0, inputs.nouns, (K, B), generator=g))
    state = {k: torch.stack([v] * K) for k, v in models[0].initial_state(8, 8, torch.device("cpu")).items()}
    keys = torch.tensor([rng.fold_int(s, 0) for s in range(K)], dtype=torch.int64)
    for stage in (1, 2):
        active = cfg.active_terms(stage)
        coeff = {level: torch.tensor(0.5) for level in cls.reversals}

        def one_run(p, b, run):
            ctx = Context(run["key"], coeff, B, run["state"], run["batch"], stage)
            try:
                out = functional_call(template, (p, b), (run["x"], ctx))
            except Exception as e:  # noqa: BLE001
                raise PartError("its forward", e) from None
            values = []
            for name in active:
                try:
                    v = getattr(template, name)(out, ctx)
                except Exception as e:  # noqa: BLE001
                    raise PartError(f"term {name!r}", e) from None
                if not isinstance(v, torch.Tensor):
                    raise PartError(f"term {name!r}", TypeError(f"returned a {type(v).__name__}, not a tensor: a term "
                                                            f"returns one number as a 0-dim tensor"))
                if v.dim() != 0:
                    raise PartError(f"term {name!r}", ValueError(f"returned a tensor of shape {tuple(v.shape)}: a term "
                                                             f"returns one number (reduce it with .mean() or "
                                                             f".sum())"))
                values.append(v)
            try:
                writes = template.writes(out, ctx)
            except Exception as e:  # noqa: BLE001
                raise PartError("writes", e) from None
            total = sum(values) if values else out["verb"].sum() * 0
            return total, (torch.stack(values) if values else total[None]), writes

        run = {"x": x, "batch": batch, "key": keys, "state": state}
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        try:
            total, values, _ = vmap(one_run, in_dims=(0, 0, 0), randomness="error")(p, buffers, run)
            total.sum().backward()
        except PartError as e:
            raise fail(cls, e.part, e.error) from None
        except MethodError:
            raise
        except Exception as e:  # noqa: BLE001 - vmap's own refusals (.item(), masks), backward's
            raise fail(cls, f"stage {stage}'s forward and backward", e) from None
        bad = [n for n, ok in zip(active, torch.isfinite(values.detach()).all(0).tolist()) if not ok]
        if bad:
            raise MethodError(f"{where(cls)}: term {bad[0]!r} is not finite on random inputs (stage {stage}): "
                              f"check its logs, divisions and square roots")


class PartError(Exception):
    """An exception raised by one part of a method (which part, and the original error)."""

    def __init__(self, part: str, error: BaseException):
        super().__init__(part)
        self.part, self.error = part, error
