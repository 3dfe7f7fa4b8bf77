"""Training configuration and the method presets.

A method is a named preset of parts and loss weights over one :class:`TrainConfig`; an ablation is the same
preset with a part switched off or a weight changed (``--set sc=false``, ``--set w_frame_adv=0``).  Defaults are
the papers' hyper-parameters (REFERENCE.md, "Method hyper-parameters"); the schedule (steps, stages, batch) comes
from the dataset: the MM-SADA schedule for D1/D2/D3 (and the demo kitchens, shortened), TA3N's for EPIC-100.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

from extract.errors import UserError


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
    # schedule (MM-SADA: 3K steps stage 1 + 6K steps stage 2, batch 64 + 64)
    steps: int = 9000
    stage1_steps: int = 3000         # alignment terms start here (two-stage schedule); 0 = from the start
    batch_source: int = 64
    batch_target: int = 64
    eval_every: int = 100
    eval_batch: int = 1024
    last_evals: int = 9              # target_top1 = mean over the last 9 evaluations (MM-SADA)
    optimizer: str = "sgd"           # "sgd" (momentum) | "adam"
    lr: float = 0.01
    lr_stage2: float = 0.001         # the released MM-SADA code: 0.01 then 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-7
    # parts
    spatial: bool = False            # keep 7x7 maps (needed by MC / SC); otherwise pooled at load
    mc: bool = False                 # SMR / MC mutual-refinement gating (M3EM eqs. 1-4)
    sc: bool = False                 # CMC / SC spatial consensus (M3EM eq. 5)
    reduction: int = 16
    sc_k: int = 3
    sc_dim: int = 256
    embed_dim: int = 512             # trainable per-modality embedding (TA3N shared layer)
    dropout: float = 0.5
    temporal: str = "avg"            # "avg" | "trn" (TA3N); I3D uses one window per clip
    segments: int = 5                # TBN: segments per clip the heads see (TA3N: 5 of 25)
    audio_weight: float = 0.5        # late fusion weight of audio (M3EM)
    standardise: bool = True         # inputs standardised per channel with the source store's statistics
    adabn: bool = False              # per-domain input statistics; evaluation with the target's
    mcd: bool = False                # MCD: two classifiers and the three-step update
    mcd_generator_steps: int = 4
    disc_hidden: int = 100
    domain_attention: bool = False   # TA3N
    corr_sync: bool = False          # MM-SADA time-synchronised correspondence (negatives: another window)
    tau: float = 0.1
    bank_momentum: float = 0.5
    pl_threshold: float = 0.8
    # loss weights
    w_cls: float = 1.0               # lambda_y: source classification
    w_target_cls: float = 0.0        # supervised target (upper bound)
    w_adv: float = 0.0               # lambda_d: per-modality discriminators (MM-SADA, M3EM)
    w_video_adv: float = 0.0         # lambda_vd: video-level discriminator on the fused feature (CIA, DANN, TA3N)
    w_frame_adv: float = 0.0         # lambda_fd: frame-level discriminators (CIA, TA3N)
    w_relation_adv: float = 0.0      # TA3N relation discriminators
    w_corr: float = 0.0              # lambda_c: MM-SADA correspondence
    w_mmd: float = 0.0
    w_xmodal: float = 0.0            # Kim et al. cross-modal contrastive
    w_xdomain: float = 0.0           # Kim et al. cross-domain contrastive
    w_pseudo: float = 0.0
    w_attn_entropy: float = 0.0      # TA3N attentive entropy (gamma)
    w_mcd: float = 1.0

    WEIGHTS = ("w_cls", "w_target_cls", "w_adv", "w_video_adv", "w_frame_adv", "w_relation_adv", "w_corr", "w_mmd",
               "w_xmodal", "w_xdomain", "w_pseudo", "w_attn_entropy", "w_mcd")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture_key(self) -> str:
        """Everything except the seed and the loss weights: runs with equal keys can be trained stacked."""
        d = self.to_dict()
        for k in ("seed", "out", "tag", *self.WEIGHTS):
            d.pop(k)
        d["active_terms"] = [w for w in self.WEIGHTS if getattr(self, w)]  # a zero weight removes its head
        return json.dumps(d, sort_keys=True)


METHODS: dict[str, dict] = {
    "source_only": {},
    "target_only": {"w_cls": 0.0, "w_target_cls": 1.0},
    "adabn": {"adabn": True},
    "mmd": {"w_mmd": 1.0},
    "mcd": {"mcd": True},
    "dann": {"w_video_adv": 1.0},
    "pseudo_label": {"w_pseudo": 1.0},
    "mmsada": {"w_adv": 1.0, "w_corr": 5.0},
    "contrastive": {"w_xmodal": 1.25, "w_xdomain": 1.25},
    "ta3n": {"temporal": "trn", "domain_attention": True, "w_frame_adv": 0.75, "w_relation_adv": 0.75,
             "w_video_adv": 0.5, "w_attn_entropy": 0.003, "lr": 3e-3, "lr_stage2": 3e-3},
    "m3em": {"spatial": True, "mc": True, "sc": True, "w_adv": 1.0},
    "cia": {"spatial": True, "mc": True, "sc": True, "w_video_adv": 1.0, "w_frame_adv": 0.5,
            "optimizer": "adam", "lr": 1e-4, "lr_stage2": 1e-4},
}
METHOD_PAPERS = {
    "source_only": "no adaptation (MM-SADA Table 1 'Source-only')",
    "target_only": "supervised target, the upper bound (MM-SADA Table 1)",
    "adabn": "AdaBN, Li et al. 2018: normalisation statistics re-estimated on the target",
    "mmd": "MK-MMD, Long et al. 2015 (DAN)",
    "mcd": "MCD, Saito et al. CVPR 2018: maximum classifier discrepancy, three-step update",
    "dann": "DANN, Ganin et al. 2016: gradient reversal and a domain discriminator",
    "pseudo_label": "self-training on confident target pseudo-labels",
    "mmsada": "MM-SADA, Munro and Damen CVPR 2020: per-modality adversarial + self-supervised correspondence",
    "contrastive": "Kim et al. ICCV 2021: cross-modal and cross-domain contrastive learning",
    "ta3n": "TA3N, Chen et al. ICCV 2019: TRN-multiscale, domain attention, attentive entropy",
    "m3em": "M3EM, Yang et al. EPIC-100 UDA 2021 report: SMR + CMC + adversarial alignment",
    "cia": "CIA, Yang et al. CVPR 2022: MC + SC + video- and frame-level adversarial alignment",
}


def _coerce(name: str, value: str, current):
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--set {name}={value}: expected true or false")
    try:
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            return [v for v in value.split(",") if v]
    except ValueError:
        raise UserError(f"--set {name}={value}: expected a {type(current).__name__}") from None
    return value


def parse_sets(items: list[str]) -> dict:
    """``["w_adv=0", "sc=false"]`` -> dict of raw strings; unknown keys are refused later."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def resolve(method: str, dataset: str, overrides: dict | None = None, **given) -> TrainConfig:
    """The configuration of a run: defaults, then the dataset's schedule, the method preset, the arguments given,
    and last the ``--set`` overrides (strings are converted to the field's type)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    cfg = TrainConfig(method=method)
    schedule = SCHEDULES.get(dataset, {})
    preset = dict(METHODS[method])
    backbone = given.get("backbone", cfg.backbone)
    if method == "m3em" and backbone == "i3d":
        preset["w_adv"] = 3.0  # M3EM: lambda_d = 3 with I3D, 1 otherwise
    if method == "cia" and backbone == "tbn":
        preset["temporal"] = "trn"  # CIA on TBN builds on TA3N's TRN aggregator
    if dataset == "epic100" and method == "cia" and backbone == "tbn":
        preset.update(optimizer="sgd", lr=3e-3, lr_stage2=3e-3)  # CIA supp.: SGD 3e-3 with TRN
    names = {f.name: f for f in fields(TrainConfig)}
    for layer in (schedule, preset, {k: v for k, v in given.items() if v is not None}):
        for k, v in layer.items():
            setattr(cfg, k, v)
    for k, v in (overrides or {}).items():
        if k not in names:
            raise UserError(f"--set {k}: unknown setting (see `adapt train --help-settings`)")
        setattr(cfg, k, _coerce(k, v, getattr(cfg, k)) if isinstance(v, str) else v)
    if cfg.temporal not in ("avg", "trn"):
        raise UserError(f"temporal={cfg.temporal!r}: one of avg, trn")
    if cfg.optimizer not in ("sgd", "adam"):
        raise UserError(f"optimizer={cfg.optimizer!r}: one of sgd, adam")
    if (cfg.mc or cfg.sc) and not cfg.spatial:
        cfg.spatial = True
    return cfg


SCHEDULES = {
    "mmsada": {},
    # TA3N's EPIC-100 schedule: SGD lr 3e-3, 30 epochs (about 7.5K steps of 64 source clips), no stage split
    "epic100": {"steps": 7500, "stage1_steps": 0, "lr": 3e-3, "lr_stage2": 3e-3, "eval_every": 250},
    # the demo kitchens: the MM-SADA schedule shortened to run in seconds on a CPU
    "demo": {"steps": 150, "stage1_steps": 50, "batch_source": 32, "batch_target": 32, "eval_every": 10},
}
