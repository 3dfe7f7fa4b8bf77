"""TA3N: Chen et al., "Temporal attentive alignment for large-scale video domain adaptation", ICCV 2019, as the
EPIC-KITCHENS-100 UDA baseline runs it (``jonmun/EPIC-KITCHENS-100_UDA_TA3N``: script_test_ta3n.sh, main.py,
models.py, opts.py, dataset.py; TRNmodule.py and loss.py from ``cmhungsteve/TA3N``).

Model (modality ALL): RGB, flow and audio features of 5 fixed segments (2, 7, 12, 17, 22 of 25) concatenated to
3072, one shared FC 3072 -> 512 + ReLU + dropout 0.5; TRN-multiscale with at most 3 relations per scale, summed
(256 per scale); one relation discriminator per scale, whose entropy weights its scale by ``2 - H(d)`` (domain
attention); the scales summed to the 256-d video feature; dropout 0.5; one verb and one noun classifier; a
frame-level discriminator on the shared features and a video-level one on the dropped-out video feature.

Loss (main.py:488-639): ``0.5 (CE_verb + CE_noun) + L_relation + L_video + L_frame + 0.003 x 0.5 (AE_verb + AE_noun)``
where each domain loss is a cross-entropy averaged over all its rows and enters with weight 1; ``--beta 0.75 0.75
0.5`` (ordered relation, video, frame) scales the reversed gradients, warmed up by ``2 / (1 + exp(-p)) - 1``
(gamma 1) with p from 1/30 to 31/30 over the run.  The attentive entropy is ``mean (1 + H(d_video)) H(y)`` over
source and target clips.  SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 3e-3 divided by 10 at the start of
epochs 10 and 20 of 30, the gradient's global norm clipped at 20; 128 source clips a step and 207 target clips
(128 x 26115 / 16115); the last epoch's model is the one tested (script_test_ta3n.sh:147).
"""

from adapt.methods.base import Method, facts

TA = "EPIC-KITCHENS-100_UDA_TA3N "

# The EPIC-100 base (adapt.config.DATASETS["epic100"]): the TA3N code, which its source-only script shares
EPIC100_BASE = facts(
    ("epochs", 30, TA + "script_test_ta3n.sh:124"),
    ("stage1_steps", 0, TA + "main.py:203-212 (one stage)"),
    ("batch_source", 128, TA + "script_test_ta3n.sh:79"),
    ("batch_target", None, TA + "script_test_ta3n.sh:80 (bS_2 = bS x num_target / num_source = 207)"),
    ("eval_every", 126, TA + "main.py:226 (every epoch: 126 steps on EPIC-100)"),
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
)

METHOD = Method(
    name="ta3n",
    title="TA3N, Chen et al., ICCV 2019 (the EPIC-100 UDA baseline's code)",
    citation="M.-H. Chen et al. Temporal Attentive Alignment for Large-Scale Video Domain Adaptation. ICCV 2019.",
    composition="RGB+flow+audio concatenated, shared FC 3072->512, TRN (<=3 relations per scale, summed), "
                "relation/video/frame discriminators (GRL 0.75/0.75/0.5, loss weight 1), domain attention, "
                "attentive entropy 0.003",
    base=EPIC100_BASE,
    facts=facts(
        ("w_relation_adv", 1.0, TA + "main.py:591, 594 (loss_adversarial summed over levels)"),
        ("w_video_adv", 1.0, TA + "main.py:591, 594"),
        ("w_frame_adv", 1.0, TA + "main.py:591, 594"),
        ("beta_relation", 0.75, TA + "script_test_ta3n.sh:63 (beta_0); opts.py:62 ([relation, video, frame])"),
        ("beta_video", 0.75, TA + "script_test_ta3n.sh:64 (beta_1)"),
        ("beta_frame", 0.5, TA + "script_test_ta3n.sh:65 (beta_2)"),
        ("domain_attention", True, TA + "script_test_ta3n.sh:67 (TransAttn); models.py:373-379, 401-410"),
        ("w_attn_entropy", 0.003, TA + "script_test_ta3n.sh:73 (gamma); main.py:625-639"),
        (None, "AE uses the video-level domain logits", TA + "main.py:631-634 (pred_domain_all[1])"),
        (None, "domain CE: mean over all rows, S then T", TA + "main.py:577-589"),
    ),
    differences=(
        "The code pads the last, short source batch of an epoch (115 of 128) and drops a 127th target batch; here "
        "every step has full batches drawn epoch by epoch without replacement.",
        "Model selection: the code tests the last epoch's model; the reported figure here is the last evaluation.",
    ),
)


def built_on_ta3n(when: dict) -> tuple:
    """TA3N's base and losses as fact rows restricted to ``when`` (M3EM's and CIA's "TA3N + the module" on TBN)."""
    return tuple((f.setting, f.value, f.source, when) for f in (*EPIC100_BASE, *METHOD.facts) if f.setting)
