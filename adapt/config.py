"""A run's settings, grouped by who owns them, and resolved in layers.

* :class:`RunSettings`: what every run has, whatever its method: what to train on, the schedule, the optimiser,
  the evaluation and validators, the inputs, the shared video model (:mod:`adapt.model`) and the gradient-reversal
  schedule.
* the method's own settings: its ``Settings`` dataclass (:mod:`adapt.method`; e.g. ``w_adv``, ``tau``), each owned by
  the method of its lineage that declares it.

A run's configuration is one flat dataclass of both (:func:`config_class`), so ``cfg.steps`` and ``cfg.w_adv`` read
alike, ``--set`` and sweep specs name any of them, and a key the run's method does not have is refused in one
line.  ``resolve(method, dataset, overrides, **given)`` builds it from

1. the defaults: the run settings' defaults below are the released MM-SADA code's composition for EPIC-55
   (``jonmun/MM-SADA-code``; the facts are in :mod:`adapt.datasets`), the method settings' are "off";
2. the dataset's base (:mod:`adapt.datasets`: EPIC-100 is the TA3N baseline code's, the demo kitchens EPIC-55's
   scaled to 150 steps); a base setting the method does not have is skipped;
3. the method's preset (its facts, ``adapt/methods/<name>.py``);
4. the arguments given (``--steps``, ``--seed``, ...), and last the ``--set key=value`` overrides.

``adapt train --settings`` prints them resolved, by owner.  The settings that take ``none`` (``lr_stage2``,
``batch_target``, ``epochs``, ...) mean "derived" when unset, as their comments say.  Ranges and choices are
declared with the field (:func:`positive`, :func:`one_of`, ...) and checked before anything is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field, fields

from adapt import tracking
from featstore.errors import UserError
from featstore.settings import coerce, kind_of, split_items


# ---------------------------------------------------------------------------------------------------------------
# declaring a setting's range


def positive(default, **kw):
    """A setting that must be a positive number (or none, where it takes none)."""
    return field(default=default, metadata={"range": "positive", **kw})


def non_negative(default, **kw):
    return field(default=default, metadata={"range": "non_negative", **kw})


def probability(default, **kw):
    """A setting in [0, 1)."""
    return field(default=default, metadata={"range": "probability", **kw})


def one_of(default, *choices):
    return field(default=default, metadata={"choices": (default, *choices)})


def listed(default=()):
    """A list setting (comma-separated on the command line)."""
    return field(default_factory=lambda: list(default))


# ---------------------------------------------------------------------------------------------------------------
# the settings every run has


@dataclass
class RunSettings:
    # what to train on
    method: str = "source_only"      # a built-in name, path/to/method.py or package.module:ClassName
    backbone: str = "i3d"
    source: str = ""                 # domain (D1), split (D1_train) or store path
    target: str = ""
    eval: str = ""                   # default: the target domain's test split
    features_root: str = "features"
    out: str = "runs"
    modalities: list = listed()      # empty: every modality the stores share
    seed: int = non_negative(0)
    tag: str = ""                    # distinguishes runs of one method and pair (set by sweeps); names a folder
    challenge: str = ""              # EPIC-100: a store to predict for the challenge's test.json
    device: str = "auto"
    memory_budget: typing.Optional[str] = None  # "24G": stores that do not fit are streamed; none = what is free
    form: str = one_of("code", "paper")  # where a paper and its released code differ (adapt/methods)
    allow_overlap: bool = False      # train although the target or evaluation store shares clips with the source
                                     # (refused otherwise; every output marks such a run)
    # trackers (adapt/tracking.py): where the curves go live; they change no number
    log: list = listed(["auto"])     # tensorboard, mlflow, wandb; auto: tensorboard when installed; none
    experiment: str = ""             # the trackers' experiment / project (a sweep's name); empty: "adapt"
    mlflow_uri: str = ""             # MLflow tracking URI; empty: a local store, <out>/mlruns
    wandb_mode: str = one_of("offline", "online")  # W&B without a network by default
    dataset: str = ""                # whose base the run starts from (adapt/datasets.py): epic100 | mmsada | demo |
                                     # custom (= mmsada's); set from --dataset or the source store
    # schedule (MM-SADA code: stage 1 = 3K steps, stage 2 = 6K steps restored from it; batch 64 + 64)
    steps: int = positive(9000)
    stop_after: typing.Optional[int] = positive(None)  # end after this many steps of the full schedule (a prefix
                                     # of the run: its lr milestones and warm-ups as in the full run); --steps
                                     # instead runs the whole schedule compressed into that many steps
    epochs: typing.Optional[int] = positive(None)  # when set: steps = epochs x steps per epoch (TA3N)
    stage1_steps: int = non_negative(3000)  # stage 2 (the alignment terms) starts here; 0 = one stage
    stage1_epochs: typing.Optional[int] = non_negative(None)  # with epochs: stage 1 in epochs (SHOT on EPIC-100)
    batch_source: int = positive(64)
    batch_target: typing.Optional[int] = non_negative(64)  # none: batch_source x n_target / n_source (TA3N's bS_2)
    eval_every: typing.Optional[int] = positive(100)  # none: once an epoch (TA3N's code evaluates each epoch)
    eval_batch: int = positive(1024)
    last_evals: int = positive(9)    # target_top1 = mean of the evaluations at the last 9 ...
    last_eval_every: int = positive(50)  # ... checkpoints, 50 steps apart (MM-SADA submit_test.sh: 5600..6000)
    # model selection (adapt/validators.py): validators computed at every evaluation, without target labels
    validators: bool = True
    validator_clips: int = positive(1000)  # most clips of each domain the validators look at (a fixed subset)
    source_holdout: float = probability(0.0)  # fraction of the source train clips held out as source validation
    source_val: str = ""             # or a store / split / domain for it (EPIC-100: source_val)
    # optimiser
    optimizer: str = one_of("sgd", "adam")  # "sgd" (momentum) | "adam"
    lr: float = positive(0.01)
    lr_stage2: typing.Optional[float] = non_negative(None)  # none: lr (the MM-SADA code's --lr is never read)
    lr_steps: list = listed()        # steps after which lr is multiplied by lr_decay
    lr_epochs: list = listed()       # the same in epochs (TA3N: at the start of epochs 10 and 20)
    lr_decay: float = non_negative(0.1)
    lr_anneal: float = non_negative(0.0)  # lr x (1 + a p)^-power, p the stage's progress (DANN, SHOT: 10); 0 = off
    lr_anneal_power: float = non_negative(0.75)
    momentum: float = non_negative(0.9)
    nesterov: bool = False
    weight_decay: float = non_negative(1e-7)
    clip_grad_norm: typing.Optional[float] = non_negative(None)  # global L2 norm per run (TA3N: 20); none = off
    # inputs and sampling
    spatial: bool = False            # keep 7x7 maps (needed by MC / SC); otherwise pooled at load
    feature_form: str = one_of("float16", "int8")  # in memory; int8: per-channel scales, half the memory
    standardise: bool = False        # inputs standardised per channel with the source store's statistics
    segments: int = positive(5)      # TBN: segments per clip the heads see (TA3N: 5 of 25)
    units: str = one_of("random", "fixed")  # training units: a random window / segment per group, or the centres
    sync_windows: bool = False       # one window index for every modality (MM-SADA's "Sync"); default independent
    # the video model (adapt/model.py)
    fusion: str = "late"             # "late" (a stream per modality) | "concat" (one stream) | groups "rgb+flow,audio"
    fusion_mean: bool = False        # late fusion averages the streams' logits (Kim et al.) instead of summing them
    audio_weight: float = non_negative(0.5)  # weight of an audio-only stream in the late fusion (M3EM)
    embed_dim: int = positive(1024)  # the trainable embedding standing in for the backbone's top (see README)
    dropout: float = probability(0.0)  # on the embedding's output: every head sees it (TA3N dropout_i)
    dropout_video: float = probability(0.5)  # on the video feature, before the classifier (MM-SADA; TA3N dropout_v)
    temporal: str = one_of("avg", "trn")  # TRN-multiscale: TA3N's; I3D uses one window per clip
    trn_relations: int = non_negative(3)  # relations per scale (TA3N TRNmodule subsample_num); 0 = all subsets
    trn_dim: int = positive(256)     # TRN bottleneck width = the video feature's width
    init: str = one_of("torch", "mmsada", "ta3n")  # the code base's initialisers (adapt.datasets.INITIALISERS)
    # gradient reversal: coefficient = beta x (2 / (1 + exp(-grl_gamma p)) - 1), beta the method's per level
    grl_gamma: float = non_negative(10.0)
    grl_restart: bool = True         # p counts from the start of stage 2 (MM-SADA code) rather than step 0
    grl_p0: float = non_negative(0.0)  # p at the first step (TA3N: 1/30, its epochs count from 1)


MAX_STEPS, MAX_EPOCHS, MAX_EVALS = 10_000_000, 100_000, 100_000  # beyond these a run is a typo, not a plan

RUN_GROUPS = {  # for --settings: the run settings by what they are about, in the order above
    "run": "method", "schedule": "steps", "validators": "validators", "optimiser": "optimizer",
    "inputs": "spatial", "video model": "fusion", "gradient reversal": "grl_gamma"}


# ---------------------------------------------------------------------------------------------------------------
# a run's configuration: the run settings and its method's


class ConfigBase:
    """What every run's configuration can say about itself (mixed into :func:`config_class`)."""

    method_class: typing.ClassVar[type]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def owner(self, name: str) -> str:
        """'run: <group>' for a run setting, or the method of the lineage that declares it."""
        return setting_owners(self.method_class)[name]

    def weight_settings(self) -> set:
        """The settings that weigh the method's loss terms (in either stage)."""
        out = set()
        for t in self.method_class.terms():
            out.add(t.weight)
            if isinstance(t.stage1, str):
                out.add(t.stage1)
        return out

    def active_terms(self, stage: int) -> tuple:
        """The method's terms with a non-zero weight in ``stage``, in their declared order (the others are left out
        of the objective rather than multiplied by zero)."""
        return tuple(t.name for t in self.method_class.terms() if t.weight_in(self, stage))

    def architecture_key(self) -> str:
        """Everything except the seed and the loss weights' values: runs with equal keys can be trained stacked
        (a zero weight removes a term, and its head, so which terms act is part of the key)."""
        d = self.to_dict()
        for k in ("seed", "out", "tag", "memory_budget", "log", "experiment", *self.weight_settings()):
            d.pop(k, None)
        d["active_terms"] = [self.active_terms(1), self.active_terms(2)]
        return json.dumps(d, sort_keys=True, default=str)


