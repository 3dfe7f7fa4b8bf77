"""MM-SADA: Munro and Damen, "Multi-modal domain adaptation for fine-grained action recognition", CVPR 2020
(``shared/papers/mm-sada_munro-damen_cvpr2020.txt``; released code ``jonmun/MM-SADA-code``).

Loss (eq. 4): ``L = L_y + lambda_d sum_m L_d^m + lambda_c L_c`` with the late-fused classification loss of eq. 1
(the modalities' logits summed), one discriminator per modality behind a gradient reversal layer (eq. 2) and the
self-supervised correspondence classifier on the concatenated features (eq. 3).

As the released code trains it (``scripts/submit_mmsada.sh``): stage 1 (3K steps) is ``1.0 CE + 5.0 L_c``; stage 2
(6K steps, restored from stage 1, its step counter and so its GRL schedule restarted) is
``0.2 CE + (L_d^rgb + L_d^flow) + 1.0 L_c`` with the reversed gradient scaled by
``0.2 x (2 / (1 + exp(-10 p)) - 1)``.  SGD with momentum 0.9 at 0.01 in both stages: the scripts' ``--lr`` never
reaches the optimiser (train.py:59-63 builds the Model without it; model.py:49, 108).  Half of each domain's 64 clips
are correspondence negatives, their flow from the next clip of that half (batch_generator.py:110-119); only the
corresponding source clips train the classifier (model.py:536-539); RGB and flow windows are drawn independently
(batch_generator.py:294-298).  The discriminators and the correspondence head see the features before dropout, the
classifier after it (i3d.py:466-469).  Reported: the mean top-1 of the checkpoints at stage-2 steps 5600..6000,
every 50 (submit_test.sh:11).
"""

from adapt.methods.base import Method, facts

MM = "MM-SADA-code "

# The EPIC-55 base every MM-SADA-table method shares: the defaults of adapt.config.TrainConfig (a test checks it)
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
    ("w_corr_stage1", None, "the stage-2 weight unless the method sets it"),
    ("embed_dim", 1024, "frozen features: a trainable FC + ReLU of the feature's width stands in for I3D's top"),
    (None, "16-way classifier, 8 used", MM + "src/models/arch.py:13 (argmax over 16 at test; 8 here)"),
    (None, "stage 2: fresh optimiser state", MM + "src/models/utils.py:27-28, 57-58 (momentum not restored)"),
    (None, "5 test windows, softmax averaged", MM + "src/train/training_loops.py:85-86"),
)

METHOD = Method(
    name="mmsada",
    title="MM-SADA, Munro and Damen, CVPR 2020",
    citation="J. Munro, D. Damen. Multi-modal Domain Adaptation for Fine-grained Action Recognition. CVPR 2020.",
    composition="per-modality discriminators summed (eq. 2, 4) + correspondence head (eq. 3); stage 1 CE + 5 L_c, "
                "stage 2 0.2 CE + sum_m L_d + L_c, GRL 0.2 restarted",
    base=EPIC55_BASE,
    facts=facts(
        ("w_adv", 1.0, MM + "src/models/model.py:642 (domain_loss enters with weight 1)"),
        ("beta_adv", 0.2, MM + "scripts/submit_mmsada.sh:24 (--lambda_in=0.2: scales the reversed gradient)"),
        ("disc_hidden", 100, MM + "src/models/arch.py:47-50 (dense(100)-ReLU-dense(2))"),
        ("w_corr_stage1", 5.0, MM + "src/train/train.py:347 (self_lambda default 5; stage 1 passes none)"),
        ("w_corr", 1.0, MM + "scripts/submit_mmsada.sh:24 (--self_lambda=1.0)"),
        ("init", "mmsada", MM + "src/models/arch.py:47-50, 58-63 (truncated normal 0.1); i3d.py:483-488"),
        (None, "classifier on corresponding source clips", MM + "src/models/model.py:536-539"),
        (None, "negatives: flow of the next clip, half a domain", MM + "src/data_gen/batch_generator.py:110-119"),
        (None, "L_d, L_c: batch means over both domains", MM + "src/models/model.py:482-512"),
        # the paper's form (sec. 4.1): Adam, stage 2 at 2e-4, the weights of eq. 4
        ("optimizer", "adam", "paper sec. 4.1 ('Adam optimiser')", {"form": "paper"}),
        ("lr_stage2", 2e-4, "paper sec. 4.1 (stage 2 at 2e-4)", {"form": "paper"}),
        ("w_cls", 1.0, "paper eq. 4", {"form": "paper"}),
        ("w_corr", 5.0, "paper sec. 4.1 (lambda_c = 5)", {"form": "paper"}),
        ("beta_adv", 1.0, "paper eq. 4 (lambda_d = 1)", {"form": "paper"}),
    ),
    differences=(
        "Frozen features: MM-SADA fine-tunes both I3D streams end to end; here a trainable FC + ReLU (1024 -> 1024) "
        "per modality plays that part, and the heads sit on its output.",
        "The 16-way classifier of the code (8 columns trained, argmax over 16) is an 8-way one here.",
        "The code's 8 GPU towers give I3D's BatchNorm per-domain batch statistics in training; frozen features "
        "have no BatchNorm.",
    ),
)
