"""The training objective: each loss term of the methods, computed from the model's outputs on a batch of
``B_s`` source clips followed by ``B_t`` target clips.

``L = sum_term w_term(stage) L_term``: in stage 1 (``step < stage1_steps``, MM-SADA's first stage) only the
classification and self-supervised terms act, with their stage-1 weights; the alignment terms act from stage 2 on.
Adversarial terms learn through gradient reversal; the reversal's coefficient per level is the schedule's
(``adapt.schedule``), so their loss weights are those of the papers' sums.  Terms (unweighted, each a scalar):

=============  =================================================================================  ================
term           loss                                                                               weight
=============  =================================================================================  ================
cls            mean over tasks (verb, + noun) of the fused source logits' CE (MM-SADA eq. 1; TA3N  w_cls
               main.py:506: 0.5 (CE_verb + CE_noun)); with the correspondence head, only the
               corresponding source clips (MM-SADA model.py:536-539); MCD adds its second head's
target_cls     the same on the target's labels: the supervised-target upper bound only           w_target_cls
adv            sum over streams of the discriminator CE (MM-SADA eq. 4, model.py:501; M3EM L_d)    w_adv
video_adv      CE of the discriminator on concat(v) (DANN; CIA lambda_vd; TA3N video level)       w_video_adv
frame_adv      sum over streams of the frame discriminators' CE, over all frames (CIA, TA3N)       w_frame_adv
relation_adv   sum over streams of the relation discriminators' CE, over all relations (TA3N)      w_relation_adv
corr           correspondence CE over both domains (MM-SADA eq. 3, model.py:505-512)              w_corr
mmd            sum over streams of MMD^2(v_s, v_t) (MM-SADA model.py:514-535; DAN)                w_mmd
xmodal         Kim et al. eqs. 1-3: L_mo^s + L_mo^t, bank negatives                             w_xmodal
xdomain        Kim et al. eqs. 4-6: sum over streams of L_do (confident target anchors)           w_xdomain
pseudo         CE on confident target pseudo-labels                                              w_pseudo
attn_entropy   TA3N loss.py:15-25: mean over tasks of mean (1 + H(d_video)) H(y), S and T        w_attn_entropy
mcd            MCD discrepancy mean |p1 - p2| of the fused target softmaxes (Saito eq. 1)         w_mcd
=============  =================================================================================  ================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapt import losses, parts

TERMS = ("cls", "target_cls", "adv", "video_adv", "frame_adv", "relation_adv", "corr", "mmd", "xmodal", "xdomain",
         "pseudo", "attn_entropy", "mcd")
STAGE1 = ("cls", "target_cls", "corr", "xmodal")  # act in stage 1 too (classification and self-supervision)


def _domain_ce(logits: torch.Tensor, b_s: int) -> torch.Tensor:
    """Discriminator CE with labels 0 for the first b_s rows (source) and 1 for the rest (target); a (B, T, 2)
    input has one label per clip, repeated over its units, and the mean runs over every row (TA3N main.py:589)."""
    labels = (torch.arange(logits.shape[0], device=logits.device) >= b_s).long()
    if logits.dim() == 3:
        labels = labels[:, None].expand(logits.shape[:2])
    return losses.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))


def correspondence_targets(b_s: int, b_t: int, device) -> torch.Tensor:
    """1 where a row's RGB and flow come from the same clip, 0 for the negatives: the first half of each domain's
    rows (see :func:`adapt.parts.correspondence_negatives`)."""
    t = torch.ones(b_s + b_t, dtype=torch.int64, device=device)
    t[:parts.correspondence_negatives(b_s)] = 0
    t[b_s:b_s + parts.correspondence_negatives(b_t)] = 0
    return t


def _tasks_ce(out: dict, rows: slice, verb: torch.Tensor, noun: torch.Tensor | None, second: bool = False):
    """Mean over tasks (verb, and noun when there are noun heads) of the fused logits' CE on ``rows``."""
    v, n = ("verb2", "noun2") if second else ("verb", "noun")
    ce = [losses.cross_entropy(out[v][rows], verb)]
    if out.get(n) is not None and noun is not None:
        ce.append(losses.cross_entropy(out[n][rows], noun))
    return sum(ce) / len(ce)