@functools.cache
def config_class(method_cls: type) -> type:
    """The configuration dataclass of runs of ``method_cls``: :class:`RunSettings` and its ``Settings``."""
    clash = {f.name for f in fields(method_cls.Settings)} & {f.name for f in fields(RunSettings)}
    if clash:
        raise UserError(f"method {method_cls.name}: its settings {', '.join(sorted(clash))} are run settings; "
                        f"give them other names")
    cls = dataclasses.make_dataclass(f"{method_cls.__name__}Config", [], bases=(ConfigBase, method_cls.Settings,
                                                                                 RunSettings))
    cls.method_class = method_cls
    cls.__module__ = method_cls.__module__
    return cls


@functools.cache
def setting_owners(method_cls: type) -> dict:
    """{setting: owner}: 'run: <group>' for the run settings, the declaring method's name for the method's."""
    from adapt.method import own_settings
    out, group = {}, None
    starts = {v: k for k, v in RUN_GROUPS.items()}
    for f in fields(RunSettings):
        group = starts.get(f.name, group)
        out[f.name] = f"run: {group}"
    out.update(dict(own_settings(method_cls)))
    return out


def _hints(cfg_or_cls) -> dict:
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    return typing.get_type_hints(cls)


def _unknown(cls, name: str, where: str) -> UserError:
    from adapt.method import reference_of
    m = cls.method_class
    return UserError(f"{where}: {name!r} is not a setting of method {m.name} (`adapt methods "
                     f"{reference_of(m)}` lists them)")


