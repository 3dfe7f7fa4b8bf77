"""The datasets' bases: the composition and schedule every method starts from on a dataset, as facts (setting,
value, the reference file:line), before its own preset.

* EPIC-55 (MM-SADA's D1/D2/D3, and stores of no registered dataset): the released MM-SADA code's composition
  (``jonmun/MM-SADA-code``); these are the defaults of :class:`adapt.config.RunSettings` and of the methods'
  settings (a test checks it), so this base changes nothing.
* EPIC-100: the TA3N baseline's code (``jonmun/EPIC-KITCHENS-100_UDA_TA3N``), which its source-only script shares
  (script_test_sourceonly.sh differs from script_test_ta3n.sh only in use_target).
* the demo kitchens: EPIC-55's, its schedule scaled to :data:`DEMO_STEPS` after the method's preset, the features
  standardised (the demo's features come from random weights; real I3D features are not, in the code).

A base setting that the run's method does not have (a discriminator's width for source-only) is skipped.
"""

from __future__ import annotations

from adapt import parts
from adapt.facts import facts
from adapt.model import Heads

MM = "MM-SADA-code "
TA = "EPIC-KITCHENS-100_UDA_TA3N "

# EPIC-55: the MM-SADA code's composition, shared by every method of its Table 1
EPIC55_BASE = facts(
    ("steps", 9000, MM + "scripts/submit_mmsada.sh:15,24 (3K stage 1 + 6K stage 2; the loops run 3002 and 6002)"),
    ("stage1_steps", 3000, MM + "scripts/submit_*.sh:17 (stage 2 restores model.ckpt-3000)"),
    ("batch_source", 64, MM + "src/train/training_loops.py:240-245 (nextBatch(64) per domain of --batch_size=128)"),
    ("batch_target", 64, MM + "src/train/training_loops.py:240-245"),
    ("optimizer", "sgd", MM + "src/models/model.py:108 (MomentumOptimizer; the paper says Adam, README corrects it)"),
    ("lr", 0.01, MM + "src/models/model.py:49, 108 (--lr is stored at train.py:47 and never passed on)"),
    ("lr_stage2", None, MM + "src/train/train.py:59-63 (stage 2's --lr=0.001 is not used either)"),
    ("momentum", 0.9, MM + "src/models/model.py:108"),
    ("weight_decay", 1e-7, MM + "src/models/model.py:666-668 (1e-7 x sum l2_loss(v): gradient 1e-7 w)"),
    ("dropout", 0.0, MM + "src/models/i3d.py:466-469 (features taken before dropout)"),
    ("dropout_video", 0.5, MM + "src/models/i3d.py:469; training_loops.py:269 (keep_prob 0.5, only the classifier)"),
    ("w_cls_stage1", 1.0, MM + "src/models/model.py:102-105 (softmax_lambda 1.0 for Pretrain / PretrainM)"),
    ("w_cls", 0.2, MM + "src/models/model.py:102-105 (softmax_lambda 0.2 in every stage-2 mode, source-only too)"),
    ("grl_gamma", 10.0, MM + "src/train/train.py:116-117"),
    ("grl_restart", True, MM + "src/models/utils.py:86-91, 105-109 (start_step 0 in stage 2)"),
    ("sync_windows", False, MM + "src/data_gen/batch_generator.py:294-298 (no script passes --synchronised)"),
    ("last_evals", 9, MM + "scripts/submit_test.sh:11 ({5600..6000..50})"),
    ("last_eval_every", 50, MM + "scripts/submit_test.sh:11"),
    ("standardise", False, MM + "src/models/i3d.py:466-468 (no feature normalisation)"),
    ("epochs", None, MM + "scripts/submit_*.sh (--max_steps, no epochs)"),
    ("lr_steps", [], MM + "src/models/model.py:108 (no decay; global_step is never read)"),
    ("lr_epochs", [], MM + "no decay"),
    ("nesterov", False, MM + "src/models/model.py:108"),
    ("clip_grad_norm", None, MM + "src/models/model.py:653-663 (no clipping)"),
    ("eval_every", 100, "a curve point every 100 steps (the code logs every 50: train.py:130-188)"),
    ("init", "torch", "the trainable embedding (no counterpart in the code)"),
    ("units", "random", MM + "src/data_gen/batch_generator.py:283-284 (a random window centre per step)"),
    ("fusion", "late", MM + "src/models/model.py:405-407 (logits summed: eq. 1)"),
    ("fusion_mean", False, MM + "src/models/model.py:406 (reduce_sum)"),
    ("video_disc_after_dropout", False, MM + "src/models/model.py:424-449 (heads on the pre-dropout features)"),
    ("temporal", "avg", "one I3D window per clip"),
    ("trn_relations", 3, "no TRN (TA3N's value, for TBN runs that set temporal=trn)"),
    ("trn_dim", 256, "no TRN (TA3N's value)"),
    ("lr_decay", 0.1, "no decay (the factor lr_steps would use)"),
    ("disc_hidden", 100, MM + "src/models/arch.py:47-50"),
    ("grl_p0", 0.0, MM + "src/train/train.py:116 (p = step / max_steps)"),
    ("embed_dim", 1024, "frozen features: a trainable FC + ReLU of the feature's width stands in for I3D's top"),
    (None, "16-way classifier, 8 used", MM + "src/models/arch.py:13 (argmax over 16 at test; 8 here)"),
    (None, "stage 2: fresh optimiser state", MM + "src/models/utils.py:27-28, 57-58 (momentum not restored)"),
    (None, "5 test windows, softmax averaged", MM + "src/train/training_loops.py:85-86"),
    base=True,
)