def compute_terms(out: dict, cfg, b_s: int, batch: dict, state: dict, active: set) -> tuple[dict, dict]:
    """The active loss terms (unweighted) and the state's writes ``{name: (idx, rows)}``: the memory-bank rows this
    step updates (:func:`apply_writes`), computed from the banks as they were.

    batch: ``y_s``, ``n_s`` (source verb / noun labels), ``y_t``, ``n_t`` (target labels, supervised target only),
    ``idx_s``, ``idx_t`` (clip indices, for the memory banks)."""
    zero = out["verb"].new_zeros(())
    terms = {t: zero for t in TERMS}
    y_s, n_s = batch["y_s"], batch.get("n_s")
    b = out["verb"].shape[0]
    if "cls" in active:
        rows = slice(parts.correspondence_negatives(b_s), b_s) if "corr" in active else slice(0, b_s)
        lab_n = n_s[rows] if n_s is not None else None
        terms["cls"] = _tasks_ce(out, rows, y_s[rows], lab_n)
        if "verb2" in out:
            terms["cls"] = terms["cls"] + _tasks_ce(out, rows, y_s[rows], lab_n, second=True)
    if "target_cls" in active:
        terms["target_cls"] = _tasks_ce(out, slice(b_s, b), batch["y_t"], batch.get("n_t"))
    if "adv" in active:
        terms["adv"] = sum(_domain_ce(d, b_s) for d in out["disc"].values())
    if "video_adv" in active:
        terms["video_adv"] = _domain_ce(out["disc_video"], b_s)
    if "frame_adv" in active:
        terms["frame_adv"] = sum(_domain_ce(d, b_s) for d in out["disc_frame"].values())
    if "relation_adv" in active and "disc_relation" in out:
        terms["relation_adv"] = sum(_domain_ce(d, b_s) for d in out["disc_relation"].values())
    if "corr" in active:
        terms["corr"] = losses.cross_entropy(out["corr"], correspondence_targets(b_s, b - b_s, y_s.device))
    video = out["video"]
    if "mmd" in active:
        mmd = losses.mmsada_mmd if cfg.mmd_kernels == "mmsada" else losses.mk_mmd
        terms["mmd"] = sum(mmd(v[:b_s], v[b_s:]) for v in video.values())
    verb_t = out["verb"][b_s:].detach()
    conf_t, pseudo_t = F.softmax(verb_t, dim=-1).max(dim=-1)
    writes = {}
    if "xmodal" in active:
        terms["xmodal"] = _cross_modal(out, cfg, b_s, batch, state)
    if "xdomain" in active:
        confident = conf_t > cfg.pl_threshold
        terms["xdomain"] = sum(losses.cross_domain_contrastive(v[b_s:], pseudo_t, confident, state[f"bank_s_{s}"],
                                                               state["bank_s_labels"], cfg.tau)
                               for s, v in video.items())
    if "xmodal" in active or "xdomain" in active:
        for s, v in video.items():  # eq. 8, written after the step
            writes[f"bank_s_{s}"] = (batch["idx_s"], losses.memory_bank_rows(state[f"bank_s_{s}"], batch["idx_s"],
                                                                             v[:b_s], cfg.bank_momentum))
            writes[f"bank_t_{s}"] = (batch["idx_t"], losses.memory_bank_rows(state[f"bank_t_{s}"], batch["idx_t"],
                                                                             v[b_s:], cfg.bank_momentum))
        writes["bank_s_labels"] = (batch["idx_s"], y_s)
        writes["bank_t_labels"] = (batch["idx_t"], torch.zeros_like(batch["idx_t"]))  # 0 = written (labels unknown)
    if "pseudo" in active:
        terms["pseudo"] = losses.pseudo_label_ce(out["verb"][b_s:], cfg.pl_threshold)
    if "attn_entropy" in active:
        ae = [parts.attentive_entropy(out["verb"], out["disc_video"])]
        if out["noun"] is not None:
            ae.append(parts.attentive_entropy(out["noun"], out["disc_video"]))
        terms["attn_entropy"] = sum(ae) / len(ae)
    if "mcd" in active:
        terms["mcd"] = losses.mcd_discrepancy(out["verb"][b_s:], out["verb2"][b_s:])
    return terms, writes