def typed_value(cls, name: str, value, where: str = "--set"):
    """A value from a sweep spec (TOML / YAML: already typed) or ``--set`` (a string) as setting ``name``'s type
    for configurations of class ``cls``; an unknown setting or a value of the wrong type is a one-line error
    naming ``where``."""
    hints = _hints(cls)
    if name not in {f.name for f in fields(cls)}:
        raise _unknown(cls, name, where)
    kind, optional = kind_of(hints[name])
    if isinstance(value, str):
        return coerce(name, value, kind, optional, where)
    if value is None and optional:
        return None
    bad = UserError(f"{where}: {name} = {value!r}: expected a {kind.__name__}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind is list:
        if not isinstance(value, list):
            raise bad
        return list(value)
    return value


def parse_sets(items: list[str]) -> dict:
    """``["w_adv=0", "sc=false"]`` -> dict of raw strings; unknown keys are refused by :func:`resolve`."""
    return split_items(items)


def check(cfg) -> None:
    """Refuse settings that cannot train, with one line naming the setting (before anything is read)."""
    weights = cfg.weight_settings()
    for f in fields(cfg):
        v, meta = getattr(cfg, f.name), f.metadata
        rule = meta.get("range") or ("non_negative" if f.name in weights else None)
        if "choices" in meta and v not in meta["choices"]:
            raise UserError(f"{f.name}={v!r}: one of {', '.join(map(str, meta['choices']))}")
        if v is None or rule is None:
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if rule == "positive" and not (number and v > 0):
            raise UserError(f"{f.name}={v!r}: must be a positive number")
        if rule == "non_negative" and not (number and v >= 0):
            raise UserError(f"{f.name}={v!r}: must be zero or positive")
        if rule == "probability" and not (number and 0 <= v < 1):
            raise UserError(f"{f.name}={v!r}: must be in [0, 1)")
    if cfg.steps > MAX_STEPS or (cfg.epochs or 0) > MAX_EPOCHS:
        what = f"steps={cfg.steps}" if cfg.steps > MAX_STEPS else f"epochs={cfg.epochs}"
        raise UserError(f"{what}: more than {MAX_STEPS:,} steps ({MAX_EPOCHS:,} epochs) would run for years; give "
                        f"a smaller number")
    if cfg.eval_every and not cfg.epochs and cfg.steps / cfg.eval_every > MAX_EVALS:
        raise UserError(f"eval_every={cfg.eval_every}: {cfg.steps // cfg.eval_every:,} evaluations in {cfg.steps:,} "
                        f"steps; evaluate less often (at most {MAX_EVALS:,} evaluations)")
    for k in ("lr_steps", "lr_epochs"):
        v = getattr(cfg, k)
        if any(not isinstance(s, (int, float)) or isinstance(s, bool) or s < 0 for s in v):
            raise UserError(f"{k}={v!r}: expected a list of non-negative numbers, e.g. 3000,6000")
        if list(v) != sorted(v):
            raise UserError(f"{k}={v!r}: the learning-rate milestones must be in ascending order")
    if cfg.lr_steps and not cfg.epochs and max(cfg.lr_steps) >= cfg.steps:
        raise UserError(f"lr_steps={cfg.lr_steps!r}: a milestone at or past the last step ({cfg.steps}) never acts")
    if cfg.lr_epochs and cfg.epochs and (min(cfg.lr_epochs) < 1 or max(cfg.lr_epochs) > cfg.epochs):
        raise UserError(f"lr_epochs={cfg.lr_epochs!r}: epochs count from 1 to epochs={cfg.epochs} (the decay acts "
                        f"at the start of each)")
    if "/" in cfg.tag or "\\" in cfg.tag or cfg.tag in (".", ".."):
        raise UserError(f"tag={cfg.tag!r}: a tag names the run's folder inside --out; no / or \\ (use letters, "
                        f"digits, = , . _ -)")
    if cfg.tag.endswith((".partial", ".replaced", ".lock")):
        raise UserError(f"tag={cfg.tag!r}: a run folder ending in {cfg.tag[cfg.tag.rindex('.'):]} is one this tool "
                        f"uses while it writes a run; give another tag")
    if cfg.source_holdout and cfg.source_val:
        raise UserError("source_holdout and source_val both set: hold out source clips or give a source validation "
                        "store, not both")
    if cfg.lr_epochs and not cfg.epochs:
        raise UserError("lr_epochs needs epochs (or give lr_steps in steps)")
    if cfg.stage1_epochs is not None and not (cfg.epochs and cfg.stage1_epochs < cfg.epochs):
        raise UserError(f"stage1_epochs={cfg.stage1_epochs}: needs epochs, and fewer of them (epochs={cfg.epochs})")
    later = [t for t in cfg.method_class.terms() if t.weight_in(cfg, 2) and not t.weight_in(cfg, 1)]
    if not cfg.epochs and cfg.stage1_steps >= cfg.steps and later:
        raise UserError(f"stage1_steps={cfg.stage1_steps} leaves no stage 2 in {cfg.steps} steps: the method's "
                        f"terms {', '.join(t.name for t in later)} would never act (lower stage1_steps or raise "
                        f"steps)")
    if cfg.memory_budget is not None:
        from adapt.data import parse_bytes
        parse_bytes(cfg.memory_budget)
    tracking.chosen(cfg.log)  # an unknown tracker, before anything is read


def resolve(method, dataset: str, overrides: dict | None = None, **given):
    """The configuration of a run: defaults, then the dataset's base, the method's preset, the arguments given,
    and last the ``--set`` overrides (strings are converted to the setting's type).  ``method``: a built-in name,
    a file or module reference (:func:`adapt.method.load`) or a Method class."""
    from adapt import datasets
    from adapt.method import FORMS, applying, check_one_place, declared_defaults, facts_owner, load, reference_of
    m = load(method)
    check_one_place(m)
    cls = config_class(m)
    if dataset not in datasets.KNOWN:
        raise UserError(f"--dataset {dataset}: one of {', '.join(datasets.KNOWN)}")
    cfg = cls(method=reference_of(m), dataset=dataset)
    backbone = given.get("backbone") or cfg.backbone
    form = (overrides or {}).get("form") or given.get("form") or cfg.form
    if form not in FORMS:
        raise UserError(f"form={form!r}: one of {', '.join(FORMS)}")
    names = {f.name for f in fields(cls)}
    for k, v in datasets.base(dataset).items():
        if k in names:
            setattr(cfg, k, v)
    for f in applying(m.facts, dataset, backbone, form):  # the preset, in the order its rows act
        if f.setting not in names:
            if f.base:
                continue  # a dataset base's row about a setting this method does not have
            raise UserError(f"method {m.name}: its fact names {f.setting!r}, not one of its settings")
        setattr(cfg, f.setting, f.value)
    # a subclass's own Settings defaults win over the facts it inherits (the subclass said them last)
    for k, v in declared_defaults(m, below=facts_owner(m)).items():
        setattr(cfg, k, v)
    if dataset == "demo":
        datasets.shorten(cfg, datasets.DEMO_STEPS)
        for k, v in datasets.DEMO.items():
            setattr(cfg, k, v)
    sets = {k: typed_value(cls, k, v) for k, v in (overrides or {}).items()}
    explicit = {**{k: v for k, v in given.items() if v is not None}, **sets}
    if explicit.get("steps") is not None:  # the preset's schedule in that many steps (datasets.rescale)
        if explicit.get("epochs") is not None:
            raise UserError(f"steps={explicit['steps']} and epochs={explicit['epochs']} both given: a schedule "
                            f"counts steps or epochs, give one")
        datasets.rescale(cfg, explicit["steps"])
    for k, v in explicit.items():
        if k != "steps":
            setattr(cfg, k, v)
    check(cfg)
    return cfg


def from_saved(saved: dict):
    """A run's configuration from its config.json (settings this version no longer has are left out)."""
    from adapt.method import load
    cls = config_class(load(saved.get("method", "source_only")))
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in saved.items() if k in names})


