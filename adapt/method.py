"""What a method is: the contract between a method file and the one training loop.

A method is a subclass of :class:`Method` in one file (``adapt/methods/<name>.py``, or a file of your own given to
``adapt train --method path/to/my_method.py``).  The base class *is* the video model every method shares
(:class:`adapt.model.VideoModel`) with its classification term: source-only.

**What every method may define** (most define three or four of them):

* ``Settings``: a dataclass of its own settings (loss weights, reversal scales, temperatures) with their defaults,
  extending its parent's; ``--set``, sweep specs and grids name them like any other setting;
* ``facts``: its preset, a table of rows (setting, value, the reference's file:line or equation[, where it applies,
  the code's or the paper's form]) applied over the dataset's base; given whole (a subclass building on its parent's
  preset includes it: ``facts(*TA3N.facts, ...)``, or restricted: :func:`adapt.facts.where`); ``differences``: where
  a frozen-feature run differs, and why; ``title``, ``citation``, ``composition``: its paper;
* ``build(inputs)``: the heads it adds, from the shared parts (:mod:`adapt.parts`); ``forward(x, ctx)``: the video
  model's outputs (``super().forward``) plus its heads';
* its loss terms: functions decorated with :func:`term` (the setting that weighs each, the stages it acts in); the
  loss of a step is ``sum_t w_t(stage) L_t`` in the order the terms are declared, a parent's first;
* ``reversals``: its gradient-reversal levels and the settings that scale them (added to its parent's).

**What a term reads.**  ``out``, the forward's outputs, always has (``B`` = ``ctx.b_s`` source rows, then the
target's; ``s`` a stream: a modality, or modalities fused, e.g. ``rgb+flow+audio``):

================  =====================================================================================
``verb``          fused verb logits (B, verbs)
``noun``          fused noun logits (B, nouns); None without noun classes (the EPIC-55 splits)
``verb_m``        {s: verb logits (B, verbs)}; ``noun_m`` the same for nouns (values None without nouns)
``video``         {s: the video feature v (B, V)} before dropout (what discriminators read)
``video_drop``    {s: dropout(v)}, what the classifier saw
``frame``         {s: frame features (B, T, D)}: one per window / segment the heads see
================  =====================================================================================

plus what the method's own ``forward`` adds (DANN ``disc``, ``disc_video``; TA3N ``disc_frame``,
``disc_relation``; MM-SADA ``corr``; CIA / M3EM ``consensus``; ...).  ``ctx`` (:class:`Context`) has the step's
``b_s``, labels ``y_s`` / ``n_s``, clip indices ``idx_s`` / ``idx_t``, the reversal coefficients ``grl[level]``, the
method's ``state``, the dropout ``key`` and the ``stage``.

**Special shapes, each with its one user** (a reader following that method finds them in its file):

* a state kept across steps: ``initial_state`` and ``writes`` (Kim et al.'s memory banks, written after the step);
* an update of its own: ``phases`` and ``parameter_groups`` (MCD's three steps, SHOT's frozen classifier);
* stages of their own: ``batches`` (the clips each stage draws), ``source_stage`` (stage 1 on the source alone,
  saved once and reused), ``before_step(run)`` with a :class:`RunView` (SHOT's pseudo-labels and source pick);
* data: ``arrange`` (how the drawn clips pair up: MM-SADA's correspondence negatives), ``uses_target_labels``
  (target-only), ``per_domain_statistics`` (AdaBN), ``check`` (settings it cannot train with, before the run);
* the video model's steps (:mod:`adapt.model`): ``build_inputs`` / ``read_inputs`` (CIA's and M3EM's MC and SC),
  ``relations`` (TA3N's domain attention), ``classify`` (MCD's reversal before its classifiers).

The trainer (:mod:`adapt.trainer`) knows no method by name: it builds K models of the class, stacks them, and runs
each step as ``forward -> terms -> weighted sum -> backward -> update -> writes``.  Everything here must stay
functional under ``torch.func.vmap`` (no ``.item()``, no data-dependent shapes; random numbers from ``ctx.key``):
:mod:`adapt.method_check` tests a method of your own for that before it trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from adapt import losses
from adapt.datasets import INITIALISERS
from adapt.facts import FORMS, Fact, applying, facts, facts_table, preset, where  # noqa: F401 - a method's imports
from adapt.model import Inputs, VideoModel, initialise
from featstore.errors import UserError


# ---------------------------------------------------------------------------------------------------------------
# loss terms


@dataclass(frozen=True)
class Term:
    """A loss term: its name, the setting that weighs it, and its stage-1 weight: ``None`` (it acts from stage 2,
    MM-SADA's alignment stage, on), ``True`` (from the start, with its weight) or a setting's name (its stage-1
    weight; a value of None there means the stage-2 weight)."""

    name: str
    weight: str
    stage1: Any = None

    def weight_in(self, cfg, stage: int) -> float:
        w = getattr(cfg, self.weight)
        if stage == 2:
            return w
        if self.stage1 is None:
            return 0.0
        if self.stage1 is True:
            return w
        w1 = getattr(cfg, self.stage1)
        return w if w1 is None else w1


def term(weight: str, stage1: Any = None):
    """Declare a method's function ``(self, out, ctx) -> scalar`` as a loss term weighed by setting ``weight``
    (see :class:`Term` for ``stage1``).  A subclass that overrides the function keeps the declaration."""
    def mark(fn):
        fn.__term__ = Term(fn.__name__, weight, stage1)
        return fn
    return mark


# ---------------------------------------------------------------------------------------------------------------
# what one run sees at a step


class Context:
    """One run's view of a step (a slice of the stacked inputs under vmap): the dropout ``key``, the gradient
    reversal coefficients ``grl[level]``, the number of source rows ``b_s`` (the batch is ``b_s`` source clips,
    then target clips), the method's ``state`` (memory banks), and the batch's labels and clip indices:
    ``y_s``, ``n_s`` (source verb / noun classes; ``n_s`` None without nouns), ``y_t``, ``n_t`` (target classes,
    only for methods with ``uses_target_labels``), ``idx_s``, ``idx_t`` (rows of the stores)."""

    __slots__ = ("key", "grl", "b_s", "state", "y_s", "n_s", "y_t", "n_t", "idx_s", "idx_t", "stage")

    def __init__(self, key, grl: dict, b_s: int = 0, state: dict | None = None, batch: dict | None = None,
                 stage: int = 2):
        batch = batch or {}
        self.key, self.grl, self.b_s, self.state, self.stage = key, grl, b_s, state or {}, stage
        for k in ("y_s", "n_s", "y_t", "n_t", "idx_s", "idx_t"):
            setattr(self, k, batch.get(k))


class RunView:
    """What :meth:`Method.before_step` sees of the run, and may do to it (never the trainer itself).

    * ``step`` (about to be trained), ``K`` (runs stacked), ``stage1_steps``, ``epoch_steps``, ``start`` (the
      first step this process trains: ``stage1_steps`` when a saved source stage was restored);
    * ``predict(domain)``: every run's softmax ``verb`` (and ``noun``) scores (K, N, classes) and video features
      ``feat`` (K, N, D) on each clip of ``"target"`` or of the held-out source clips (``"held_out"``, with
      ``held_out_labels``), the evaluation's protocol (views averaged, no dropout);
    * ``set_state(name, k, values)``: run k's entry of the method's state (:meth:`Method.initial_state`);
    * ``weights(k)`` / ``load_weights(k, weights)``: run k's parameters, copied out or put back."""

    def __init__(self, training, step: int):
        self._t = training
        self.step, self.K = step, training.K
        self.stage1_steps, self.epoch_steps = training.sched.stage1_steps, training.sched.epoch_steps
        self.start = training.start

    @property
    def held_out_labels(self):
        return self._t.val_labels if self._t.val_dom is not None else None

    def predict(self, domain: str = "target") -> dict:
        t = self._t
        if domain == "target":
            return t.evaluate(t.pair.target, None, t.feature_fn, t.norm_t)
        if domain == "held_out":
            if t.val_dom is None:
                raise UserError("no held-out source clips (set source_holdout or source_val)")
            return t.evaluate(t.val_dom, t.val_rows, t.feature_fn, t.norm_s)
        raise ValueError(f"domain {domain!r}: 'target' or 'held_out'")

    def set_state(self, name: str, k: int, values: torch.Tensor) -> None:
        state = self._t.state[name]
        state[k] = values.to(state.device, state.dtype)

    def weights(self, k: int) -> dict:
        return self._t._heads(k)

    def load_weights(self, k: int, weights: dict) -> None:
        with torch.no_grad():
            params = self._t.params()
            for name, value in weights.items():
                params[name][k].copy_(value.to(params[name].device))


@dataclass(frozen=True)
class Phase:
    """One pass of an update: ``loss(terms, weights)`` is minimised, then the optimisers of ``groups`` (names of
    :meth:`Method.parameter_groups`; None: all) step.  A step is one phase unless a method says otherwise."""

    name: str
    groups: Optional[tuple] = None
    loss: Any = None                 # None: the weighted sum of the terms


# ---------------------------------------------------------------------------------------------------------------
# the method


@dataclass
class MethodSettings:
    """The settings every method has: the weight of the classification loss on the labelled source clips."""

    w_cls: float = 0.2                         # lambda_y (MM-SADA code stage 2: 0.2)
    w_cls_stage1: Optional[float] = 1.0        # in stage 1 (MM-SADA code: 1.0); none = w_cls


class Method(VideoModel):
    """No adaptation: the video model trained with the classification loss (source-only).  Subclass it for a method
    (see the module docstring); everything below is what a subclass may override."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    composition: ClassVar[str] = ""
    Settings: ClassVar[type] = MethodSettings
    facts: ClassVar[tuple] = ()
    differences: ClassVar[tuple] = ()
    reversals: ClassVar[dict] = {}             # gradient-reversal level -> the setting that scales it (added to
                                               # the parent's)
    uses_target_labels: ClassVar[bool] = False  # the target store's labels are loaded and given as y_t, n_t
    per_domain_statistics: ClassVar[bool] = False  # inputs standardised with each domain's own statistics (AdaBN)
    source_stage: ClassVar[bool] = False       # stage 1 sees only source clips; saved once, reused by target runs

    def __init_subclass__(cls, **kw):
        """A subclass's tables extend its parent's the way dataclasses do: ``Settings`` by inheritance, loss
        terms by the decorated functions of the lineage (:meth:`terms`), and ``reversals``: its own levels added
        to the inherited ones.  ``facts`` is the one table given whole: a subclass that builds on its parent's
        preset includes it (``facts(*TA3N.facts, ...)`` or :func:`where`)."""
        super().__init_subclass__(**kw)
        if "reversals" in vars(cls):
            inherited = getattr(super(cls, cls), "reversals", {})
            cls.reversals = {**inherited, **vars(cls)["reversals"]}

    def __init__(self, cfg, inputs: Inputs):
        super().__init__(cfg, inputs)
        self.build(inputs)
        clash = [t.name for t in self.terms() if t.name in self._modules]
        if clash:
            raise TypeError(f"{type(self).__name__}: a head and a loss term are both named {clash[0]!r}")
        initialise(self, INITIALISERS.get(cfg.init, {}))

    def build(self, inputs: Inputs) -> None:
        """Add the method's heads (modules) to the model; called after the video model is built."""

    # ---- terms --------------------------------------------------------------------------------------------

    @classmethod
    def terms(cls) -> list[Term]:
        """The loss terms, a parent's before its subclass's, each at the place it was first declared."""
        found: dict = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                t = getattr(value, "__term__", None)
                if t is not None:
                    found[name] = t
        return list(found.values())

    def acts(self, name: str) -> bool:
        """Whether term ``name`` has a non-zero weight in either stage (a head only it uses is built only then)."""
        t = next(t for t in self.terms() if t.name == name)
        return bool(t.weight_in(self.cfg, 1) or t.weight_in(self.cfg, 2))

    @term("w_cls", stage1="w_cls_stage1")
    def cls(self, out: dict, ctx: Context) -> torch.Tensor:
        """Mean over tasks (verb, and noun with noun heads) of the fused source logits' cross-entropy (MM-SADA
        eq. 1; TA3N main.py:506: 0.5 (CE_verb + CE_noun))."""
        return losses.tasks_ce(out["verb"], out["noun"], slice(0, ctx.b_s), ctx.y_s, ctx.n_s)

    # ---- the update ---------------------------------------------------------------------------------------

    def phases(self, stage: int) -> list[Phase]:
        """The passes of one step in ``stage``: one, minimising the weighted sum of the terms."""
        return [Phase("all")]

    def parameter_groups(self) -> dict:
        """{group: parameter names}: one optimiser each (a phase steps some of them)."""
        return {"all": [n for n, _ in self.named_parameters()]}

    def initial_state(self, n_source: int, n_target: int, device) -> dict:
        """The state one run keeps across steps (memory banks): tensors, written only through :meth:`writes`."""
        return {}

    def writes(self, out: dict, ctx: Context) -> dict:
        """``{state name: (indices (B,), rows (B, ...))}``: the rows of the state this step updates, computed from
        the state as it was; the trainer writes them in place after the step's passes."""
        return {}

    def before_step(self, run: "RunView") -> None:
        """Called before each step with a view of the run (:class:`RunView`: the step, the schedule's stages, the
        predictions on a domain, the state and the weights of each of the K stacked runs)."""

    # ---- data ---------------------------------------------------------------------------------------------

    @classmethod
    def batches(cls, stage: int, source: int, target: int) -> tuple[int, int]:
        """(source clips, target clips) a step of ``stage`` draws, from the run's batch settings: both."""
        return source, target

    def arrange(self, sel: dict, batch: int) -> dict:
        """A domain's drawn clips and units per modality ``{m: (clips (B,), units (B, T))}`` (numpy), as the
        method wants them paired (MM-SADA: half take the next clip's flow)."""
        return sel

    @classmethod
    def check(cls, cfg, batches: dict, streams: list) -> None:
        """Refuse, with one line, settings the method cannot train with (``batches``: stage -> (B_s, B_t))."""


# ---------------------------------------------------------------------------------------------------------------
# finding a method: a built-in name, a file, or package.module:NAME


def is_method_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, Method)


