"""The training objective: each loss term of the methods, computed from the model's outputs on a batch of
``B_s`` source clips followed by ``B_t`` target clips.

``L = lambda_y L_y + sum_term lambda_term L_term`` where the alignment terms are active from stage 2 on
(MM-SADA's two-stage schedule) and adversarial terms learn through gradient reversal (the GRL coefficient
follows ``(2 / (1 + exp(-10 p)) - 1)``, MM-SADA / DANN).  Terms (unweighted, each a scalar):

=============  ============================================================================  ==================
term           loss                                                                          weight (setting)
=============  ============================================================================  ==================
cls            CE of the fused source logits (verb, + noun for EPIC-100) (MM-SADA eq. 1)      w_cls (lambda_y)
target_cls     CE on the target's labels: the supervised-target upper bound only             w_target_cls
adv            mean over modalities of the discriminator CE (MM-SADA eq. 2)                  w_adv (lambda_d)
video_adv      CE of the discriminator on concat(v) (DANN; CIA lambda_vd; TA3N video)         w_video_adv
frame_adv      CE of per-modality frame discriminators (CIA lambda_fd; TA3N frame)            w_frame_adv
relation_adv   CE of the TRN relation discriminators (TA3N)                                  w_relation_adv
corr           MM-SADA eq. 3 correspondence CE, both domains, negatives in-domain              w_corr (lambda_c)
mmd            sum over modalities of MK-MMD(v_s, v_t) (DAN)                                 w_mmd
xmodal         Kim et al. eq. 3: cross-modal InfoNCE per domain via the projection head        w_xmodal
xdomain        Kim et al. eq. 5-6: cross-domain contrastive per modality with memory banks     w_xdomain
pseudo         CE on confident target pseudo-labels                                          w_pseudo
attn_entropy   TA3N eq. 7: (1 + H(d)) H(y)                                                   w_attn_entropy
mcd            MCD discrepancy between the two classifiers on the target                      w_mcd
=============  ============================================================================  ==================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapt import losses, parts

TERMS = ("cls", "target_cls", "adv", "video_adv", "frame_adv", "relation_adv", "corr", "mmd", "xmodal", "xdomain",
         "pseudo", "attn_entropy", "mcd")
ALIGNMENT = {"adv", "video_adv", "frame_adv", "relation_adv", "mmd", "xdomain", "pseudo", "attn_entropy", "mcd"}


def _domain_ce(logits: torch.Tensor, b_s: int) -> torch.Tensor:
    """Discriminator CE with labels 0 for the first b_s rows (source) and 1 for the rest (target)."""
    labels = (torch.arange(logits.shape[0], device=logits.device) >= b_s).long()
    if logits.dim() == 3:  # (B, T, 2): one label per clip, repeated over units
        labels = labels[:, None].expand(logits.shape[:2])
    return losses.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))


def _mean(values) -> torch.Tensor:
    values = list(values)
    return sum(values) / len(values)


def compute_terms(out: dict, cfg, b_s: int, y_s: torch.Tensor, n_s: torch.Tensor | None, y_t: torch.Tensor,
                  idx_s: torch.Tensor, idx_t: torch.Tensor, state: dict) -> tuple[dict, dict]:
    """All active loss terms (unweighted) and the state's writes: ``{name: (idx, rows)}``, the memory-bank rows
    this step updates (:func:`apply_writes`), computed from the banks as they were.  Shapes: see the module
    docstring."""
    zero = out["verb"].new_zeros(())
    terms = {t: zero for t in TERMS}
    verb_s, verb_t = out["verb"][:b_s], out["verb"][b_s:]
    if cfg.w_cls:
        terms["cls"] = losses.cross_entropy(verb_s, y_s)
        if out["noun"] is not None:
            terms["cls"] = terms["cls"] + losses.cross_entropy(out["noun"][:b_s], n_s)
        if "verb2" in out:
            terms["cls"] = terms["cls"] + losses.cross_entropy(out["verb2"][:b_s], y_s)
    if cfg.w_target_cls:
        terms["target_cls"] = losses.cross_entropy(verb_t, y_t)
    if "disc" in out:
        terms["adv"] = _mean(_domain_ce(d, b_s) for d in out["disc"].values())
    if "disc_video" in out and cfg.w_video_adv:
        terms["video_adv"] = _domain_ce(out["disc_video"], b_s)
    if "disc_frame" in out and cfg.w_frame_adv:
        terms["frame_adv"] = _mean(_domain_ce(d, b_s) for d in out["disc_frame"].values())
    if "disc_relation" in out:
        terms["relation_adv"] = _mean(_domain_ce(d, b_s) for d in out["disc_relation"].values())
    video = out["video"]
    if "corr" in out:
        terms["corr"] = losses.cross_entropy(*out["corr"])
    if cfg.w_mmd:
        terms["mmd"] = sum(losses.mk_mmd(v[:b_s], v[b_s:]) for v in video.values())
    if cfg.w_xmodal and len(video) > 1:
        z = out["proj"]
        names = list(z)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        terms["xmodal"] = _mean(losses.cross_modal_contrastive(z[a][sl], z[b][sl], cfg.tau)
                                for a, b in pairs for sl in (slice(0, b_s), slice(b_s, None)))
    writes = {}
    if cfg.w_xdomain:
        conf_t, pseudo_t = F.softmax(verb_t.detach(), dim=-1).max(dim=-1)
        xd = []
        labels_t = torch.where(conf_t > cfg.pl_threshold, pseudo_t, torch.full_like(pseudo_t, -1))
        for m, v in video.items():
            fs, ft = v[:b_s], v[b_s:]
            xd.append(losses.cross_domain_contrastive(fs, y_s, ft, pseudo_t, conf_t, state[f"bank_s_{m}"],
                                                      state["bank_s_labels"], cfg.pl_threshold, cfg.tau, "target"))
            xd.append(losses.cross_domain_contrastive(fs, y_s, ft, pseudo_t, conf_t, state[f"bank_t_{m}"],
                                                      state["bank_t_labels"], cfg.pl_threshold, cfg.tau, "source"))
            writes[f"bank_s_{m}"] = (idx_s, losses.memory_bank_rows(state[f"bank_s_{m}"], idx_s, fs, cfg.bank_momentum))
            writes[f"bank_t_{m}"] = (idx_t, losses.memory_bank_rows(state[f"bank_t_{m}"], idx_t, ft, cfg.bank_momentum))
        writes["bank_s_labels"] = (idx_s, y_s)
        writes["bank_t_labels"] = (idx_t, labels_t)
        terms["xdomain"] = _mean(xd)
    if cfg.w_pseudo:
        terms["pseudo"] = losses.pseudo_label_ce(verb_t, cfg.pl_threshold)
    if cfg.w_attn_entropy and "disc_video" in out:
        terms["attn_entropy"] = parts.attentive_entropy(out["verb"], out["disc_video"])
    if "verb2" in out:
        terms["mcd"] = losses.mcd_discrepancy(verb_t, out["verb2"][b_s:])
    return terms, writes


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


def initial_state(cfg, modalities, n_s: int, n_t: int, device) -> dict:
    """Memory banks of Kim et al. (one per domain and modality; labels -1 = empty), or an empty dict."""
    if not cfg.w_xdomain:
        return {}
    state = {}
    for m in modalities:
        state[f"bank_s_{m}"] = torch.zeros(n_s, cfg.embed_dim, device=device)
        state[f"bank_t_{m}"] = torch.zeros(n_t, cfg.embed_dim, device=device)
    state["bank_s_labels"] = torch.full((n_s,), -1, dtype=torch.long, device=device)
    state["bank_t_labels"] = torch.full((n_t,), -1, dtype=torch.long, device=device)
    return state
