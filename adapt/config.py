"""The training configuration: one flat set of settings, resolved in layers.

``resolve(method, dataset, overrides, **given)`` builds a run's :class:`TrainConfig` from

1. the defaults below: the released MM-SADA code's composition for EPIC-55 (``jonmun/MM-SADA-code``);
2. the dataset's base (:data:`DATASETS`): EPIC-100 takes the TA3N baseline code's composition and schedule
   (``jonmun/EPIC-KITCHENS-100_UDA_TA3N``), the demo kitchens the EPIC-55 one scaled to 150 steps;
3. the method's preset (``adapt/methods/<name>.py``: its parts, weights and, where its paper has one, schedule);
4. the arguments given (``--steps``, ``--seed``, ...), and last the ``--set key=value`` overrides.

Every setting is a field of :class:`TrainConfig`; ``adapt train --settings`` prints them resolved.  The settings
that take ``none`` (``lr_stage2``, ``batch_target``, ``epochs``, ...) mean "derived" when unset, as their comments say.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields

from adapt.methods.ta3n import EPIC100_BASE
from featstore.errors import UserError
from featstore.settings import coerce, kind_of, split_items


@dataclass
class TrainConfig:
    # what to train on
    method: str = "source_only"
    backbone: str = "i3d"
    source: str = ""                 # domain (D1), split (D1_train) or store path
    target: str = ""
    eval: str = ""                   # default: the target domain's test split
    features_root: str = "features"
    out: str = "runs"
    modalities: list = field(default_factory=list)  # empty: every modality the stores share
    seed: int = 0
    tag: str = ""                    # distinguishes runs of one method and pair (set by sweeps)
    challenge: str = ""              # EPIC-100: a store to predict for the challenge's test.json
    device: str = "auto"
    memory_budget: typing.Optional[str] = None  # "24G": stores that do not fit are streamed; none = what is free
    form: str = "code"               # "code" | "paper": where a paper and its released code differ (adapt/methods)
    # schedule (MM-SADA code: stage 1 = 3K steps, stage 2 = 6K steps restored from it; batch 64 + 64)
    steps: int = 9000
    epochs: typing.Optional[int] = None  # when set: steps = epochs x steps per epoch (TA3N); see schedule.py
    stage1_steps: int = 3000         # alignment terms start here (MM-SADA's two stages); 0 = from the start
    batch_source: int = 64
    batch_target: typing.Optional[int] = 64  # none: batch_source x n_target / n_source (TA3N's bS_2)
    eval_every: int = 100
    eval_batch: int = 1024
    # model selection (adapt/validators.py): validators computed at every evaluation, without target labels
    validators: bool = True
    validator_clips: int = 1000      # most clips of each domain the validators look at (a fixed subset)
    source_holdout: float = 0.0      # fraction of the source train clips held out as labelled source validation
    source_val: str = ""             # or a store / split / domain for it (EPIC-100: source_val); none: no
                                     # source_val and dev validators
    last_evals: int = 9              # target_top1 = mean of the evaluations at the last 9 ...
    last_eval_every: int = 50        # ... checkpoints, 50 steps apart (MM-SADA submit_test.sh: 5600..6000)
    # optimiser
    optimizer: str = "sgd"           # "sgd" (momentum) | "adam"
    lr: float = 0.01
    lr_stage2: typing.Optional[float] = None  # none: lr (the MM-SADA code's --lr is never read: 0.01 throughout)
    lr_steps: list = field(default_factory=list)   # steps after which lr is multiplied by lr_decay
    lr_epochs: list = field(default_factory=list)  # the same in epochs (TA3N: at the start of epochs 10 and 20)
    lr_decay: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-7
    clip_grad_norm: typing.Optional[float] = None  # global L2 norm per run (TA3N: 20); none = off
    init: str = "torch"              # "torch" | "mmsada" | "ta3n": the reference code's initialisers
    # inputs and sampling
    spatial: bool = False            # keep 7x7 maps (needed by MC / SC); otherwise pooled at load
    feature_form: str = "float16"    # in memory: "float16" | "int8" (per-channel scales: half the memory)
    standardise: bool = False        # inputs standardised per channel with the source store's statistics
    adabn: bool = False              # per-domain input statistics; evaluation with the target's
    segments: int = 5                # TBN: segments per clip the heads see (TA3N: 5 of 25)
    units: str = "random"            # training units: "random" (a window / one segment per group) | "fixed"
    sync_windows: bool = False       # one window index for every modality (MM-SADA's "Sync"); default independent
    # the model
    fusion: str = "late"             # "late" (a stream per modality) | "concat" (one stream) | groups "rgb+flow,audio"
    fusion_mean: bool = False        # late fusion averages the streams' logits (Kim et al.) instead of summing them
    audio_weight: float = 0.5        # weight of an audio-only stream in the late fusion (M3EM)
    embed_dim: int = 1024            # the trainable embedding standing in for the backbone's top (see README)
    dropout: float = 0.0             # on the embedding's output: every head sees it (TA3N dropout_i)
    dropout_video: float = 0.5       # on the video feature, before the classifier (MM-SADA; TA3N dropout_v)
    video_disc_after_dropout: bool = False  # the video discriminator sees dropout_video's output (TA3N)
    temporal: str = "avg"            # "avg" | "trn" (TA3N's TRN-multiscale); I3D uses one window per clip
    trn_relations: int = 3           # relations per scale (TA3N TRNmodule subsample_num); 0 = all subsets
    trn_dim: int = 256               # TRN bottleneck width = the video feature's width
    domain_attention: bool = False   # TA3N: relation features weighted by 2 - H(d)
    disc_hidden: typing.Optional[int] = 100  # discriminator hidden width; none = its input's width (TA3N)
    mc: bool = False                 # SMR / MC mutual-refinement gating (M3EM eqs. 1-4)
    sc: bool = False                 # CMC / SC spatial consensus (M3EM eq. 5)
    reduction: int = 16
    sc_k: int = 3
    sc_dim: int = 256
    # gradient reversal: coefficient = beta x (2 / (1 + exp(-grl_gamma p)) - 1)
    grl_gamma: float = 10.0
    grl_restart: bool = True         # p counts from the start of stage 2 (MM-SADA code) rather than step 0
    grl_p0: float = 0.0              # p at the first step (TA3N: 1/30, its epochs count from 1)
    beta_adv: float = 0.2            # per-modality discriminators (MM-SADA lambda_in 0.2)
    beta_video: float = 1.0
    beta_frame: float = 1.0
    beta_relation: float = 1.0
    beta_mcd: float = 1.0            # MCD in the GRL form (MM-SADA code, lambda_in's default 1.0)
    # method details
    mcd_form: str = "grl"            # "grl" (MM-SADA code: one step) | "three_step" (Saito et al.)
    mcd_generator_steps: int = 4
    mmd_kernels: str = "mmsada"      # "mmsada" (12 fixed bandwidths) | "dan" (DAN's mean-distance family)
    tau: float = 0.1
    bank_momentum: float = 0.5
    xmodal_bank: bool = True         # Kim et al.: memory-bank negatives in the cross-modal loss
    pl_threshold: float = 0.8
    # loss weights (stage 2, or the whole run when stage1_steps = 0)
    w_cls: float = 0.2               # lambda_y (MM-SADA code stage 2: 0.2)
    w_target_cls: float = 0.0        # supervised target (upper bound)
    w_adv: float = 0.0               # lambda_d: per-stream discriminators (MM-SADA, M3EM)
    w_video_adv: float = 0.0         # lambda_vd: the discriminator on the video feature (DANN, CIA, TA3N)
    w_frame_adv: float = 0.0         # lambda_fd: frame-level discriminators (CIA, TA3N)
    w_relation_adv: float = 0.0      # TA3N relation discriminators
    w_corr: float = 0.0              # lambda_c: MM-SADA correspondence
    w_mmd: float = 0.0
    w_xmodal: float = 0.0            # Kim et al. cross-modal contrastive
    w_xdomain: float = 0.0           # Kim et al. cross-domain contrastive
    w_pseudo: float = 0.0
    w_attn_entropy: float = 0.0      # TA3N attentive entropy (gamma)
    w_mcd: float = 0.0
    # stage-1 weights (MM-SADA code: 1.0 x CE + 5.0 x L_c); none = the stage-2 weight
    w_cls_stage1: typing.Optional[float] = 1.0
    w_target_cls_stage1: typing.Optional[float] = None
    w_corr_stage1: typing.Optional[float] = None

    WEIGHTS = ("w_cls", "w_target_cls", "w_adv", "w_video_adv", "w_frame_adv", "w_relation_adv", "w_corr", "w_mmd",
               "w_xmodal", "w_xdomain", "w_pseudo", "w_attn_entropy", "w_mcd",
               "w_cls_stage1", "w_target_cls_stage1", "w_corr_stage1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def weight(self, term: str, stage: int) -> float:
        """The weight of loss term ``term`` in stage 1 or 2 (a stage-1 weight of none is the stage-2 weight)."""
        w = getattr(self, f"w_{term}")
        if stage == 1 and hasattr(self, f"w_{term}_stage1"):
            w1 = getattr(self, f"w_{term}_stage1")
            return w if w1 is None else w1
        return w

    def architecture_key(self) -> str:
        """Everything except the seed and the loss weights: runs with equal keys can be trained stacked."""
        d = self.to_dict()
        for k in ("seed", "out", "tag", "memory_budget", *self.WEIGHTS):
            d.pop(k)
        d["active_terms"] = [w for w in self.WEIGHTS if getattr(self, w)]  # a zero weight removes its head
        return json.dumps(d, sort_keys=True)


CHOICES = {"form": ("code", "paper"), "feature_form": ("float16", "int8"), "optimizer": ("sgd", "adam"),
           "temporal": ("avg", "trn"), "units": ("random", "fixed"), "init": ("torch", "mmsada", "ta3n"),
           "mcd_form": ("grl", "three_step"), "mmd_kernels": ("mmsada", "dan")}
POSITIVE = ("steps", "batch_source", "eval_every", "eval_batch", "validator_clips", "last_evals", "last_eval_every",
            "embed_dim", "segments", "trn_dim", "reduction", "sc_dim", "mcd_generator_steps", "epochs", "batch_target",
            "disc_hidden", "lr", "tau")
NON_NEGATIVE = ("stage1_steps", "lr_stage2", "momentum", "weight_decay", "clip_grad_norm", "audio_weight",
                "trn_relations", "sc_k", "grl_gamma", "grl_p0", "lr_decay", *TrainConfig.WEIGHTS)
PROBABILITY = ("dropout", "dropout_video", "bank_momentum", "pl_threshold", "source_holdout")

_HINTS = typing.get_type_hints(TrainConfig)


def _kind(name: str) -> tuple[type, bool]:
    """(the setting's type, whether it takes none) from TrainConfig's annotation."""
    return kind_of(_HINTS[name])


def _coerce(name: str, value: str):
    """A ``--set`` string as the setting's type (``none`` for the settings that take it)."""
    kind, optional = _kind(name)
    return coerce(name, value, kind, optional)


def typed_value(name: str, value, where: str = "--set"):
    """A value from a sweep spec (TOML / YAML: already typed) or ``--set`` (a string) as setting ``name``'s type;
    an unknown setting or a value of the wrong type is a one-line error naming ``where``."""
    if name not in _HINTS or name in ("WEIGHTS",):
        raise UserError(f"{where}: unknown setting {name!r} (`adapt train --settings` lists them)")
    if isinstance(value, str):
        return value  # resolve() converts strings with the --set rules
    kind, optional = _kind(name)
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


def check(cfg: TrainConfig) -> None:
    """Refuse settings that cannot train, with one line naming the setting (before anything is read)."""
    for k, allowed in CHOICES.items():
        if getattr(cfg, k) not in allowed:
            raise UserError(f"{k}={getattr(cfg, k)!r}: one of {', '.join(allowed)}")
    for k in POSITIVE:
        v = getattr(cfg, k)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise UserError(f"{k}={v!r}: must be a positive number")
    for k in NON_NEGATIVE:
        v = getattr(cfg, k)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise UserError(f"{k}={v!r}: must be zero or positive")
    for k in PROBABILITY:
        v = getattr(cfg, k)
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise UserError(f"{k}={v!r}: must be in [0, 1)")
    for k in ("lr_steps", "lr_epochs"):
        if any(not isinstance(s, (int, float)) or s < 0 for s in getattr(cfg, k)):
            raise UserError(f"{k}={getattr(cfg, k)!r}: expected a list of non-negative numbers, e.g. 3000,6000")
    if cfg.source_holdout and cfg.source_val:
        raise UserError("source_holdout and source_val both set: hold out source clips or give a source validation "
                        "store, not both")
    if cfg.lr_epochs and not cfg.epochs:
        raise UserError("lr_epochs needs epochs (or give lr_steps in steps)")
    if not cfg.epochs and cfg.stage1_steps >= cfg.steps and any(
            getattr(cfg, f"w_{t}") for t in ("adv", "video_adv", "frame_adv", "relation_adv", "mmd", "xdomain",
                                              "pseudo", "attn_entropy", "mcd")):
        raise UserError(f"stage1_steps={cfg.stage1_steps} leaves no stage 2 in {cfg.steps} steps: the method's "
                        f"alignment terms would never act (lower stage1_steps or raise steps)")
    if (cfg.mc or cfg.sc) and not cfg.spatial:
        cfg.spatial = True


def resolve(method: str, dataset: str, overrides: dict | None = None, **given) -> TrainConfig:
    """The configuration of a run: defaults, then the dataset's base, the method's preset, the arguments given,
    and last the ``--set`` overrides (strings are converted to the setting's type)."""
    from adapt import methods
    if method not in methods.REGISTRY:
        raise UserError(f"unknown method {method!r}: one of {', '.join(methods.REGISTRY)}")
    cfg = TrainConfig(method=method)
    backbone = given.get("backbone") or cfg.backbone
    form = (overrides or {}).get("form") or given.get("form") or cfg.form
    if form not in methods.FORMS:
        raise UserError(f"form={form!r}: one of {', '.join(methods.FORMS)}")
    base = DATASETS.get(dataset, {})
    preset = methods.REGISTRY[method].preset(dataset, backbone, form)
    names = {f.name for f in fields(TrainConfig)}
    for layer in (base, preset):
        for k, v in layer.items():
            setattr(cfg, k, v)
    if dataset == "demo":
        shorten(cfg, DEMO_STEPS)
        for k, v in DEMO.items():
            setattr(cfg, k, v)
    for k, v in given.items():
        if v is not None:
            setattr(cfg, k, v)
    for k, v in (overrides or {}).items():
        if k not in names:
            raise UserError(f"--set {k}: unknown setting (`adapt train --settings` lists them)")
        setattr(cfg, k, _coerce(k, v) if isinstance(v, str) else v)
    check(cfg)
    return cfg


# The datasets' bases.  "mmsada" (D1/D2/D3) is the defaults themselves.  EPIC-100 is the TA3N baseline's code,
# which its source-only script shares (script_test_sourceonly.sh differs from script_test_ta3n.sh only in
# use_target): the facts and their lines are in adapt/methods/ta3n.py.
DATASETS = {
    "mmsada": {},
    "epic100": {f.setting: f.value for f in EPIC100_BASE if f.setting},
    "demo": {},
}
# the demo kitchens: the EPIC-55 base; after the method's preset, its schedule is scaled to DEMO_STEPS and the
# features are standardised (the demo's features come from random weights; real I3D features are not, in the code)
DEMO_STEPS = 150
DEMO = {"standardise": True}


def shorten(cfg: TrainConfig, steps: int) -> None:
    """Scale a schedule to ``steps`` steps: stage split, learning-rate steps and the last-evaluations spacing
    keep their fractions of the run; evaluation every ``steps / 15``."""
    total = cfg.steps
    if cfg.epochs:
        epochs, cfg.epochs = cfg.epochs, None
        cfg.lr_steps = [round((e - 1) / epochs * steps) for e in cfg.lr_epochs]  # at the start of epoch e
        cfg.lr_epochs = []
        total = steps
    scale = steps / total
    cfg.steps = steps
    cfg.stage1_steps = round(cfg.stage1_steps * scale)
    cfg.lr_steps = [round(s * scale) for s in cfg.lr_steps]
    cfg.eval_every = max(1, steps // 15)
    cfg.last_eval_every = cfg.eval_every