def load(ref) -> type:
    """The Method class of ``ref``: a class, a built-in name (``dann``), a file (``path/my_method.py``, optionally
    ``:ClassName``) or a module (``package.module:ClassName``, or the module's one Method subclass)."""
    from adapt.methods import REGISTRY
    if is_method_class(ref):
        if ref.name not in REGISTRY or REGISTRY[ref.name] is not ref:  # a class given directly: named by its module
            if not vars(ref).get("name"):
                ref.name = ref.__name__.lower()
            check_name(ref, ref.__qualname__)
            ref.reference = getattr(ref, "reference", None) or f"{ref.__module__}:{ref.__qualname__}"
            _LOADED[ref.reference] = ref
        return ref
    text = str(ref)
    if text in REGISTRY:
        return REGISTRY[text]
    path, _, attr = text.partition(":")
    if text in _LOADED and not (path.endswith(".py") or Path(path).is_file()):
        return _LOADED[text]
    if path.endswith(".py") or Path(path).is_file():
        module = _module_from_file(Path(path), text)
    elif attr or "." in path:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise UserError(f"--method {text}: cannot import {path} ({e})") from None
    else:
        raise UserError(f"unknown method {text!r}: one of {', '.join(REGISTRY)}, a file path/to/method.py or "
                        f"package.module:ClassName")
    cls = _pick(module, attr, text)
    if not vars(cls).get("name"):  # its own name, else the class's (file:Class, module:Class) or the file's
        cls.name = cls.__name__.lower() if attr or not path.endswith(".py") else Path(path).stem
    check_name(cls, text)
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise UserError(f"--method {text}: its name {cls.name!r} is a built-in method's; give the class another "
                        f"name (name = \"my_{cls.name}\")")
    cls.reference = text
    from adapt.method_check import check_declarations
    check_declarations(cls)  # its terms' weights name its settings: said at once, before anything runs
    _LOADED[text] = cls
    return cls