def _cross_modal(out: dict, cfg, b_s: int, batch: dict, state: dict) -> torch.Tensor:
    """Kim et al. eq. 7's ``L_mo^s + L_mo^t``: per domain, InfoNCE between the streams' projections of the same
    clips (both directions averaged), negatives the other clips of the batch and, with ``xmodal_bank``, the
    domain's memory-bank entries of the other modality (projected by h; the batch's own slots and unwritten slots
    left out)."""
    z = out["proj"]
    names = list(z)
    pairs = [(a, c) for i, a in enumerate(names) for c in names[i + 1:]]
    total = 0.0
    for dom, rows, idx in (("s", slice(0, b_s), batch["idx_s"]), ("t", slice(b_s, None), batch["idx_t"])):
        mask = None
        if cfg.xmodal_bank:
            written = state[f"bank_{dom}_labels"] >= 0
            mask = written.index_fill(0, idx.to(torch.int64), False)
        per_pair = []
        for a, c in pairs:
            neg_a = out["proj_bank"][f"bank_{dom}_{a}"] if cfg.xmodal_bank else None
            neg_c = out["proj_bank"][f"bank_{dom}_{c}"] if cfg.xmodal_bank else None
            per_pair.append(losses.cross_modal_contrastive(z[a][rows], z[c][rows], cfg.tau, negatives_a=neg_a,
                                                           negatives_b=neg_c, neg_mask=mask))
        total = total + sum(per_pair) / len(per_pair)
    return total


def bank_inputs(state: dict, cfg) -> dict | None:
    """The memory banks the model projects for the cross-modal loss's negatives, or None."""
    if not (cfg.w_xmodal and cfg.xmodal_bank):
        return None
    return {k: v for k, v in state.items() if k.startswith("bank_") and not k.endswith("_labels")}


def apply_writes(state: dict, writes: dict) -> None:
    """Write the rows a step computed into the state (memory banks), in place: ``state[name][k, idx[k]] =
    rows[k]`` for each run ``k`` of the stack.

    Done by the trainer after all the step's passes (their backward passes read the banks as they were), outside
    vmap.  With a repeated index the last row written wins (``index_put_`` on the CPU), the same for a run alone
    or stacked.

    Shapes: state[name] (K, N, ...), writes[name] = (idx (K, B) int64, rows (K, B, ...))."""
    for name, (idx, rows) in writes.items():
        bank = state[name]
        runs = torch.arange(bank.shape[0], device=bank.device)[:, None]
        bank.index_put_((runs, idx.to(torch.int64)), rows.detach().to(bank.dtype))


def initial_state(cfg, streams, n_s: int, n_t: int, width: int, device) -> dict:
    """Kim et al.'s memory banks, one per domain and stream, zero (labels -1 = not written yet), or an empty dict."""
    if not (cfg.w_xdomain or cfg.w_xmodal):
        return {}
    state = {}
    for s in streams:
        state[f"bank_s_{s}"] = torch.zeros(n_s, width, device=device)
        state[f"bank_t_{s}"] = torch.zeros(n_t, width, device=device)
    state["bank_s_labels"] = torch.full((n_s,), -1, dtype=torch.long, device=device)
    state["bank_t_labels"] = torch.full((n_t,), -1, dtype=torch.long, device=device)
    return state