# EPIC-100: the TA3N baseline's code
EPIC100_BASE = facts(
    ("epochs", 30, TA + "script_test_ta3n.sh:124"),
    ("stage1_steps", 0, TA + "main.py:203-212 (one stage)"),
    ("batch_source", 128, TA + "script_test_ta3n.sh:79"),
    ("batch_target", 207, TA + "script_test_ta3n.sh:40-41, 80 (bS_2 = 128 x num_target / num_source with the "
                              "full splits' sizes written in the script, 26115 and 16115: 207 whatever the stores; "
                              "on a subset its epoch is the shorter of the two loaders, main.py:329)"),
    ("eval_every", None, TA + "main.py:226 (once an epoch: 126 steps on EPIC-100's splits)"),
    ("last_evals", 1, TA + "script_test_ta3n.sh:147 (checkpoint.pth.tar: the last epoch)"),
    ("optimizer", "sgd", TA + "main.py:97"),
    ("lr", 3e-3, TA + "script_test_ta3n.sh:84"),
    ("lr_epochs", [10, 20], TA + "script_test_ta3n.sh:122-123; main.py:208-212 (at the start of the epoch)"),
    ("lr_decay", 0.1, TA + "script_test_ta3n.sh:120 (--lr_decay 10: divided by 10)"),
    ("momentum", 0.9, TA + "opts.py:87"),
    ("nesterov", True, TA + "main.py:97 (hard-coded)"),
    ("weight_decay", 1e-4, TA + "opts.py:89"),
    ("clip_grad_norm", 20.0, TA + "script_test_ta3n.sh:125; main.py:661-664"),
    ("init", "ta3n", TA + "models.py:132-147 (normal 0.001, bias 0; TRN and relation discriminators: default)"),
    ("units", "fixed", TA + "dataset.py:147-160; main.py:167,177 (test_mode=True: segments 2, 7, 12, 17, 22)"),
    ("fusion", "concat", TA + "models.py:124-127 (ALL: 3072-d input)"),
    ("embed_dim", 512, TA + "script_test_ta3n.sh:15 (fc_dim 512); models.py:133, 145"),
    ("dropout", 0.5, TA + "script_test_ta3n.sh (--dropout_i 0.5); models.py:595-596"),
    ("dropout_video", 0.5, TA + "script_test_ta3n.sh (--dropout_v 0.5); models.py:702-703"),
    ("video_disc_after_dropout", True, TA + "models.py:720 (the video discriminator takes the dropped-out feature)"),
    ("temporal", "trn", TA + "script_test_ta3n.sh:13 (trn-m)"),
    ("trn_relations", 3, "cmhungsteve/TA3N TRNmodule.py:32, 71 (subsample_num 3, fixed indices)"),
    ("trn_dim", 256, TA + "models.py:236-237 (num_bottleneck 256)"),
    ("disc_hidden", None, TA + "models.py:165-178, 280-298, 303-311 (512-512-2, 256-256-2, 256-256-2)"),
    ("grl_gamma", 1.0, TA + "main.py:355-361 (2 / (1 + exp(-1.0 p)) - 1)"),
    ("grl_restart", False, TA + "main.py:332-333 (p over all 30 epochs)"),
    ("grl_p0", 1 / 30, TA + "main.py:203, 332-333 (epochs count from 1: p starts at 1/30)"),
    ("w_cls", 1.0, TA + "main.py:506 (the 0.5 of 0.5 (CE_verb + CE_noun) is the cls term's mean over tasks)"),
    ("w_cls_stage1", None, TA + "one stage"),
    ("standardise", False, TA + "dataset.py:49-56, 173-207 (features as stored)"),
    (None, "126 steps an epoch: zip(source, target) loaders", TA + "main.py:329"),
    base=True,
)