def base_name(dataset: str) -> str:
    """How a dataset's base reads in the run's first line."""
    return {"epic100": "epic100 (the TA3N baseline's code)", "mmsada": "mmsada (MM-SADA's code)",
            "demo": "demo (MM-SADA's code, 150 steps)",
            "custom": "mmsada (MM-SADA's code; --dataset epic100 for TA3N's)"}.get(dataset, dataset)


def schedule_line(cfg, sched) -> str:
    """The run's schedule in one line: the preset's, compressed (``--steps``) or cut short (``stop_after``), with
    the learning-rate milestones that act before the run ends."""
    compressed = cfg.__dict__.get("rescaled_from")
    if sched.stop < sched.steps:
        how = (f"the first {sched.stop} steps of a {sched.steps}-step schedule (stop_after: a prefix of the full "
               f"run)")
    elif compressed:
        how = f"the preset's schedule ({compressed}) compressed into {sched.steps} steps (--steps)"
    else:
        how = f"{sched.steps} steps (the preset's schedule)"
    acting = [m for m in sched.lr_milestones if m < sched.stop]
    lr = f"lr {cfg.lr}" + (f" x {cfg.lr_decay} at steps {acting}" if acting else ", no decay before the end")
    stage = f"stage 2 from step {sched.stage1_steps}" if 0 < sched.stage1_steps < sched.stop else (
        "one stage" if not sched.stage1_steps else f"stage 1 only (stage 2 would start at {sched.stage1_steps})")
    return f"schedule: {how}; {stage}; {lr}"