_LOADED: dict = {}  # reference -> class, for the methods of files and classes this process has loaded
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+=-]*")


def check_name(cls: type, text: str) -> None:
    """A method's name begins its runs' folder names: letters, digits and _ + = - only (no path, no dot)."""
    if not isinstance(cls.name, str) or not NAME.fullmatch(cls.name):
        raise UserError(f"--method {text}: its name {cls.name!r} names its runs' folders: use letters, digits and "
                        f"_ + = - (e.g. name = \"my_coral\")")


def _module_from_file(path: Path, text: str):
    if not path.is_file():
        raise UserError(f"--method {text}: no such file {path}")
    # keyed by the file's place and content: a file edited since it was loaded is loaded again
    digest = hashlib.sha1(str(path.resolve()).encode() + path.read_bytes()).hexdigest()[:10]
    name = f"adapt_user_method_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"--method {text}: {path} is not a Python file (a method is a .py file defining a subclass "
                        f"of adapt.method.Method)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a user's file: say where it failed, in one line
        del sys.modules[name]
        raise UserError(f"--method {text}: {path} does not load: {type(e).__name__}: {e}") from None
    return module


def _pick(module, attr: str, text: str) -> type:
    if attr:
        if not hasattr(module, attr):
            found = [n for n, v in vars(module).items() if is_method_class(v) and v.__module__ == module.__name__]
            raise UserError(f"--method {text}: {text.rsplit(':', 1)[0]} has no class {attr} (its methods: "
                            f"{', '.join(found) or 'none'})")
        cls = getattr(module, attr)
        if not is_method_class(cls):
            raise UserError(f"--method {text}: {attr} is not a subclass of adapt.method.Method")
        return cls
    own = [v for v in vars(module).values() if is_method_class(v) and v.__module__ == module.__name__]
    if len(own) != 1:
        names = ", ".join(c.__name__ for c in own) or "none"
        raise UserError(f"--method {text}: expected one subclass of adapt.method.Method in the file (found "
                        f"{names}); name it as {text.split(':')[0]}:ClassName")
    return own[0]


def describe(cls: type) -> str:
    """``adapt methods NAME``: the paper, the lineage, the facts, the method's own settings, its terms."""
    lineage = " <- ".join(k.name or k.__name__ for k in cls.__mro__ if is_method_class(k) and k is not Method)
    lines = [f"# {cls.title or cls.name}", ""]
    if cls.citation:
        lines += [cls.citation, ""]
    lines += [f"method {cls.name} ({reference_of(cls)}): {lineage or cls.name} <- the video model (source-only)", ""]
    rows = cls.facts
    if rows:
        lines += ["## Preset (facts over the dataset's base)", "", facts_table(rows), ""]
    defaults = cls.Settings()
    lines += ["## Settings of the method (owner: the method of its lineage that declares it)", "",
              "| setting | default | owner |", "|---|---|---|"]
    lines += [f"| {n} | {getattr(defaults, n)!r} | {owner} |" for n, owner in own_settings(cls)]
    lines += ["", "## Loss terms: L = sum_t w_t(stage) L_t", "", "| term | weight | stage 1 |", "|---|---|---|"]
    for t in cls.terms():
        first = {None: "no (from stage 2)", True: "yes, the same weight"}.get(t.stage1, f"weight {t.stage1}")
        lines.append(f"| {t.name} | {t.weight} | {first} |")
    if cls.reversals:
        lines += ["", "Gradient reversal levels: " + ", ".join(f"{k} (scaled by {v})" for k, v in cls.reversals.items())]
    if cls.differences:
        lines += ["", "## Where a frozen-feature run differs", ""] + [f"- {d}" for d in cls.differences]
    return "\n".join(lines)


OFF = (0, 0.0, False, None, "", ())  # a default that leaves a setting unused: the state a method's facts turn on


def facts_owner(cls: type) -> type:
    """The class of ``cls``'s lineage whose ``facts`` table is its preset (the nearest that defines one)."""
    return next(k for k in cls.__mro__ if "facts" in vars(k))


def declared_defaults(cls: type, below: type | None = None) -> dict:
    """{setting: default} of the settings that the ``Settings`` of ``cls`` and of its lineage down to ``below``
    (exclusive) declare themselves, the nearest class's first."""
    out: dict = {}
    for k in cls.__mro__:
        if k is below:
            break
        settings = vars(k).get("Settings")
        if settings is None:
            continue
        defaults = settings()
        for name in vars(settings).get("__annotations__", {}):
            out.setdefault(name, getattr(defaults, name))
    return out


def check_one_place(cls: type) -> None:
    """A preset value lives in one place: a method whose own facts set one of its own settings, for every
    dataset and backbone, may not also give it another default in its ``Settings`` (the facts would silently win;
    a default of "off", 0 / False / None, is the unused state the facts turn on).  Refused in one line."""
    for k in cls.__mro__:
        if not is_method_class(k) or "facts" not in vars(k):
            continue
        own = declared_defaults(k, below=k.__mro__[1])
        for f in vars(k)["facts"]:
            if not isinstance(f, Fact) or f.base or f.setting not in own or f.when or f.form != "code":
                continue
            default = own[f.setting]
            if default not in OFF and default != f.value:
                where = getattr(k, "reference", None) or k.__module__
                raise UserError(f"method {cls.name or k.__name__} ({where}): {f.setting} has two preset values, its "
                                f"Settings default {default!r} and its fact {f.value!r}; keep one (the fact would "
                                f"win)")


def is_builtin(cls: type) -> bool:
    """Whether ``cls`` is one of the built-in methods (tested here) rather than a method of a user's."""
    from adapt.methods import REGISTRY
    return REGISTRY.get(cls.name) is cls


def reference_of(cls: type) -> str:
    """What ``--method`` names the class by: a built-in's name, or the file / module it was loaded from."""
    return getattr(cls, "reference", cls.name)


def own_settings(cls: type) -> list[tuple[str, str]]:
    """(setting, owner) of the method's settings: the method of its lineage whose ``Settings`` declares each one
    ("every method" for the classification weights of :class:`MethodSettings`)."""
    owners = {}
    for klass in reversed(cls.__mro__):
        settings = vars(klass).get("Settings")
        if settings is None:
            continue
        for k in reversed(settings.__mro__):
            for name in vars(k).get("__annotations__", {}):
                if name not in owners:
                    owners[name] = "every method" if k is MethodSettings else (klass.name or klass.__name__)
    return [(f.name, owners.get(f.name, cls.name)) for f in dataclasses.fields(cls.Settings)]