def _normal(std: float, truncated: bool = False):
    return lambda lin: parts.init_normal(lin, std, truncated)


# The code bases' initialisers (the ``init`` setting: the EPIC-100 base's is TA3N's), by part: TA3N's normal(0,
# 0.001) with zero bias on every layer but the TRN's and the relation discriminators' (models.py:132-147, 165-180,
# 280-300); MM-SADA's truncated normal 0.1 on the domain heads (arch.py:47-50, 58-63) and Sonnet's default, truncated
# normal 1/sqrt(fan_in), on the classifiers (i3d.py:483-488).  ``torch``: PyTorch's defaults everywhere.
INITIALISERS = {
    "ta3n": {parts.Embedding: _normal(0.001), Heads: _normal(0.001), parts.DomainDiscriminator: _normal(0.001),
             parts.CorrespondenceHead: _normal(0.001), parts.ProjectionHead: _normal(0.001)},
    "mmsada": {parts.DomainDiscriminator: _normal(0.1, True), parts.CorrespondenceHead: _normal(0.1, True),
               Heads: lambda lin: parts.init_normal(lin, lin.in_features ** -0.5, truncated=True)},
}

BASES = {"mmsada": EPIC55_BASE, "epic100": EPIC100_BASE}
KNOWN = ("mmsada", "epic100", "demo", "custom")  # custom: stores of no registered dataset, EPIC-55's base
DEMO_STEPS = 150
DEMO = {"standardise": True}


def base(dataset: str) -> dict:
    """The settings of ``dataset``'s base; EPIC-55's are the defaults, so only EPIC-100 changes anything."""
    return {f.setting: f.value for f in EPIC100_BASE if f.setting} if dataset == "epic100" else {}


def rescale(cfg, steps: int) -> None:
    """An explicit ``--steps`` (or ``steps`` in ``--set`` or a sweep spec): the preset's schedule run in ``steps``
    steps, every part of it keeping its fraction of the run: stage 1, the learning-rate milestones, the evaluation
    spacing (an epoch preset's epochs become these fractions: TA3N's decays at epochs 10 and 20 of 30 fall at 9/30
    and 19/30 of the steps, an evaluation every 1/30)."""
    cfg.__dict__["rescaled_from"] = f"{cfg.epochs} epochs" if cfg.epochs else f"{cfg.steps} steps"  # for its line
    if cfg.epochs:
        epochs = cfg.epochs
        cfg.lr_steps = sorted({*cfg.lr_steps, *(round((e - 1) / epochs * steps) for e in cfg.lr_epochs)})
        if cfg.stage1_epochs is not None:
            cfg.stage1_steps = round(cfg.stage1_epochs / epochs * steps)
        cfg.eval_every = cfg.last_eval_every = max(1, round(steps / epochs))
        cfg.epochs, cfg.stage1_epochs, cfg.lr_epochs, cfg.steps = None, None, [], steps
        return
    scale = steps / cfg.steps
    cfg.steps = steps
    cfg.stage1_steps = round(cfg.stage1_steps * scale)
    cfg.lr_steps = [round(s * scale) for s in cfg.lr_steps]
    if cfg.eval_every:  # none (once an epoch) stays once an epoch
        cfg.eval_every = max(1, round(cfg.eval_every * scale))
    cfg.last_eval_every = max(1, round(cfg.last_eval_every * scale))


def shorten(cfg, steps: int) -> None:
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