def settings_text(cfg) -> str:
    """Every setting with its resolved value, by owner (``adapt train --settings``)."""
    unused = {"steps": "epochs", "stage1_steps": "stage1_epochs"}  # a count in epochs replaces the count in steps
    by_owner: dict = {}
    for f in fields(cfg):
        line = f"  {f.name} = {getattr(cfg, f.name)!r}"
        if f.name in unused and getattr(cfg, unused[f.name]) is not None and (f.name == "steps" or cfg.epochs):
            line += f"  (not used: {unused[f.name]} is set; the schedule below says what runs)"
        by_owner.setdefault(cfg.owner(f.name), []).append(line)
    return "\n".join(f"[{owner}]\n" + "\n".join(lines) for owner, lines in by_owner.items())


def schedule_text(cfg) -> str:
    """The schedule that will run, derived from the stores' sizes (steps, epoch length, batches, learning-rate
    milestones, the evaluations reported), or why it cannot be derived yet."""
    from adapt.schedule import Schedule
    from featstore.paths import resolve_store, store_attrs
    try:
        sizes = []
        for name in (cfg.source, cfg.target):
            path, _ = resolve_store(name, "train", cfg.backbone, cfg.features_root)
            attrs = store_attrs(path)
            if not attrs:
                return f"[schedule]\n  (derived from the stores' sizes; {path} is not a store yet)"
            sizes.append(int(attrs.get("num_done") or attrs.get("num_clips") or 0))
    except UserError as e:
        return f"[schedule]\n  (derived from the stores' sizes: {e})"
    n_s = sizes[0] - int(round(cfg.source_holdout * sizes[0]))
    s = Schedule.of(cfg, max(1, n_s), max(1, sizes[1]))
    epochs = f" = {cfg.epochs} epochs x {s.epoch_steps}" if cfg.epochs else f" (an epoch is {s.epoch_steps} steps)"
    return "\n".join([
        f"[schedule, from the stores' sizes: {n_s} source and {sizes[1]} target clips]",
        f"  {schedule_line(cfg, s)}",
        f"  steps = {s.steps}{epochs}",
        f"  stage 1 = steps 0..{s.stage1_steps - 1}" if s.stage1_steps else "  one stage",
        f"  batch = {s.batch_source} source + {s.batch_target} target clips a step",
        f"  lr = {cfg.lr}" + (f", x {cfg.lr_decay} after steps {s.lr_milestones}" if s.lr_milestones else "")
        + (f", {cfg.lr_stage2} from stage 2" if cfg.lr_stage2 is not None and s.stage1_steps else ""),
        f"  reported = the mean of the evaluations at steps {s.final_steps}"])
